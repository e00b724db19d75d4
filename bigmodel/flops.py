"""Parameter counts, FLOPs per token, device peak FLOP/s and model FLOPs utilisation."""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigmodel import runtime

# Dense peak FLOP/s per chip for bf16 matrix math (vendor figures), matched against
# jax.Device.device_kind by substring, most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)
EMBEDDING_AXES = {"vocab", "pos"}


def param_count(params: Any) -> int:
    """Number of scalars in a (possibly boxed, possibly abstract) parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(params)))


def count_on_axes(boxed_params: Any, axes: set[str]) -> int:
    """Scalars in boxed parameters with at least one logical axis in `axes`."""
    total = 0
    for leaf in jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(leaf, nn.Partitioned) and axes & set(leaf.names):
            total += int(leaf.value.size)
    return total


def embedding_param_count(boxed_params: Any) -> int:
    """Scalars in parameters whose logical axes include 'vocab' or 'pos' (lookup tables)."""
    return count_on_axes(boxed_params, EMBEDDING_AXES)


def inactive_param_count(boxed_params: Any, model_cfg: Any) -> int:
    """Expert parameters a token does not use: (1 - k/E) of those on the 'expert' axis.

    A mixture of experts routes each token through k of its E experts, so its FLOPs follow
    the active parameters (total minus this), not the total. 0 for dense models.
    """
    if "num_experts" not in model_cfg or not model_cfg.num_experts:
        return 0
    expert = count_on_axes(boxed_params, {"expert"})
    return round(expert * (1 - model_cfg.experts_per_token / model_cfg.num_experts))


def gpt_flops_per_token(cfg: Any, params_nonembed: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·(non-embedding params + output head) + attention.

    For a mixture of experts pass the active non-embedding parameters (see
    `inactive_param_count`).

    Attention adds 12·L·T·D per token (QK^T and AV, forward and backward, not halved for
    the causal mask), the PaLM/Kaplan convention.
    """
    head = cfg.vocab_size * cfg.d_model
    return 6.0 * (params_nonembed + head) + 12.0 * cfg.num_layers * seq_len * cfg.d_model


# XLA:CPU's matmul libraries: the process's default choice, and YNNPACK for every dot.
PEAK_MATMUL_OPTIONS = ({}, {runtime.YNN_FLAG.lstrip("-"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})


@functools.lru_cache(maxsize=1)
def measured_cpu_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of float32 matmuls on all CPU devices at once, measured once per process.

    The best over XLA's matmul libraries (bigmodel's runtime settings send plain dots to
    Eigen, which is slower than YNNPACK on one large square matmul). Fake CPU devices
    (--xla_force_host_platform_device_count) share the same cores, so one matmul per device
    measures what the whole machine delivers.
    """
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    a = jax.device_put(jnp.ones((len(devices), n, n), jnp.float32), sharded)
    lowered = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharded).lower(a)
    best = float("inf")
    for options in PEAK_MATMUL_OPTIONS:
        f = lowered.compile(compiler_options=options)
        f(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2.0 * len(devices) * n**3 / best


def peak_flops(devices: list | None = None) -> tuple[float, str]:
    """(total peak FLOP/s over the devices, where the figure comes from)."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Fake CPU devices share the same cores: the measured peak is for all of them.
        return measured_cpu_peak(), "measured float32 matmul on this CPU"
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops * len(devices), f"table: {name}"
    return float("nan"), f"no peak known for device kind {kind!r}"
