"""Fused attention on TPU: JAX's Pallas splash-attention kernel in the models' [B, T, N, H] layout.

`attention(q, k, v, causal, scale)` runs the kernel (jax.experimental.pallas.ops.tpu.
splash_attention) on every batch row. Grouped-query attention is native to the kernel (N query
heads over K key/value heads, N a multiple of K). Sequences are padded to a multiple of the
kernel's block and the padding is kept out of the softmax by segment ids. Under a mesh the
kernel runs per shard (shard_map) over the batch and head shardings of the activations'
logical axes; a sharded sequence is refused (`unsupported`), as is an explicit mask: the
model then uses XLA's attention. `interpret=True` runs the same kernel in Pallas's
interpreter (any backend), which the tests use to compare it with the einsum path on a CPU.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128  # the kernel's blocks are multiples of the TPU's 128 lanes
BLOCK = 512  # the largest block (query and key rows per grid step)


def block_size(q_len: int, kv_len: int) -> int:
    """The kernel's block: BLOCK, or the longest sequence rounded up to LANES when shorter."""
    longest = max(q_len, kv_len)
    return min(BLOCK, -(-longest // LANES) * LANES)


def _spec(names: tuple[str | None, ...]) -> P:
    return nn.logical_to_mesh_axes(names) if nn.get_logical_axis_rules() else P()


def unsupported(q: jax.Array, k: jax.Array, mask: jax.Array | None, causal: bool, kv_axis: str) -> str | None:
    """Why the kernel cannot take these inputs (None if it can)."""
    if mask is not None:
        return "an explicit attention mask (the kernel takes causal or full attention only)"
    if causal and q.shape[1] != k.shape[1]:
        return f"causal attention of {q.shape[1]} queries over {k.shape[1]} keys"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads over {k.shape[2]} key/value heads"
    mesh = jax.sharding.get_abstract_mesh()
    for heads in ("act_heads", f"act_{kv_axis}"):
        names = ("act_batch", "act_seq", heads, "act_kv")
        spec = (*_spec(names), None, None)
        if spec[1] is not None and not mesh.empty and _axes_size(mesh, spec[1]) > 1:
            return f"the sequence is sharded over mesh axis {spec[1]!r} (set config.mesh.sequence=1)"
    return None


def _axes_size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _kernel(q_len: int, kv_len: int, heads: int, causal: bool, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as masks,
    )

    shape = (q_len, kv_len)
    mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _local(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float, interpret: bool) -> jax.Array:
    """The kernel on one device's shard: q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    t, s = q.shape[1], k.shape[1]
    block = block_size(t, s)
    tp, sp = -(-t // block) * block, -(-s // block) * block
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)))
    heads_major = lambda a: a.transpose(0, 2, 1, 3)
    q = heads_major(pad(q * jnp.asarray(scale, q.dtype), tp))
    k, v = heads_major(pad(k, sp)), heads_major(pad(v, sp))
    segments = None
    if (tp, sp) != (t, s):
        segments = splash.SegmentIds(q=(jnp.arange(tp) < t).astype(jnp.int32),
                                     kv=(jnp.arange(sp) < s).astype(jnp.int32))
    kernel = _kernel(tp, sp, q.shape[1], causal, block, interpret)
    y = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(q, k, v)
    return heads_major(y)[:, :t]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float, kv_axis: str = "heads",
              interpret: bool = False) -> jax.Array:
    """q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H], per shard of the batch and heads under a mesh."""
    local = functools.partial(_local, causal=causal, scale=scale, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v)
    q_spec = _spec(("act_batch", None, "act_heads", None))
    kv_spec = _spec(("act_batch", None, f"act_{kv_axis}", None))
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(q, k, v)
