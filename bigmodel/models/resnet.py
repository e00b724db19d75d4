"""ResNet v1.5 image classifiers (torchvision layout), and a small CNN for tiny images.

Einsum letters (one meaning everywhere in bigmodel.models):
  B batch, T query length, S key/value length, D model width, N query heads,
  K kv heads, H head dim, F MLP hidden, V vocab, C channels.
Images are [B, height, width, C] (NHWC, what XLA's convolutions prefer).

v1.5 puts the stride of a downsampling Bottleneck on its 3×3 convolution, not the
first 1×1 (v1). Paddings are explicit and symmetric, as in torchvision, so imported
weights give identical activations (flax's 'SAME' pads stride-2 convs asymmetrically).

BatchNorm: statistics live in the 'batch_stats' collection. `axis_name` is not set on
purpose: under jit with the batch sharded over the data-parallel mesh axes, the batch
mean is a global reduction that XLA computes across devices, so this already is
synchronised BatchNorm (pmap-era code needed axis_name for that; we use no pmap).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bigmodel.models import fields, layers
from bigmodel.models.fields import field

# name: block type, blocks per stage, stem; widths 64·2^stage, expansion 4 for bottleneck.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(block="basic", stage_sizes=(1, 1, 1), width=16, stem="small", image_size=8, num_classes=10),
    "cifar18": dict(block="basic", stage_sizes=(2, 2, 2, 2), stem="small", image_size=32, num_classes=10),
    "18": dict(block="basic", stage_sizes=(2, 2, 2, 2)),
    "34": dict(block="basic", stage_sizes=(3, 4, 6, 3)),
    "50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3)),
    "101": dict(block="bottleneck", stage_sizes=(3, 4, 23, 3)),
    "152": dict(block="bottleneck", stage_sizes=(3, 8, 36, 3)),
}

# name: conv widths then dense width; the flax MNIST example's network.
CNN_SIZES: dict[str, dict[str, Any]] = {
    "small": dict(features=(32, 64), dense=256, image_size=8, num_classes=10),
    "mnist": dict(features=(32, 64), dense=256, image_size=28, num_classes=10, num_channels=1),
}

CONV_NAMES = (None, None, "conv_in", "conv_out")  # kernel [kh, kw, C_in, C_out]
BLOCK_TYPES = ("basic", "bottleneck")  # BasicBlock (ResNet-18/34), Bottleneck (50/101/152)
STEMS = ("imagenet", "small")


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full ResNet field set for a named size, for `config.model`."""
    return fields.config_dict(ResNetConfig, SIZES, size)


def cnn_model_config(size: str) -> ml_collections.ConfigDict:
    """The full small-CNN field set for a named size, for `config.model`."""
    return fields.config_dict(CNNConfig, CNN_SIZES, size)


@dataclasses.dataclass(frozen=True)
class ResNetConfig(fields.ModelConfig):
    """Static hyper-parameters of a ResNet: the fields of `config.model` (defaults: ResNet-18 on ImageNet)."""

    family = "resnet"
    block: str = field("basic", choices=BLOCK_TYPES)
    stage_sizes: tuple[int, ...] = field((2, 2, 2, 2), ge=1)  # blocks per stage
    width: int = field(64, ge=1)  # channels of stage 0; stage i has width·2^i (·4 after a bottleneck)
    stem: str = field("imagenet", choices=STEMS)  # 7×7/2 conv + 3×3/2 max-pool, or one 3×3/1 conv
    num_classes: int = field(1000, ge=2)
    image_size: int = field(224, ge=1)  # for building the init batch; the network itself is size-agnostic
    num_channels: int = field(3, ge=1)  # C of the input images
    bn_momentum: float = field(0.9, ge=0, lt=1)  # running = momentum·running + (1-momentum)·batch (torch's 0.1)
    bn_epsilon: float = field(1e-5, gt=0)
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters, BN statistics float32


@dataclasses.dataclass(frozen=True)
class CNNConfig(fields.ModelConfig):
    """Static hyper-parameters of the small CNN: the fields of `config.model`."""

    family = "cnn"
    features: tuple[int, ...] = field((32, 64), ge=1)  # channels of each 3×3 conv (each followed by 2×2 avg-pool)
    dense: int = field(256, ge=1)  # hidden width of the dense layer
    num_classes: int = field(10, ge=2)
    image_size: int = field(8, ge=1)  # for building the init batch
    num_channels: int = field(1, ge=1)  # C of the input images
    dropout: float = field(0.0, ge=0, lt=1)  # before the output layer
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters stay float32


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """Bias-free k×k convolution with torchvision's symmetric padding k//2."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=layers.partitioned(nn.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_NAMES),
        name=name,
    )


class BatchNorm(nn.Module):
    """nn.BatchNorm over channels with logical names on scale and bias."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    zero_scale: bool = False  # zero-init the last BN of a residual branch (Goyal et al. 2017)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """[B, h, w, C] -> [B, h, w, C]; updates 'batch_stats' when train."""
        # No axis_name: the batch axis is already global under jit (module docstring).
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=layers.partitioned(scale_init, ("conv_out",)),
            bias_init=layers.partitioned(nn.initializers.zeros, ("conv_out",)),
            name="bn",
        )(x)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual; the first carries the stride."""

    features: int  # output channels
    stride: int = 1
    norm: Any = BatchNorm  # partial(BatchNorm, momentum=…, epsilon=…, dtype=…)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, h, w, C] -> [B, h/stride, w/stride, features]."""
        y = conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, train))
        y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = self.norm(zero_scale=True, name="bn2")(y, train)
        if x.shape[-1] != self.features or self.stride != 1:
            x = conv(self.features, 1, self.stride, self.dtype, "proj_conv")(x)
            x = self.norm(name="proj_bn")(x, train)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided, v1.5), 1×1 expand ×4, with a residual."""

    features: int  # width of the 3×3 convolution; the output has 4× as many channels
    stride: int = 1
    norm: Any = BatchNorm
    dtype: Any = jnp.float32
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, h, w, C] -> [B, h/stride, w/stride, 4·features]."""
        out = self.features * self.expansion
        y = conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, train))
        y = conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y, train))
        y = conv(out, 1, 1, self.dtype, "conv3")(y)
        y = self.norm(zero_scale=True, name="bn3")(y, train)
        if x.shape[-1] != out or self.stride != 1:
            x = conv(out, 1, self.stride, self.dtype, "proj_conv")(x)
            x = self.norm(name="proj_bn")(x, train)
        return nn.relu(x + y)


BLOCKS = dict(zip(BLOCK_TYPES, (BasicBlock, Bottleneck)))


class ResNet(nn.Module):
    """ResNet v1.5 classifier returning float32 logits."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, height, width, C] float -> logits [B, classes] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        norm = functools.partial(BatchNorm, momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon, dtype=dtype)
        x = layers.constrain(images.astype(dtype), ("act_batch", None, None, None))
        if cfg.stem == "imagenet":
            x = conv(cfg.width, 7, 2, dtype, "stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x, train))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(cfg.width, 3, 1, dtype, "stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x, train))
        block = BLOCKS[cfg.block]
        for stage, num_blocks in enumerate(cfg.stage_sizes):
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                x = block(cfg.width * 2**stage, stride, norm, dtype, name=f"stage{stage + 1}_block{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pool -> [B, C]
        return layers.ClassifierHead(cfg.num_classes, kernel_init=nn.initializers.lecun_normal(), dtype=dtype,
                                     name="head")(x)


class CNN(nn.Module):
    """Conv-ReLU-AvgPool stack, then Dense-ReLU-Dense: for 8×8 digits and 28×28 MNIST."""

    cfg: CNNConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, height, width, C] float -> logits [B, classes] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        x = layers.constrain(images.astype(dtype), ("act_batch", None, None, None))
        for i, features in enumerate(cfg.features):
            x = nn.Conv(
                features,
                (3, 3),
                padding="SAME",
                dtype=dtype,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(), CONV_NAMES),
                bias_init=layers.partitioned(nn.initializers.zeros, ("conv_out",)),
                name=f"conv{i + 1}",
            )(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            cfg.dense,
            dtype=dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
            name="fc",
        )(x)
        head = layers.ClassifierHead(cfg.num_classes, cfg.dropout, nn.initializers.lecun_normal(), "mlp", dtype,
                                     name="head")
        return head(nn.relu(x), train=train)
