"""Text classification data: an offline task cut from a text corpus, or a labelled TFDS set.

`config.data.name`:
  'text_files'    (offline) "which package does this snippet come from". The corpus is the
                  text-files builder (default: the CPython standard library); a file's label is
                  the first directory of its path, kept when it is one of `data.classes`. The
                  builder's split is by a hash of the file path, so evaluation snippets come
                  from files never seen in training (nor by a pre-training run on the same data
                  settings, whose training split is the same set of files). Snippets are
                  windows of whole token rows cut from each file at fixed offsets, taken
                  round-robin over a class's files up to `snippets_per_class` (train) and
                  `eval_snippets_per_class` (evaluation), so classes are balanced unless one
                  runs out of text; the counts and the majority-class accuracy go to summary.json.
  a TFDS name     features `data.text_key` and `data.label_key` (a ClassLabel), e.g.
                  'glue/sst2' (text_key 'sentence', eval_split 'validation') or 'imdb_reviews'
                  (text_key 'text', eval_split 'test'); prepared under data.data_dir.

Rows: token ids [T] padded with 0; with `data.add_cls` (for BERT) [CLS] ids [SEP] using the
special ids of bigmodel.data.mlm, so a classifier fine-tuned from an MLM run sees the same
framing as in pre-training. Without it (e.g. for RNNClassifier, which reads lengths off the
non-zero ids) the ids are truncated to T. Batches: {'inputs' [B,T] int32, 'labels' [B] int32};
training shuffles with the run's seed (reshuffled every epoch) and repeats; each process
keeps its rows of the global batch, as in pipeline.lm_dataset. Evaluation batches add
'weights' [B] (0 on the padding of the last batch) and cover `config.eval.num_batches`
batches, or the whole split when it is <= 0, in one fixed shuffled order.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.experimental import ThreadPrefetchIterDataset

from bigmodel.config import ConfigError
from bigmodel.data import mlm, pipeline, tokenizers

EVAL_ORDER_SEED = 0  # fixed shuffle of the evaluation examples so every batch mixes classes
# (train rows, eval rows, class names, (train labels, eval labels), extra info)
Split = tuple[grain.MapDataset, grain.MapDataset, list[str], tuple[list[int], list[int]], dict]


class Framer:
    """Token ids -> one fixed-length row (optionally [CLS] … [SEP]), padded with 0."""

    def __init__(self, seq_len: int, add_cls: bool, ids: mlm.SpecialIds) -> None:
        self.seq_len, self.add_cls, self.ids = seq_len, add_cls, ids
        if seq_len < (3 if add_cls else 1):
            raise ConfigError(f"config.data.seq_len={seq_len} is too short for a snippet")

    @property
    def content_len(self) -> int:
        """How many text ids fit in a row."""
        return self.seq_len - 2 if self.add_cls else self.seq_len

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """ids [n] -> row [seq_len] int32."""
        body = np.asarray(tokens, np.int32)[: self.content_len]
        row = np.full(self.seq_len, self.ids.pad, np.int32)
        if self.add_cls:
            row[0], row[1:1 + len(body)], row[1 + len(body)] = self.ids.cls, body, self.ids.sep
        else:
            row[: len(body)] = body
        return row


def label_of(path: bytes | str) -> str:
    """A text-files example's class: the first directory of its relative path."""
    parts = (path.decode() if isinstance(path, bytes) else path).replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else ""  # files at the root belong to no class


def _windows(num_tokens: int, length: int, path: str) -> list[int]:
    """Start offsets of the non-overlapping windows of a file, in a fixed per-file order."""
    starts = list(range(0, max(num_tokens - length, 0) + 1, length))
    # A path-seeded order spreads each file's first snippets over its whole text, not only its header.
    rng = np.random.default_rng(int(hashlib.sha1(path.encode()).hexdigest()[:8], 16))
    return [starts[i] for i in rng.permutation(len(starts))]


def snippets(files: Sequence[tuple[str, int, np.ndarray]], per_class: int,
             framer: Framer) -> tuple[list[dict], list[str]]:
    """(path, label, ids) per file -> (rows, source file of each row): up to per_class rows per label.

    Windows are taken round-robin over a label's files (each file's first window, then each
    file's second, …) so the rows of a class come from as many files as possible.
    """
    by_label: dict[int, list[tuple[str, np.ndarray]]] = collections.defaultdict(list)
    for path, label, ids in sorted(files, key=lambda f: f[0]):
        if len(ids):
            by_label[label].append((path, ids))
    rows, sources = [], []
    for label in sorted(by_label):
        queues = [(path, [ids[s:s + framer.content_len] for s in _windows(len(ids), framer.content_len, path)])
                  for path, ids in by_label[label]]
        taken, depth = 0, 0
        while taken < per_class and any(depth < len(q) for _, q in queues):
            for path, q in queues:
                if depth < len(q) and taken < per_class:
                    rows.append({"inputs": framer(q[depth]), "labels": np.int32(label)})
                    sources.append(path)
                    taken += 1
            depth += 1
    return rows, sources


def file_snippets(split: Sequence[Any], classes: Sequence[str], tokenizer: tokenizers.Tokenizer, framer: Framer,
                  per_class: int) -> tuple[list[dict], list[str]]:
    """Snippet rows of one text-files split (only files of `classes`), and each row's source file."""
    index = {name: i for i, name in enumerate(classes)}
    files = []
    for i in range(len(split)):
        ex = split[i]
        path = ex["path"].decode() if isinstance(ex["path"], bytes) else ex["path"]
        if label_of(path) in index:
            files.append((path, index[label_of(path)], tokenizer.encode(ex["text"])))
    return snippets(files, per_class, framer)


def _counts(labels: Sequence[int], names: Sequence[str]) -> dict[str, int]:
    c = collections.Counter(int(x) for x in labels)
    return {name: c.get(i, 0) for i, name in enumerate(names)}


def _check_files_cover_classes(train: Sequence[str], evals: Sequence[str], cfg: ml_collections.ConfigDict,
                               source: pipeline.TextSource) -> None:
    for split, files in (("train", train), ("evaluation", evals)):
        have = {label_of(p) for p in files}
        missing = [c for c in cfg.classes if c not in have]
        if not missing:
            continue
        available = collections.Counter(label_of(s[i]["path"]) for s in (source.train, source.eval)
                                        for i in range(len(s)))
        absent = [c for c in missing if c not in available]
        if absent:
            top = ", ".join(f"{k} ({n})" for k, n in available.most_common(20))
            raise ConfigError(
                f"config.data.classes names {absent}, which have no files in the corpus; the first directories "
                f"with the most files are: {top}"
            )
        raise ConfigError(
            f"config.data.classes {missing} have no files in the {split} split (validation_fraction="
            f"{cfg.validation_fraction}); drop them or raise config.data.validation_fraction"
        )


def _text_files_task(cfg: ml_collections.ConfigDict, source: pipeline.TextSource, tokenizer: tokenizers.Tokenizer,
                     framer: Framer) -> Split:
    if not cfg.classes:
        raise ConfigError("config.data.classes is empty; name the first directories to tell apart, "
                          "e.g. ('email', 'json')")
    train_rows, train_src = file_snippets(source.train, cfg.classes, tokenizer, framer, cfg.snippets_per_class)
    eval_rows, eval_src = file_snippets(source.eval, cfg.classes, tokenizer, framer, cfg.eval_snippets_per_class)
    _check_files_cover_classes(train_src, eval_src, cfg, source)
    info = {"train_files": len(set(train_src)), "eval_files": len(set(eval_src))}
    labels = ([int(r["labels"]) for r in train_rows], [int(r["labels"]) for r in eval_rows])
    return grain.MapDataset.source(train_rows), grain.MapDataset.source(eval_rows), list(cfg.classes), labels, info


def _check_tfds_name(cfg: ml_collections.ConfigDict) -> None:
    # TFDS registers its older text builders (glue among them) only once their package is imported.
    import tensorflow_datasets.text  # noqa: F401

    try:
        tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:  # ValueError: unknown builder config
        raise ConfigError(
            f"config.data.name={cfg.name!r} is neither 'text_files' nor a known TFDS dataset "
            f"({str(e).splitlines()[0].split(': ', 1)[-1][:200]}); use 'text_files' (the offline package task), "
            "'glue/sst2' or 'imdb_reviews'"
        ) from None


def _tfds_task(cfg: ml_collections.ConfigDict, source: pipeline.TextSource, tokenizer: tokenizers.Tokenizer,
               framer: Framer) -> Split:
    feature = tfds.builder(cfg.name, data_dir=cfg.data_dir or None).info.features
    if cfg.label_key not in feature:
        raise ConfigError(f"config.data.label_key={cfg.label_key!r} is not a feature of {cfg.name}; "
                          f"features: {sorted(feature.keys())}")
    if not isinstance(feature[cfg.label_key], tfds.features.ClassLabel):
        raise ConfigError(f"config.data.label_key={cfg.label_key!r} of {cfg.name} is not a class label")
    names = list(feature[cfg.label_key].names)
    labels = []
    for split_name, split in ((cfg.train_split, source.train), (cfg.eval_split, source.eval)):
        labels.append([int(split[i][cfg.label_key]) for i in range(len(split))])
        bad = [x for x in labels[-1] if not 0 <= x < len(names)]
        if bad:
            # GLUE test splits are unlabelled (-1).
            raise ConfigError(f"split {split_name!r} of {cfg.name} has labels outside [0, {len(names)}) such as "
                              f"{bad[0]} (an unlabelled split?); use another config.data.train_split/eval_split")
    key, label = source.text_key, cfg.label_key

    def row(ex: dict) -> dict:
        return {"inputs": framer(tokenizer.encode(ex[key])), "labels": np.int32(ex[label])}

    train, evals = (grain.MapDataset.source(s).map(row) for s in (source.train, source.eval))
    return train, evals, names, tuple(labels), {}


def _rows(batch_size: int, shard: tuple[int, int]) -> slice:
    index, count = shard
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by the {count} processes")
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


def train_dataset(examples: grain.MapDataset, *, batch_size: int, seed: int, shard: tuple[int, int],
                  prefetch: int = 0) -> grain.IterDataset:
    """This process's rows of shuffled, endlessly repeated global batches."""
    rows = _rows(batch_size, shard)
    it = examples.shuffle(seed=seed).repeat(None).to_iter_dataset().batch(batch_size, drop_remainder=True)
    if shard[1] > 1:
        it = it.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    if prefetch:
        it = ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def eval_dataset(examples: grain.MapDataset, *, batch_size: int, num_batches: int,
                 shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """This process's rows of evaluation batches in a fixed order; num_batches <= 0: the whole split.

    The order is one fixed shuffle, so a partial pass still mixes the classes. The last
    batch is padded with weight-0 copies of an example, so every example counts once.
    """
    rows = _rows(batch_size, shard)
    total = len(examples) if num_batches <= 0 else min(len(examples), num_batches * batch_size)
    padded = -(-total // batch_size) * batch_size
    order = np.random.default_rng(EVAL_ORDER_SEED).permutation(len(examples))

    def example(i: int) -> dict:
        out = dict(examples[int(order[i if i < total else 0])])
        out["weights"] = np.float32(i < total)
        return out

    ds = grain.MapDataset.range(padded).map(example).batch(batch_size, drop_remainder=True)
    if shard[1] > 1:
        ds = ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    return ds


def build(config: ml_collections.ConfigDict, shard: tuple[int, int]):
    """Data for the 'classify' task on text (bigmodel.data.build, data.kind == 'text')."""
    from bigmodel.data import Data

    cfg = config.data
    if cfg.name != "text_files":
        _check_tfds_name(cfg)
    source = pipeline.text_source(cfg)
    tokenizer = pipeline.make_tokenizer(cfg, source)
    ids = mlm.SpecialIds.of(tokenizer)
    pipeline.check_vocab(tokenizer, config.model, extra=ids.vocab_needed - tokenizer.vocab_size if cfg.add_cls else 0)
    framer = Framer(cfg.seq_len, cfg.add_cls, ids)
    make = _text_files_task if cfg.name == "text_files" else _tfds_task
    train, evals, names, (train_labels, eval_labels), info = make(cfg, source, tokenizer, framer)
    if config.model.num_classes != len(names):
        raise ConfigError(f"config.model.num_classes={config.model.num_classes} but the data has {len(names)} "
                          f"classes ({', '.join(names)}); set --config.model.num_classes={len(names)}")
    if not len(evals) or not len(train):
        raise ConfigError(f"{source.dataset_id}: the {'evaluation' if len(train) else 'training'} split has no "
                          "examples; check config.data.train_split/eval_split")
    train_counts, eval_counts = _counts(train_labels, names), _counts(eval_labels, names)
    info |= {
        "dataset": source.dataset_id,
        "classes": names,
        "train_class_counts": train_counts,
        "eval_class_counts": eval_counts,
        # Always answering the most common class (of the whole evaluation split): the bar to clear.
        "majority_accuracy": max(eval_counts.values()) / max(sum(eval_counts.values()), 1),
    }
    train_it = train_dataset(train, batch_size=config.train.batch_size, seed=config.seed, shard=shard,
                             prefetch=cfg.prefetch)

    def eval_batches() -> Iterator[dict]:
        return iter(eval_dataset(evals, batch_size=config.eval.batch_size, num_batches=config.eval.num_batches,
                                 shard=shard))

    return Data(train=train_it, eval_batches=eval_batches, units_per_example=1, info=info, tokenizer=tokenizer)
