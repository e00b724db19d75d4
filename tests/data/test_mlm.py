"""MLM data: framing, 80/10/10 masking statistics, determinism, process rows, exact resume."""

import itertools
import pathlib

import numpy as np
import pytest

from bigmodel import config as config_lib
from bigmodel.config import ConfigError
from bigmodel.data import mlm, tokenizers

from conftest import SMALL_CORPUS

BERT_STDLIB = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bert_stdlib.py")
TOK = tokenizers.ByteTokenizer()
IDS = mlm.SpecialIds.after(TOK)


def random_docs(n=120, seed=0):
    """Documents of printable-ish random bytes (never 0, so no accidental padding)."""
    rng = np.random.default_rng(seed)
    return [{"text": rng.integers(1, 256, int(rng.integers(50, 900))).astype(np.uint8).tobytes()} for _ in range(n)]


def dataset(docs, **kw):
    args = {"text_key": "text", "seq_len": 64, "batch_size": 8, "seed": 1, "mask_seed": 1}
    args.update(kw)
    return mlm.mlm_dataset(docs, TOK, **args)


def test_special_ids_follow_the_vocabulary():
    assert (IDS.mask, IDS.cls, IDS.sep, IDS.pad, IDS.vocab_end) == (257, 258, 259, 0, 257)


def test_masking_statistics():
    batches = list(itertools.islice(dataset(random_docs(), seq_len=128, batch_size=16), 60))  # ~120k tokens
    stats = mlm.masking_stats(batches, IDS)
    assert stats["count"] > 15_000
    assert stats["selected"] == pytest.approx(0.15, abs=0.006)
    assert stats["mask"] == pytest.approx(0.8, abs=0.015)
    assert stats["random"] == pytest.approx(0.1, abs=0.01)
    assert stats["kept"] == pytest.approx(0.1, abs=0.01)
    for b in batches:
        replaced = (b["weights"] > 0) & (b["inputs"] != IDS.mask) & (b["inputs"] != b["targets"])
        # random replacements are ordinary ids, never padding or a special
        assert np.all((b["inputs"][replaced] >= 1) & (b["inputs"][replaced] < IDS.vocab_end))
        # unselected positions are untouched
        np.testing.assert_array_equal(b["inputs"][b["weights"] == 0], b["targets"][b["weights"] == 0])


def test_cls_sep_and_padding_are_never_masked():
    docs = random_docs(30)
    for b in itertools.islice(dataset(docs, seed=None), 100):  # an ordered pass ends with a padded row
        assert np.all(b["targets"][:, 0] == IDS.cls) and np.all(b["inputs"][:, 0] == IDS.cls)
        special = (b["targets"] == IDS.cls) | (b["targets"] == IDS.sep) | (b["targets"] == IDS.pad)
        assert not np.any(b["weights"][special])
        assert np.all(b["inputs"][special] == b["targets"][special])
        assert np.all((b["targets"] == IDS.sep).sum(axis=1) == 1)


def test_targets_are_the_original_token_stream():
    docs = random_docs(25)
    expected = np.concatenate([np.concatenate([TOK.encode(d["text"]), [TOK.eod_id]]) for d in docs])
    rows = [row for b in dataset(docs, seed=None, batch_size=1) for row in b["targets"]]
    stream = []
    for row in rows:
        sep = int(np.flatnonzero(row == IDS.sep)[0])
        stream.extend(row[1:sep].tolist())
        assert np.all(row[sep + 1:] == IDS.pad)
    assert stream == expected.tolist()  # every token once, in order; the last row is padded
    assert np.any(rows[-1] == IDS.pad)


def test_masks_are_deterministic_and_seeded():
    docs = random_docs(40)
    a = list(itertools.islice(dataset(docs), 5))
    b = list(itertools.islice(dataset(docs), 5))
    c = list(itertools.islice(dataset(docs, mask_seed=2), 5))
    for x, y, z in zip(a, b, c):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(x[key], y[key])
        np.testing.assert_array_equal(x["targets"], z["targets"])  # same data order, other masks
    assert any(not np.array_equal(x["weights"], z["weights"]) for x, z in zip(a, c))


def test_processes_split_each_global_batch():
    docs = random_docs(40)
    whole = list(itertools.islice(dataset(docs), 6))
    parts = [list(itertools.islice(dataset(docs, shard=(i, 2)), 6)) for i in range(2)]
    for step, batch in enumerate(whole):
        for key in ("inputs", "targets", "weights"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
        assert parts[0][step]["inputs"].shape == (4, 64)


def test_resume_gives_the_same_next_batches():
    ds = dataset(random_docs(40))
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(ds)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(got[key], want[key])


def bert_config(data_dir, *overrides):
    return config_lib.load(BERT_STDLIB + ":tiny", [f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2",
                                                   f"data.data_dir={data_dir}", *overrides])


def test_build_from_the_experiment_config(data_dir):
    config = bert_config(data_dir)
    data = mlm.build(config, shard=(0, 1))
    assert data.units_per_example == config.data.seq_len == 32
    batch = next(iter(data.train))
    assert batch["inputs"].shape == (8, 32) and batch["inputs"].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and batch["weights"].sum() > 0
    first, second = list(data.eval_batches()), list(data.eval_batches())
    assert len(first) == config.eval.num_batches
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert 2.0 < data.info["unigram_loss"] < np.log(256)
    assert data.info["special_ids"] == {"pad": 0, "mask": 257, "cls": 258, "sep": 259}


def test_config_errors(data_dir):
    with pytest.raises(ConfigError, match="tokenizer has 260 ids but config.model.vocab_size=259"):
        mlm.build(bert_config(data_dir, "model.vocab_size=259"), shard=(0, 1))
    with pytest.raises(ConfigError, match="mask_rate=0.0 must be in"):
        mlm.build(bert_config(data_dir, "data.mask_rate=0.0"), shard=(0, 1))
    with pytest.raises(ConfigError, match="must be non-negative and sum to at most 1"):
        mlm.build(bert_config(data_dir, "data.mask_token_fraction=0.95"), shard=(0, 1))
