"""Building blocks shared by every model family.

Einsum letters (one meaning everywhere in bigmodel.models):
  B batch, T query length, S key/value length, D model width, N query heads,
  K kv heads, H head dim, F MLP hidden, V vocab, C channels.

Logical axis names. Weights: 'vocab', 'embed', 'mlp', 'heads', 'kv_heads' (grouped-query
key/value heads), 'kv', 'pos', 'norm', 'layers', 'classes', 'conv_in', 'conv_out'.
Activations: 'act_batch', 'act_seq', 'act_embed', 'act_mlp', 'act_heads', 'act_kv_heads',
'act_kv', 'act_vocab'. Their mapping onto mesh
axes is `config.sharding.rules`; `constrain` and `check_rules` refuse a name with no
rule, so a model cannot silently replicate a tensor by a typo.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
    """Map a config dtype string ('float32', 'bfloat16') to a jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """Wrap an initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; unknown names are an error."""
    rules = nn.get_logical_axis_rules()
    if rules:
        known = {rule[0] for rule in rules}
        missing = [n for n in names if n is not None and n not in known]
        if missing:
            raise ValueError(
                f"activation axis name(s) {missing} have no rule in config.sharding.rules; "
                "add a rule such as ('" + missing[0] + "', None) to the config"
            )
    return nn.with_logical_constraint(x, tuple(names))


def dense_init(scale: float = 1.0) -> Initializer:
    """Normal(0, 0.02·scale) initialisation used by GPT-2 and BERT."""
    return nn.initializers.normal(stddev=0.02 * scale)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics and logical names."""

    epsilon: float = 1e-5  # GPT-2 uses 1e-5, BERT 1e-12
    use_bias: bool = True
    dtype: Any = jnp.float32  # output dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        return nn.LayerNorm(
            epsilon=self.epsilon,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=partitioned(nn.initializers.ones, ("norm",)),
            bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        )(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): a scale and no centring or bias."""

    epsilon: float = 1e-5
    dtype: Any = jnp.float32  # output dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D] with float32 statistics."""
        return nn.RMSNorm(
            epsilon=self.epsilon, dtype=self.dtype, param_dtype=jnp.float32,
            scale_init=partitioned(nn.initializers.ones, ("norm",)),
        )(x)


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, epsilon: float, dtype: Any, name: str, use_bias: bool = True) -> nn.Module:
    """A LayerNorm (with or without bias) or an RMSNorm, by config name."""
    if kind == "layernorm":
        return LayerNorm(epsilon, use_bias=use_bias, dtype=dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon, dtype=dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}")


def rotary(x: jax.Array, positions: jax.Array, base: float, seq_axis: int = 1) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) of x [B, T, N, H] (or [B, N, T, H] with
    seq_axis=2) at positions [T].

    Channel i of the first half pairs with channel i of the second half (the GPT-NeoX /
    Hugging Face Llama layout); the pair turns by positions · base^(-2i/H). Computed in
    float32 and returned in x's dtype.
    """
    h = x.shape[-1]
    if h % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {h}")
    inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
    angle = positions.astype(jnp.float32)[:, None] * inv_freq[None]  # [T, H/2]
    shape = [1] * x.ndim
    shape[seq_axis], shape[-1] = angle.shape
    sin, cos = jnp.sin(angle).reshape(shape), jnp.cos(angle).reshape(shape)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # GPT-2's 'gelu_new'
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact erf GELU (BERT)
    "relu": nn.relu,
}
# Gated linear units (Shazeer 2020): act(x·W_gate) * (x·W_in), then W_out.
GATED = {"swiglu": nn.silu, "geglu": lambda x: nn.gelu(x, approximate=False)}


class Mlp(nn.Module):
    """Feed-forward block D -> F -> D: GELU (or another `activation`), or a gated unit.

    A gated activation ('swiglu', 'geglu') adds a second input projection `fc_gate`, so the
    block holds 3·D·F weights instead of 2·D·F.
    """

    d_ff: int  # F, hidden width
    dropout: float = 0.0
    out_init_scale: float = 1.0  # GPT-2 scales residual projections by 1/sqrt(2L)
    dtype: Any = jnp.float32  # compute dtype
    use_bias: bool = True
    activation: str = "gelu_tanh"  # a key of ACTIVATIONS or GATED
    in_init_scale: float = 1.0  # muP shrinks hidden initialisations with width

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(
                f"unknown Mlp activation {self.activation!r}; use one of {sorted(ACTIVATIONS) + sorted(GATED)}"
            )
        d_model = x.shape[-1]

        def project(name: str) -> jax.Array:
            h = nn.Dense(
                self.d_ff,
                use_bias=self.use_bias,
                dtype=self.dtype,
                kernel_init=partitioned(dense_init(self.in_init_scale), ("embed", "mlp")),
                bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
                name=name,
            )(x)
            return constrain(h, ("act_batch", "act_seq", "act_mlp"))

        if self.activation in GATED:
            h = GATED[self.activation](project("fc_gate")) * project("fc_in")
        else:
            h = ACTIVATIONS[self.activation](project("fc_in"))
        h = nn.Dense(
            d_model,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=partitioned(dense_init(self.out_init_scale), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="fc_out",
        )(h)
        return nn.Dropout(self.dropout, deterministic=not train)(h)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool,
                     scale: float | None) -> jax.Array:
    """Attention in the heads-major layout: q [B, N, T, H], k and v [B, K, S, H] -> [B, N, T, H].

    Batched matmuls with the batch and head dimensions leading need no transposes, which on
    CPU makes this about twice as fast as `jax.nn.dot_product_attention`'s XLA path (that takes
    [B, T, N, H]). Logits and softmax in float32; grouped-query heads share their key/value head.
    """
    b, n, t, h = q.shape
    kv, s = k.shape[1], k.shape[2]
    grouped = q.reshape(b, kv, n // kv, t, h)
    logits = jnp.einsum("bkgth,bksh->bkgts", grouped, k, preferred_element_type=jnp.float32).reshape(b, n, t, s)
    logits = logits * (h**-0.5 if scale is None else scale)
    keep = mask
    if causal:
        below = jnp.tril(jnp.ones((t, s), bool), k=s - t)
        keep = below if keep is None else keep & below
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, n // kv, t, s)
    return jnp.einsum("bkgts,bksh->bkgth", probs, v).reshape(b, n, t, h)


class Attention(nn.Module):
    """Multi-head attention (self or cross).

    `implementation` None picks 'einsum' (`einsum_attention`, heads-major) on CPU and JAX's
    choice of `jax.nn.dot_product_attention` elsewhere (cuDNN's fused kernel where it can);
    'xla' or 'cudnn' force that function's implementation.
    """

    num_heads: int  # N
    head_dim: int  # H
    causal: bool = False
    dropout: float = 0.0  # on the output projection (attention-prob dropout is not used)
    out_init_scale: float = 1.0
    dtype: Any = jnp.float32
    use_bias: bool = True
    implementation: str | None = None  # None: 'einsum' on CPU, else JAX's pick; or one of ATTENTION_IMPLS
    scale: float | None = None  # logit scale; None = 1/sqrt(H), muP uses 1/H
    init_scale: float = 1.0  # of the query/key/value initialisation (muP shrinks it with width)
    zero_query: bool = False  # muP starts with a zero query projection
    num_kv_heads: int | None = None  # K; None = N (multi-head), 1 = multi-query, else grouped-query
    rope_base: float = 0.0  # > 0: rotary position embedding of queries and keys with this base

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """x [B, T, D], context [B, S, D] (defaults to x), mask broadcastable to [B, N, T, S]."""
        d_model = x.shape[-1]
        context = x if context is None else context
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"{self.num_heads} query heads cannot be grouped over {kv_heads} key/value heads")
        # Fewer key/value heads get their own logical name, so the rules can shard them apart.
        kv_name = "heads" if kv_heads == self.num_heads else "kv_heads"
        impl = self.implementation or ("einsum" if jax.default_backend() == "cpu" else None)
        if impl is not None and impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; use one of {ATTENTION_IMPLS} or ''")
        heads_major = impl == "einsum"  # [B, N, T, H] for einsum_attention, else [B, T, N, H]
        layout, seq_axis = ("bnsh", 2) if heads_major else ("bsnh", 1)

        def proj(name: str, inputs: jax.Array) -> jax.Array:
            heads, axis = (self.num_heads, "heads") if name == "query" else (kv_heads, kv_name)
            init = nn.initializers.zeros if name == "query" and self.zero_query else dense_init(self.init_scale)
            kernel = self.param(
                f"{name}_kernel", partitioned(init, ("embed", axis, "kv")), (d_model, heads, self.head_dim)
            )
            y = jnp.einsum(f"bsd,dnh->{layout}", inputs.astype(self.dtype), kernel.astype(self.dtype))
            if self.use_bias:
                bias = self.param(f"{name}_bias", partitioned(nn.initializers.zeros, (axis, "kv")), (heads, self.head_dim))
                y = y + (bias[:, None] if heads_major else bias).astype(self.dtype)
            names = ["act_batch", "act_seq", "act_" + axis, "act_kv"]
            if heads_major:
                names[1], names[2] = names[2], names[1]
            return constrain(y, names)

        q, k, v = proj("query", x), proj("key", context), proj("value", context)
        if self.rope_base:
            q = rotary(q, jnp.arange(q.shape[seq_axis]), self.rope_base, seq_axis)
            k = rotary(k, jnp.arange(k.shape[seq_axis]), self.rope_base, seq_axis)
        if heads_major:
            y = einsum_attention(q, k, v, mask, self.causal, self.scale)
            y = constrain(y, ("act_batch", "act_heads", "act_seq", "act_kv"))
        else:
            y = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=self.causal, scale=self.scale, implementation=impl
            )  # [B, T, N, H]
            y = constrain(y, ("act_batch", "act_seq", "act_heads", "act_kv"))
        out = self.param(
            "out_kernel", partitioned(dense_init(self.out_init_scale), ("heads", "kv", "embed")),
            (self.num_heads, self.head_dim, d_model),
        )
        y = jnp.einsum("bnth,nhd->btd" if heads_major else "btnh,nhd->btd", y, out.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("out_bias", partitioned(nn.initializers.zeros, ("embed",)), (d_model,)).astype(self.dtype)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class Embed(nn.Module):
    """Token embedding table [V, D] that can also act as the tied output head."""

    vocab_size: int  # V
    d_model: int  # D
    dtype: Any = jnp.float32

    def setup(self) -> None:
        """Create the [V, D] table."""
        self.embedding = self.param(
            "embedding", partitioned(dense_init(), ("vocab", "embed")), (self.vocab_size, self.d_model)
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D]."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> logits [B, T, V] with the transposed table."""
        return jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype))
