"""Grain pipelines from TFDS data sources to host-local numpy batches.

Language modelling: documents -> tokens + end-of-document -> concat-then-split packing
into sequences of seq_len+1 -> {inputs, targets, weights, target_bytes} -> batches.
The training iterator is shuffled with the run's seed, repeated forever, and its state
is saved in checkpoints.

Sharding by process: every process runs the same pipeline and keeps its own rows of
each global batch. The global batches are therefore identical for any number of
processes, and a checkpoint resumes on a different topology with the same data order
(the iterator state is the same on every process). Tokenising and packing are cheap
next to a train step, so the repeated host work is small.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchIterDataset, WindowShuffleIterDataset

from bigmodel.config import ConfigError
from bigmodel.data import text_files, tokenizers

# grain's default (16 threads, 500 elements ahead) starves the train step of CPU on small
# machines; one reader thread a little ahead keeps up with packing on any machine we use.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=32)


# Evaluation reads the documents in one fixed shuffled order, the same for every run
# seed, so a few evaluation batches sample many documents rather than the first few.
EVAL_ORDER_SEED = 20_231_123


def tfds_builder(name: str, data_dir: str, suggestion: str) -> Any:
    """The TFDS builder for `name`; an unknown name is a ConfigError ending with `suggestion`."""
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(
            f"config.data.name={name!r} is not a known TFDS dataset ({str(e).splitlines()[0]}); {suggestion}"
        ) from None


def tfds_splits(name: str, data_dir: str, splits: Sequence[str], builder: Any) -> list[Any]:
    """Random-access data sources of prepared splits, with the fix spelled out when they are not."""
    try:
        return [tfds.data_source(name, split=s, data_dir=data_dir or None, download=False) for s in splits]
    except (AssertionError, FileNotFoundError, NotImplementedError):
        raise ConfigError(
            f"TFDS dataset {name!r} is not prepared in data_dir={str(builder.data_dir_root)!r} "
            "(config.data.data_dir); prepare it there with "
            f"`tfds build {name} --data_dir DIR --file_format array_record` on a machine with network"
        ) from None
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config.data.train_split/eval_split: {e}") from None


@dataclasses.dataclass
class TextSource:
    """The train and eval splits of a text dataset, plus an id that names its contents."""

    train: Sequence[Any]
    eval: Sequence[Any]
    dataset_id: str
    text_key: str


def text_source(cfg: ml_collections.ConfigDict) -> TextSource:
    """Open `config.data` as TFDS data sources (our text-files builder or any TFDS name)."""
    if cfg.name == "text_files":
        builder = text_files.prepare(cfg.source, cfg.data_dir, cfg.validation_fraction)
        return TextSource(
            train=builder.as_data_source(split=cfg.train_split),
            eval=builder.as_data_source(split=cfg.eval_split),
            dataset_id=f"text_files/{builder.builder_config.name}/{builder.version}",
            text_key="text",
        )
    builder = tfds_builder(cfg.name, cfg.data_dir, "use 'text_files' for your own files or a TFDS name such as 'lm1b'")
    train, evals = tfds_splits(cfg.name, cfg.data_dir, (cfg.train_split, cfg.eval_split), builder)
    if len(train) and cfg.text_key not in train[0]:
        raise ConfigError(
            f"config.data.text_key={cfg.text_key!r} is not a feature of {cfg.name}; features: {sorted(train[0])}"
        )
    return TextSource(train, evals, f"{cfg.name}/{builder.version}", cfg.text_key)


def make_tokenizer(cfg: ml_collections.ConfigDict, source: TextSource) -> tokenizers.Tokenizer:
    """The configured tokenizer: bytes, SentencePiece (trained once, cached) or 'hf:PATH' (a tokenizer.json)."""
    if cfg.tokenizer == "byte":
        return tokenizers.ByteTokenizer()
    if cfg.tokenizer == "sentencepiece":
        path = tokenizers.spm_path(cfg.data_dir or tfds.core.constants.DATA_DIR, source.dataset_id, cfg.spm_vocab_size)
        if path.exists():
            return tokenizers.SentencePieceTokenizer(path)
        texts = (source.train[i][source.text_key] for i in range(len(source.train)))
        return tokenizers.train_sentencepiece(texts, cfg.spm_vocab_size, path)
    if cfg.tokenizer.startswith("hf:"):
        path = cfg.tokenizer[len("hf:"):]
        if not os.path.exists(path):
            raise ConfigError(f"config.data.tokenizer={cfg.tokenizer!r}: {path} does not exist; give the path of a "
                              "Hugging Face tokenizer.json (or its directory)")
        return tokenizers.HFTokenizer(path)
    raise ConfigError(
        f"config.data.tokenizer={cfg.tokenizer!r}; use 'byte', 'sentencepiece' or 'hf:PATH/tokenizer.json'")


def _lm_example(token_bytes: np.ndarray) -> Callable[[dict], dict]:
    def fn(packed: dict) -> dict:
        tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
        targets = tokens[1:]
        weights = (segments[1:] > 0).astype(np.float32)
        return {
            "inputs": tokens[:-1],
            "targets": targets,
            "weights": weights,
            "target_bytes": token_bytes[targets].astype(np.float32) * weights,
        }

    return fn


def lm_dataset(
    docs: Sequence[Any],
    tokenizer: tokenizers.Tokenizer,
    *,
    text_key: str,
    seq_len: int,
    batch_size: int,
    seed: int | None,
    shard: tuple[int, int] = (0, 1),
    prefetch: int = 0,
    repeat: bool = True,
    shuffle_window: int = 0,
) -> grain.IterDataset:
    """This process's rows of packed global LM batches.

    seed=None reads the documents in order; repeat=False makes one pass (evaluation).
    shuffle_window > 0 shuffles the packed sequences within windows of that many (grain's
    WindowShuffleIterDataset, whose state the checkpoints keep): without it a batch holds
    consecutive pieces of one or two documents, since packing cuts each document in order.
    """
    index, count = shard
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by the {count} processes")
    rows = slice(index * batch_size // count, (index + 1) * batch_size // count)
    ds = grain.MapDataset.source(docs)
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if seed is not None and repeat:
        ds = ds.repeat(None)
    eod = np.asarray([tokenizer.eod_id], np.int32)
    ds = ds.map(lambda ex: {"tokens": np.concatenate([tokenizer.encode(ex[text_key]), eod])})
    it = ConcatThenSplitIterDataset(ds.to_iter_dataset(READ_OPTIONS), length_struct={"tokens": seq_len + 1})
    if shuffle_window and seed is not None:
        it = WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed)
    it = it.map(_lm_example(tokenizer.token_bytes)).batch(batch_size, drop_remainder=True)
    if count > 1:
        it = it.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    if prefetch:
        it = ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def unigram_bits_per_byte(docs: Sequence[Any], text_key: str, max_bytes: int = 50_000_000) -> float:
    """Entropy (bits) of the byte distribution of `docs`: the best any unigram model scores."""
    counts = np.zeros(256, np.int64)
    seen = 0
    for i in range(len(docs)):
        text = docs[i][text_key]
        data = text.encode("utf-8") if isinstance(text, str) else text
        counts += np.bincount(np.frombuffer(data, np.uint8), minlength=256)
        seen += len(data)
        if seen >= max_bytes:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@dataclasses.dataclass
class LMData:
    """Everything the trainer needs from the LM data side."""

    tokenizer: tokenizers.Tokenizer
    train: grain.IterDataset  # host-local batches, infinite
    eval_batches: Callable[[], Iterator[dict]]  # a fresh, identical pass each call
    unigram_bpb: float  # baseline: unigram entropy of the evaluation bytes
    dataset_id: str


def lm_data(
    cfg: ml_collections.ConfigDict, *, seed: int, batch_size: int, eval_batch_size: int,
    num_eval_batches: int, shard: tuple[int, int],
) -> LMData:
    """Build the training and evaluation pipelines for language modelling."""
    source = text_source(cfg)
    tokenizer = make_tokenizer(cfg, source)
    window = cfg.get("shuffle_window", 0)  # absent from the saved configs of runs made before it existed
    train = lm_dataset(
        source.train, tokenizer, text_key=source.text_key, seq_len=cfg.seq_len,
        batch_size=batch_size, seed=seed, shard=shard, prefetch=cfg.prefetch,
        shuffle_window=window,
    )

    def eval_batches() -> Iterator[dict]:
        it = lm_dataset(
            source.eval, tokenizer, text_key=source.text_key, seq_len=cfg.seq_len,
            batch_size=eval_batch_size, seed=EVAL_ORDER_SEED, shard=shard, repeat=False,
            shuffle_window=window,
        )
        for i, batch in enumerate(it):
            if i >= num_eval_batches:
                return
            yield batch

    return LMData(tokenizer, train, eval_batches, unigram_bits_per_byte(source.eval, source.text_key),
                  source.dataset_id)


def check_vocab(tokenizer: tokenizers.Tokenizer, model_cfg: ml_collections.ConfigDict, extra: int = 0) -> None:
    """Refuse a model vocabulary smaller than the tokenizer's (+ extra special ids)."""
    need = tokenizer.vocab_size + extra
    if need > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {need} ids but config.model.vocab_size={model_cfg.vocab_size}; "
            f"raise the model vocabulary to at least {need}"
        )


def build(config: ml_collections.ConfigDict, shard: tuple[int, int]):
    """Data for the 'lm' task (bigmodel.data.build)."""
    from bigmodel.data import Data, store

    if config.data.sources:  # prepared token stores (bigmodel prepare)
        data = store.build(config, shard)
        check_vocab(data.tokenizer, config.model)
        return data
    lm = lm_data(config.data, seed=config.seed, batch_size=config.train.batch_size,
                 eval_batch_size=config.eval.batch_size, num_eval_batches=config.eval.num_batches, shard=shard)
    check_vocab(lm.tokenizer, config.model)
    return Data(train=lm.train, eval_batches=lm.eval_batches, units_per_example=config.data.seq_len,
                info={"unigram_bits_per_byte": lm.unigram_bpb, "dataset": lm.dataset_id}, tokenizer=lm.tokenizer,
                eval_sets=store.eval_sets(config, lm.tokenizer, shard))


def bits_per_byte(nats_sum: float, bytes_sum: float) -> float:
    """Convert a summed negative log-likelihood in nats to bits per UTF-8 byte."""
    return nats_sum / math.log(2) / max(bytes_sum, 1.0)
