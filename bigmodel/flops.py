"""Parameter counts, training FLOPs per step for every model family, device peak FLOP/s.

FLOPs are counted analytically from the model config and the batch shape, not read from
XLA's cost analysis: that counts nothing inside the fused CPU kernels (custom calls) and
counts the body of a scan once (scanned layers, the RNN time loop, gradient accumulation).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
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
    # Not nn.meta.unbox: under a mesh and logical axis rules it would apply sharding constraints.
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return sum(int((x.value if isinstance(x, nn.meta.AxisMetadata) else x).size) for x in leaves)


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


# --------------------------------------------------------------------------- training FLOPs per step
#
# Convention (Kaplan et al. 2020; PaLM's model FLOPs): a training step costs 3 × the forward
# pass's matrix-multiply FLOPs (forward, input gradient and weight gradient), counting
# 2 FLOPs per multiply-add: 6 per weight and token for a dense layer. Attention's two
# products QK^T and AV add 2·2·S·D per query token and layer forward (12·L·T·D per token
# in training for a causal decoder: the causal mask is not halved). Convolutions count
# 2·K·K·C_in·C_out per output position, padding included. Not counted: embedding lookups,
# norms (LayerNorm, BatchNorm), activations, softmax, pooling, residual adds, the loss and
# the optimizer update: each is a few to a few tens of FLOPs per activation against 6·D per
# output of a dense layer in training (6·9·C_in of a 3×3 convolution; BatchNorm's ~20 are
# 0.6% of that at C_in = 64). The first layer's input gradient is counted even where nothing
# needs it (images), as 6·N does. Remat's recomputation is not counted (model FLOPs).


def _encoder_layers(num_layers: int, d: int, f: int, t: int) -> float:
    """Forward FLOPs of `num_layers` bidirectional Transformer blocks over one sequence of t tokens.

    Per token and layer: query, key, value and output projections 4·2·D², the MLP 2·2·D·F,
    attention over the t keys 2·2·t·D.
    """
    return num_layers * t * (8.0 * d * d + 4.0 * d * f + 4.0 * t * d)


def bert_forward_flops(cfg: Any, example: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of one BERT example: encoder, then the MLM head at every position or the classifier."""
    t, d = example["inputs"][0], cfg.d_model
    flops = _encoder_layers(cfg.num_layers, d, cfg.d_ff or 4 * d, t)
    if cfg.head == "mlm":
        # BertMLM computes its transform and the tied output layer at all T positions (the loss
        # then weighs the masked ones), so all of them are counted.
        return flops + t * (2.0 * d * d + 2.0 * d * cfg.vocab_size)
    return flops + 2.0 * d * d + 2.0 * d * cfg.num_classes  # pooler on [CLS], classifier


def transformer_forward_flops(cfg: Any, example: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of one encoder-decoder example: S source and T target tokens."""
    s, t = example["inputs"][0], example["decoder_inputs"][0]
    d, f = cfg.d_model, cfg.d_ff
    encoder = _encoder_layers(cfg.num_layers, d, f, s)
    decoder = cfg.num_layers * (
        t * (8.0 * d * d + 4.0 * t * d)  # causal self-attention, counted over all T keys as for GPT
        + t * (4.0 * d * d + 4.0 * s * d)  # cross-attention: query and output projections, attention over S
        + s * 4.0 * d * d  # cross-attention's key and value projections of the S encoder outputs
        + t * 4.0 * d * f  # MLP
    )
    return encoder + decoder + t * 2.0 * d * cfg.vocab_size  # tied output layer


def vit_forward_flops(cfg: Any, example: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of one ViT image: patch embedding, blocks over patches (+ class token), pooling, head."""
    height, width, channels = example["inputs"]
    p, d, f = cfg.patch_size, cfg.d_model, cfg.d_ff
    patches = (height // p) * (width // p)
    t = patches + (1 if cfg.pool == "token" else 0)
    flops = patches * 2.0 * p * p * channels * d + _encoder_layers(cfg.num_layers, d, f, t)
    if cfg.pool == "map":
        # One probe query: its query and output projections, keys and values of all t tokens,
        # attention, and the head's MLP.
        flops += 4.0 * d * d + t * 4.0 * d * d + 4.0 * t * d + 4.0 * d * f
    return flops + 2.0 * d * cfg.num_classes


def _conv(height: int, width: int, c_in: int, c_out: int, kernel: int, stride: int) -> tuple[int, int, float]:
    """(output height, output width, forward FLOPs) of a k×k convolution padded by k//2 (odd k)."""
    height, width = math.ceil(height / stride), math.ceil(width / stride)
    return height, width, 2.0 * kernel * kernel * c_in * c_out * height * width


def resnet_forward_flops(cfg: Any, example: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of one ResNet image: its convolutions and the classifier (BatchNorm not counted)."""
    h, w, c = example["inputs"]
    if cfg.stem == "imagenet":
        h, w, flops = _conv(h, w, c, cfg.width, 7, 2)
        h, w = math.ceil(h / 2), math.ceil(w / 2)  # 3×3 stride-2 max-pool, padding 1
    else:
        h, w, flops = _conv(h, w, c, cfg.width, 3, 1)
    c = cfg.width
    for stage, num_blocks in enumerate(cfg.stage_sizes):
        features = cfg.width * 2**stage
        for i in range(num_blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            if cfg.block == "basic":
                ho, wo, a = _conv(h, w, c, features, 3, stride)
                out, b = features, _conv(ho, wo, features, features, 3, 1)[2]
            else:
                a = _conv(h, w, c, features, 1, 1)[2]
                ho, wo, b = _conv(h, w, features, features, 3, stride)
                out = 4 * features
                b += _conv(ho, wo, features, out, 1, 1)[2]
            if c != out or stride != 1:
                b += _conv(h, w, c, out, 1, stride)[2]  # projection shortcut
            flops += a + b
            h, w, c = ho, wo, out
    return flops + 2.0 * c * cfg.num_classes


def cnn_forward_flops(cfg: Any, example: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of one image through the small CNN: 3×3 'SAME' convolutions, 2×2 pools, two dense layers."""
    h, w, c = example["inputs"]
    flops = 0.0
    for features in cfg.features:
        flops += _conv(h, w, c, features, 3, 1)[2]
        h, w, c = math.ceil(h / 2), math.ceil(w / 2), features  # 2×2 stride-2 average pool, 'SAME'
    return flops + 2.0 * h * w * c * cfg.dense + 2.0 * cfg.dense * cfg.num_classes


def rnn_forward_flops(cfg: Any, example: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of one sequence through the LSTM/GRU stack and its head.

    Per step and layer an LSTM multiplies its input and its state by 4 gate matrices, a GRU
    by 3. The time loop runs all T steps (padding included) for the classifier too.
    """
    t, f = example["inputs"][0], cfg.hidden
    gates = {"lstm": 4, "gru": 3}[cfg.cell]
    flops, width = 0.0, cfg.d_model
    for _ in range(cfg.num_layers):
        flops += t * 2.0 * gates * f * (width + f)
        width = f
    if cfg.head == "lm":
        return flops + t * 2.0 * f * cfg.vocab_size
    return flops + 2.0 * f * cfg.num_classes


FORWARD_FLOPS: dict[str, Callable[[Any, Mapping[str, tuple[int, ...]]], float]] = {
    "bert": bert_forward_flops,
    "transformer": transformer_forward_flops,
    "vit": vit_forward_flops,
    "resnet": resnet_forward_flops,
    "cnn": cnn_forward_flops,
    "rnn": rnn_forward_flops,
}


def train_flops_per_step(model_cfg: Any, batch: Mapping[str, Any], params: Any) -> float:
    """Training FLOPs of one optimizer step over the global `batch` (3 × forward matmul FLOPs; see above).

    `batch` maps names to arrays or ShapeDtypeStructs with the global batch first (a step
    processes all of it, however many microbatches `train.grad_accum` splits it into);
    `params` is the (boxed, possibly abstract) parameter tree. GPT keeps
    `gpt_flops_per_token` on its active non-embedding parameters, the count published figures use.
    """
    shapes = {name: tuple(value.shape) for name, value in batch.items()}
    batch_size = shapes["inputs"][0]
    if model_cfg.name == "gpt":
        seq_len = shapes["inputs"][1]
        active = param_count(params) - embedding_param_count(params) - inactive_param_count(params, model_cfg)
        return batch_size * seq_len * gpt_flops_per_token(model_cfg, active, seq_len)
    if model_cfg.name not in FORWARD_FLOPS:
        raise ValueError(f"no FLOP count for model family {model_cfg.name!r}; known: gpt, {', '.join(FORWARD_FLOPS)}")
    example = {name: shape[1:] for name, shape in shapes.items()}
    return 3.0 * batch_size * FORWARD_FLOPS[model_cfg.name](model_cfg, example)


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
