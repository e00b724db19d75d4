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

from bigmodel.models import fields, layers
from bigmodel.models.fields import field

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
    return fields.config_dict(RNNConfig, SIZES, size)


@dataclasses.dataclass(frozen=True)
class RNNConfig(fields.ModelConfig):
    """Static hyper-parameters of an RNN model: the fields of `config.model`."""

    family = "rnn"
    cell: str = field("lstm", choices=tuple(CELLS))
    head: str = field("lm", choices=HEADS)  # 'lm' (RNNLM, logits per step) | 'classify' (RNNClassifier)
    vocab_size: int = field(384, ge=1)  # V; bytes plus specials, padded to a multiple of 128
    num_layers: int = field(1, ge=1)
    d_model: int = field(64, ge=1)  # D, embedding width
    hidden: int = field(128, ge=1)  # F, recurrent state width
    num_classes: int = field(2, ge=2)  # RNNClassifier only
    max_len: int = field(256, ge=1)  # for building the init batch; the network itself is length-agnostic
    dropout: float = field(0.0, ge=0, lt=1)  # on embeddings, between layers and before the head
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters and carry stay float32


class RNNStack(nn.Module):
    """Embedding followed by `num_layers` recurrent layers."""

    cfg: RNNConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, lengths: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """tokens [B, T], lengths [B] -> (outputs [B, T, F], last-layer final state [B, F])."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
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
        head = layers.ClassifierHead(cfg.num_classes, cfg.dropout, nn.initializers.lecun_normal(), "mlp", dtype,
                                     name="head")
        return head(final, train=train)


def build(cfg: RNNConfig) -> nn.Module:
    """RNNLM or RNNClassifier according to `cfg.head`."""
    return RNNLM(cfg) if cfg.head == "lm" else RNNClassifier(cfg)
