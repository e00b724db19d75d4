"""Text classification data: the offline package task (split by file) and TFDS sst2 / imdb."""

import collections
import itertools
import os
import pathlib
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel import config as config_lib
from bigmodel.config import ConfigError
from bigmodel.data import mlm, text_classify, text_files, tokenizers

BERT_CLASSIFY = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bert_classify.py")
# Five first-level packages, each with files on both sides of a 0.25 split: small and quick.
CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "[hjuw]*", "*.py")
CLASSES = ("http", "json", "unittest", "urllib", "wsgiref")
TOK = tokenizers.ByteTokenizer()
IDS = mlm.SpecialIds.after(TOK)


def classify_config(data_dir, *overrides):
    base = [f"data.source={CORPUS}", "data.validation_fraction=0.25", f"data.data_dir={data_dir}",
            f"data.classes={CLASSES!r}", f"model.num_classes={len(CLASSES)}"]
    return config_lib.load(BERT_CLASSIFY + ":tiny", base + list(overrides))


@pytest.fixture(scope="module")
def splits(data_dir):
    builder = text_files.prepare(CORPUS, data_dir, 0.25)
    return builder.as_data_source(split="train"), builder.as_data_source(split="validation")


def test_snippets_come_from_disjoint_files_with_labels_in_range(splits):
    framer = text_classify.Framer(64, True, IDS)
    train, train_src = text_classify.file_snippets(splits[0], CLASSES, TOK, framer, per_class=40)
    evals, eval_src = text_classify.file_snippets(splits[1], CLASSES, TOK, framer, per_class=10)
    assert not set(train_src) & set(eval_src)
    assert {text_classify.label_of(p) for p in eval_src} == set(CLASSES)
    for rows, sources in ((train, train_src), (evals, eval_src)):
        labels = np.array([r["labels"] for r in rows])
        assert labels.min() == 0 and labels.max() == len(CLASSES) - 1
        assert all(CLASSES[label] == text_classify.label_of(src) for label, src in zip(labels, sources))
    counts = collections.Counter(int(r["labels"]) for r in train)
    assert counts == {i: 40 for i in range(len(CLASSES))}  # balanced: every class has enough text
    texts = {splits[0][i]["path"].decode(): splits[0][i]["text"] for i in range(len(splits[0]))}
    for row, src in zip(train[:50], train_src[:50]):
        ids = row["inputs"]
        assert ids[0] == IDS.cls
        sep = int(np.flatnonzero(ids == IDS.sep)[0])
        assert np.all(ids[sep + 1:] == 0)
        assert bytes(ids[1:sep].astype(np.uint8)) in texts[src]  # a window of its own file
    # Deterministic: the same rows again.
    again, _ = text_classify.file_snippets(splits[0], CLASSES, TOK, framer, per_class=40)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(train, again))


def test_snippets_round_robin_over_files():
    framer = text_classify.Framer(10, False, IDS)
    files = [("a/x.py", 0, np.arange(1, 41)), ("a/y.py", 0, np.arange(101, 111)), ("b/z.py", 1, np.arange(1, 6))]
    rows, sources = text_classify.snippets(files, per_class=3, framer=framer)
    assert sources == ["a/x.py", "a/y.py", "a/x.py", "b/z.py"]  # y.py has one window; z.py is short
    np.testing.assert_array_equal(rows[1]["inputs"], np.arange(101, 111))
    np.testing.assert_array_equal(rows[3]["inputs"], [1, 2, 3, 4, 5, 0, 0, 0, 0, 0])  # padded with 0


def test_build_reports_balance_and_evaluates_every_example_once(data_dir):
    config = classify_config(data_dir, "eval.batch_size=16")
    data = text_classify.build(config, shard=(0, 1))
    info = data.info
    assert info["classes"] == list(CLASSES)
    assert info["train_class_counts"] == {c: 32 for c in CLASSES}
    assert sum(info["eval_class_counts"].values()) == 8 * len(CLASSES)
    assert info["majority_accuracy"] == pytest.approx(max(info["eval_class_counts"].values()) / 40)
    assert info["train_files"] > info["eval_files"] > 0
    batches = list(data.eval_batches())
    assert len(batches) == 3 and sum(b["weights"].sum() for b in batches) == 40  # 40 = 16 + 16 + 8 (padded)
    labels = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    assert dict(collections.Counter(CLASSES[i] for i in labels)) == {
        k: v for k, v in info["eval_class_counts"].items() if v}
    again = list(data.eval_batches())
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again))
    train = next(iter(data.train))
    assert train["inputs"].shape == (8, 32) and train["labels"].shape == (8,)
    assert np.all(train["inputs"][:, 0] == IDS.cls)


def test_processes_split_each_global_batch_and_resume(data_dir):
    config = classify_config(data_dir)
    whole = text_classify.build(config, shard=(0, 1))
    parts = [text_classify.build(config, shard=(i, 2)) for i in range(2)]
    it = iter(whole.train)
    batches = list(itertools.islice(it, 4))
    for step, part in enumerate(zip(*(itertools.islice(iter(p.train), 4) for p in parts))):
        np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in part]), batches[step]["inputs"])
    state = it.get_state()
    want = next(it)
    fresh = iter(whole.train)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["inputs"], want["inputs"])


def test_without_cls_rows_are_plain_ids(data_dir):
    data = text_classify.build(classify_config(data_dir, "data.add_cls=false"), shard=(0, 1))
    batch = next(iter(data.train))
    assert np.all(batch["inputs"] < 257) and np.all(batch["inputs"][:, 0] != 0)


def test_config_errors(data_dir):
    with pytest.raises(ConfigError, match=r"names \['nosuchpkg'\], which have no files"):
        text_classify.build(classify_config(data_dir, "data.classes=('json', 'nosuchpkg')",
                                            "model.num_classes=2"), shard=(0, 1))
    with pytest.raises(ConfigError, match=r"\['html'\] have no files in the evaluation split"):
        text_classify.build(classify_config(data_dir, "data.classes=('json', 'html')", "model.num_classes=2"),
                            shard=(0, 1))
    with pytest.raises(ConfigError, match="num_classes=3 but the data has 5 classes"):
        text_classify.build(classify_config(data_dir, "model.num_classes=3"), shard=(0, 1))
    with pytest.raises(ConfigError, match="neither 'text_files' nor a known TFDS dataset"):
        text_classify.build(classify_config(data_dir, "data.name=glue/sst3"), shard=(0, 1))


def tfds_config(data_dir, variant, *overrides):
    return config_lib.load(f"{BERT_CLASSIFY}:{variant}", [f"data.data_dir={data_dir}", "train.batch_size=4",
                                                           "eval.batch_size=4", *overrides])


@pytest.mark.parametrize("variant, name, text_key, names", [
    ("sst2", "glue/sst2", "sentence", ["negative", "positive"]),
    ("imdb", "imdb_reviews", "text", ["neg", "pos"]),
])
def test_tfds_datasets_with_mock_data(tmp_path, variant, name, text_key, names):
    config = tfds_config(str(tmp_path), variant)
    assert (config.data.name, config.data.text_key) == (name, text_key)
    with tfds.testing.mock_data(num_examples=10):
        data = text_classify.build(config, shard=(0, 1))
        batch = next(iter(data.train))
        evals = list(data.eval_batches())
        assert batch["inputs"].shape == (4, 128) and set(batch["labels"].tolist()) <= {0, 1}
        assert np.all(batch["inputs"][:, 0] == IDS.cls)
        assert sum(b["weights"].sum() for b in evals) == 10  # the whole mock split, once
        assert data.info["classes"] == names and sum(data.info["train_class_counts"].values()) == 10
        with pytest.raises(ConfigError, match=rf"text_key='review' is not a feature of {name}"):
            text_classify.build(tfds_config(str(tmp_path), variant, "data.text_key=review"), shard=(0, 1))
        with pytest.raises(ConfigError, match=rf"label_key='sentiment' is not a feature of {name}"):
            text_classify.build(tfds_config(str(tmp_path), variant, "data.label_key=sentiment"), shard=(0, 1))
        with pytest.raises(ConfigError, match="num_classes=5 but the data has 2 classes"):
            text_classify.build(tfds_config(str(tmp_path), variant, "model.num_classes=5"), shard=(0, 1))
