"""Sequence-to-sequence data: built-in algorithmic tasks (offline) and TFDS translation.

Algorithmic tasks (`config.data.name`), written as characters:
  addition  "123+4567" -> "4690"   operands of 1..max_digits digits
  reverse   "40213"    -> "31204"  1..max_digits digits
  sort      "40213"    -> "01234"  1..max_digits digits
Training example i is drawn from its own generator seeded with (config.seed, i), so any
example can be rebuilt from its index and the iterator state is just a position. A
problem is held out when a hash of its source string falls below data.test_fraction:
training rejects those problems and the test set (fixed, whatever the run's seed) is made
of them only, so the two are disjoint by construction. Vocabulary: PAD 0, BOS 1, EOS 2,
then one id per character.

Translation: a TFDS dataset whose features are language codes, e.g.
`wmt14_translate` with data.source_lang='de', data.target_lang='en' (or the full name
'wmt14_translate/de-en'). One SentencePiece BPE vocabulary is trained on both sides of the
train split and cached next to the data. Sources longer than source_len and targets
longer than target_len (EOS included) are cut; a cut target has no EOS.

Batches: inputs [B,S] source ids, decoder_inputs [B,T] = BOS + targets[:-1], targets [B,T]
(ending in EOS), weights [B,T] (1 on real target tokens); 0 pads everything. As in
pipeline.lm_dataset, every process builds the same global batches and keeps its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from bigmodel.config import ConfigError
from bigmodel.data import pipeline, tokenizers

ALGORITHMIC = ("addition", "reverse", "sort")
# Seed of the held-out stream: the test set is the same for every run seed.
TEST_SEED = 20140901
TRAIN_LENGTH = 2**62  # "endless": the training index space is never exhausted


class CharVocab:
    """Characters of the algorithmic tasks: PAD 0, BOS 1, EOS 2, then '0'-'9' and '+'."""

    pad_id, bos_id, eos_id = 0, 1, 2
    chars = "0123456789+"
    vocab_size = 3 + len(chars)
    eod_id = eos_id

    def __init__(self) -> None:
        self._ids = {c: i + 3 for i, c in enumerate(self.chars)}
        self.token_bytes = np.ones(self.vocab_size, np.int32)
        self.token_bytes[:3] = 0

    def encode(self, text: bytes | str) -> np.ndarray:
        """Text -> int32 ids (no BOS/EOS); raises ValueError on a character outside the vocabulary."""
        text = text.decode() if isinstance(text, bytes) else text
        try:
            return np.asarray([self._ids[c] for c in text], np.int32)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary {self.chars!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at EOS and drops PAD/BOS."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(self.chars[i - 3])
        return "".join(out)


# --------------------------------------------------------------------------- algorithmic problems


def _number(rng: np.random.Generator, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short ones are not rare)."""
    n = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10**n))


def make_problem(name: str, rng: np.random.Generator, max_digits: int) -> tuple[str, str]:
    """One random (source, target) pair of an algorithmic task."""
    if name == "addition":
        a, b = _number(rng, max_digits), _number(rng, max_digits)
        return f"{a}+{b}", str(a + b)
    digits = "".join(map(str, rng.integers(0, 10, int(rng.integers(1, max_digits + 1)))))
    if name == "reverse":
        return digits, digits[::-1]
    if name == "sort":
        return digits, "".join(sorted(digits))
    raise ValueError(f"unknown algorithmic task {name!r}; choose one of {ALGORITHMIC}")


def is_held_out(source: str, fraction: float) -> bool:
    """Whether a problem belongs to the test set: a stable hash of its source, not Python's hash()."""
    digest = hashlib.blake2b(source.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def train_problem(name: str, seed: int, index: int, max_digits: int, test_fraction: float) -> tuple[str, str]:
    """Training example `index`: the first problem of its generator that is not held out."""
    rng = np.random.default_rng((seed, index))
    while True:
        pair = make_problem(name, rng, max_digits)
        if not is_held_out(pair[0], test_fraction):
            return pair


def test_problems(name: str, count: int, max_digits: int, test_fraction: float) -> list[tuple[str, str]]:
    """`count` distinct held-out problems, always the same ones for the same settings."""
    rng = np.random.default_rng(TEST_SEED)
    seen: dict[str, str] = {}
    # More distinct held-out problems than exist: 200 repeats in a row say the pool is spent.
    repeats = 0
    while repeats < 200:
        source, target = make_problem(name, rng, max_digits)
        if is_held_out(source, test_fraction):
            repeats = repeats + 1 if source in seen else 0
            seen.setdefault(source, target)
            if len(seen) == count:
                return list(seen.items())
    raise ConfigError(
        f"only {len(seen)} distinct held-out {name} problems were found but the evaluation needs {count} "
        f"(eval.batch_size * eval.num_batches); raise config.data.test_fraction or config.data.max_digits, "
        "or evaluate fewer batches"
    )


def problem_lengths(name: str, max_digits: int) -> tuple[int, int]:
    """(longest source, longest target incl. EOS) of an algorithmic task."""
    if name == "addition":
        return 2 * max_digits + 1, max_digits + 2
    return max_digits, max_digits + 1


# --------------------------------------------------------------------------- translation


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class TranslationSource:
    """The train and eval splits of a TFDS translation dataset and its language keys."""

    train: Sequence[Any]
    eval: Sequence[Any]
    dataset_id: str
    source_key: str
    target_key: str


def translation_source(cfg: ml_collections.ConfigDict) -> TranslationSource:
    """Open `config.data.name` (e.g. 'wmt14_translate' or 'wmt14_translate/de-en') as TFDS data sources."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.translate  # registers wmt*_translate (not found by name otherwise)

    data_dir = cfg.data_dir or None
    src, tgt = cfg.source_lang, cfg.target_lang
    name = cfg.name
    try:
        if "/" not in name:
            # WMT names its configs 'xx-en' whichever way one translates: pick the one with both languages.
            configs = [c.name for c in tfds.builder_cls(name).BUILDER_CONFIGS]
            pair = next((p for p in (f"{src}-{tgt}", f"{tgt}-{src}") if p in configs), None)
            if configs and pair is None:
                raise ConfigError(
                    f"{name} has no language pair with config.data.source_lang={src!r} and target_lang={tgt!r}; "
                    f"its pairs: {configs}"
                )
            name = f"{name}/{pair}" if pair else name
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(
            f"config.data.name={cfg.name!r} is neither a built-in task {ALGORITHMIC} nor a known TFDS dataset "
            f"({str(e).splitlines()[0]}); use e.g. 'wmt14_translate'"
        ) from None
    keys = set(builder.info.features.keys())
    if not {src, tgt} <= keys:
        raise ConfigError(
            f"config.data.source_lang={src!r} / target_lang={tgt!r} are not both features of {name}; "
            f"features: {sorted(keys)}"
        )
    train, evals = pipeline.tfds_splits(name, cfg.data_dir, (cfg.train_split, cfg.eval_split), builder)
    return TranslationSource(train, evals, f"{name}/{builder.version}", src, tgt)


def translation_tokenizer(cfg: ml_collections.ConfigDict,
                          source: TranslationSource) -> tokenizers.SentencePieceTokenizer:
    """One SentencePiece vocabulary for both languages, trained on the train split once and cached.

    Its ids: unknown 0, BOS 1, EOS 2. The unknown id doubles as padding, which is safe because
    byte fallback means encoding never produces it.
    """
    import tensorflow_datasets as tfds

    path = tokenizers.spm_path(cfg.data_dir or tfds.core.constants.DATA_DIR, source.dataset_id, cfg.spm_vocab_size)
    if path.exists():
        return tokenizers.SentencePieceTokenizer(path)

    def texts() -> Iterator[str]:
        for i in range(len(source.train)):
            example = source.train[i]
            yield _text(example[source.source_key])
            yield _text(example[source.target_key])

    return tokenizers.train_sentencepiece(texts(), cfg.spm_vocab_size, path)


# --------------------------------------------------------------------------- problems -> batches


@dataclasses.dataclass
class Problems:
    """A task's tokenizer and its examples as (source, target) text pairs."""

    tokenizer: Any  # CharVocab or SentencePieceTokenizer
    train: grain.MapDataset  # (source, target) pairs in training order, endless
    eval: list[tuple[str, str]]  # held-out pairs in evaluation order
    dataset_id: str
    bleu_tokenize: str  # sacrebleu tokenizer suited to the outputs: 'char' for digit strings


def problems(config: ml_collections.ConfigDict) -> Problems:
    """The (source, target) pairs of `config.data`, validated against config.data and config.model."""
    cfg = config.data
    num_eval = config.eval.batch_size * config.eval.num_batches
    if cfg.name in ALGORITHMIC:
        if cfg.max_digits < 1:
            raise ConfigError(f"config.data.max_digits={cfg.max_digits}; use at least 1")
        if not 0 < cfg.test_fraction < 1:
            raise ConfigError(f"config.data.test_fraction={cfg.test_fraction}; use a share in (0, 1), e.g. 0.05")
        source_len, target_len = problem_lengths(cfg.name, cfg.max_digits)
        if cfg.source_len < source_len or cfg.target_len < target_len:
            raise ConfigError(
                f"{cfg.name} with max_digits={cfg.max_digits} has sources of up to {source_len} and targets of up to "
                f"{target_len} ids (EOS included) but config.data.source_len={cfg.source_len}, target_len="
                f"{cfg.target_len}; set --config.data.source_len={source_len} --config.data.target_len={target_len}"
            )
        name, seed, digits, fraction = cfg.name, config.seed, cfg.max_digits, cfg.test_fraction
        train = grain.MapDataset.range(TRAIN_LENGTH).map(lambda i: train_problem(name, seed, i, digits, fraction))
        evals = test_problems(name, num_eval, digits, fraction)
        result = Problems(CharVocab(), train, evals, f"{name}/max_digits={digits}", "char")
    else:
        source = translation_source(cfg)
        tokenizer = translation_tokenizer(cfg, source)
        src, tgt = source.source_key, source.target_key
        train = grain.MapDataset.source(source.train).shuffle(seed=config.seed).repeat(None)
        train = train.map(lambda ex: (_text(ex[src]), _text(ex[tgt])))
        examples = (source.eval[i] for i in range(min(num_eval, len(source.eval))))
        evals = [(_text(ex[src]), _text(ex[tgt])) for ex in examples]
        result = Problems(tokenizer, train, evals, source.dataset_id, "13a")
    check_ids(config, result.tokenizer)
    return result


def check_ids(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
    """Refuse BOS/EOS ids, lengths or a model vocabulary that do not fit the tokenizer."""
    cfg = config.data
    if isinstance(tokenizer, CharVocab):
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
    else:
        bos, eos = int(tokenizer.sp.bos_id()), int(tokenizer.sp.eos_id())
    if (cfg.bos_id, cfg.eos_id) != (bos, eos):
        raise ConfigError(
            f"config.data.bos_id={cfg.bos_id}, eos_id={cfg.eos_id} but the vocabulary's are BOS {bos}, EOS {eos}; "
            f"set --config.data.bos_id={bos} --config.data.eos_id={eos}"
        )
    if cfg.target_len < 2 or cfg.source_len < 1:
        raise ConfigError("config.data.target_len must be at least 2 (a token and EOS) and source_len at least 1")
    longest = max(cfg.source_len, cfg.target_len)
    if "max_len" in config.model and longest > config.model.max_len:
        raise ConfigError(
            f"config.data.source_len/target_len ({cfg.source_len}/{cfg.target_len}) exceed config.model.max_len="
            f"{config.model.max_len}; shorten them or raise --config.model.max_len={longest}"
        )
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"the vocabulary has {tokenizer.vocab_size} ids but config.model.vocab_size={config.model.vocab_size}; "
            f"raise the model vocabulary to at least {tokenizer.vocab_size}"
        )


def encode_pair(tokenizer: Any, source: str, target: str, source_len: int, target_len: int, bos: int, eos: int) -> dict:
    """One (source, target) text pair -> padded, fixed-length arrays of a seq2seq example."""
    src = tokenizer.encode(source)[:source_len]
    tgt = np.concatenate([tokenizer.encode(target), [eos]])[:target_len]
    inputs = np.zeros(source_len, np.int32)
    inputs[: len(src)] = src
    targets = np.zeros(target_len, np.int32)
    targets[: len(tgt)] = tgt
    decoder_inputs = np.concatenate([[bos], targets[:-1]]).astype(np.int32)
    # A cut target still ends in a real token, so decoder_inputs never feeds padding before the end.
    return {"inputs": inputs, "decoder_inputs": decoder_inputs, "targets": targets,
            "weights": (targets != 0).astype(np.float32)}


def encode_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]], cfg: ml_collections.ConfigDict) -> dict:
    """A list of text pairs -> one batch of arrays (config.data lengths and ids)."""
    examples = [encode_pair(tokenizer, s, t, cfg.source_len, cfg.target_len, cfg.bos_id, cfg.eos_id) for s, t in pairs]
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def _rows(shard: tuple[int, int], batch_size: int) -> slice:
    index, count = shard
    if batch_size % count:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {count} processes")
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


def seq2seq_dataset(
    pairs: grain.MapDataset, tokenizer: Any, cfg: ml_collections.ConfigDict, *, batch_size: int,
    shard: tuple[int, int] = (0, 1), prefetch: int = 0,
) -> grain.IterDataset:
    """This process's rows of global batches of encoded pairs (iterator state is checkpointable)."""
    rows = _rows(shard, batch_size)
    def encode(pair: tuple[str, str]) -> dict:
        return encode_pair(tokenizer, *pair, cfg.source_len, cfg.target_len, cfg.bos_id, cfg.eos_id)

    it = pairs.map(encode).batch(batch_size, drop_remainder=True).to_iter_dataset(pipeline.READ_OPTIONS)
    if shard[1] > 1:
        it = it.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    if prefetch:
        it = ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def build(config: ml_collections.ConfigDict, shard: tuple[int, int]):
    """Data for the 'seq2seq' task (bigmodel.data.build)."""
    from bigmodel.data import Data

    probs = problems(config)
    cfg = config.data
    train = seq2seq_dataset(probs.train, probs.tokenizer, cfg, batch_size=config.train.batch_size, shard=shard,
                            prefetch=cfg.prefetch)
    eval_size = config.eval.batch_size
    rows = _rows(shard, eval_size)
    num_batches = len(probs.eval) // eval_size
    if num_batches == 0:
        raise ConfigError(
            f"the evaluation split has {len(probs.eval)} examples, fewer than config.eval.batch_size={eval_size}; "
            "lower the evaluation batch size"
        )
    batches = [encode_batch(probs.tokenizer, probs.eval[i * eval_size:(i + 1) * eval_size], cfg)
               for i in range(num_batches)]

    def eval_batches() -> Iterator[dict]:
        for batch in batches:
            yield {k: v[rows] for k, v in batch.items()}

    info = {
        "dataset": probs.dataset_id,
        "vocab_size": int(probs.tokenizer.vocab_size),
        "source_len": cfg.source_len,
        "target_len": cfg.target_len,
        "eval_examples": num_batches * eval_size,
        "bleu_tokenize": probs.bleu_tokenize,
    }
    return Data(train=train, eval_batches=eval_batches, units_per_example=cfg.target_len, info=info,
                tokenizer=probs.tokenizer)
