"""The seq2seq experiment end to end: ':tiny' trains through the CLI, decoding evaluation, BLEU, sharding."""

import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigmodel import cli, config as config_lib, metrics, seq2seq_eval, sharding, train
from bigmodel.data import seq2seq

from conftest import REPO

EXPERIMENT = str(REPO / "experiments" / "transformer_seq2seq.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "seq2seq_tiny"
    args = ["train", "--config", EXPERIMENT + ":tiny", "--workdir", str(workdir), "--config.log.progress=false"]
    assert cli.main(args) == 0
    return workdir


@pytest.mark.slow
def test_tiny_trains_and_reports_exact_match(tiny_run):
    rows = metrics.read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and "tokens_per_s" in r for r in rows)
    assert rows[0]["loss"] < math.log(16) + 0.5  # about a uniform guess over the vocabulary at the start
    last = rows[-1]
    assert 0.0 <= last["eval_exact_match"] <= 1.0 and math.isfinite(last["eval_loss"])
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["eval_exact_match"] == pytest.approx(last["eval_exact_match"])
    assert summary["tokens"] == 6 * 16 * 4  # steps * batch * target_len
    assert summary["dataset"] == "addition/max_digits=2" and summary["bleu_tokenize"] == "char"


@pytest.mark.slow
def test_evaluate_command_decodes_greedy_and_beam(tiny_run, capsys):
    assert cli.main(["evaluate-seq2seq", "--workdir", str(tiny_run), "--beam_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "beam (size 2)" in out and "BLEU" in out
    saved = json.loads((tiny_run / "seq2seq_eval.json").read_text())
    assert saved["step"] == 6 and saved["examples"] == 16
    # Host-side greedy decoding agrees with the trainer's on-device exact match.
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert saved["greedy_exact_match"] == pytest.approx(summary["eval_exact_match"])
    for key in ("greedy_bleu", "beam_bleu"):
        assert 0.0 <= saved[key] <= 100.0
    assert len(saved["beam_examples"]) == 3 and saved["beam_examples"][0]["source"].count("+") == 1


def test_bleu_values():
    refs = ["the cat sat on a mat", "a dog barked"]
    assert seq2seq_eval.corpus_bleu(refs, refs) == pytest.approx(100.0)
    # Unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3, equal lengths (no brevity penalty).
    want = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert seq2seq_eval.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(want)
    assert want == pytest.approx(53.7285, abs=1e-4)
    # Short answers scored per character: right ones are 100, a wrong digit costs.
    assert seq2seq_eval.corpus_bleu(["12", "7"], ["12", "7"], tokenize="char") == pytest.approx(100.0)
    assert seq2seq_eval.corpus_bleu(["13", "7"], ["12", "7"], tokenize="char") < 100.0
    assert seq2seq_eval.until_eos([5, 7, 2, 9, 0], eos=2) == [5, 7, 2]


def run_steps(mesh_sizes, steps=3):
    config = config_lib.load(EXPERIMENT + ":tiny")
    data = seq2seq.build(config, (0, 1))
    batches = list(zip(range(steps), data.train))
    mesh, rules, module, task, tx, schedule = train.setup_model(config, mesh_sizes)
    state, shardings, _ = train.sharded_init(train.init_fn(module, task, tx, batches[0][1]), jax.random.key(0),
                                             mesh, rules)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(train.make_train_step(module, task, tx, schedule, 1),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        for _, batch in batches:
            state, mets = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
            losses.append(float(mets["loss"][0] / mets["loss"][1]))
    return losses


@pytest.mark.slow
def test_losses_equal_across_meshes():
    ref = run_steps(sharding.axis_sizes(data=8))
    other = run_steps(sharding.axis_sizes(data=2, fsdp=2, tensor=2))
    assert ref[2] < ref[0]  # it trains
    np.testing.assert_allclose(other, ref, rtol=1e-5)
