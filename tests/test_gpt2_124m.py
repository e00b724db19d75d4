"""experiments/gpt2_124m.py ':tiny' end to end: a parquet and a jsonl corpus written from the standard library,
a BPE trained on them, two stores made by `bigmodel prepare`, trained as a 2:1 mixture with per-set evaluation;
stopping and resuming gives the uninterrupted run's numbers."""

import glob
import json
import os
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing import event_accumulator

from bigmodel import cli, metrics
from bigmodel.data import tokenizers

from conftest import REPO

EXPERIMENT = str(REPO / "experiments" / "gpt2_124m.py")


def modules(pattern):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], pattern)))
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    code, email = modules("json/*.py") + modules("http/*.py"), modules("email/*.py")
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"content": code}), root / "parquet" / "code.parquet", row_group_size=4)
    (root / "jsonl").mkdir()
    with open(root / "jsonl" / "email.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in email)
    tok = tokenizers.train_bpe(code + email, 512, root / "bpe" / "tokenizer.json")
    common = ["--tokenizer", f"hf:{tok.path}", "--validation-fraction", "0.2", "--processes", "1", "--quiet"]
    out = {name: root / "stores" / name for name in ("tiny_parquet", "tiny_jsonl")}
    assert cli.main(["prepare", "--source", str(root / "parquet"), "--format", "parquet", "--text-key", "content",
                     "--out", str(out["tiny_parquet"]), *common]) == 0
    assert cli.main(["prepare", "--source", str(root / "jsonl" / "*.jsonl"), "--format", "jsonl",
                     "--out", str(out["tiny_jsonl"]), *common]) == 0
    return out


def train(workdir, stores, *overrides):
    sources = repr(tuple(str(p) for p in stores.values()))
    args = ["train", "--config", EXPERIMENT + ":tiny", "--workdir", str(workdir), f"--config.data.sources={sources}",
            f"--config.eval.sets={sources}", "--config.log.progress=false"]
    return cli.main(args + [f"--config.{o}" for o in overrides])


@pytest.mark.slow
def test_tiny_trains_on_a_mixture_and_reports_each_set(tmp_path, stores):
    assert train(tmp_path, stores) == 0
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in stores:
        for key in ("loss", "bits_per_byte"):
            assert 0 < summary[f"eval_{name}/{key}"] < 10, (name, key)
            assert all(f"eval_{name}/{key}" in r for r in rows if "eval_loss" in r)
    # The run's own evaluation is the first store's validation split: the same numbers as that set.
    assert summary["eval_loss"] == summary["eval_tiny_parquet/loss"]
    assert summary["eval_tiny_parquet/loss"] != summary["eval_tiny_jsonl/loss"]
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"eval/tiny_jsonl/loss", "eval/tiny_jsonl/bits_per_byte"} <= set(acc.Tags()["scalars"])
    saved = tokenizers.load(tmp_path)
    assert saved.vocab_size == 512 and tokenizers.file_sha256(saved.path) == json.loads(
        (stores["tiny_jsonl"] / "manifest.json").read_text())["tokenizer"]["sha256"]


@pytest.mark.slow
def test_stop_and_resume_on_a_mixture_matches_uninterrupted(tmp_path, stores):
    common = ["optim.decay_steps=12", "log.every=2", "eval.every=4", "checkpoint.every=4"]
    assert train(tmp_path / "straight", stores, *common, "train.steps=12") == 0
    assert train(tmp_path / "stopped", stores, *common, "train.steps=6") == 0
    assert train(tmp_path / "stopped", stores, *common, "train.steps=12") == 0
    straight = metrics.read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    resumed = metrics.read_jsonl(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(2, 13, 2))
    for a, b in zip(straight, resumed):
        for key in ("loss", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)  # bitwise on CPU
        if "eval_loss" in a:  # (the stopped run also evaluated at its last step, 6)
            assert (a["eval_loss"], a["eval_tiny_jsonl/loss"]) == (b["eval_loss"], b["eval_tiny_jsonl/loss"])
