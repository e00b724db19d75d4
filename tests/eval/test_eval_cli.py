"""End to end: a trained tiny GPT evaluated inside training (eval.tasks) and by `bigmodel eval`."""

import json
import pathlib
import random

import pytest

from bigmodel import cli, metrics

from conftest import GPT_TINY, SMALL_CORPUS

QUESTIONS = 24


def write_questions(path: pathlib.Path) -> None:
    """Real lines of Python against random printable noise of the same length: a trained model tells them apart."""
    rng = random.Random(0)
    lines = [ln.strip() for f in sorted(pathlib.Path(SMALL_CORPUS).parent.glob("*.py"))[:5]
             for ln in f.read_text().splitlines() if 20 <= len(ln.strip()) <= 60 and ln.strip().isascii()]
    rows = []
    for i, line in enumerate(rng.sample(lines, QUESTIONS)):
        noise = ["".join(rng.choice("qzjxkvQZJXKV{}|~^`$@") for _ in line) for _ in range(3)]
        label = i % 4
        endings = noise[:label] + [line] + noise[label:]
        rows.append({"ctx": "# Python source", "endings": endings, "label": str(label)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("eval")
    write_questions(root / "code_mc.jsonl")
    (root / "held_out.txt").write_text((pathlib.Path(SMALL_CORPUS).parent / "errors.py").read_text())
    workdir = root / "run"
    overrides = [f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2", f"data.data_dir={data_dir}",
                 "log.progress=false", "train.steps=40", "eval.every=20", "checkpoint.every=20",
                 f"eval.tasks=('mc:{root / 'code_mc.jsonl'}',)"]
    args = ["train", "--config", GPT_TINY + ":tiny", "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides]
    assert cli.main(args) == 0
    return root, workdir


@pytest.mark.slow
def test_tasks_run_inside_training(trained):
    _, workdir = trained
    rows = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "eval_code_mc_acc" in r]
    assert [r["step"] for r in rows] == [20, 40]
    assert all(r["eval_code_mc_questions"] == QUESTIONS for r in rows)
    saved = json.loads((workdir / "eval" / "step_40.json").read_text())
    assert saved["step"] == 40 and saved["tasks"]["code_mc"]["acc"] == rows[-1]["eval_code_mc_acc"]


@pytest.mark.slow
def test_eval_command(trained, capsys):
    root, workdir = trained
    capsys.readouterr()
    code = cli.main(["eval", "--workdir", str(workdir), "--tasks", "validation", f"text:{root / 'held_out.txt'}",
                     f"mc:{root / 'code_mc.jsonl'}"])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((workdir / "eval" / "step_40.json").read_text())
    assert saved["tasks"] == printed and saved["checkpoint"].endswith("checkpoints/40")
    summary = json.loads((workdir / "summary.json").read_text())
    # The run's own evaluation, repeated from the checkpoint, gives the trainer's figures.
    assert printed["validation"]["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert printed["validation"]["bits_per_byte"] == pytest.approx(summary["eval_bits_per_byte"], rel=1e-5)
    mc = printed["code_mc"]
    assert mc["questions"] == QUESTIONS and mc["acc"] >= 0.9 and mc["acc_norm"] >= 0.9  # chance is 0.25
    rows = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert mc["acc"] == rows[-1]["eval_code_mc_acc"]  # the same checkpoint scored the same way in training
    text = printed["held_out"]
    assert text["documents"] == 1 and text["bytes"] == text["tokens"]  # byte-level tokenizer
    # Python source like the validation split, scored document by document: close to its bits per byte, and far
    # below a uniform guess over 257 ids (8.006 bits).
    assert abs(text["bits_per_byte"] - printed["validation"]["bits_per_byte"]) < 0.5 and text["bits_per_byte"] < 7
    assert text["perplexity"] == pytest.approx(2 ** text["bits_per_byte"])  # one token per byte


@pytest.mark.slow
def test_eval_errors_are_one_line(trained, tmp_path, capsys):
    _, workdir = trained
    assert cli.main(["eval", "--workdir", str(workdir), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown evaluation task 'hellaswag'" in err
    assert cli.main(["eval", "--workdir", str(tmp_path), "--tasks", "validation"]) == 2
    assert "has no config.json" in capsys.readouterr().err


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


def write_harness_tasks(root: pathlib.Path) -> pathlib.Path:
    """Three lm_eval tasks over local files: multiple choice, rolling perplexity, generation."""
    tasks = root / "harness_tasks"
    tasks.mkdir(exist_ok=True)
    (root / "held_out.jsonl").write_text(json.dumps({"text": (root / "held_out.txt").read_text()}) + "\n")
    (root / "complete.jsonl").write_text("".join(json.dumps({"ctx": c, "answer": a}) + "\n" for c, a in [
        ("import os\nimport ", "sys"), ("def __init__(self", ", ")]))
    (tasks / "local_mc.yaml").write_text(TASK_YAML.format(name="local_mc", data=root / "code_mc.jsonl") + """\
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tasks / "local_text.yaml").write_text(TASK_YAML.format(name="local_text", data=root / "held_out.jsonl") + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""")
    (tasks / "local_gen.yaml").write_text(TASK_YAML.format(name="local_gen", data=root / "complete.jsonl") + """\
output_type: generate_until
doc_to_text: "{{ctx}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
""")
    return tasks


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.slow
def test_lm_evaluation_harness_adapter(trained, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed: pip install "
                                          "'bigmodel[eval]'")
    from bigmodel.eval import harness, scoring

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task files are local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, workdir = trained
    include = write_harness_tasks(root)
    code = cli.main(["eval", "--workdir", str(workdir), "--tasks", f"mc:{root / 'code_mc.jsonl'}",
                     f"text:{root / 'held_out.txt'}", "--harness", "local_mc", "local_text", "local_gen",
                     "--harness_include", str(include)])
    assert code == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    # lm_eval's own metric code, fed by the adapter, agrees with bigmodel's evaluators on the same files.
    assert out["local_mc"]["acc"] == out["code_mc"]["acc"] and out["local_mc"]["acc_norm"] == out["code_mc"]["acc_norm"]
    assert out["local_text"]["bits_per_byte"] == pytest.approx(out["held_out"]["bits_per_byte"], rel=1e-6)
    assert 0 <= out["local_gen"]["exact_match"] <= 1

    # Generation is greedy: scoring what it produced finds every token the argmax.
    lm = harness.BigmodelLM(model=scoring.load(str(workdir), progress=False))
    prompts = ["import os\nimport", "class Message:\n    def"]  # no trailing space: the model writes it
    texts = lm.generate_until([Request(p, {"until": ["\n\n"], "max_gen_toks": 10}) for p in prompts])
    assert all(0 < len(t) <= 10 for t in texts)  # one byte a token
    scored = lm.loglikelihood([Request(p, t) for p, t in zip(prompts, texts)])
    assert all(greedy and logprob < 0 for logprob, greedy in scored)
    rolling = lm.loglikelihood_rolling([Request(prompts[0] + texts[0])])
    assert rolling[0] < scored[0][0] < 0  # the whole text is less likely than its continuation alone
