"""Text builder, tokenizers and the grain LM pipeline."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel import config as config_lib
from bigmodel.config import ConfigError
from bigmodel.data import pipeline, text_files, tokenizers

from conftest import GPT_TINY, SMALL_CORPUS


def examples(split):
    return [(ex["path"], ex["text"]) for ex in (split[i] for i in range(len(split)))]


def test_builder_is_deterministic_and_splits_by_file(tmp_path):
    a = text_files.prepare(SMALL_CORPUS, str(tmp_path / "a"), 0.2)
    b = text_files.prepare(SMALL_CORPUS, str(tmp_path / "b"), 0.2)
    for split in ("train", "validation"):
        ea, eb = examples(a.as_data_source(split=split)), examples(b.as_data_source(split=split))
        assert ea == eb and ea
    train_paths = {p for p, _ in examples(a.as_data_source(split="train"))}
    val_paths = {p for p, _ in examples(a.as_data_source(split="validation"))}
    assert not train_paths & val_paths
    _, files = text_files.resolve_files(SMALL_CORPUS)
    assert train_paths | val_paths == {f.encode() for f in files}
    assert all(text_files.is_validation(p.decode(), 0.2) for p in val_paths)


def test_empty_split_is_refused(tmp_path):
    with pytest.raises(Exception, match="validation split .* would be empty"):
        text_files.prepare(SMALL_CORPUS, str(tmp_path), 0.0)


def docs_of(texts):
    return [{"text": t} for t in texts]


def test_packing_loses_no_tokens():
    tok = tokenizers.ByteTokenizer()
    texts = [b"def f():\n    return 1\n", b"x" * 50, b"", "caf\u00e9 = 'b\u00e9b\u00e9'\n".encode(), b"y" * 7]
    ds = pipeline.lm_dataset(docs_of(texts), tok, text_key="text", seq_len=16, batch_size=1, seed=None)
    stream = []
    for batch in ds:
        inputs, targets, weights = batch["inputs"][0], batch["targets"][0], batch["weights"][0]
        tokens = np.concatenate([inputs[:1], targets])
        keep = np.concatenate([[True], weights > 0])
        stream.extend(tokens[keep].tolist())
        # bytes are counted exactly once per real target
        np.testing.assert_array_equal(batch["target_bytes"][0], tok.token_bytes[targets] * weights)
    expected = []
    for t in texts:
        expected.extend(list(t) + [tok.eod_id])
    assert stream == expected


@pytest.mark.parametrize("window", [0, 10])  # 10 packed sequences: the state is taken inside the second window
def test_pipeline_resumes_at_the_same_batch(window):
    tok = tokenizers.ByteTokenizer()
    texts = [bytes([65 + i % 26]) * (10 + 3 * i) for i in range(40)]
    ds = pipeline.lm_dataset(docs_of(texts), tok, text_key="text", seq_len=8, batch_size=2, seed=3,
                             shuffle_window=window)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(12)]
    fresh = iter(ds)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])


def letter_docs(n=60):
    """Documents of one repeated letter each (26 letters cycling), 40-80 bytes long."""
    return docs_of([bytes([65 + i % 26]) * (40 + (7 * i) % 41) for i in range(n)])


def letters_per_batch(ds, steps):
    """Distinct document letters in each of the first batches (the end-of-document id left out)."""
    return [len(set(np.unique(b["inputs"])) - {tokenizers.ByteTokenizer().eod_id})
            for b in itertools.islice(ds, steps)]


def test_shuffle_window_mixes_documents_in_each_batch_and_keeps_every_sequence():
    tok = tokenizers.ByteTokenizer()
    plain = pipeline.lm_dataset(letter_docs(), tok, text_key="text", seq_len=8, batch_size=8, seed=5)
    mixed = pipeline.lm_dataset(letter_docs(), tok, text_key="text", seq_len=8, batch_size=8, seed=5,
                                shuffle_window=64)
    # packing cuts documents in order, so 8 consecutive 9-byte pieces come from one or two documents
    assert max(letters_per_batch(plain, 40)) <= 3
    assert np.mean(letters_per_batch(mixed, 40)) >= 5
    # within each window the same sequences arrive, only reordered
    window = lambda ds: sorted(map(tuple, np.concatenate([b["inputs"] for b in itertools.islice(ds, 8)])))
    assert window(plain) == window(mixed)
    again = pipeline.lm_dataset(letter_docs(), tok, text_key="text", seq_len=8, batch_size=8, seed=5,
                                shuffle_window=64)
    for a, b in zip(itertools.islice(mixed, 20), itertools.islice(again, 20)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_shuffle_window_spreads_the_evaluation_sample_over_more_documents():
    tok = tokenizers.ByteTokenizer()
    first = lambda window: list(itertools.islice(pipeline.lm_dataset(
        letter_docs(), tok, text_key="text", seq_len=8, batch_size=8, seed=pipeline.EVAL_ORDER_SEED,
        repeat=False, shuffle_window=window), 2))
    assert sum(letters_per_batch(first(0), 2)) < sum(letters_per_batch(first(200), 2))
    # one pass still ends: the window holds the rest of the split
    assert sum(1 for _ in pipeline.lm_dataset(letter_docs(), tok, text_key="text", seq_len=8, batch_size=8,
                                              seed=1, repeat=False, shuffle_window=10_000)) > 0


def test_processes_split_each_global_batch():
    tok = tokenizers.ByteTokenizer()
    texts = [bytes([65 + i % 26]) * (5 + 2 * i) for i in range(30)]
    whole = list(itertools.islice(pipeline.lm_dataset(
        docs_of(texts), tok, text_key="text", seq_len=8, batch_size=4, seed=1), 6))
    parts = [list(itertools.islice(pipeline.lm_dataset(
        docs_of(texts), tok, text_key="text", seq_len=8, batch_size=4, seed=1, shard=(i, 2)), 6)) for i in range(2)]
    for step, batch in enumerate(whole):
        joined = np.concatenate([parts[0][step]["inputs"], parts[1][step]["inputs"]])
        np.testing.assert_array_equal(joined, batch["inputs"])
        assert parts[0][step]["inputs"].shape == (2, 8)


def test_unigram_entropy():
    assert pipeline.unigram_bits_per_byte(docs_of([b"aabb"]), "text") == pytest.approx(1.0)
    assert pipeline.unigram_bits_per_byte(docs_of([b"abcd", b"efgh"]), "text") == pytest.approx(3.0)


def test_sentencepiece_is_lossless_and_counts_bytes(tmp_path):
    ds = text_files.prepare(SMALL_CORPUS, str(tmp_path), 0.2).as_data_source(split="train")
    texts = [ds[i]["text"] for i in range(len(ds))]
    tok = tokenizers.train_sentencepiece(texts, 512, tmp_path / "spm.model")
    assert tok.vocab_size == 512
    sample = "def parse(self, fp):\n        \"\"\"Parse a file \u00e9\"\"\"\n\treturn 42\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert int(tok.token_bytes[ids].sum()) == len(sample.encode("utf-8"))
    assert len(ids) < len(sample.encode("utf-8")) * 0.8  # it compresses


def tiny_data_config(data_dir, **overrides):
    c = config_lib.load(GPT_TINY + ":tiny").data
    with c.unlocked():
        c.update(overrides)
    c.data_dir = data_dir
    return c


def test_lm_data_end_to_end(data_dir):
    c = tiny_data_config(data_dir, source=SMALL_CORPUS, validation_fraction=0.2)
    data = pipeline.lm_data(c, seed=0, batch_size=4, eval_batch_size=4, num_eval_batches=3, shard=(0, 1))
    batch = next(iter(data.train))
    assert batch["inputs"].shape == (4, c.seq_len) and batch["inputs"].dtype == np.int32
    assert 3.5 < data.unigram_bpb < 6.0
    first, second = list(data.eval_batches()), list(data.eval_batches())
    assert len(first) == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_tfds_dataset_by_name_with_mock_data(tmp_path):
    c = tiny_data_config(str(tmp_path), name="lm1b", train_split="train", eval_split="test")
    with tfds.testing.mock_data(num_examples=12):
        data = pipeline.lm_data(c, seed=0, batch_size=2, eval_batch_size=2, num_eval_batches=2, shard=(0, 1))
        batches = list(itertools.islice(iter(data.train), 3))
    assert len(batches) == 3 and batches[0]["inputs"].shape == (2, c.seq_len)
    assert data.dataset_id.startswith("lm1b/")


def test_unknown_tfds_name_and_unprepared_dataset(tmp_path):
    with pytest.raises(ConfigError, match="'lm1bb' is not a known TFDS dataset"):
        pipeline.text_source(tiny_data_config(str(tmp_path), name="lm1bb"))
    with pytest.raises(ConfigError, match=r"'lm1b' is not prepared in data_dir=.*tfds build lm1b"):
        pipeline.text_source(tiny_data_config(str(tmp_path), name="lm1b"))
