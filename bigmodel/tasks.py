"""Tasks: what a model is fed from a batch, and the loss and metrics of its outputs.

Metrics are returned as {name: (sum, count)} so microbatches, devices and evaluation
batches combine exactly; `reduce_metrics` turns them into means.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, tuple[jax.Array, jax.Array]]


class LanguageModeling:
    """Next-token prediction on packed sequences; reports loss and bits per byte."""

    name = "lm"

    def model_inputs(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
        """Positional inputs of the model: tokens [B, T]."""
        return (batch["inputs"],)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
        """A batch of zeros with the right shapes and dtypes (for init and shape checks)."""
        tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
        ones = jnp.ones((batch_size, seq_len), jnp.float32)
        return {"inputs": tokens, "targets": tokens, "weights": ones, "target_bytes": ones}

    def loss_and_metrics(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        """Mean token cross-entropy over non-padding targets, plus summed metrics."""
        weights = batch["weights"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * weights
        tokens = weights.sum()
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * weights
        metrics = {
            "loss": (nll.sum(), tokens),
            "accuracy": (correct.sum(), tokens),
            # bits per byte = nats / ln 2 / bytes; kept as (nats/ln2, bytes) so sums combine
            "bits_per_byte": (nll.sum() / math.log(2), batch["target_bytes"].sum()),
        }
        return nll.sum() / jnp.maximum(tokens, 1.0), metrics


TASKS = {"lm": LanguageModeling}


def get(name: str) -> Any:
    """The task object for `config.task`."""
    if name not in TASKS:
        raise ValueError(f"unknown config.task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
    """Element-wise sum of two metric dicts of (sum, count)."""
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def reduce_metrics(metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """(sum, count) -> mean, as Python floats."""
    return {k: float(s) / max(float(c), 1e-12) for k, (s, c) in metrics.items()}
