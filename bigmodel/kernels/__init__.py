"""Fused kernels, one package per backend.

cpu/   the XLA:CPU library: attention, LayerNorm/RMSNorm and bias + GELU as XLA FFI custom
       calls, compiled for the host on first use (`cpu.library`).
tpu/   Pallas kernels for TPU will live here.
GPU needs no package of its own: attention runs cuDNN's fused kernel through
`jax.nn.dot_product_attention`, and XLA fuses the norms and activations itself.

The models pick a kernel per op (`bigmodel.models.layers`) and fall back to plain JAX
wherever one cannot run.
"""
