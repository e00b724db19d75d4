"""The encoder-decoder Transformer (Vaswani et al. 2017), with greedy and beam decoding.

Einsum letters (one meaning everywhere in bigmodel.models):
  B batch, T query length, S key/value length, D model width, N query heads,
  K kv heads, H head dim, F MLP hidden, V vocab, C channels.
Here S is also the source length and T the target length; in beam search the beam
index is folded into B.

Layout choices, deliberately not the paper's:
- pre-LayerNorm (x + f(LN(x)), final LN after each stack), which trains without the
  warm-up sensitivity of the paper's post-LN;
- `layers.Mlp` uses GELU where the paper used ReLU.
One embedding table is shared by source, target and the output projection (the paper's
shared-BPE setup), scaled by sqrt(D); positions are sinusoidal (paper) or learned.
Token id 0 is padding in source and target.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigmodel.models import fields, layers
from bigmodel.models.fields import field

# name: layers per stack, D, N, F, dropout (Table 3 of the paper for base and big).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, d_model=128, num_heads=4, d_ff=512, vocab_size=384, max_len=256),
    "base": dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048, dropout=0.1),
    "big": dict(num_layers=6, d_model=1024, num_heads=16, d_ff=4096, dropout=0.3),
}
POSITIONS = ("sinusoidal", "learned")


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full Transformer field set for a named size, for `config.model`."""
    return fields.config_dict(TransformerConfig, SIZES, size)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(fields.ModelConfig):
    """Static hyper-parameters of an encoder-decoder Transformer: the fields of `config.model` (defaults: base)."""

    family = "transformer"
    vocab_size: int = field(32000, ge=1)  # V, shared by source and target (one sentencepiece vocabulary)
    max_len: int = field(256, ge=1)  # longest source or target; also the decode buffer bound
    num_layers: int = field(6, ge=1)  # per stack: encoder and decoder each
    d_model: int = field(512, ge=1)  # D
    num_heads: int = field(8, ge=1)  # N, a divisor of D
    d_ff: int = field(2048, ge=1)  # F
    dropout: float = field(0.0, ge=0, lt=1)  # after embeddings, attention and MLP outputs
    positions: str = field("sinusoidal", choices=POSITIONS)  # the paper's fixed table, or a learned one
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters stay float32
    attention_impl: str = field("", choices=("", *layers.ATTENTION_IMPLS))  # '': layers.default_attention_impl

    def check(self) -> None:
        """Heads that split the width."""
        fields.check_heads(self.d_model, self.num_heads)


def sinusoids(length: int, d_model: int) -> np.ndarray:
    """The paper's fixed position table [length, D]: sin on even, cos on odd channels."""
    pos = np.arange(length)[:, None]
    inv = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((length, d_model), np.float32)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)[:, : d_model // 2]
    return table


def padding_mask(ids: jax.Array) -> jax.Array:
    """[B, S] ids -> [B, 1, 1, S] bool attention mask, False at padding (id 0)."""
    return (ids != 0)[:, None, None, :]


class EncoderBlock(nn.Module):
    """Pre-LN encoder block: x + SelfAttn(LN(x)), then x + MLP(LN(x))."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        """x [B, S, D], mask [B, 1, 1, S] -> [B, S, D]."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        h = layers.LayerNorm(dtype=dtype, name="ln_1")(x)
        h = layers.Attention(
            cfg.num_heads, cfg.d_model // cfg.num_heads, dropout=cfg.dropout, dtype=dtype,
            implementation=cfg.attention_impl or None, name="self_attn",
        )(h, mask=mask, train=train)
        x = layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))
        h = layers.LayerNorm(dtype=dtype, name="ln_2")(x)
        h = layers.Mlp(cfg.d_ff, cfg.dropout, dtype=dtype, name="mlp")(h, train=train)
        return layers.constrain(x + h, ("act_batch", "act_seq", "act_embed"))


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention to the encoder, MLP."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, y: jax.Array, encoded: jax.Array, src_mask: jax.Array, train: bool = False) -> jax.Array:
        """y [B, T, D], encoded [B, S, D], src_mask [B, 1, 1, S] -> [B, T, D]."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        attn = dict(
            num_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads, dropout=cfg.dropout,
            dtype=dtype, implementation=cfg.attention_impl or None,
        )
        # Causal masking alone suffices for target padding: pads sit after every real token.
        h = layers.LayerNorm(dtype=dtype, name="ln_1")(y)
        h = layers.Attention(causal=True, name="self_attn", **attn)(h, train=train)
        y = layers.constrain(y + h, ("act_batch", "act_seq", "act_embed"))
        h = layers.LayerNorm(dtype=dtype, name="ln_2")(y)
        h = layers.Attention(name="cross_attn", **attn)(h, context=encoded, mask=src_mask, train=train)
        y = layers.constrain(y + h, ("act_batch", "act_seq", "act_embed"))
        h = layers.LayerNorm(dtype=dtype, name="ln_3")(y)
        h = layers.Mlp(cfg.d_ff, cfg.dropout, dtype=dtype, name="mlp")(h, train=train)
        return layers.constrain(y + h, ("act_batch", "act_seq", "act_embed"))


class Transformer(nn.Module):
    """Encoder-decoder Transformer returning float32 target logits."""

    cfg: TransformerConfig

    def setup(self) -> None:
        """Shared embedding, optional learned positions, the two stacks and final norms."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype)
        if cfg.positions == "learned":
            self.pos = self.param(
                "pos", layers.partitioned(layers.dense_init(), ("pos", "embed")), (cfg.max_len, cfg.d_model)
            )
        self.encoder = [EncoderBlock(cfg) for _ in range(cfg.num_layers)]
        self.decoder = [DecoderBlock(cfg) for _ in range(cfg.num_layers)]
        self.encoder_ln = layers.LayerNorm(dtype=dtype)
        self.decoder_ln = layers.LayerNorm(dtype=dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, ids: jax.Array, train: bool) -> jax.Array:
        """[B, L] ids -> [B, L, D] scaled embeddings plus positions."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        length = ids.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={cfg.max_len}")
        if cfg.positions == "learned":
            pos = self.pos[:length]
        else:
            pos = jnp.asarray(sinusoids(length, cfg.d_model))
        x = self.embed(ids) * jnp.asarray(cfg.d_model**0.5, dtype) + pos.astype(dtype)[None]
        x = self.dropout(x, deterministic=not train)
        return layers.constrain(x, ("act_batch", "act_seq", "act_embed"))

    def encode(self, src: jax.Array, train: bool = False) -> jax.Array:
        """src [B, S] int32 -> encoded [B, S, D]."""
        mask = padding_mask(src)
        x = self._embed(src, train)
        for block in self.encoder:
            x = block(x, mask, train=train)
        return self.encoder_ln(x)

    def decode(self, encoded: jax.Array, src_mask: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """encoded [B, S, D], src_mask [B, S] bool, tgt_in [B, T] int32 -> logits [B, T, V] float32."""
        mask = src_mask[:, None, None, :]
        y = self._embed(tgt_in, train)
        for block in self.decoder:
            y = block(y, encoded, mask, train=train)
        y = self.decoder_ln(y)
        logits = layers.constrain(self.embed.attend(y), ("act_batch", "act_seq", "act_vocab"))
        return logits.astype(jnp.float32)

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """src [B, S] int32, tgt_in [B, T] int32 (BOS-shifted target) -> logits [B, T, V] float32."""
        return self.decode(self.encode(src, train), src != 0, tgt_in, train)


def greedy_decode(module: Transformer, params: Any, src: jax.Array, max_len: int, bos: int, eos: int) -> jax.Array:
    """Greedy translation: src [B, S] -> tokens [B, max_len] (EOS kept, 0 after it).

    Padding (id 0) is never emitted, so 0 in the output always means "after EOS".

    jit-friendly: a fixed [B, max_len] buffer and a `lax.while_loop` that stops once every
    row has emitted EOS. There is no KV cache: each step re-runs the decoder over the whole
    buffer (causal masking makes the unwritten tail irrelevant), O(max_len²) decoder work,
    which is fine for evaluation-sized outputs. Wrap in `jax.jit` with `module`,
    `max_len`, `bos` and `eos` closed over.
    """
    variables = {"params": params}
    batch = src.shape[0]
    encoded = module.apply(variables, src, method=module.encode)
    src_mask = src != 0
    buf = jnp.zeros((batch, max_len + 1), jnp.int32).at[:, 0].set(bos)
    done = jnp.zeros((batch,), bool)

    def cond(state: tuple) -> jax.Array:
        i, _, done = state
        return (i < max_len) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, buf, done = state
        logits = module.apply(variables, encoded, src_mask, buf[:, :max_len], method=module.decode)
        step = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
        token = jnp.argmax(step.at[:, 0].set(-jnp.inf), axis=-1)  # never emit padding
        token = jnp.where(done, 0, token).astype(jnp.int32)
        buf = jax.lax.dynamic_update_index_in_dim(buf, token, i + 1, axis=1)
        return i + 1, buf, done | (token == eos)

    _, buf, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), buf, done))
    return buf[:, 1:]


def length_norm(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length normalisation ((5 + length) / 6)^alpha; alpha 0 disables it."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(
    module: Transformer,
    params: Any,
    src: jax.Array,
    beam_size: int,
    max_len: int,
    bos: int,
    eos: int,
    length_penalty: float = 0.6,
) -> tuple[jax.Array, jax.Array]:
    """Beam search: src [B, S] -> (tokens [B, K, max_len], scores [B, K]), best beam first.

    Here K is the beam size. Finished hypotheses stay in the beam, extended by padding at
    no cost, and compete with live ones on the length-normalised score
    log p / ((5 + len) / 6)^length_penalty, where len counts generated tokens including EOS. Like
    `greedy_decode` it is jit-friendly (fixed [B, K, max_len] buffers, `lax.while_loop`)
    and recomputes the decoder over the whole prefix every step instead of caching keys
    and values. With beam_size 1 it returns exactly the greedy output.
    """
    variables = {"params": params}
    batch, k = src.shape[0], beam_size
    encoded = module.apply(variables, src, method=module.encode)
    encoded = jnp.repeat(encoded, k, axis=0)  # [B·K, S, D]
    src_mask = jnp.repeat(src != 0, k, axis=0)
    buf = jnp.zeros((batch, k, max_len + 1), jnp.int32).at[:, :, 0].set(bos)
    # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
    logp = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (batch, 1))
    lengths = jnp.zeros((batch, k), jnp.int32)
    done = jnp.zeros((batch, k), bool)

    def cond(state: tuple) -> jax.Array:
        i, _, _, _, done = state
        return (i < max_len) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, buf, logp, lengths, done = state
        logits = module.apply(
            variables, encoded, src_mask, buf[:, :, :max_len].reshape(batch * k, max_len), method=module.decode
        )
        step = jax.nn.log_softmax(jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False))
        step = step.reshape(batch, k, -1).at[..., 0].set(-jnp.inf)  # [B, K, V]; never emit padding
        vocab = step.shape[-1]
        # A finished beam can only be extended by padding (id 0), at log-probability 0.
        finished_step = jnp.full((vocab,), -jnp.inf).at[0].set(0.0)
        step = jnp.where(done[..., None], finished_step, step)
        cand_logp = (logp[..., None] + step).reshape(batch, k * vocab)
        cand_len = jnp.where(done, lengths, lengths + 1)[..., None]
        cand_len = jnp.broadcast_to(cand_len, (batch, k, vocab)).reshape(batch, k * vocab)
        _, idx = jax.lax.top_k(cand_logp / length_norm(cand_len, length_penalty), k)  # [B, K]
        parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        buf = jnp.take_along_axis(buf, parent[..., None], axis=1)
        buf = jax.lax.dynamic_update_index_in_dim(buf, token, i + 1, axis=2)
        new_done = jnp.take_along_axis(done, parent, axis=1)
        new_logp = jnp.take_along_axis(cand_logp, idx, axis=1)
        new_len = jnp.take_along_axis(cand_len, idx, axis=1)
        return i + 1, buf, new_logp, new_len, new_done | (token == eos)

    state = (jnp.int32(0), buf, logp, lengths, done)
    _, buf, logp, lengths, _ = jax.lax.while_loop(cond, body, state)
    scores = logp / length_norm(lengths, length_penalty)
    order = jnp.argsort(-scores, axis=1)
    tokens = jnp.take_along_axis(buf[:, :, 1:], order[..., None], axis=1)
    return tokens, jnp.take_along_axis(scores, order, axis=1)
