"""Masked-language-model data: packed text in [CLS] … [SEP] rows, BERT's 80/10/10 masking.

Ids: the tokenizer's own ids [0, V_tok), then three specials appended after them
(`SpecialIds.after`): MASK = V_tok, CLS = V_tok + 1, SEP = V_tok + 2 (a vocabulary with its
own [PAD] = 0, [MASK], [CLS] and [SEP], as BERT's WordPiece, uses those: `SpecialIds.of`); with the byte
tokenizer (V_tok = 257, end-of-document 256) that is 257, 258, 259, so a BERT needs
model.vocab_size ≥ 260. Id 0 is padding (the models mask keys holding it): it is the NUL
byte, which source text does not contain, and SentencePiece's <unk>, which byte fallback
never produces.

Pipeline: documents -> ids + end-of-document -> concat-then-split into chunks of
seq_len - 2 -> [CLS] chunk [SEP] (then 0-padding, only in the last row of an ordered
pass) -> masking -> global batches -> this process's rows, exactly as
`pipeline.lm_dataset`.

Masking (Devlin et al. 2018, with RoBERTa's per-pass dynamic masks): each real token
(never CLS, SEP or padding) is selected with probability `mask_rate`; a selected token
becomes MASK with probability `mask_token_fraction`, a uniformly random ordinary id with
probability `random_token_fraction`, and stays itself otherwise. `weights` is 1 at the
selected positions, `targets` holds the original ids everywhere. The random numbers come
from grain's `random_map`, seeded by the pipeline seed and the example's position in the
stream; that position is part of the iterator state, so a resumed run masks exactly as
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchIterDataset

from bigmodel.config import ConfigError
from bigmodel.data import pipeline, tokenizers

NUM_SPECIALS = 3  # MASK, CLS, SEP
OWN_SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]")  # a WordPiece vocabulary's, in SpecialIds.of's order
PAD_ID = 0
EVAL_MASK_SEED = 0  # evaluation masks do not depend on the run's seed, so runs compare on one set


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """BERT's special ids, placed after a tokenizer's vocabulary."""

    pad: int  # padding, masked out of attention
    mask: int
    cls: int  # first token of every row; BertClassifier pools it
    sep: int  # closes every row
    vocab_end: int  # ordinary ids are [1, vocab_end); random replacements are drawn from there

    @classmethod
    def after(cls, tokenizer: tokenizers.Tokenizer) -> SpecialIds:
        """MASK, CLS and SEP as the three ids following the tokenizer's vocabulary."""
        v = tokenizer.vocab_size
        return cls(pad=PAD_ID, mask=v, cls=v + 1, sep=v + 2, vocab_end=v)

    @classmethod
    def of(cls, tokenizer: tokenizers.Tokenizer) -> SpecialIds:
        """The tokenizer's own [PAD], [MASK], [CLS] and [SEP] where it has them all (a BERT WordPiece
        vocabulary, e.g. an imported checkpoint's), else three ids appended after it (`after`)."""
        token_id = getattr(tokenizer, "token_id", None)
        own = [token_id(t) for t in OWN_SPECIALS] if token_id else [None]
        if any(i is None for i in own):
            return cls.after(tokenizer)
        pad, mask, cls_id, sep = own
        if pad != PAD_ID:
            raise ConfigError(f"the tokenizer has [PAD] at id {pad}, but bigmodel's BERT masks id {PAD_ID} as "
                              "padding; use a vocabulary whose [PAD] is id 0 (as BERT's)")
        return cls(pad=pad, mask=mask, cls=cls_id, sep=sep, vocab_end=tokenizer.vocab_size)

    @property
    def vocab_needed(self) -> int:
        """The smallest model vocabulary that holds the tokenizer's ids and these."""
        return max(self.vocab_end, self.mask + 1, self.cls + 1, self.sep + 1)


@dataclasses.dataclass(frozen=True)
class Masking:
    """How tokens are selected and corrupted."""

    rate: float = 0.15  # share of real tokens to predict
    mask_fraction: float = 0.8  # of those: replaced by MASK
    random_fraction: float = 0.1  # of those: replaced by a random ordinary id (the rest stay)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Masking:
        """Read and check data.mask_rate / mask_token_fraction / random_token_fraction."""
        m = cls(cfg.mask_rate, cfg.mask_token_fraction, cfg.random_token_fraction)
        if not 0.0 < m.rate <= 1.0:
            raise ConfigError(f"config.data.mask_rate={m.rate} must be in (0, 1]; BERT uses 0.15")
        if m.mask_fraction < 0 or m.random_fraction < 0 or m.mask_fraction + m.random_fraction > 1.0:
            raise ConfigError(
                f"config.data.mask_token_fraction={m.mask_fraction} and random_token_fraction={m.random_fraction} "
                "must be non-negative and sum to at most 1 (BERT: 0.8 and 0.1)"
            )
        return m


def frame(chunk: np.ndarray, real: np.ndarray, seq_len: int, ids: SpecialIds) -> np.ndarray:
    """[CLS] + real tokens of a packed chunk + [SEP], zero-padded to seq_len."""
    body = chunk[real]  # concat-then-split pads only at the end, so the real tokens are a prefix
    out = np.full(seq_len, ids.pad, np.int32)
    out[0] = ids.cls
    out[1:1 + len(body)] = body
    out[1 + len(body)] = ids.sep
    return out


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, ids: SpecialIds, masking: Masking) -> dict:
    """One row [T] of ids -> {inputs, targets, weights} with BERT's corruption."""
    maskable = (tokens != ids.pad) & (tokens != ids.cls) & (tokens != ids.sep)
    # Draw all randomness at fixed shapes, so the stream of draws never depends on the data.
    select = (rng.random(tokens.shape) < masking.rate) & maskable
    how = rng.random(tokens.shape)
    random_ids = rng.integers(1, ids.vocab_end, tokens.shape, dtype=np.int32)
    inputs = tokens.copy()
    to_mask = select & (how < masking.mask_fraction)
    to_random = select & (how >= masking.mask_fraction) & (how < masking.mask_fraction + masking.random_fraction)
    inputs[to_mask] = ids.mask
    inputs[to_random] = random_ids[to_random]
    return {"inputs": inputs, "targets": tokens, "weights": select.astype(np.float32)}


def mlm_dataset(
    docs: Sequence[Any],
    tokenizer: tokenizers.Tokenizer,
    *,
    text_key: str,
    seq_len: int,
    batch_size: int,
    seed: int | None,
    mask_seed: int,
    masking: Masking = Masking(),
    shard: tuple[int, int] = (0, 1),
    prefetch: int = 0,
) -> grain.IterDataset:
    """This process's rows of masked global batches; seed=None means one ordered pass."""
    index, count = shard
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by the {count} processes")
    if seq_len < 3:
        raise ConfigError(f"config.data.seq_len={seq_len} leaves no room for text between [CLS] and [SEP]")
    rows = slice(index * batch_size // count, (index + 1) * batch_size // count)
    ids = SpecialIds.of(tokenizer)
    ds = grain.MapDataset.source(docs)
    if seed is not None:
        ds = ds.shuffle(seed=seed).repeat(None)
    eod = np.asarray([tokenizer.eod_id], np.int32)
    ds = ds.map(lambda ex: {"tokens": np.concatenate([tokenizer.encode(ex[text_key]), eod])})
    it = ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len - 2})
    it = it.map(lambda p: frame(p["tokens"], p["tokens_segment_ids"] > 0, seq_len, ids))
    # Masks are drawn before batching and row slicing, so every process sees the same global batch.
    it = it.random_map(lambda tokens, rng: mask_tokens(tokens, rng, ids, masking), seed=mask_seed)
    it = it.batch(batch_size, drop_remainder=True)
    if count > 1:
        it = it.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    if prefetch:
        it = ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def unigram_loss(docs: Sequence[Any], tokenizer: tokenizers.Tokenizer, text_key: str,
                 max_tokens: int = 5_000_000) -> float:
    """Entropy (nats) of the token distribution: the MLM loss of a model that ignores context."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    seen = 0
    for i in range(len(docs)):
        ids = tokenizer.encode(docs[i][text_key])
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
        seen += len(ids)
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


def build(config: ml_collections.ConfigDict, shard: tuple[int, int]):
    """Data for the 'mlm' task (bigmodel.data.build)."""
    from bigmodel.data import Data

    cfg = config.data
    source = pipeline.text_source(cfg)
    tokenizer = pipeline.make_tokenizer(cfg, source)
    pipeline.check_vocab(tokenizer, config.model, extra=SpecialIds.of(tokenizer).vocab_needed - tokenizer.vocab_size)
    masking = Masking.from_config(cfg)
    common = {"text_key": source.text_key, "seq_len": cfg.seq_len, "masking": masking, "shard": shard}
    train = mlm_dataset(source.train, tokenizer, batch_size=config.train.batch_size, seed=config.seed,
                        mask_seed=config.seed, prefetch=cfg.prefetch, **common)

    def eval_batches() -> Iterator[dict]:
        it = mlm_dataset(source.eval, tokenizer, batch_size=config.eval.batch_size, seed=None,
                         mask_seed=EVAL_MASK_SEED, **common)
        for i, batch in enumerate(it):
            if i >= config.eval.num_batches:
                return
            yield batch

    ids = SpecialIds.of(tokenizer)
    info = {
        "dataset": source.dataset_id,
        "unigram_loss": unigram_loss(source.eval, tokenizer, source.text_key),
        "special_ids": {"pad": ids.pad, "mask": ids.mask, "cls": ids.cls, "sep": ids.sep},
    }
    return Data(train=train, eval_batches=eval_batches, units_per_example=cfg.seq_len, info=info, tokenizer=tokenizer)


def masking_stats(batches: Sequence[dict], ids: SpecialIds) -> dict[str, float]:
    """Shares of selected tokens and of MASK / random / kept among them (for checks and tests)."""
    sel = real = masked = kept = 0
    for b in batches:
        w = b["weights"] > 0
        real += int(((b["targets"] != ids.pad) & (b["targets"] != ids.cls) & (b["targets"] != ids.sep)).sum())
        sel += int(w.sum())
        masked += int((w & (b["inputs"] == ids.mask)).sum())
        kept += int((w & (b["inputs"] == b["targets"])).sum())
    n = max(sel, 1)
    return {"selected": sel / max(real, 1), "mask": masked / n, "kept": kept / n, "random": (sel - masked - kept) / n,
            "count": float(sel)}

