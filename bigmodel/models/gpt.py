"""GPT: a decoder-only causal language model (GPT-2 layout, pre-LayerNorm).

Einsum letters: B batch, T query length, S key/value length, D model width,
N query heads, K kv heads, H head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bigmodel.models import layers

# name: (num_layers, d_model, num_heads); d_ff = 4·d_model, GPT-2 vocab and context.
SIZES: dict[str, dict[str, Any]] = {
    "nano": dict(num_layers=2, d_model=64, num_heads=4, vocab_size=384, max_len=128),
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, vocab_size=384, max_len=256),
    "small": dict(num_layers=6, d_model=256, num_heads=8, vocab_size=384, max_len=512),
    "124m": dict(num_layers=12, d_model=768, num_heads=12),
    "350m": dict(num_layers=24, d_model=1024, num_heads=16),
    "774m": dict(num_layers=36, d_model=1280, num_heads=20),
    "1.5b": dict(num_layers=48, d_model=1600, num_heads=25),
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full GPT field set for a named size, for `config.model`."""
    if size not in SIZES:
        raise ValueError(f"unknown GPT size {size!r}; choose one of {sorted(SIZES)}")
    fields = dict(
        name="gpt",
        size=size,
        vocab_size=50257,
        max_len=1024,
        d_ff=0,  # 0 means 4·d_model
        dropout=0.0,
        tie_embeddings=True,
        dtype="float32",
        remat="none",
        scan_layers=False,
        attention_impl="",  # '' lets JAX choose; 'xla' or 'cudnn' to force one
        mup=False,  # maximal-update parameterisation (needs tie_embeddings=False)
        mup_base_width=128,  # d_model at which muP and the standard parameterisation coincide
    )
    fields.update(SIZES[size])
    return ml_collections.ConfigDict(fields)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Static hyper-parameters of a GPT, built from `config.model`."""

    vocab_size: int  # V
    max_len: int  # longest sequence the position table covers
    num_layers: int
    d_model: int  # D
    num_heads: int  # N
    d_ff: int = 0  # F; 0 means 4·D
    dropout: float = 0.0
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # 'none' | 'full' | 'dots'
    scan_layers: bool = False  # stack layers with nn.scan (fast compile for deep models)
    attention_impl: str = ""
    mup: bool = False  # maximal-update parameterisation (Yang et al. 2022)
    mup_base_width: int = 128  # base d_model of muP's width multiplier

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "GPTConfig":
        """Pick the GPTConfig fields out of `config.model`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    @property
    def hidden(self) -> int:
        """F, the MLP width."""
        return self.d_ff or 4 * self.d_model

    @property
    def width_mult(self) -> float:
        """muP's width multiplier d_model / base width (1 without muP)."""
        return self.d_model / self.mup_base_width if self.mup else 1.0


class Block(nn.Module):
    """Pre-LN decoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    cfg: GPTConfig
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        """[B, T, D] -> [B, T, D] (the scan-compatible carry signature)."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        head_dim = cfg.d_model // cfg.num_heads
        # muP: hidden initialisations shrink as 1/sqrt(width multiplier), attention logits
        # scale as 1/H instead of 1/sqrt(H), and the query starts at zero.
        hidden_scale = cfg.width_mult**-0.5
        residual_scale = (2 * cfg.num_layers) ** -0.5 * hidden_scale
        h = layers.LayerNorm(dtype=dtype, name="ln_1")(x)
        h = layers.Attention(
            num_heads=cfg.num_heads,
            head_dim=head_dim,
            causal=True,
            dropout=cfg.dropout,
            out_init_scale=residual_scale,
            dtype=dtype,
            implementation=cfg.attention_impl or None,
            scale=1.0 / head_dim if cfg.mup else None,
            init_scale=hidden_scale,
            zero_query=cfg.mup,
            name="attn",
        )(h, train=self.train)
        x = layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))
        h = layers.LayerNorm(dtype=dtype, name="ln_2")(x)
        h = layers.Mlp(cfg.hidden, cfg.dropout, residual_scale, dtype, in_init_scale=hidden_scale,
                       name="mlp")(h, train=self.train)
        x = layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))
        return x, None


class GPT(nn.Module):
    """Causal language model returning float32 logits."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """tokens [B, T] int32 -> logits [B, T, V] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        length = tokens.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={cfg.max_len}")
        embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype, name="wte")
        pos = self.param(
            "wpe", layers.partitioned(layers.dense_init(0.5), ("pos", "embed")), (cfg.max_len, cfg.d_model)
        )
        x = embed(tokens) + pos[:length].astype(dtype)[None]
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        x = layers.constrain(x, ("act_batch", "act_seq", "act_embed"))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, train, name="blocks")(x, None)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, train, name=f"block_{i}")(x, None)

        x = layers.LayerNorm(dtype=dtype, name="ln_f")(x)
        if cfg.tie_embeddings:
            if cfg.mup:
                raise ValueError("model.mup needs model.tie_embeddings=False (muP's readout is separate)")
            logits = embed.attend(x)
        else:
            # muP's readout starts at zero and divides the logits by the width multiplier.
            init = nn.initializers.zeros if cfg.mup else layers.dense_init()
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                kernel_init=layers.partitioned(init, ("embed", "vocab")),
                name="lm_head",
            )(x) / cfg.width_mult
        logits = layers.constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        return logits.astype(jnp.float32)
