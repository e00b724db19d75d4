"""GPT: a decoder-only causal language model (GPT-2 layout, pre-LayerNorm) and its variants.

Einsum letters: B batch, T query length, S key/value length, D model width,
N query heads, K kv heads, H head dim, F MLP hidden, V vocab.

Structural switches in `config.model` (each independent; `LLAMA` sets them all):
  position     'learned' (GPT-2's wpe table) | 'rope' (rotary, rope_base; rope_scaling 'linear' or
               'llama3' stretches it for long contexts) | 'none'
  norm         'layernorm' | 'rmsnorm' (norm_eps)
  activation   'gelu_tanh' | 'gelu' | 'relu' | 'swiglu' | 'geglu' (gated: three MLP matrices)
  num_kv_heads 0 = num_heads (multi-head); 1 = multi-query; a divisor of num_heads = grouped-query
  use_bias     biases in attention, MLP and LayerNorm
  tie_embeddings  output layer shares the token embedding table
  num_experts  0 = dense MLPs; E > 0 = a routed mixture of experts (bigmodel.models.moe) in
               every moe_every-th block, experts_per_token of them per token, capacity_factor
               (0: dropless), auxiliary losses moe_balance_weight and moe_z_weight
The llama* sizes are Llama-style (RoPE, RMSNorm, SwiGLU, no biases, untied, GQA where the
original has it); llama2_7b counts 6,738,415,616 parameters and llama3_8b 8,030,261,248.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bigmodel.config import ConfigError
from bigmodel.models import fields, layers, moe
from bigmodel.models.fields import field

# The Llama recipe (Touvron et al. 2023) as switches of this decoder.
LLAMA: dict[str, Any] = dict(position="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
                             tie_embeddings=False, rope_base=10000.0, norm_eps=1e-5)

# name: (num_layers, d_model, num_heads); d_ff = 4·d_model, GPT-2 vocab and context unless given.
SIZES: dict[str, dict[str, Any]] = {
    "nano": dict(num_layers=2, d_model=64, num_heads=4, vocab_size=384, max_len=128),
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, vocab_size=384, max_len=256),
    "small": dict(num_layers=6, d_model=256, num_heads=8, vocab_size=384, max_len=512),
    "124m": dict(num_layers=12, d_model=768, num_heads=12),
    "350m": dict(num_layers=24, d_model=1024, num_heads=16),
    "774m": dict(num_layers=36, d_model=1280, num_heads=20),
    "1.3b": dict(num_layers=24, d_model=2048, num_heads=16),  # GPT-3 XL's shape (head dim 128)
    "1.5b": dict(num_layers=48, d_model=1600, num_heads=25),
    # Llama-style; the small ones keep the byte vocabulary and have SwiGLU's F ≈ 8/3·D.
    "llama_nano": dict(LLAMA, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=176, vocab_size=384,
                       max_len=128),
    "llama_tiny": dict(LLAMA, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352, vocab_size=384,
                       max_len=256),
    "llama2_7b": dict(LLAMA, num_layers=32, d_model=4096, num_heads=32, d_ff=11008, vocab_size=32000, max_len=4096),
    "llama3_1b": dict(LLAMA, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, d_ff=8192,
                      vocab_size=128256, max_len=8192, rope_base=500000.0, tie_embeddings=True),
    "llama3_8b": dict(LLAMA, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, d_ff=14336,
                      vocab_size=128256, max_len=8192, rope_base=500000.0),
}
POSITIONS = ("learned", "rope", "none")
SCAN_FROM_LAYERS = 12  # model_config turns scan_layers on for sizes at least this deep
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full GPT field set for a named size, for `config.model`."""
    cfg = fields.config_dict(GPTConfig, SIZES, size)
    # Deep models stack their blocks with nn.scan: compile time stays flat in depth (2.1 s at 4 and at
    # 32 layers for gpt_tiny's width, against 12 s unrolled), for about 15-20% of CPU step time.
    cfg.scan_layers = cfg.num_layers >= SCAN_FROM_LAYERS
    return cfg


@dataclasses.dataclass(frozen=True)
class GPTConfig(fields.ModelConfig):
    """Static hyper-parameters of a GPT: the fields of `config.model` (defaults: GPT-2 124M)."""

    family = "gpt"
    vocab_size: int = field(50257, ge=1)  # V
    max_len: int = field(1024, ge=1)  # longest sequence the position table covers
    num_layers: int = field(12, ge=1)
    d_model: int = field(768, ge=1)  # D
    num_heads: int = field(12, ge=1)  # N, a divisor of D
    d_ff: int = field(0, ge=0)  # F; 0 means 4·D (8/3·D rounded up to a multiple of 16 for gated MLPs)
    dropout: float = field(0.0, ge=0, lt=1)
    tie_embeddings: bool = field(True)  # the output layer shares the token embedding table
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters stay float32
    remat: str = field("none", choices=tuple(REMAT_POLICIES))  # what a block's backward recomputes
    scan_layers: bool = field(False)  # stack layers with nn.scan; model_config sets it from the depth
    attention_impl: str = field("", choices=("", *layers.ATTENTION_IMPLS))  # '': layers.default_attention_impl
    mup: bool = field(False)  # maximal-update parameterisation (Yang et al. 2022; needs tie_embeddings=False)
    mup_base_width: int = field(128, ge=1)  # d_model at which muP and the standard parameterisation coincide
    position: str = field("learned", choices=POSITIONS)  # rope: rotary, with rope_base
    rope_base: float = field(10000.0, gt=0)  # rotary base (position='rope')
    rope_scaling: str = field("none", choices=layers.ROPE_SCALINGS)  # stretch RoPE for long contexts
    rope_factor: float = field(1.0, gt=0)  # rope_scaling's factor (linear, llama3)
    rope_low_freq_factor: float = field(1.0, gt=0)  # llama3: wavelengths above original/low are divided
    rope_high_freq_factor: float = field(4.0, gt=0)  # llama3: wavelengths below original/high are kept
    rope_original_max_len: int = field(8192, ge=1)  # llama3: the context length the model was trained at
    norm: str = field("layernorm", choices=layers.NORMS)
    norm_eps: float = field(1e-5, gt=0)
    norm_impl: str = field("", choices=("", *layers.NORM_IMPLS))  # '': layers.default_norm_impl
    activation: str = field("gelu_tanh", choices=(*layers.ACTIVATIONS, *layers.GATED))  # of the MLP
    activation_impl: str = field("", choices=("", *layers.ACTIVATION_IMPLS))  # '': fused bias + gelu_tanh where it runs
    num_kv_heads: int = field(0, ge=0)  # 0 = num_heads; a divisor of it = grouped-query, 1 = multi-query
    use_bias: bool = field(True)  # biases of attention, MLP and LayerNorm
    num_experts: int = field(0, ge=0)  # 0 = dense MLP; E > 0 = mixture of experts (d_ff is each expert's width)
    experts_per_token: int = field(2, ge=1)  # top-k routing: 1 (Switch) or 2 (GShard, Mixtral); <= num_experts
    capacity_factor: float = field(1.25, ge=0)  # slots per expert = ceil(k·T·factor / E); 0 = dropless (ragged_dot)
    moe_every: int = field(1, ge=1)  # an MoE block every n-th block (the others dense); 1 with scan_layers
    moe_balance_weight: float = field(0.01, ge=0)  # load-balancing loss weight
    moe_z_weight: float = field(0.001, ge=0)  # router z-loss weight

    def check(self) -> None:
        """Heads that split the width, grouped heads that split the heads, and the MoE and muP combinations."""
        fields.check_heads(self.d_model, self.num_heads, self.position == "rope")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config.model.num_kv_heads={self.num_kv_heads} must divide config.model.num_heads="
                              f"{self.num_heads} (0 means num_heads; 1 is multi-query attention)")
        if self.num_experts and self.experts_per_token > self.num_experts:
            raise ConfigError(f"config.model.experts_per_token={self.experts_per_token} exceeds config.model."
                              f"num_experts={self.num_experts}; route each token to at most that many experts")
        if self.scan_layers and self.num_experts and 1 < self.moe_every <= self.num_layers:
            raise ConfigError(f"config.model.moe_every={self.moe_every} mixes MoE and dense blocks, but "
                              "config.model.scan_layers stacks identical blocks; use moe_every=1 or scan_layers=False")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"config.model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                              f"config.model.rope_low_freq_factor={self.rope_low_freq_factor} (Llama 3.1: 4 and 1)")
        if self.mup and self.tie_embeddings:
            raise ConfigError("config.model.mup needs config.model.tie_embeddings=False (muP's readout is separate)")

    @property
    def hidden(self) -> int:
        """F, the MLP width: d_ff, else 4·D, or for gated MLPs 8/3·D rounded up to a multiple of 16
        (the same 8·D² weights as 4·D with two matrices)."""
        if self.d_ff:
            return self.d_ff
        if self.activation in layers.GATED:
            return 16 * math.ceil(8 * self.d_model / 3 / 16)
        return 4 * self.d_model

    @property
    def rope_scaling_spec(self) -> tuple:
        """`layers.rope_frequencies`' scaling argument for these fields."""
        if self.rope_scaling == "linear":
            return ("linear", self.rope_factor)
        if self.rope_scaling == "llama3":
            return ("llama3", self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                    self.rope_original_max_len)
        return ()

    @property
    def width_mult(self) -> float:
        """muP's width multiplier d_model / base width (1 without muP)."""
        return self.d_model / self.mup_base_width if self.mup else 1.0


class Block(nn.Module):
    """Pre-LN decoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    cfg: GPTConfig
    train: bool = False
    moe: bool = False  # a routed mixture of experts in place of the MLP
    decode: bool = False  # attend against the key/value cache (GPT.__call__)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, None]:
        """[B, T, D], positions [B, T] or None -> [B, T, D] (the scan-compatible carry signature)."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        head_dim = cfg.d_model // cfg.num_heads
        # muP: hidden initialisations shrink as 1/sqrt(width multiplier), attention logits
        # scale as 1/H instead of 1/sqrt(H), and the query starts at zero.
        hidden_scale = cfg.width_mult**-0.5
        residual_scale = (2 * cfg.num_layers) ** -0.5 * hidden_scale
        h = layers.make_norm(cfg.norm, cfg.norm_eps, dtype, "ln_1", cfg.use_bias, cfg.norm_impl or None)(x)
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
            num_kv_heads=cfg.num_kv_heads or None,
            rope_base=cfg.rope_base if cfg.position == "rope" else 0.0,
            rope_scaling=cfg.rope_scaling_spec,
            use_bias=cfg.use_bias,
            name="attn",
        )(h, train=self.train, positions=positions, decode=self.decode)
        x = layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))
        h = layers.make_norm(cfg.norm, cfg.norm_eps, dtype, "ln_2", cfg.use_bias, cfg.norm_impl or None)(x)
        if self.moe:
            h = moe.MoeMlp(
                cfg.num_experts, cfg.experts_per_token, cfg.hidden, cfg.capacity_factor, cfg.activation,
                cfg.moe_balance_weight, cfg.moe_z_weight, dtype, hidden_scale, residual_scale, name="moe",
            )(h, train=self.train)
            h = nn.Dropout(cfg.dropout, deterministic=not self.train)(h)
        else:
            h = layers.Mlp(cfg.hidden, cfg.dropout, residual_scale, dtype, use_bias=cfg.use_bias,
                           activation=cfg.activation, in_init_scale=hidden_scale,
                           activation_impl=cfg.activation_impl or None, name="mlp")(h, train=self.train)
        x = layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))
        return x, None


class GPT(nn.Module):
    """Causal language model returning float32 logits."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False, positions: jax.Array | None = None,
                 decode: bool = False) -> jax.Array:
        """tokens [B, T] int32 -> logits [B, T, V] float32.

        positions [B, T]: each token's position (default 0 … T-1; -1 marks left padding).
        decode: append the tokens to the key/value cache (the mutable 'cache' collection, made
        by `bigmodel.generate.init_cache`) and attend to everything in it.
        """
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        length = tokens.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={cfg.max_len}")
        embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype, name="wte")
        x = embed(tokens)
        if cfg.position == "learned":
            pos = self.param(
                "wpe", layers.partitioned(layers.dense_init(0.5), ("pos", "embed")), (cfg.max_len, cfg.d_model)
            )
            if positions is None:
                x = layers.add_leading(x, pos[:length].astype(dtype))
            else:
                x = x + jnp.take(pos, jnp.maximum(positions, 0), axis=0).astype(dtype)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        x = layers.constrain(x, ("act_batch", "act_seq", "act_embed"))

        block = Block
        if cfg.remat != "none" and not decode:
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
        is_moe = [cfg.num_experts > 0 and (i + 1) % cfg.moe_every == 0 for i in range(cfg.num_layers)]
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, moe.AUX: 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,  # every layer sees the same positions
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, train, is_moe[0], decode, name="blocks")(x, positions)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, train, is_moe[i], decode, name=f"block_{i}")(x, positions)

        x = layers.make_norm(cfg.norm, cfg.norm_eps, dtype, "ln_f", cfg.use_bias, cfg.norm_impl or None)(x)
        if cfg.tie_embeddings:
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
