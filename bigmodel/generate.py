"""Sampling from a trained language model (temperature, top-k, max tokens)."""

from __future__ import annotations

import json
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


def sample(module: nn.Module, variables: Any, prompt_ids: list[int], *, max_len: int, max_tokens: int,
           temperature: float, top_k: int, vocab_limit: int, stop_id: int | None, seed: int) -> list[int]:
    """Autoregressive sampling with a fixed-size window (one compilation for all steps)."""

    @jax.jit
    def next_token(window: jax.Array, length: jax.Array, rng: jax.Array) -> jax.Array:
        logits = module.apply(variables, window[None], train=False)[0, length - 1]
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        if temperature <= 0:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(rng, logits)

    tokens = list(prompt_ids)
    rng = jax.random.key(seed)
    out: list[int] = []
    for i in range(max_tokens):
        context = tokens[-max_len:]
        window = np.zeros(max_len, np.int32)
        window[: len(context)] = context
        tok = int(next_token(jnp.asarray(window), jnp.int32(len(context)), jax.random.fold_in(rng, i)))
        if stop_id is not None and tok == stop_id:
            break
        tokens.append(tok)
        out.append(tok)
    return out


def generate_from_workdir(workdir: str, prompt: str, *, max_tokens: int = 200, temperature: float = 0.8,
                          top_k: int = 40, seed: int = 0, step: int | None = None) -> str:
    """Prompt + sampled continuation, decoded to text."""
    config, module, variables, tokenizer = load_run(workdir, step)
    # The end-of-document id starts an empty context, as at the start of every document.
    prompt_ids = [tokenizer.eod_id] + tokenizer.encode(prompt).tolist()
    max_len = min(config.model.max_len, config.data.seq_len)
    ids = sample(module, variables, prompt_ids, max_len=max_len, max_tokens=max_tokens, temperature=temperature,
                 top_k=top_k, vocab_limit=tokenizer.vocab_size, stop_id=tokenizer.eod_id, seed=seed)
    return prompt + tokenizer.decode(ids)
