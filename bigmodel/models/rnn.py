"""Recurrent networks (LSTM, GRU): a byte-level language model and a sequence classifier.

Einsum letters (one meaning everywhere in bigmodel.models):
  B batch, T query length, S key/value length, D model width, N query heads,
  K kv heads, H head dim, F MLP hidden, V vocab, C channels.
Here D is the embedding width and F the recurrent hidden width.

Layers are `nn.RNN` over flax's cells (`OptimizedLSTMCell`, whose parameters are
`LSTMCell`-compatible, or `GRUCell`), stacked; `nn.RNN` runs the time loop as an
`nn.scan`. Input kernels [D or F, F] are ('embed', 'mlp'); recurrent kernels [F, F] are
(None, 'mlp') so no logical name repeats within an array; biases ('mlp',).
Token id 0 is padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bigmodel.models import layers

# name: (num_layers, d_model = embedding width, hidden = recurrent width)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=1, d_model=64, hidden=128),
    "small": dict(num_layers=2, d_model=256, hidden=256),
    "medium": dict(num_layers=2, d_model=650, hidden=650, dropout=0.5),  # Zaremba et al. 2014
    "large": dict(num_layers=2, d_model=1500, hidden=1500, dropout=0.65),
}
CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}
HEADS = ("lm", "classify")


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full RNN field set for a named size, for `config.model`."""
    if size not in SIZES:
        raise ValueError(f"unknown RNN size {size!r}; choose one of {sorted(SIZES)}")
    fields = dict(
        name="rnn",
        size=size,
        cell="lstm",  # 'lstm' | 'gru'
        head="lm",  # 'lm' (RNNLM, logits per step) | 'classify' (RNNClassifier)
        vocab_size=384,  # bytes plus specials, padded to a multiple of 128
        num_layers=1,
        d_model=64,
        hidden=128,
        num_classes=2,  # used when head == 'classify'
        max_len=256,  # for building the init batch; the network itself is length-agnostic
        dropout=0.0,
        dtype="float32",
    )
    fields.update(SIZES[size])
    return ml_collections.ConfigDict(fields)


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """Static hyper-parameters of an RNN model, built from `config.model`."""

    vocab_size: int  # V
    num_layers: int
    d_model: int  # D, embedding width
    hidden: int  # F, recurrent state width
    cell: str = "lstm"  # 'lstm' | 'gru'
    num_classes: int = 2  # RNNClassifier only
    dropout: float = 0.0  # on embeddings, between layers and before the head
    dtype: str = "float32"  # compute dtype; parameters and the recurrent carry stay float32

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "RNNConfig":
        """Pick the RNNConfig fields out of `config.model`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


class RNNStack(nn.Module):
    """Embedding followed by `num_layers` recurrent layers."""

    cfg: RNNConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, lengths: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """tokens [B, T], lengths [B] -> (outputs [B, T, F], last-layer final state [B, F])."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown model.cell {cfg.cell!r}; choose one of {sorted(CELLS)}")
        x = layers.Embed(cfg.vocab_size, cfg.d_model, dtype, name="embed")(tokens)
        x = layers.constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        final = None
        for i in range(cfg.num_layers):
            cell = CELLS[cfg.cell](
                cfg.hidden,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                recurrent_kernel_init=layers.partitioned(nn.initializers.orthogonal(), (None, "mlp")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
                dtype=dtype,
                param_dtype=jnp.float32,
                name=f"layer_{i}",  # the cell owns the parameters; nn.RNN only loops over time
            )
            carry, x = nn.RNN(cell, return_carry=True)(x, seq_lengths=lengths)
            x = layers.constrain(x, ("act_batch", "act_seq", "act_mlp"))
            if i + 1 < cfg.num_layers:
                x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
            final = carry[1] if cfg.cell == "lstm" else carry  # LSTM carry is (c, h)
        return x, final


class RNNLM(nn.Module):
    """Recurrent language model (next-token logits at every step)."""

    cfg: RNNConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """tokens [B, T] int32 -> logits [B, T, V] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        x, _ = RNNStack(cfg, name="rnn")(tokens, train=train)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        logits = nn.Dense(
            cfg.vocab_size,
            dtype=dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("mlp", "vocab")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("vocab",)),
            name="lm_head",
        )(x)
        logits = layers.constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        return logits.astype(jnp.float32)


class RNNClassifier(nn.Module):
    """Sequence classifier on the last layer's state at each sequence's final real token."""

    cfg: RNNConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, lengths: jax.Array | None = None, train: bool = False) -> jax.Array:
        """tokens [B, T] int32, lengths [B] (default: count of non-zero tokens) -> logits [B, classes] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        if lengths is None:
            lengths = jnp.sum(tokens != 0, axis=-1)
        _, final = RNNStack(cfg, name="rnn")(tokens, lengths=lengths.astype(jnp.int32), train=train)
        final = nn.Dropout(cfg.dropout, deterministic=not train)(final.astype(dtype))
        logits = nn.Dense(
            cfg.num_classes,
            dtype=dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("mlp", "classes")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("classes",)),
            name="head",
        )(final)
        return layers.constrain(logits, ("act_batch", None)).astype(jnp.float32)


def build(cfg: ml_collections.ConfigDict) -> nn.Module:
    """RNNLM or RNNClassifier according to `cfg.head`."""
    if cfg.head not in HEADS:
        raise ValueError(f"unknown model.head {cfg.head!r} for rnn; choose one of {HEADS}")
    module = RNNLM if cfg.head == "lm" else RNNClassifier
    return module(RNNConfig.from_config(cfg))
