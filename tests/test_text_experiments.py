"""BERT pre-training and fine-tuning, text classification and the LSTM LM through `bigmodel train`."""

import json
import math

import flax
import jax
import numpy as np
import pytest

from bigmodel import checkpoint, cli, config as config_lib, metrics, sharding, train

from conftest import REPO, SMALL_CORPUS

pytestmark = pytest.mark.slow  # every test here trains end to end

BERT_STDLIB = str(REPO / "experiments" / "bert_stdlib.py")
BERT_CLASSIFY = str(REPO / "experiments" / "bert_classify.py")
LSTM_STDLIB = str(REPO / "experiments" / "lstm_stdlib.py")


def train_cli(config, workdir, *overrides):
    args = ["train", "--config", config + ":tiny", "--workdir", str(workdir), "--config.log.progress=false"]
    return cli.main(args + [f"--config.{o}" for o in overrides])


def finite_rows(workdir, *keys):
    rows = metrics.read_jsonl(workdir / "metrics.jsonl")
    for key in ("loss", "learning_rate", "mfu", *keys):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    return rows


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("runs") / "bert"
    assert train_cli(BERT_STDLIB, workdir, f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2",
                     f"data.data_dir={data_dir}") == 0
    return workdir


def test_bert_pretraining_logs_mlm_metrics(bert_run):
    rows = finite_rows(bert_run, "accuracy", "tokens_per_s")
    assert [r["step"] for r in rows] == [5, 10]
    assert 0 < rows[-1]["loss"] < 1.2 * math.log(384)  # about a uniform guess at this size, not diverging
    summary = json.loads((bert_run / "summary.json").read_text())
    assert summary["tokens"] == 10 * 8 * 32 and 0 <= summary["eval_accuracy"] <= 1
    assert math.isfinite(summary["eval_loss"]) and summary["unigram_loss"] > 2


def test_fine_tuning_copies_the_pretrained_encoder(bert_run, tmp_path, data_dir, capsys):
    overrides = [f"data.data_dir={data_dir}", f"init.workdir={bert_run}"]
    assert train_cli(BERT_CLASSIFY, tmp_path, *overrides) == 0
    out = capsys.readouterr().out
    assert f"initialised bert from {bert_run / 'checkpoints' / '10'}: copied 20 arrays; " \
           "left fresh: bert/pooler/bias, bert/pooler/kernel; not in this model: none" in out
    rows = finite_rows(tmp_path, "accuracy", "examples_per_s", "eval_accuracy")
    assert [r["step"] for r in rows] == [5, 10]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["majority_accuracy"] == pytest.approx(0.125) and len(summary["classes"]) == 8
    assert sum(summary["eval_class_counts"].values()) == 64

    # The classifier's state at step 0, built as the trainer builds it, holds the saved encoder.
    config = config_lib.load(BERT_CLASSIFY + ":tiny", overrides)
    mesh, rules, module, task, tx, _ = train.setup_model(config, sharding.axis_sizes(data=8))
    dummy = {"inputs": np.zeros((8, config.data.seq_len), np.int32)}
    state, shardings, _ = train.sharded_init(train.init_fn(module, task, tx, dummy), jax.random.key(0), mesh, rules)
    fresh = jax.device_get(state.params)
    state = train.load_pretrained(state, shardings, str(bert_run), ("bert",))
    saved = checkpoint.Checkpointer(bert_run, keep=1, async_save=False)
    pretrained = flax.traverse_util.flatten_dict(saved.restore_raw(10)["params"]["bert"], sep="/")
    saved.close()
    loaded = flax.traverse_util.flatten_dict(jax.device_get(state.params["bert"]), sep="/")
    assert set(loaded) - set(pretrained) == {"pooler/kernel", "pooler/bias"}
    for key, value in pretrained.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    np.testing.assert_array_equal(loaded["pooler/kernel"], fresh["bert"]["pooler"]["kernel"])
    np.testing.assert_array_equal(jax.device_get(state.params["head"]["kernel"]), fresh["head"]["kernel"])


def test_fine_tuning_refuses_mismatched_shapes(bert_run, tmp_path, data_dir, capsys):
    assert train_cli(BERT_CLASSIFY, tmp_path, f"data.data_dir={data_dir}", f"init.workdir={bert_run}",
                     "model.d_model=64") == 2
    err = capsys.readouterr().err
    assert "parameters 'bert' of" in err and "do not match this model's shapes" in err
    assert "(32,) vs (64,)" in err or "(32, 32) vs (64, 64)" in err or "vs (384, 64)" in err


def test_lstm_language_model_reports_bits_per_byte(tmp_path, data_dir):
    assert train_cli(LSTM_STDLIB, tmp_path, f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2",
                     f"data.data_dir={data_dir}") == 0
    rows = finite_rows(tmp_path, "bits_per_byte", "tokens_per_s")
    evals = [r["eval_bits_per_byte"] for r in rows if "eval_bits_per_byte" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] and evals[-1] < 8  # 8 bits: a uniform guess over bytes
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model"]["name"], config["model"]["cell"], config["task"]) == ("rnn", "lstm", "lm")
