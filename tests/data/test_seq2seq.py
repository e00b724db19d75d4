"""Seq2seq data: algorithmic problems, the character vocabulary, batches, process rows, resume, TFDS translation."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel import config as config_lib
from bigmodel.config import ConfigError
from bigmodel.data import seq2seq, tokenizers

from conftest import REPO

EXPERIMENT = str(REPO / "experiments" / "transformer_seq2seq.py")


def tiny_config(*overrides):
    return config_lib.load(EXPERIMENT + ":tiny", list(overrides))


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("name, check", [
    ("addition", lambda s, t: sum(map(int, s.split("+"))) == int(t) and str(int(t)) == t),
    ("reverse", lambda s, t: t == s[::-1]),
    ("sort", lambda s, t: t == "".join(sorted(s))),
])
def test_problems_are_right_and_reproducible_from_their_index(name, check):
    pairs = [seq2seq.train_problem(name, 7, i, 4, 0.05) for i in range(300)]
    assert all(check(s, t) for s, t in pairs)
    assert pairs == [seq2seq.train_problem(name, 7, i, 4, 0.05) for i in range(300)]
    assert pairs != [seq2seq.train_problem(name, 8, i, 4, 0.05) for i in range(300)]
    longest_source, longest_target = seq2seq.problem_lengths(name, 4)
    assert max(len(s) for s, _ in pairs) == longest_source
    assert max(len(t) for _, t in pairs) + 1 == longest_target  # + EOS
    # Every operand length occurs: short problems are not starved.
    assert {len(s.split("+")[0]) for s, _ in pairs} == {1, 2, 3, 4}


def test_data_is_deterministic():
    a, b = seq2seq.build(tiny_config(), (0, 1)), seq2seq.build(tiny_config(), (0, 1))
    assert_batches_equal(take(a.train, 3), take(b.train, 3))
    assert_batches_equal(list(a.eval_batches()), list(b.eval_batches()))
    assert_batches_equal(list(a.eval_batches()), list(a.eval_batches()))
    other = seq2seq.build(tiny_config("seed=1"), (0, 1))
    assert not np.array_equal(take(other.train, 1)[0]["inputs"], take(a.train, 1)[0]["inputs"])
    # The test set does not depend on the run's seed.
    assert_batches_equal(list(other.eval_batches()), list(a.eval_batches()))


def test_train_and_test_are_disjoint():
    config = tiny_config("eval.num_batches=8")  # 128 held-out problems out of ~10^4
    probs = seq2seq.problems(config)
    test = [s for s, _ in probs.eval]
    assert len(test) == len(set(test)) == 128
    assert all(seq2seq.is_held_out(s, 0.05) for s in test)
    train = {probs.train[i][0] for i in range(5000)}
    assert not train & set(test)
    assert len(train) > 2000  # many distinct problems, so the check means something
    assert not any(seq2seq.is_held_out(s, 0.05) for s in train)
    # About test_fraction of all problems are held out.
    every = [f"{a}+{b}" for a in range(100) for b in range(100)]
    assert 0.04 < np.mean([seq2seq.is_held_out(s, 0.05) for s in every]) < 0.06


def test_char_vocabulary_round_trip():
    vocab = seq2seq.CharVocab()
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.vocab_size) == (0, 1, 2, 14)
    ids = vocab.encode("123+4567")
    assert ids.dtype == np.int32 and len(ids) == 8 and ids.min() >= 3
    assert vocab.decode(ids) == "123+4567"
    assert vocab.decode([1, *ids[:3], 2, *ids[3:]]) == "123"  # BOS dropped, stops at EOS
    assert vocab.decode([*vocab.encode("42"), 0, 0]) == "42"
    with pytest.raises(ValueError, match="'x' is not in the vocabulary"):
        vocab.encode("1x")


def test_batches_shift_targets_and_mask_padding():
    config = tiny_config()
    data = seq2seq.build(config, (0, 1))
    vocab = data.tokenizer
    batch = take(data.train, 1)[0]
    assert {k: v.shape for k, v in batch.items()} == {
        "inputs": (16, 5), "decoder_inputs": (16, 4), "targets": (16, 4), "weights": (16, 4)}
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 0], 1)
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["weights"], batch["targets"] != 0)
    lengths = batch["weights"].sum(1).astype(int)
    np.testing.assert_array_equal(batch["targets"][np.arange(16), lengths - 1], 2)  # each target ends in EOS
    for src, tgt in zip(batch["inputs"], batch["targets"]):
        source, target = vocab.decode(src), vocab.decode(tgt)
        assert sum(map(int, source.split("+"))) == int(target)
        assert (src[len(source):] == 0).all()  # sources are padded with 0 on the right
    assert data.units_per_example == 4
    assert data.info["vocab_size"] == 14 and data.info["bleu_tokenize"] == "char"


def test_processes_split_each_global_batch():
    config = tiny_config()
    whole = seq2seq.build(config, (0, 1))
    parts = [seq2seq.build(config, (i, 2)) for i in range(2)]
    for step, batch in enumerate(take(whole.train, 3)):
        halves = [take(p.train, step + 1)[step] for p in parts]
        for k in batch:
            assert halves[0][k].shape[0] == 8
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k])
    for batch, *halves in zip(whole.eval_batches(), *(p.eval_batches() for p in parts)):
        np.testing.assert_array_equal(np.concatenate([h["targets"] for h in halves]), batch["targets"])
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        seq2seq.build(config, (0, 3))


def test_iterator_resumes_at_the_same_batch():
    data = seq2seq.build(tiny_config(), (0, 1))
    it = iter(data.train)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = iter(seq2seq.build(tiny_config(), (0, 1)).train)
    fresh.set_state(state)
    assert_batches_equal([next(fresh) for _ in range(3)], expected)


def test_settings_that_do_not_fit_the_data_are_refused():
    with pytest.raises(ConfigError, match=r"targets of up to 4 ids .* --config.data.target_len=4"):
        seq2seq.build(tiny_config("data.target_len=3"), (0, 1))
    with pytest.raises(ConfigError, match=r"--config.data.bos_id=1 --config.data.eos_id=2"):
        seq2seq.build(tiny_config("data.eos_id=3"), (0, 1))
    with pytest.raises(ConfigError, match="vocabulary has 14 ids but config.model.vocab_size=8"):
        seq2seq.build(tiny_config("model.vocab_size=8"), (0, 1))
    with pytest.raises(ConfigError, match="raise --config.model.max_len=20"):
        seq2seq.build(tiny_config("data.source_len=20", "model.max_len=16"), (0, 1))
    with pytest.raises(ConfigError, match="only .* distinct held-out"):
        seq2seq.build(tiny_config("data.max_digits=1", "eval.num_batches=4"), (0, 1))
    with pytest.raises(ConfigError, match="neither a built-in task"):
        seq2seq.build(tiny_config("data.name=additio"), (0, 1))


def wmt_config(data_dir, *overrides):
    return tiny_config("data.name=wmt14_translate", f"data.data_dir={data_dir}", "data.spm_vocab_size=300",
                       "model.vocab_size=304", "data.source_len=24", "data.target_len=32", "model.max_len=32",
                       "eval.batch_size=4", "eval.num_batches=2", "train.batch_size=4", *overrides)


def test_wmt14_with_mock_data_and_a_trained_vocabulary(tmp_path):
    config = wmt_config(tmp_path, "data.source_lang=en", "data.target_lang=de")  # English to German
    with tfds.testing.mock_data(num_examples=40):
        data = seq2seq.build(config, (0, 1))
        batches = take(data.train, 3)
        source = seq2seq.translation_source(config.data)
        raw = [source.eval[i] for i in range(8)]
    assert data.info["dataset"] == "wmt14_translate/de-en/1.0.0" and data.info["bleu_tokenize"] == "13a"
    tok = data.tokenizer
    assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.vocab_size == 300
    assert (tok.sp.bos_id(), tok.sp.eos_id()) == (1, 2)
    assert tokenizers.spm_path(str(tmp_path), "wmt14_translate/de-en/1.0.0", 300).exists()  # cached
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == {
            "inputs": (4, 24), "decoder_inputs": (4, 32), "targets": (4, 32), "weights": (4, 32)}
        np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["weights"], batch["targets"] != 0)
        assert batch["weights"].sum() > 0 and batch["targets"].max() < 300
    evals = list(data.eval_batches())
    assert len(evals) == 2
    # The evaluation set is the eval split in order; English sources, German targets, losslessly encoded.
    first = evals[0]
    for row, example in enumerate(raw[:4]):
        src = first["inputs"][row][first["inputs"][row] > 0]
        tgt = first["targets"][row][first["weights"][row] > 0]
        if len(src) < 24:
            assert tok.decode(src) == example["en"]
        if tgt[-1] == 2:  # not cut
            assert tok.decode(tgt[:-1]) == example["de"]


def test_wmt_settings_are_checked(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        with pytest.raises(ConfigError, match=r"no language pair with .*'xx'"):
            seq2seq.build(wmt_config(tmp_path, "data.source_lang=xx"), (0, 1))
        with pytest.raises(ConfigError, match="vocabulary has 300 ids but config.model.vocab_size=256"):
            seq2seq.build(wmt_config(tmp_path, "model.vocab_size=256"), (0, 1))
    with pytest.raises(ConfigError, match=r"'wmt14_translate/de-en' is not prepared in .*`tfds build wmt14_translate"):
        seq2seq.build(wmt_config(tmp_path), (0, 1))
