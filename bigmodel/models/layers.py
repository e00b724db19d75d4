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

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.kernels.cpu import attention as cpu_attention, gelu as cpu_gelu, norm as cpu_norm
from bigmodel.kernels.tpu import attention as tpu_attention

Initializer = Callable[..., jax.Array]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# The backend a model is traced for when that is not the process's own (an ahead-of-time compile).
_COMPILE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("compile_backend", default=None)


def backend() -> str:
    """The backend the model is being traced for: 'cpu', 'gpu' or 'tpu' (see `compiling_for`)."""
    return _COMPILE_BACKEND.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
    """Trace models for backend `name` ('gpu', 'tpu') instead of this process's (ahead-of-time compiles):
    the kernels and attention implementations are those that backend gets by default."""
    token = _COMPILE_BACKEND.set(name)
    try:
        yield
    finally:
        _COMPILE_BACKEND.reset(token)


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


def fused_cpu_default(dtype: Any) -> bool:
    """Whether the fused CPU kernels (`bigmodel.kernels.cpu`) are the default: float32 on one CPU device.

    They are XLA custom calls that the SPMD partitioner does not split, so over several
    devices each would gather its whole input on every device; there, and on GPU and TPU
    (where XLA fuses these operations itself), the plain JAX implementations are the default.
    """
    return backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and jax.device_count() == 1


NORM_IMPLS = ("flax", "fused_cpu")
ACTIVATION_IMPLS = ("xla", "fused_cpu")


def default_norm_impl(dtype: Any) -> str:
    """The norm implementation a model gets when its config leaves the choice open: 'fused_cpu'
    (`cpu_norm`) where `fused_cpu_default`, else 'flax' (nn.LayerNorm, nn.RMSNorm)."""
    return "fused_cpu" if fused_cpu_default(dtype) else "flax"


def _checked_impl(kind: str, requested: str | None, default: str, choices: tuple[str, ...],
                  reason: Callable[[], str | None]) -> str:
    """The implementation an op runs with: the one asked for or the default, checked.

    `reason()` says why 'fused_cpu' cannot run here (None if it can): a default falls back to
    choices[0]; 'fused_cpu' asked for by name raises a ValueError naming the reason.
    """
    impl = requested or default
    if impl not in choices:
        raise ValueError(f"unknown {kind} implementation {impl!r}; use one of {choices} or ''")
    if impl == "fused_cpu":
        why = reason()
        if why and requested:
            raise ValueError(f"{kind} implementation 'fused_cpu' cannot run here: {why}; use {choices[0]!r} "
                             "(or leave the choice open)")
        return choices[0] if why else impl
    return impl


def _norm_impl(requested: str | None, x: jax.Array, dtype: Any) -> str:
    return _checked_impl("norm", requested, default_norm_impl(dtype), NORM_IMPLS,
                         lambda: cpu_norm.unsupported(x.dtype) or cpu_norm.unsupported(dtype))


class _FusedNorm(nn.Module):
    """The `cpu_norm` kernel with nn.LayerNorm's (or nn.RMSNorm's) parameters: same names,
    shapes and initialisers, so checkpoints move freely between the two implementations."""

    epsilon: float
    center: bool  # LayerNorm; False: RMSNorm
    use_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] float32 -> [..., D] float32."""
        features = (x.shape[-1],)
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), features, jnp.float32)
        if not self.center:
            return cpu_norm.rms_norm(x, scale, self.epsilon)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), features,
                          jnp.float32) if self.use_bias else None
        return cpu_norm.layer_norm(x, scale, bias, self.epsilon)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics and logical names.

    `implementation` None picks `default_norm_impl`: the fused CPU kernel (`cpu_norm`) for
    float32 on one CPU device, nn.LayerNorm otherwise; 'flax' or 'fused_cpu' force one (a
    forced 'fused_cpu' raises where it cannot run). Both hold the same parameters.
    """

    epsilon: float = 1e-5  # GPT-2 uses 1e-5, BERT 1e-12
    use_bias: bool = True
    dtype: Any = jnp.float32  # output dtype
    implementation: str | None = None  # None: default_norm_impl(dtype); or one of NORM_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        if _norm_impl(self.implementation, x, self.dtype) == "fused_cpu":
            return _FusedNorm(self.epsilon, True, self.use_bias, name="LayerNorm_0")(x)
        return nn.LayerNorm(
            epsilon=self.epsilon,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=partitioned(nn.initializers.ones, ("norm",)),
            bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        )(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): a scale and no centring or bias.

    `implementation` as for `LayerNorm`.
    """

    epsilon: float = 1e-5
    dtype: Any = jnp.float32  # output dtype
    implementation: str | None = None  # None: default_norm_impl(dtype); or one of NORM_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D] with float32 statistics."""
        if _norm_impl(self.implementation, x, self.dtype) == "fused_cpu":
            return _FusedNorm(self.epsilon, False, False, name="RMSNorm_0")(x)
        return nn.RMSNorm(
            epsilon=self.epsilon, dtype=self.dtype, param_dtype=jnp.float32,
            scale_init=partitioned(nn.initializers.ones, ("norm",)),
        )(x)


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, F] -> [..., F], as one 2-D matmul over all leading positions.

    XLA:CPU differentiates a dot_general with several free dimensions (x [B, T, D]) into
    products it runs as batched matmuls with transposed copies around them; the same product
    on [B·T, D] keeps every forward and backward matmul plain: an MLP block's forward and
    backward take 0.77x the time at B=16, T=256, D=256 (benchmarks/cpu.md). The reshapes are
    free (no data moves) and keep the batch and sequence sharding of x on the merged axis.
    """
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*lead, kernel.shape[-1])


@jax.custom_vjp
def add_leading(x: jax.Array, b: jax.Array) -> jax.Array:
    """x [..., *b.shape] + b, with b's gradient summed over the leading axes by a matvec.

    XLA:CPU's reduction of a [B, T, D] cotangent over B alone is slow (4.4 ms at 16x256x256
    against 0.25 ms for ones[B] @ [B, T·D]); a learned position table added to every
    sequence of a batch takes that gradient at every step.
    """
    return x + b


def _add_leading_fwd(x: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x + b, b


def _add_leading_bwd(b: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = dy.size // b.size
    db = jnp.ones((rows,), dy.dtype) @ dy.reshape(rows, b.size)
    return dy, db.reshape(b.shape).astype(b.dtype)


add_leading.defvjp(_add_leading_fwd, _add_leading_bwd)


class Dense(nn.Module):
    """`nn.Dense` over the last axis (same parameters) computed by `token_matmul`, optionally
    followed by an activation.

    `activation` 'gelu_tanh' runs the bias add and the GELU as one fused CPU kernel
    (`cpu_gelu`) where `fused_cpu_default` holds; `activation_impl` 'xla' or 'fused_cpu' forces
    one (a forced 'fused_cpu' raises where it cannot run).
    """

    features: int  # F
    use_bias: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    activation: str = ""  # after the bias: '' (none) or a key of ACTIVATIONS
    activation_impl: str | None = None  # None: 'fused_cpu' where fused_cpu_default; or one of ACTIVATION_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., F]."""
        if self.activation and self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown Dense activation {self.activation!r}; use one of {sorted(ACTIVATIONS)}")
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = token_matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype) \
            if self.use_bias else None
        if self.activation:
            default = "fused_cpu" if fused_cpu_default(self.dtype) and self.activation == "gelu_tanh" else "xla"

            def reason() -> str | None:
                if self.activation != "gelu_tanh":
                    return f"its only activation is 'gelu_tanh', not {self.activation!r}"
                return cpu_gelu.unsupported(self.dtype)

            if _checked_impl("activation", self.activation_impl, default, ACTIVATION_IMPLS, reason) == "fused_cpu":
                return cpu_gelu.bias_gelu(y, jnp.zeros((self.features,), y.dtype) if bias is None else bias)
        y = y if bias is None else y + bias
        return ACTIVATIONS[self.activation](y) if self.activation else y


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, epsilon: float, dtype: Any, name: str, use_bias: bool = True,
              implementation: str | None = None) -> nn.Module:
    """A LayerNorm (with or without bias) or an RMSNorm, by config name."""
    if kind == "layernorm":
        return LayerNorm(epsilon, use_bias=use_bias, dtype=dtype, implementation=implementation, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon, dtype=dtype, implementation=implementation, name=name)
    raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}")


ROPE_SCALINGS = ("none", "linear", "llama3")


def rope_frequencies(h: int, base: float, scaling: tuple = ()) -> jax.Array:
    """The [H/2] rotary frequencies base^(-2i/H), stretched by `scaling` for longer contexts.

    scaling: () or ('none', …) leaves them; ('linear', factor) divides every frequency by factor
    (position interpolation); ('llama3', factor, low_freq_factor, high_freq_factor,
    original_max_len) divides only the slow ones, those with a wavelength above
    original_max_len / low_freq_factor, keeps those below original_max_len / high_freq_factor
    and blends in between (the Llama 3.1 recipe).
    """
    inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    kind = scaling[0] if scaling else "none"
    if kind == "linear":
        return inv_freq / scaling[1]
    if kind == "llama3":
        factor, low, high, original = scaling[1:]
        wavelength = 2 * math.pi / inv_freq
        blend = (original / wavelength - low) / (high - low)
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq
        scaled = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
        middle = (wavelength >= original / high) & (wavelength <= original / low)
        return jnp.where(middle, blended, scaled)
    if kind != "none":
        raise ValueError(f"unknown rope scaling {kind!r}; use one of {ROPE_SCALINGS}")
    return inv_freq


def rotary(x: jax.Array, positions: jax.Array, base: float, scaling: tuple = ()) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) of x [B, T, N, H] at positions [T] (or [B, T]).

    Channel i of the first half pairs with channel i of the second half (the GPT-NeoX /
    Hugging Face Llama layout); the pair turns by positions · base^(-2i/H) (as
    `rope_frequencies` scales it). Computed in float32 and returned in x's dtype.
    """
    h = x.shape[-1]
    if h % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {h}")
    inv_freq = rope_frequencies(h, base, scaling)  # [H/2]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, H/2]
    sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]  # [(B,) T, 1, H/2]
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
    activation_impl: str | None = None  # of a non-gated activation: see Dense

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(
                f"unknown Mlp activation {self.activation!r}; use one of {sorted(ACTIVATIONS) + sorted(GATED)}"
            )
        d_model = x.shape[-1]

        def project(name: str, activation: str = "") -> jax.Array:
            h = Dense(
                self.d_ff,
                use_bias=self.use_bias,
                dtype=self.dtype,
                kernel_init=partitioned(dense_init(self.in_init_scale), ("embed", "mlp")),
                bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
                activation=activation,
                activation_impl=self.activation_impl,
                name=name,
            )(x)
            return constrain(h, ("act_batch", "act_seq", "act_mlp"))

        if self.activation in GATED:
            h = GATED[self.activation](project("fc_gate")) * project("fc_in")
        else:
            h = project("fc_in", self.activation)
        h = Dense(
            d_model,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=partitioned(dense_init(self.out_init_scale), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="fc_out",
        )(h)
        return nn.Dropout(self.dropout, deterministic=not train)(h)


ATTENTION_IMPLS = ("einsum", "fused_cpu", "xla", "cudnn", "splash")
# What cuDNN's fused attention refuses at trace time (shapes, head size, dtype, version, no GPU).
CUDNN_REFUSALS = (RuntimeError, ValueError, NotImplementedError, TypeError)


def default_attention_impl(dtype: Any) -> str:
    """The attention implementation a model gets when its config leaves the choice open.

    On CPU 'fused_cpu' (`cpu_attention`, float32, one device; `Attention` falls back to
    'einsum' for a mask or where the kernel cannot be built) and 'einsum' (`einsum_attention`)
    otherwise; on GPU 'cudnn' for bfloat16/float16 compute (the fused flash-attention kernel;
    `Attention` falls back to 'xla' where cuDNN refuses the shapes); on TPU 'splash' (the
    Pallas splash-attention kernel, `tpu_attention`; 'xla' for an explicit mask or a sharded
    sequence); 'xla' otherwise (jax.nn.dot_product_attention's own default is XLA everywhere).

    The fused CPU kernel is an XLA custom call that the SPMD partitioner does not split, so
    over several devices it would gather the whole batch on each: there 'einsum' is the default.
    """
    platform = backend()
    if platform == "cpu":
        return "fused_cpu" if fused_cpu_default(dtype) else "einsum"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis whose derivative is y·(t - Σ y·t), one fused pass.

    (`jax.nn.softmax` differentiates through exp and the division unless the global flag
    `jax_softmax_custom_jvp` is set; that costs two extra passes over the attention logits.)
    """
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
    return unnormalized / unnormalized.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    y = softmax(x)
    return y, y * (t - (y * t).sum(-1, keepdims=True))


CAUSAL_BLOCKS = 4  # query blocks of the causal einsum attention ...
MIN_CAUSAL_BLOCK = 64  # ... of at least this many rows


def _query_blocks(t: int, s: int, causal: bool, block: int) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) per block; a causal block sees keys up to its last query."""
    if not causal or t <= block:
        return [(0, t, s)]
    return [(a, min(a + block, t), min(a + block, t) + s - t) for a in range(0, t, block)]


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool,
                     scale: float | None, block: int | None = None) -> jax.Array:
    """Attention in the heads-major layout: q [B, N, T, H], k and v [B, K, S, H] -> [B, N, T, H].

    Batch and key/value heads merge into one leading matmul batch dimension (Z = B·K), the
    query heads sharing a key/value head stack along the rows (grouped-query attention), so
    every product is a plain batched matmul without transposes. Causal attention runs in
    blocks of `block` query rows (default a quarter of T, at least 64), each against only
    the keys it can see: the upper triangle
    of the logits is never computed (25% fewer attention FLOPs and softmax work at
    T = 2·block, 37.5% at 4·block). Logits and softmax in float32. The CPU default; see
    benchmarks/cpu.md for what each part of this saves.
    """
    b, n, t, h = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = n // kv
    # Four blocks measured fastest on a 2-core CPU: 64 rows at T = 256 (32.4 ms fwd+bwd for
    # B·N = 64 against 36.1 with 128 and 40.0 with 32), 128 rows at T = 512.
    block = block or max(MIN_CAUSAL_BLOCK, -(-t // CAUSAL_BLOCKS))
    q = q.reshape(b * kv, g, t, h)
    k, v = k.reshape(b * kv, s, h), v.reshape(b * kv, s, h)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (b, n, *mask.shape[2:])).reshape(b * kv, g, *mask.shape[2:])
    scale = h**-0.5 if scale is None else scale
    outs = []
    for start, end, keys in _query_blocks(t, s, causal, block):
        logits = jnp.einsum("zgth,zsh->zgts", q[:, :, start:end], k[:, :keys], preferred_element_type=jnp.float32)
        keep = None
        if mask is not None:
            keep = mask[..., start:end, :keys] if mask.shape[2] == t else mask[..., :keys]
        if causal:
            below = jnp.arange(keys)[None, :] <= jnp.arange(start, end)[:, None] + (s - t)
            keep = below if keep is None else keep & below
        if keep is not None:
            logits = jnp.where(keep, logits * scale, jnp.finfo(jnp.float32).min)
        else:
            logits = logits * scale
        probs = softmax(logits).astype(v.dtype)
        outs.append(jnp.einsum("zgts,zsh->zgth", probs, v[:, :keys]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out.reshape(b, n, t, h)


class Attention(nn.Module):
    """Multi-head attention (self or cross).

    `implementation` None picks `default_attention_impl`: the fused CPU kernel
    (`cpu_attention`) or 'einsum' (`einsum_attention`, heads-major) on CPU, cuDNN's fused kernel
    of `jax.nn.dot_product_attention` for half precision on GPU where cuDNN takes the shapes,
    that function's XLA path otherwise; 'einsum', 'fused_cpu', 'xla', 'cudnn' or 'splash' force one (a
    forced 'fused_cpu' or 'cudnn' raises where it cannot run).
    """

    num_heads: int  # N
    head_dim: int  # H
    causal: bool = False
    dropout: float = 0.0  # on the output projection (attention-prob dropout is not used)
    out_init_scale: float = 1.0
    dtype: Any = jnp.float32
    use_bias: bool = True
    implementation: str | None = None  # None: default_attention_impl(dtype); or one of ATTENTION_IMPLS
    scale: float | None = None  # logit scale; None = 1/sqrt(H), muP uses 1/H
    init_scale: float = 1.0  # of the query/key/value initialisation (muP shrinks it with width)
    zero_query: bool = False  # muP starts with a zero query projection
    num_kv_heads: int | None = None  # K; None = N (multi-head), 1 = multi-query, else grouped-query
    rope_base: float = 0.0  # > 0: rotary position embedding of queries and keys with this base
    rope_scaling: tuple = ()  # rope_frequencies' scaling, e.g. ('linear', 4.0); () = none

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | None = None,
        train: bool = False,
        positions: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """x [B, T, D], context [B, S, D] (defaults to x), mask broadcastable to [B, N, T, S].

        positions [B, T] int: of each token (default 0 … T-1; -1 marks padding in `decode`).
        decode: causal self-attention against a key/value cache (`_cached`; `bigmodel.generate`).
        """
        d_model = x.shape[-1]
        self_attention = context is None
        context = x if context is None else context
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"{self.num_heads} query heads cannot be grouped over {kv_heads} key/value heads")
        # Fewer key/value heads get their own logical name, so the rules can shard them apart.
        kv_name = "heads" if kv_heads == self.num_heads else "kv_heads"
        impl = _checked_impl(
            "attention", self.implementation, default_attention_impl(self.dtype), ATTENTION_IMPLS,
            lambda: cpu_attention.unsupported(self.dtype, x.shape[-2], context.shape[-2], mask, self.causal))

        def weights(name: str) -> tuple[jax.Array, jax.Array | None, str]:
            heads, axis = (self.num_heads, "heads") if name == "query" else (kv_heads, kv_name)
            init = nn.initializers.zeros if name == "query" and self.zero_query else dense_init(self.init_scale)
            kernel = self.param(
                f"{name}_kernel", partitioned(init, ("embed", axis, "kv")), (d_model, heads, self.head_dim)
            ).astype(self.dtype)
            bias = None
            if self.use_bias:
                bias = self.param(f"{name}_bias", partitioned(nn.initializers.zeros, (axis, "kv")),
                                  (heads, self.head_dim)).astype(self.dtype)
            return kernel, bias, axis

        def project(inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
            # [B·S, D] x [D, ...] as one plain matmul (`token_matmul`); heads-major outputs make XLA
            # pick strided dot layouts that run about 2x slower on CPU.
            y = token_matmul(inputs.astype(self.dtype), kernel.reshape(d_model, -1))
            y = y.reshape(*inputs.shape[:-1], *kernel.shape[1:])
            return y if bias is None else y + bias

        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        names = ("query", "key", "value")
        (wq, bq, _), (wk, bk, axis), (wv, bv, _) = (weights(name) for name in names)
        if self_attention and kv_heads == self.num_heads:
            # One [D, N·3·H] matmul for the three projections (heads outermost, so a 'heads'
            # sharding of the kernels carries over to the stacked one).
            stacked_bias = None if bq is None else jnp.stack([bq, bk, bv], axis=1)
            qkv = project(x, jnp.stack([wq, wk, wv], axis=2), stacked_bias)  # [B, T, N, 3, H]
            if impl == "fused_cpu" and not self.rope_base and not decode:  # the kernel reads the stacked tensor
                qkv = constrain(qkv, ("act_batch", "act_seq", "act_heads", None, "act_kv"))
                y = cpu_attention.packed_attention(qkv, self.causal, scale)
            else:
                y = self._attend(impl, *(qkv[..., i, :] for i in range(3)), mask, axis, scale, positions, decode)
        else:
            y = self._attend(impl, project(x, wq, bq), project(context, wk, bk), project(context, wv, bv), mask,
                             axis, scale, positions, decode)
        y = constrain(y, ("act_batch", "act_seq", "act_heads", "act_kv"))  # [B, T, N, H]
        out = self.param(
            "out_kernel", partitioned(dense_init(self.out_init_scale), ("heads", "kv", "embed")),
            (self.num_heads, self.head_dim, d_model),
        )
        y = token_matmul(y.reshape(*y.shape[:-2], -1), out.reshape(-1, d_model).astype(self.dtype))
        if self.use_bias:
            bias = self.param("out_bias", partitioned(nn.initializers.zeros, ("embed",)), (d_model,))
            y = y + bias.astype(self.dtype)
        return nn.Dropout(self.dropout, deterministic=not train)(y)

    def _attend(self, impl: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, axis: str,
                scale: float, positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
        """q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H] by implementation `impl`."""
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_kv"))
        k, v = (constrain(a, ("act_batch", "act_seq", "act_" + axis, "act_kv")) for a in (k, v))
        if self.rope_base:
            q = rotary(q, jnp.arange(q.shape[1]) if positions is None else positions, self.rope_base,
                       self.rope_scaling)
            k = rotary(k, jnp.arange(k.shape[1]) if positions is None else positions, self.rope_base,
                       self.rope_scaling)
        causal = self.causal
        if decode:
            k, v, mask = self._cached(k, v, positions)
            impl, causal = "einsum", False  # the cache's mask already says what each query sees
        if impl == "fused_cpu":
            return cpu_attention.attention(q, k, v, causal, scale)
        if impl == "einsum":
            heads_major = lambda a: a.transpose(0, 2, 1, 3)
            return heads_major(einsum_attention(heads_major(q), heads_major(k), heads_major(v), mask, causal,
                                                scale))
        if impl == "splash":
            why = tpu_attention.unsupported(q, k, mask, self.causal, axis)
            if why is None:
                return tpu_attention.attention(q, k, v, self.causal, scale, axis, interpret=backend() != "tpu")
            if self.implementation:
                raise ValueError(f"attention implementation 'splash' cannot run here: {why}; set "
                                 "config.model.attention_impl='' (or 'xla')")
            impl = "xla"
        attend = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, is_causal=self.causal,
                                   scale=scale)
        try:
            return attend(implementation=impl)
        except CUDNN_REFUSALS:
            if self.implementation:  # asked for by name: say why it cannot run
                raise
            return attend(implementation="xla")


    def _cached(self, k: jax.Array, v: jax.Array, positions: jax.Array | None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Append k and v [B, T, K, H] to the 'cache' collection at its write index; the whole
        cache's keys and values [B, S, K, H] and the mask [B, 1, T, S] of the keys each query sees.

        The cache's size S is that of the input it was made for (`bigmodel.generate.init_cache`
        makes it empty). Each slot keeps its token's position + 1 (0: empty or padding), so a
        query at position p sees the filled slots at positions up to p: prompts of different
        lengths share one cache, left-padded, and causality needs no slot arithmetic.
        """
        b, t = k.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        positions = positions.astype(jnp.int32)
        keys = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        values = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        slots = self.variable("cache", "position", jnp.zeros, positions.shape, jnp.int32)
        index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
        i = index.value
        keys.value = jax.lax.dynamic_update_slice(keys.value, k.astype(keys.value.dtype), (0, i, 0, 0))
        values.value = jax.lax.dynamic_update_slice(values.value, v.astype(values.value.dtype), (0, i, 0, 0))
        slots.value = jax.lax.dynamic_update_slice(slots.value, jnp.maximum(positions + 1, 0), (0, i))
        index.value = i + t
        seen = slots.value[:, None, :]  # [B, 1, S]
        mask = (seen > 0) & (seen <= positions[:, :, None] + 1)  # [B, T, S]
        return keys.value, values.value, mask[:, None]


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
        return token_matmul(x, self.embedding.T.astype(self.dtype))


class ClassifierHead(nn.Module):
    """Every classifier's output layer: pooled features, dropout, then a dense layer to the classes.

    Its parameters are a Dense's (`kernel` [D, classes], `bias` [classes]) under the name the
    model gives it ('head' in every family), with logical names (`features_axis`, 'classes').
    """

    num_classes: int
    dropout: float = 0.0  # on the pooled features
    kernel_init: Initializer = dense_init()
    features_axis: str = "embed"  # logical name of the pooled width ('mlp' where it is a hidden width)
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """pooled [B, D] -> logits [B, classes] float32."""
        x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(self.dtype))
        kernel = self.param("kernel", partitioned(self.kernel_init, (self.features_axis, "classes")),
                            (x.shape[-1], self.num_classes), jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("classes",)), (self.num_classes,), jnp.float32)
        logits = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        return constrain(logits, ("act_batch", None)).astype(jnp.float32)
