"""BERT (Devlin et al. 2018): a post-LN bidirectional encoder, its MLM head and a classifier.

Einsum letters (one meaning everywhere in bigmodel.models):
  B batch, T query length, S key/value length, D model width, N query heads,
  K kv heads, H head dim, F MLP hidden, V vocab, C channels.

Parameter tree, laid out so a Hugging Face `BertModel` maps one to one:
  embeddings/{word/embedding, position, token_type, layer_norm}
  layer_i/attention/{query,key,value,out}  layer_i/attention_ln
  layer_i/mlp/{fc_in,fc_out}  (HF intermediate.dense, output.dense)  layer_i/output_ln
  pooler  ([CLS] dense + tanh)
BertMLM nests that under bert/ and adds mlm_transform, mlm_transform_ln and mlm_bias
(HF cls.predictions.*), the output matrix tied to bert/embeddings/word; BertClassifier adds head.

Parameter counting: `BertEncoder` holds exactly the parameters of HF `BertModel` —
embeddings, encoder layers and (with `add_pooler`) the pooler, no MLM head. BERT-base
with V = 30522 counts 109,482,240 with the pooler and 108,891,648 without.

`model.position='rope'` replaces the position table with rotary embeddings of queries and
keys in every layer (as RoFormer and ModernBERT do): attending by relative offset is then
available from the first step, which small byte-level models learn far sooner.

Known differences from the reference: `layers.Attention` has no dropout on attention
probabilities. The MLP activation is the exact erf GELU of the reference by default
(`model.activation`; 'gelu_tanh' is the cheaper approximation). Token id 0 ([PAD]) is
padding: keys holding it are masked out.
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

# name: (num_layers, d_model, num_heads); d_ff = 4·d_model. Small sizes: Turc et al. 2019.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, d_model=128, num_heads=2),
    "mini": dict(num_layers=4, d_model=256, num_heads=4),
    "small": dict(num_layers=4, d_model=512, num_heads=8),
    "base": dict(num_layers=12, d_model=768, num_heads=12),
    "large": dict(num_layers=24, d_model=1024, num_heads=16),
}
HEADS = ("mlm", "classify")
POSITIONS = ("learned", "rope")


def model_config(size: str) -> ml_collections.ConfigDict:
    """The full BERT field set for a named size, for `config.model`."""
    return fields.config_dict(BertConfig, SIZES, size)


@dataclasses.dataclass(frozen=True)
class BertConfig(fields.ModelConfig):
    """Static hyper-parameters of BERT: the fields of `config.model` (defaults: BERT-base)."""

    family = "bert"
    head: str = field("mlm", choices=HEADS)  # 'mlm' (BertMLM) | 'classify' (BertClassifier)
    vocab_size: int = field(30522, ge=1)  # V; 30522 is the uncased WordPiece vocabulary
    max_len: int = field(512, ge=1)  # rows of the position table
    type_vocab_size: int = field(2, ge=1)  # segment ids (sentence A / B)
    num_layers: int = field(12, ge=1)
    d_model: int = field(768, ge=1)  # D
    num_heads: int = field(12, ge=1)  # N, a divisor of D
    d_ff: int = field(0, ge=0)  # F; 0 means 4·D
    dropout: float = field(0.1, ge=0, lt=1)  # hidden dropout: embeddings, attention output, MLP output, classifier
    layer_norm_eps: float = field(1e-12, gt=0)
    activation: str = field("gelu", choices=tuple(layers.ACTIVATIONS))  # MLP: 'gelu' is the reference's exact erf
    num_classes: int = field(2, ge=2)  # BertClassifier only
    dtype: str = field("float32", choices=tuple(layers.DTYPES))  # compute dtype; parameters stay float32
    attention_impl: str = field("", choices=("", *layers.ATTENTION_IMPLS))  # '': layers.default_attention_impl
    position: str = field("learned", choices=POSITIONS)  # 'learned' (the reference's table) | 'rope' (no table)
    rope_base: float = field(10000.0, gt=0)  # rotary base (position='rope')

    def check(self) -> None:
        """Heads that split the width."""
        fields.check_heads(self.d_model, self.num_heads, self.position == "rope")

    @property
    def hidden(self) -> int:
        """F, the MLP width."""
        return self.d_ff or 4 * self.d_model


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    cfg: BertConfig

    def setup(self) -> None:
        """Create the three tables and the embedding LayerNorm."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        self.word = layers.Embed(cfg.vocab_size, cfg.d_model, dtype)
        init = layers.dense_init()
        if cfg.position == "learned":
            self.position = self.param(
                "position", layers.partitioned(init, ("pos", "embed")), (cfg.max_len, cfg.d_model)
            )
        self.token_type = self.param(
            "token_type", layers.partitioned(init, (None, "embed")), (cfg.type_vocab_size, cfg.d_model)
        )
        self.layer_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, tokens: jax.Array, type_ids: jax.Array, train: bool = False) -> jax.Array:
        """tokens [B, T], type_ids [B, T] -> [B, T, D]."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        length = tokens.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={cfg.max_len}")
        x = self.word(tokens)
        if cfg.position == "learned":
            x = x + self.position[:length].astype(dtype)[None]
        x = x + jnp.take(self.token_type, type_ids, axis=0).astype(dtype)
        x = self.dropout(self.layer_norm(x), deterministic=not train)
        return layers.constrain(x, ("act_batch", "act_seq", "act_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] against the word table (the tied MLM output)."""
        return self.word.attend(x)


class BertLayer(nn.Module):
    """Post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        """x [B, T, D], mask [B, 1, 1, T] -> [B, T, D]."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        h = layers.Attention(
            cfg.num_heads, cfg.d_model // cfg.num_heads, dropout=cfg.dropout, dtype=dtype,
            implementation=cfg.attention_impl or None, rope_base=cfg.rope_base if cfg.position == "rope" else 0.0,
            name="attention",
        )(x, mask=mask, train=train)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="attention_ln")(x + h)
        x = layers.constrain(x, ("act_batch", "act_seq", "act_embed"))
        h = layers.Mlp(cfg.hidden, cfg.dropout, dtype=dtype, activation=cfg.activation, name="mlp")(x, train=train)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="output_ln")(x + h)
        return layers.constrain(x, ("act_batch", "act_seq", "act_embed"))


class BertEncoder(nn.Module):
    """Embeddings, encoder layers and optional pooler: the parameters of HF `BertModel`."""

    cfg: BertConfig
    add_pooler: bool = True  # dense + tanh on [CLS]; MLM pre-training without NSP needs none

    def setup(self) -> None:
        """Create embeddings, `layer_i` and the pooler."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        self.embeddings = BertEmbeddings(cfg)
        self.layer = [BertLayer(cfg) for _ in range(cfg.num_layers)]
        if self.add_pooler:
            self.pooler = nn.Dense(
                cfg.d_model,
                dtype=dtype,
                kernel_init=layers.partitioned(layers.dense_init(), ("embed", "mlp")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
            )

    def __call__(
        self, tokens: jax.Array, type_ids: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """tokens [B, T], type_ids [B, T] (default 0) -> (sequence [B, T, D], pooled [B, D] or None)."""
        if type_ids is None:
            type_ids = jnp.zeros_like(tokens)
        mask = (tokens != 0)[:, None, None, :]
        x = self.embeddings(tokens, type_ids, train=train)
        for layer in self.layer:
            x = layer(x, mask, train=train)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.add_pooler else None
        return x, pooled

    def attend(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] with the word embedding table."""
        return self.embeddings.attend(x)


class BertMLM(nn.Module):
    """BERT with the masked-language-model head (no pooler, as HF `BertForMaskedLM`)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
        """tokens [B, T] int32, type_ids [B, T] -> logits [B, T, V] float32 (every position)."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        bert = BertEncoder(cfg, add_pooler=False, name="bert")
        x, _ = bert(tokens, type_ids, train=train)
        x = nn.Dense(
            cfg.d_model,
            dtype=dtype,
            kernel_init=layers.partitioned(layers.dense_init(), ("embed", "mlp")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
            name="mlm_transform",
        )(x)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="mlm_transform_ln")(nn.gelu(x, approximate=False))
        bias = self.param("mlm_bias", layers.partitioned(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,))
        logits = bert.attend(x) + bias.astype(dtype)
        logits = layers.constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        return logits.astype(jnp.float32)


class BertClassifier(nn.Module):
    """BERT encoder and pooler, then the classifier head (dropout, a fresh dense layer over classes)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
        """tokens [B, T] int32, type_ids [B, T] -> logits [B, classes] float32."""
        cfg, dtype = self.cfg, layers.dtype_of(self.cfg.dtype)
        _, pooled = BertEncoder(cfg, add_pooler=True, name="bert")(tokens, type_ids, train=train)
        return layers.ClassifierHead(cfg.num_classes, cfg.dropout, dtype=dtype, name="head")(pooled, train=train)


def build(cfg: BertConfig) -> nn.Module:
    """BertMLM or BertClassifier according to `cfg.head`."""
    return BertMLM(cfg) if cfg.head == "mlm" else BertClassifier(cfg)
