"""End to end: the ':tiny' GPT trains, logs, checkpoints, resumes exactly and samples."""

import json
import pathlib

import pytest
import tqdm
from tensorboard.backend.event_processing import event_accumulator

from bigmodel import checkpoint, cli, exit_codes, generate, metrics, train

from conftest import GPT_TINY


def train_cli(workdir, overrides, *extra):
    args = ["train", "--config", GPT_TINY + ":tiny", "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in overrides] + list(extra)
    return cli.main(args)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    from conftest import SMALL_CORPUS

    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    overrides = [f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2", f"data.data_dir={data_dir}",
                 "log.progress=false", "train.steps=40", "eval.every=20", "checkpoint.every=20"]
    assert train_cli(workdir, overrides) == 0
    return workdir


@pytest.mark.slow
def test_tiny_trains_and_loss_falls(tiny_run):
    rows = metrics.read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for key in ("loss", "learning_rate", "tokens_per_s", "mfu", "grad_norm", "bits_per_byte"):
        assert all(key in r for r in rows), key
    assert rows[0]["loss"] > 4.5  # near ln(257) = 5.55 at the start
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_loss"] < 5.55 - 1.0  # well below a uniform guess over 257 ids
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["step"] == 40 and summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert summary["tokens"] == 40 * 8 * 64
    assert 0 < rows[-1]["mfu"] < 1


@pytest.mark.slow
def test_workdir_contents(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["train"]["steps"] == 40 and config["model"]["size"] == "nano"
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert info["device_count"] == 8 and info["jax"] and info["git_revision"]
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["20", "40"]
    saved = json.loads((tiny_run / "tokenizer" / "bigmodel_tokenizer.json").read_text())
    assert saved == {"kind": "byte", "vocab_size": 257, "eod_id": 256}


@pytest.mark.slow
def test_tensorboard_has_the_curves(tiny_run):
    acc = event_accumulator.EventAccumulator(str(tiny_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_s", "train/mfu", "eval/loss",
            "eval/bits_per_byte"} <= tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    rows = metrics.read_jsonl(tiny_run / "metrics.jsonl")
    assert losses == pytest.approx([r["loss"] for r in rows])


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 20])  # 20 packed sequences: the stop at step 6 falls inside a window
def test_stop_and_resume_matches_uninterrupted(tmp_path, tiny_overrides, window):
    common = tiny_overrides + [f"data.shuffle_window={window}", "optim.decay_steps=12", "log.every=2", "eval.every=4",
                               "checkpoint.every=4"]
    assert train_cli(tmp_path / "straight", common + ["train.steps=12"]) == 0
    assert train_cli(tmp_path / "stopped", common + ["train.steps=6"]) == 0
    assert train_cli(tmp_path / "stopped", common + ["train.steps=12"]) == 0
    straight = metrics.read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    resumed = metrics.read_jsonl(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(2, 13, 2))
    for a, b in zip(straight, resumed):
        for key in ("loss", "grad_norm", "learning_rate", "accuracy"):
            assert a[key] == b[key], (a["step"], key)  # bitwise on CPU
        if "eval_loss" in a:
            assert a["eval_loss"] == b["eval_loss"], a["step"]
    # The interrupted run also evaluated where it stopped (step 6): every run ends with an evaluation.
    assert [r["step"] for r in resumed if "eval_loss" in r] == [4, 6, 8, 12]


@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_nothing(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.steps=5", "eval.every=5"]
    assert train_cli(tmp_path, overrides) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    assert train_cli(tmp_path, overrides) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_an_interrupted_run_closes_what_it_opened_and_resumes(tmp_path, tiny_overrides, monkeypatch):
    closed = []

    def recording(cls, name, closes_it=lambda obj: True):
        original = cls.close
        monkeypatch.setattr(cls, "close", lambda self: (closes_it(self) and closed.append(name), original(self)))

    recording(checkpoint.Checkpointer, "checkpointer")
    recording(metrics.MetricsWriter, "writer")
    recording(tqdm.tqdm, "bar", lambda bar: bar.total == 6)  # the run's, not those of the data preparation
    overrides = tiny_overrides + ["train.steps=6", "log.every=2", "eval.every=4", "checkpoint.every=2",
                                  "checkpoint.async_save=true"]
    with monkeypatch.context() as m:
        m.setattr(train, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C at step 4's eval
        assert train_cli(tmp_path, overrides) == exit_codes.INTERRUPTED  # one line, no traceback
    assert list(dict.fromkeys(closed)) == ["bar", "writer", "checkpointer"]  # each closed, in this order first
    # Closing finished the asynchronous save of step 2; the row of step 4 was never written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [2]
    assert train_cli(tmp_path, overrides) == 0
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [2, 4, 6]


@pytest.mark.slow
def test_generate_samples_from_the_checkpoint(tiny_run, capsys, monkeypatch):
    # The run's saved tokenizer is used: the dataset is not rebuilt.
    monkeypatch.setattr(generate.pipeline, "text_source", lambda *a: pytest.fail("generate rebuilt the dataset"))
    greedy = generate.generate_from_workdir(str(tiny_run), "def ", max_tokens=30, temperature=0.0)
    top1 = generate.generate_from_workdir(str(tiny_run), "def ", max_tokens=30, temperature=1.0, top_k=1, seed=5)
    assert greedy.startswith("def ") and len(greedy) > 4
    assert top1 == greedy  # top-1 sampling is greedy decoding
    a = generate.generate_from_workdir(str(tiny_run), "def ", max_tokens=30, temperature=1.0, top_k=0, seed=1)
    b = generate.generate_from_workdir(str(tiny_run), "def ", max_tokens=30, temperature=1.0, top_k=0, seed=1)
    assert a == b
    assert cli.main(["generate", "--workdir", str(tiny_run), "--prompt", "import ", "--max_tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("import ")


def test_bad_override_exits_with_a_message(tmp_path, capsys):
    assert train_cli(tmp_path, ["train.stepss=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'config.train.stepss'" in err and "did you mean 'steps'" in err
    assert not pathlib.Path(tmp_path / "checkpoints").exists()


def test_vocabulary_too_small_for_the_tokenizer(tmp_path, tiny_overrides, capsys):
    assert train_cli(tmp_path, tiny_overrides + ["model.vocab_size=128"]) == 2
    assert "tokenizer has 257 ids but config.model.vocab_size=128" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_cli_batches_stops_and_matches_the_recompute_path(tiny_run, capsys):
    argv = ["generate", "--workdir", str(tiny_run), "--prompt", "def ", "--prompt", "import os\n", "--max_tokens",
            "24", "--temperature", "0"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def ", "import os\n"]
    assert all(r["text"].startswith(r["prompt"]) for r in rows)
    assert cli.main([*argv, "--no_cache"]) == 0  # the recompute path, prompt by prompt
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    continuation = rows[0]["text"][len("def "):]
    assert len(continuation) >= 6
    stop = continuation[4:6]
    text = generate.generate_from_workdir(str(tiny_run), "def ", max_tokens=24, temperature=0.0, stop=[stop])
    assert text == "def " + continuation[:continuation.find(stop)]
