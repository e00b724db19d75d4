"""LayerNorm and RMSNorm for XLA:CPU (`norm.cc`, built by `library`), float32.

XLA:CPU splits a differentiated LayerNorm into a dozen fusions: row reductions for the
statistics, broadcasts written to memory, and column reductions of the scale and bias
gradients over every row. At [16, 256, 256] in the tiny GPT's train step that made 5 to 7 ms
per norm (forward and backward), more than a third of an attention layer. The kernel reads
a row once for its statistics and once to normalise it (forward), and once for the input
gradient while it sums the scale and bias gradients (backward). `layers.LayerNorm` and
`layers.RMSNorm` use it on CPU for float32 on one device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.kernels.cpu import library

FORWARD = "bigmodel_cpu_norm_forward"
BACKWARD = "bigmodel_cpu_norm_backward"

unsupported = library.unsupported  # (dtype) -> why the kernel cannot run, or None


def _stats(x: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
    """y like x, and the per-row mean and 1/std over x's leading dimensions."""
    row = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    return jax.ShapeDtypeStruct(x.shape, jnp.float32), row, row


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, center: bool) -> jax.Array:
    """x [.., D] normalised over D, times scale [D], plus bias [D]; float32.

    center=True is LayerNorm ((x - mean) / sqrt(var + eps)), False is RMSNorm
    (x / sqrt(mean(x²) + eps)). Check `unsupported` first.
    """
    return _forward(x, scale, bias, epsilon, center)[0]


def _forward(x, scale, bias, epsilon, center):
    return library.call(FORWARD, _stats(x), x, scale, bias, eps=np.float32(epsilon), center=bool(center))


def _norm_fwd(x, scale, bias, epsilon, center):
    y, mean, rstd = _forward(x, scale, bias, epsilon, center)
    return y, (x, scale, mean, rstd)


def _norm_bwd(epsilon, center, residuals, dy):
    x, scale, mean, rstd = residuals
    return tuple(library.call(BACKWARD, library.like(x, scale, scale), x, scale, mean, rstd, dy,
                                  center=bool(center)))


norm.defvjp(_norm_fwd, _norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, epsilon: float) -> jax.Array:
    """LayerNorm of x [.., D] with scale [D] and bias [D] (None: no bias)."""
    return norm(x, scale, jnp.zeros_like(scale) if bias is None else bias, epsilon, True)


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """RMSNorm of x [.., D] with scale [D]."""
    return norm(x, scale, jnp.zeros_like(scale), epsilon, False)
