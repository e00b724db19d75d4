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

from bigmodel.models import layers

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
    if size not in SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(SIZES)}")
    fields = dict(
        name="vit",
        size=size,
        image_size=224,  # the position table is built for (image_size / patch_size)² patches
        num_channels=3,
        patch_size=16,
        d_model=768,
        num_layers=12,
        num_heads=12,
        d_ff=3072,
        num_classes=1000,
        pool="token",  # 'token' | 'map' | 'gap'
        head_zeroinit=False,  # zero-init the classifier (big_vision's default for fine-tuning)
        dropout=0.0,
        layer_norm_eps=1e-6,
        dtype="float32",
        attention_impl="",  # '': layers.default_attention_impl; or 'einsum', 'fused_cpu', 'xla', 'cudnn'
    )
    fields.update(SIZES[size])
    return ml_collections.ConfigDict(fields)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static hyper-parameters of a ViT, built from `config.model`."""

    image_size: int  # square input side in pixels
    patch_size: int  # P
    d_model: int  # D
    num_layers: int
    num_heads: int  # N
    d_ff: int  # F
    num_classes: int = 1000
    pool: str = "token"  # 'token' | 'map' | 'gap'
    head_zeroinit: bool = False  # zero classifier weights at init
    dropout: float = 0.0  # after positions, attention and MLP outputs
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention_impl: str = ""

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "ViTConfig":
        """Pick the ViTConfig fields out of `config.model`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

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
        if cfg.pool not in POOLS:
            raise ValueError(f"unknown model.pool {cfg.pool!r}; choose one of {POOLS}")
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"model.d_model={cfg.d_model} is not divisible by model.num_heads={cfg.num_heads}")
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
        logits = nn.Dense(
            cfg.num_classes,
            dtype=dtype,
            kernel_init=layers.partitioned(head_init, ("embed", "classes")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("classes",)),
            name="head",
        )(x)
        return layers.constrain(logits, ("act_batch", None)).astype(jnp.float32)
