"""Sampling from a trained language model: a key/value cache, batches of prompts, temperature,
top-k, top-p and stop sequences.

Two paths give the same tokens (greedy decoding exactly; sampling with the same random
stream): `decode` runs one prefill over the left-padded prompts, then one token per step
against a fixed-size key/value cache inside one jitted `lax.while_loop`; `sample` (the
recompute path, kept as the reference and for `bench generate`) runs the whole window
through the model for every new token. `pick` turns logits into tokens for both.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigmodel import checkpoint, sharding, storage, train
from bigmodel.data import pipeline, tokenizers


def load_run(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, nn.Module, Any, Any]:
    """(config, module, variables, tokenizer) of a language model's checkpoint in a workdir (latest by default)."""
    path = storage.as_path(workdir)  # local or in a bucket
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json; is it a bigmodel workdir?")
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    if config.task != "lm":
        raise ValueError(f"generate needs a language model; {workdir} trained task {config.task!r}")
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet; train first")
        # Replicated over the local devices: sampling needs no model parallelism at this size.
        run = train.prepare(config, sharding.make_mesh(sharding.axis_sizes(data=jax.device_count())), steps=False)
        state = ckpt.restore(step, run.abstract_state(), None)
    finally:
        ckpt.close()
    tokenizer = tokenizers.load(workdir)
    if tokenizer is None:  # a workdir written before runs kept their tokenizer
        tokenizer = pipeline.make_tokenizer(config.data, pipeline.text_source(config.data))
    return config, run.module, {"params": state.params, **state.model_state}, tokenizer




def filter_logits(logits: jax.Array, *, temperature: float, top_k: int, top_p: float, vocab_limit: int) -> jax.Array:
    """logits [..., V] -> the logits sampling draws from: ids >= vocab_limit, those outside the
    top_k, and those outside the smallest set holding top_p of the probability set to -inf,
    the rest divided by the temperature (> 0). top_k 0 and top_p 1 keep every id."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # An id stays while the ids more likely than it hold less than top_p (the first always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def pick(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int, top_p: float,
         vocab_limit: int) -> jax.Array:
    """logits [B, V] -> token ids [B]: the argmax for temperature <= 0, else a draw from `filter_logits`."""
    if temperature <= 0:
        return jnp.argmax(jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf), axis=-1)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    return jax.random.categorical(rng, filtered, axis=-1)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("temperature", "top_k", "top_p", "vocab_limit"))
def _recompute_next(module: nn.Module, variables: Any, window: jax.Array, length: jax.Array, rng: jax.Array, *,
                    temperature: float, top_k: int, top_p: float, vocab_limit: int) -> jax.Array:
    """The token after window[:length] (window [W], zero-padded on the right), from a full forward pass."""
    logits = module.apply(variables, window[None], train=False)[:, length - 1]
    return pick(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)[0]


def sample(module: nn.Module, variables: Any, prompt_ids: list[int], *, max_len: int, max_tokens: int,
           temperature: float, top_k: int, vocab_limit: int, stop_id: int | None, seed: int,
           top_p: float = 1.0) -> list[int]:
    """The recompute path: every new token from a forward pass over the last max_len tokens
    (a fixed-size window, so one compilation serves every step)."""
    tokens = list(prompt_ids)
    rng = jax.random.key(seed)
    out: list[int] = []
    for i in range(max_tokens):
        context = tokens[-max_len:]
        window = np.zeros(max_len, np.int32)
        window[: len(context)] = context
        tok = int(_recompute_next(module, variables, jnp.asarray(window), jnp.int32(len(context)),
                                  jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k, top_p=top_p,
                                  vocab_limit=vocab_limit))
        if stop_id is not None and tok == stop_id:
            break
        tokens.append(tok)
        out.append(tok)
    return out


def init_cache(module: nn.Module, batch: int, length: int) -> Any:
    """An empty key/value cache of `length` slots for `batch` sequences (the model's 'cache' collection)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32),
                                                decode=True))["cache"]
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def left_pad(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (tokens [B, length], positions [B, length]), each row's last `length` tokens
    right-aligned; padding slots hold token 0 at position -1."""
    tokens = np.zeros((len(rows), length), np.int32)
    positions = np.full((len(rows), length), -1, np.int32)
    for b, row in enumerate(rows):
        row = list(row)[-length:]
        if row:
            tokens[b, length - len(row):] = row
            positions[b, length - len(row):] = np.arange(len(row))
    return tokens, positions


def _ends_with(out: jax.Array, i: jax.Array, seq: tuple[int, ...]) -> jax.Array:
    """[B] whether out[:, :i + 1] ends with seq."""
    start = jnp.maximum(i + 1 - len(seq), 0)
    tail = jax.lax.dynamic_slice_in_dim(out, start, len(seq), axis=1)
    return (i + 1 >= len(seq)) & jnp.all(tail == jnp.asarray(seq, out.dtype), axis=1)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("steps", "temperature", "top_k", "top_p", "vocab_limit", "stops"))
def _decode_segment(module: nn.Module, variables: Any, tokens: jax.Array, positions: jax.Array, done: jax.Array,
                    limit: jax.Array, rng: jax.Array, offset: jax.Array, *, steps: int, temperature: float,
                    top_k: int, top_p: float, vocab_limit: int, stops: tuple[tuple[int, ...], ...]
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prefill tokens [B, P] into a cache of P + steps slots, then up to `limit` (<= steps) new
    tokens per row, stopping early once every row is done (a stop sequence ended it).

    Returns (out [B, steps], how many were written, done [B]). Token i is drawn with
    fold_in(rng, offset + i), as the recompute path draws it.
    """
    batch, length = tokens.shape
    pick_ = functools.partial(pick, temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)

    def forward(cache: Any, tok: jax.Array, pos: jax.Array) -> tuple[jax.Array, Any]:
        logits, mutated = module.apply({**variables, "cache": cache}, tok, positions=pos, decode=True,
                                       mutable=["cache"])
        return logits[:, -1], mutated["cache"]

    logits, cache = forward(init_cache(module, batch, length + steps), tokens, positions)
    first = pick_(logits, jax.random.fold_in(rng, offset)).astype(jnp.int32)

    def running(state: tuple) -> jax.Array:
        i, done = state[0], state[4]
        return (i < limit) & ~jnp.all(done)

    def step(state: tuple) -> tuple:
        i, cache, tok, pos, done, out = state
        out = out.at[:, i].set(tok)
        for seq in stops:
            done = done | _ends_with(out, i, seq)
        logits, cache = forward(cache, tok[:, None], pos[:, None])
        tok = pick_(logits, jax.random.fold_in(rng, offset + i + 1)).astype(jnp.int32)
        return i + 1, cache, tok, pos + 1, done, out

    state = (jnp.int32(0), cache, first, positions[:, -1] + 1, done, jnp.zeros((batch, steps), jnp.int32))
    i, _, _, _, done, out = jax.lax.while_loop(running, step, state)
    return out, i, done


def _cut(ids: list[int], stops: Sequence[Sequence[int]]) -> tuple[list[int], bool]:
    """ids up to (not including) the earliest stop sequence in them, and whether one was found."""
    end = len(ids)
    for seq in stops:
        n = len(seq)
        for j in range(min(end, len(ids) - n + 1)):
            if ids[j:j + n] == list(seq):
                end = j
                break
    return ids[:end], end < len(ids)


def decode(module: nn.Module, variables: Any, prompts: Sequence[Sequence[int]], *, max_len: int, max_tokens: int,
           vocab_limit: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           stops: Sequence[Sequence[int]] = (), seed: int = 0) -> list[list[int]]:
    """The key/value-cache path: up to max_tokens new ids per prompt (a batch, any lengths), each
    list cut before the first stop sequence (token-id sequences; an end-of-document id is one
    of length 1).

    Within max_len tokens (prompt + new) the ids are the recompute path's (`sample`). A longer
    run continues in segments, each prefilling the last max_len // 2 tokens of every row into a
    fresh cache, where the recompute path slides its window one token at a time.
    """
    stops = tuple(tuple(int(t) for t in seq) for seq in stops if len(seq))
    rows = [list(p) for p in prompts]
    if not rows or not all(rows):
        raise ValueError("every prompt needs at least one token (start it with the end-of-document id)")
    outs: list[list[int]] = [[] for _ in rows]
    done = np.zeros(len(rows), bool)
    rng = jax.random.key(seed)
    made = 0
    while made < max_tokens and not done.all():
        remaining = max_tokens - made
        longest = max(len(r) + len(o) for r, o in zip(rows, outs))
        if longest + remaining <= max_len:
            context, steps = longest, remaining
        else:  # restart from the last half window; later segments then share one compilation
            context = min(longest, max(max_len // 2, 1))
            steps = max_len - context
        tokens, positions = left_pad([r + o for r, o in zip(rows, outs)], context)
        out, count, _ = _decode_segment(
            module, variables, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(done),
            jnp.int32(min(steps, remaining)), rng, jnp.int32(made), steps=steps, temperature=temperature,
            top_k=top_k, top_p=top_p, vocab_limit=vocab_limit, stops=stops)
        out, count = np.asarray(out), int(count)
        for b in range(len(rows)):
            if not done[b]:
                outs[b], done[b] = _cut(outs[b] + out[b, :count].tolist(), stops)
        made += count
    return outs


def generate_texts(workdir: str, prompts: Sequence[str], *, max_tokens: int = 200, temperature: float = 0.8,
                   top_k: int = 40, top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0,
                   step: int | None = None, cache: bool = True) -> list[str]:
    """Each prompt + its sampled continuation, decoded to text and cut before the first stop string
    (the end-of-document token always stops). cache=False takes the recompute path, prompt by prompt."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]; 1 keeps the whole distribution")
    config, module, variables, tokenizer = load_run(workdir, step)
    # The end-of-document id starts an empty context, as at the start of every document.
    prompt_ids = [[tokenizer.eod_id] + tokenizer.encode(p).tolist() for p in prompts]
    settings = dict(max_len=min(config.model.max_len, config.data.seq_len), max_tokens=max_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=tokenizer.vocab_size, seed=seed)
    if cache:
        stop_ids = [[tokenizer.eod_id]] + [tokenizer.encode(s).tolist() for s in stop if s]
        ids = decode(module, variables, prompt_ids, stops=stop_ids, **settings)
    else:
        ids = [sample(module, variables, p, stop_id=tokenizer.eod_id, **settings) for p in prompt_ids]
    texts = []
    for prompt, row in zip(prompts, ids):
        text = tokenizer.decode(row)
        # A stop string need not fall on token boundaries: cut the text as well.
        cuts = [text.find(s) for s in stop if s and s in text]
        texts.append(prompt + (text[:min(cuts)] if cuts else text))
    return texts


def generate_from_workdir(workdir: str, prompt: str, **options: Any) -> str:
    """Prompt + sampled continuation, decoded to text (options as for `generate_texts`)."""
    return generate_texts(workdir, [prompt], **options)[0]
