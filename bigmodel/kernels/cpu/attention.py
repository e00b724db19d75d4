"""Fused float32 attention for XLA:CPU (`attention.cc`, built by `library`).

XLA:CPU has no fused attention: an einsum attention writes the [T, S] logits and
probabilities of every head to memory, differentiates the softmax elementwise and transposes
the heads in and out. This kernel takes q [.., T, N, H] and k, v [.., S, K, H] in the
projections' own layout and computes each block of 64 query rows against the keys it can
see, softmax included, in one pass over cache-resident tiles; the backward recomputes the
probabilities from the saved log-sum-exp (FlashAttention's scheme). Causal and full
attention, grouped-query heads, no mask; `packed_attention` takes self-attention's stacked
[.., T, N, 3, H] projection as it is.

Where the kernels cannot be built, `unsupported` says why and `layers.Attention` uses the
einsum attention.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.kernels.cpu import library

FORWARD = "bigmodel_cpu_attention_forward"
BACKWARD = "bigmodel_cpu_attention_backward"
PACKED_FORWARD = "bigmodel_cpu_packed_attention_forward"
PACKED_BACKWARD = "bigmodel_cpu_packed_attention_backward"


def unsupported(dtype: Any, t: int, s: int, mask: Any, causal: bool) -> str | None:
    """Why the kernel cannot run attention of T queries over S keys in `dtype` (None if it can)."""
    if mask is not None:
        return "it takes no mask (only causal or full attention)"
    if causal and s < t:
        return f"causal attention needs at least as many keys as queries (got {s} < {t})"
    return library.unsupported(dtype)


def _call(target: str, shapes: Any, *args: jax.Array, causal: bool, scale: float) -> Any:
    return library.call(target, shapes, *args, causal=bool(causal), scale=np.float32(scale))


def _outputs(q_shape: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The output [.., T, N, H] and the log-sum-exp [.., N, T] for queries of shape q_shape."""
    *lead, t, n, h = q_shape
    return jax.ShapeDtypeStruct((*lead, t, n, h), jnp.float32), jax.ShapeDtypeStruct((*lead, n, t), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float) -> jax.Array:
    """softmax(scale·q kᵀ [+ causal mask]) v for q [.., T, N, H], k and v [.., S, K, H] -> [.., T, N, H].

    Query head n attends with key/value head n // (N / K). Leading dimensions are batch.
    Check `unsupported` first: this assumes the kernel is built and the inputs are float32.
    """
    return _call(FORWARD, _outputs(q.shape), q, k, v, causal=causal, scale=scale)[0]


def _attention_fwd(q, k, v, causal, scale):
    out, lse = _call(FORWARD, _outputs(q.shape), q, k, v, causal=causal, scale=scale)
    return out, (q, k, v, out, lse)


def _attention_bwd(causal, scale, residuals, dout):
    q, k, v, out, lse = residuals
    return tuple(_call(BACKWARD, library.like(q, k, v), q, k, v, out, lse, dout, causal=causal, scale=scale))


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def packed_attention(qkv: jax.Array, causal: bool, scale: float) -> jax.Array:
    """`attention` of queries, keys and values stacked as qkv [.., T, N, 3, H] -> [.., T, N, H].

    Reads and differentiates the stacked projection in place: no slices on the way in and no
    concatenation of the three gradients on the way back.
    """
    return _call(PACKED_FORWARD, _outputs(_query_shape(qkv)), qkv, causal=causal, scale=scale)[0]


def _query_shape(qkv: jax.Array) -> tuple[int, ...]:
    *lead, t, n, _, h = qkv.shape
    return (*lead, t, n, h)


def _packed_fwd(qkv, causal, scale):
    out, lse = _call(PACKED_FORWARD, _outputs(_query_shape(qkv)), qkv, causal=causal, scale=scale)
    return out, (qkv, out, lse)


def _packed_bwd(causal, scale, residuals, dout):
    qkv, out, lse = residuals
    return (_call(PACKED_BACKWARD, library.like(qkv), qkv, out, lse, dout, causal=causal, scale=scale)[0],)


packed_attention.defvjp(_packed_fwd, _packed_bwd)
