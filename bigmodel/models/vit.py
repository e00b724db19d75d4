"""Vision Transformer (Dosovitskiy et al. 2020), big_vision layout: pre-LN encoder.

Einsum letters (one meaning everywhere in bigmodel.models):
  B batch, T query length, S key/value length, D model width, N query heads,
  K kv heads, H head dim, F MLP hidden, V vocab, C channels.
Here T counts patches (plus the class token when there is one); P is the patch side in
pixels (a name in shapes only, not an einsum letter).

Patches are embedded by a P×P stride-P convolution (kernel [P, P, C, D], named
(None, None, 'conv_in', 'embed')). The image is summarised by `pool`: 'token' (a
learned class token, the paper's choice), 'map' (multi-head attention pooling with a
learned probe, big_vision's MAPHead) or 'gap' (mean over patches). Positions are a
learned [T, D] table. There is no pre-logits representation layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bigmodel.config import ConfigError
from bigmodel.models import fields, layers
from bigmodel.models.fields import field

# name: patch, D, layers, N, F (Table 1 of the paper; Ti and S from DeiT / big_vision).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=2, d_model=64, num_layers=4, num_heads=4, d_ff=256, image_size=8, num_classes=10,
                 num_channels=1),
    "ti16": dict(patch_size=16, d_model=192, num_layers=12, num_heads=3, d_ff=768),
    "s16": dict(patch_size=16, d_model=384, num_layers=12, num_heads=6, d_ff=1536),
    "b16": dict(patch_size=16, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "l16": dict(patch_size=16, d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
}
POOLS = ("token", "map", "gap")


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full ViT field set for a named size, for `config.model`."""
    return fields.config_dict(ViTConfig, SIZES, size)


@dataclasses.dataclass(frozen=True)
class ViTConfig(fields.ModelConfig):
    """Static hyper-parameters of a ViT: the fields of `config.model` (defaults: ViT-B/16 on ImageNet)."""

    family = "vit"
    image_size: int = field(224, ge=1)  # square input side in pixels, a multiple of patch_size
    num_channels: int = field(3, ge=1)  # C of the input images
    patch_size: int = field(16, ge=1)  # P
    d_model: int = field(768, ge=1)  # D
    num_layers: int = field(12, ge=1)
    num_heads: int = field(12, ge=1)  # N, a divisor of D
    d_ff: int = field(3072, ge=1)  # F
    num_classes: int = field(1000, ge=2)
    pool: str = field("token", choices=POOLS)  # class token, attention pooling (MAPHead) or mean over patches
    head_zeroinit: bool = field(False)  # zero-init the classifier (big_vision's default for fine-tuning)
    dropout: float = field(0.0, ge=0, lt=1)  # after positions, attention and MLP outputs
    layer_norm_eps: float = field(1e-6, gt=0)
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters stay float32
    attention_impl: str = field("", choices=("", *layers.ATTENTION_IMPLS))  # '': layers.default_attention_impl

    def check(self) -> None:
        """Heads that split the width; whole patches."""
        fields.check_heads(self.d_model, self.num_heads)
        if self.image_size % self.patch_size:
            raise ConfigError(f"config.model.image_size={self.image_size} is not a multiple of config.model.patch_size="
                              f"{self.patch_size}; the patches must tile the image")

    @property
    def num_patches(self) -> int:
        """Patches per image, (image_size / P)²."""
        return (self.image_size // self.patch_size) ** 2


class EncoderBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        h = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="ln_1")(x)
        h = layers.Attention(
            cfg.num_heads, cfg.d_model // cfg.num_heads, dropout=cfg.dropout, dtype=dtype,
            implementation=cfg.attention_impl or None, name="attn",
        )(h, train=train)
        x = layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))
        h = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="ln_2")(x)
        h = layers.Mlp(cfg.d_ff, cfg.dropout, dtype=dtype, name="mlp")(h, train=train)
        return layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens, then an MLP."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, D]."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        probe = self.param("probe", layers.partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                           (1, cfg.d_model))
        probe = jnp.broadcast_to(probe.astype(dtype)[None], (x.shape[0], 1, cfg.d_model))
        y = layers.Attention(
            cfg.num_heads, cfg.d_model // cfg.num_heads, dtype=dtype,
            implementation=cfg.attention_impl or None, name="attn",
        )(probe, context=x)
        h = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="ln")(y)
        y = y + layers.Mlp(cfg.d_ff, dtype=dtype, name="mlp")(h)
        return y[:, 0]


class ViT(nn.Module):
    """Vision Transformer classifier returning float32 logits."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, height, width, C] float -> logits [B, classes] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {images.shape[1:3]} but model.image_size={cfg.image_size}")
        x = nn.Conv(
            cfg.d_model,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(images.astype(dtype))  # [B, h/P, w/P, D]
        x = x.reshape(x.shape[0], -1, cfg.d_model)  # [B, T, D], T = number of patches
        if cfg.pool == "token":
            cls = self.param("cls", layers.partitioned(nn.initializers.zeros, (None, "embed")), (1, cfg.d_model))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype)[None], (x.shape[0], 1, cfg.d_model)), x], axis=1)
        pos = self.param(
            "pos", layers.partitioned(nn.initializers.normal(stddev=0.02), ("pos", "embed")),
            (x.shape[1], cfg.d_model),
        )
        x = x + pos.astype(dtype)[None]
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        x = layers.constrain(x, ("act_batch", "act_seq", "act_embed"))
        for i in range(cfg.num_layers):
            x = EncoderBlock(cfg, name=f"block_{i}")(x, train=train)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="ln_f")(x)
        if cfg.pool == "token":
            x = x[:, 0]
        elif cfg.pool == "map":
            x = MAPHead(cfg, name="map_head")(x)
        else:
            x = jnp.mean(x, axis=1)
        head_init = nn.initializers.zeros if cfg.head_zeroinit else layers.dense_init()
        return layers.ClassifierHead(cfg.num_classes, kernel_init=head_init, dtype=dtype, name="head")(x)
