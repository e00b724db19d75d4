"""Bias add and tanh-approximate GELU for XLA:CPU (`gelu.cc`, built by `library`), float32.

XLA:CPU runs GPT-2's MLP activation gelu_tanh(h + b) as two passes over the [B·T, F] hidden
activations in the forward (one of them writing tanh for the backward) and sums the bias
gradient in a separate column reduction: about 11 ms per layer at the tiny GPT's S1 shape
(benchmarks/cpu.md). The kernel makes one pass forward and one backward, keeps only h, and
sums the bias gradient in the backward's pass. `layers.Dense(activation='gelu_tanh')` uses it
on CPU for float32 on one device.
"""

from __future__ import annotations

import jax

from bigmodel.kernels.cpu import library

FORWARD = "bigmodel_cpu_bias_gelu_forward"
BACKWARD = "bigmodel_cpu_bias_gelu_backward"

unsupported = library.unsupported  # (dtype) -> why the kernel cannot run, or None


@jax.custom_vjp
def bias_gelu(h: jax.Array, bias: jax.Array) -> jax.Array:
    """gelu_tanh(h + bias) for h [.., F] and bias [F], float32 (`nn.gelu(approximate=True)`)."""
    return library.call(FORWARD, library.like(h), h, bias)[0]


def _fwd(h, bias):
    return bias_gelu(h, bias), (h, bias)


def _bwd(residuals, dy):
    h, bias = residuals
    return tuple(library.call(BACKWARD, library.like(h, bias), h, bias, dy))


bias_gelu.defvjp(_fwd, _bwd)
