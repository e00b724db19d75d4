"""The CPU norm and GELU kernels equal their Flax / jax.nn counterparts, values and gradients;
the models pick them where they run and keep the same parameters; the kernels build safely."""

import os
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.kernels.cpu import gelu as cpu_gelu, library, norm as cpu_norm
from bigmodel.models import gpt, layers


def cotangent(shape, seed=3):
    return jax.random.normal(jax.random.key(seed), shape)


def vjp(f, *args):
    """f(*args) and the gradients of <f(*args), a random cotangent> for every argument."""
    y, pull = jax.vjp(f, *args)
    return y, pull(cotangent(y.shape))


def flax_norm(center):
    if center:
        return lambda x, s, b: nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, x)
    return lambda x, s, b: nn.RMSNorm().apply({"params": {"scale": s}}, x) + b


@pytest.mark.parametrize("shape", [(3, 37, 40), (2, 5, 64), (7, 3)])  # D with a scalar tail, 4 vectors, < 1 vector
@pytest.mark.parametrize("center", [True, False])  # LayerNorm, RMSNorm
def test_norm_kernel_equals_flax(shape, center):
    keys = jax.random.split(jax.random.key(0), 3)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5  # a mean far from 0 tests the centring
    scale = 1.0 + jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    got, got_grads = vjp(lambda x, s, b: cpu_norm.norm(x, s, b, 1e-6, center), x, scale, bias)
    want, want_grads = vjp(flax_norm(center), x, scale, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    for name, g, w in zip(("x", "scale", "bias"), got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5, err_msg=name)


def test_norm_kernel_under_vmap_with_batched_and_shared_parameters():
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, 6, 5, 48))
    scale, bias = jax.random.normal(keys[1], (2, 48)), jax.random.normal(keys[2], (2, 48))
    ours = jax.vmap(lambda x, s, b: cpu_norm.layer_norm(x, s, b, 1e-6))
    want = jax.vmap(flax_norm(True))
    got, got_grads = vjp(ours, x, scale, bias)  # each vmapped row of parameters sums its own gradient
    expected, expected_grads = vjp(want, x, scale, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
    for g, w in zip(got_grads, expected_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5)
    shared = lambda s: jax.vmap(lambda x: cpu_norm.layer_norm(x, s, bias[0], 1e-6))(x)
    shared_want = lambda s: jax.vmap(lambda x: flax_norm(True)(x, s, bias[0]))(x)
    np.testing.assert_allclose(vjp(shared, scale[0])[1][0], vjp(shared_want, scale[0])[1][0], rtol=1e-4, atol=5e-5)


def test_parameter_gradients_do_not_depend_on_thread_timing():
    x = jax.random.normal(jax.random.key(2), (4096, 64))  # 64 chunks of rows over the threads
    f = jax.jit(lambda x, s, b: vjp(lambda x, s, b: cpu_norm.layer_norm(x, s, b, 1e-5), x, s, b)[1])
    s, b = jnp.ones(64), jnp.zeros(64)
    first = f(x, s, b)
    for _ in range(3):
        for a, c in zip(first, f(x, s, b)):
            np.testing.assert_array_equal(a, c)


def gelu_float64(z):
    """gelu_tanh and its derivative in float64 (numpy): the reference for both implementations."""
    z = np.asarray(z, np.float64)
    c, a = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(c * (z + a * z**3))
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * a * z**2)


@pytest.mark.parametrize("shape", [(3, 37, 72), (4, 64)])
def test_bias_gelu_kernel_equals_gelu(shape):
    h = 4.0 * jax.random.normal(jax.random.key(4), shape)
    h = h.reshape(-1, shape[-1]).at[0, :6].set(jnp.array([30.0, -30.0, 1e-4, -12.0, 9.5, -0.5])).reshape(shape)
    bias = jax.random.normal(jax.random.key(5), shape[-1:])
    dy = cotangent(shape)
    y, pull = jax.vjp(cpu_gelu.bias_gelu, h, bias)
    dh, dbias = pull(dy)
    want_y, slope = gelu_float64(np.asarray(h) + np.asarray(bias))
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dh, np.asarray(dy) * slope, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dbias, (np.asarray(dy) * slope).reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-5)
    # and jax.nn's gelu (in float32: XLA's tanh is off by up to 4e-6 in the slope's tails)
    np.testing.assert_allclose(y, nn.gelu(h + bias, approximate=True), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["layernorm", "layernorm_nobias", "rmsnorm"])
def test_norm_modules_hold_the_same_parameters_either_way(kind):
    x = 2.0 + jax.random.normal(jax.random.key(6), (2, 9, 24))
    module = lambda impl: layers.make_norm(kind.split("_")[0], 1e-5, jnp.float32, "ln",
                                           use_bias=kind != "layernorm_nobias", implementation=impl)
    params = module("flax").init(jax.random.key(0), x)
    assert jax.tree.structure(module("fused_cpu").init(jax.random.key(0), x)) == jax.tree.structure(params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(7), p.shape), params)
    run = lambda impl: jax.value_and_grad(lambda p: (module(impl).apply(p, x) * cotangent(x.shape)).sum())(params)
    (got, got_grads), (want, want_grads) = run("fused_cpu"), run("flax")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5), got_grads, want_grads)


def test_defaults_and_refusals(monkeypatch):
    assert layers.default_norm_impl(jnp.float32) == "flax"  # 8 devices in the tests
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert layers.default_norm_impl(jnp.float32) == "fused_cpu"
    assert layers.default_norm_impl(jnp.bfloat16) == "flax"
    x = jax.random.normal(jax.random.key(8), (3, 16))
    with pytest.raises(ValueError, match="norm implementation 'fused_cpu' cannot run here: it computes in "
                                         "float32, not bfloat16; use 'flax'"):
        layers.LayerNorm(dtype=jnp.bfloat16, implementation="fused_cpu").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="unknown norm implementation 'triton'"):
        layers.LayerNorm(implementation="triton").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="activation implementation 'fused_cpu' cannot run here: its only "
                                         "activation is 'gelu_tanh', not 'relu'"):
        layers.Dense(8, activation="relu", activation_impl="fused_cpu").init(jax.random.key(0), x)
    # the automatic choice: the kernel for gelu_tanh, XLA for other activations
    for activation in ("gelu_tanh", "relu"):
        dense = layers.Dense(8, activation=activation, bias_init=nn.initializers.normal(1.0))
        params = dense.init(jax.random.key(0), x)
        want = layers.Dense(8, activation=activation, activation_impl="xla").apply(params, x)
        got = dense.apply(params, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        text = jax.jit(dense.apply).lower(params, x).as_text()
        assert ("bigmodel_cpu_bias_gelu_forward" in text) == (activation == "gelu_tanh")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.default_norm_impl(jnp.float32) == "flax"
    assert "CPU only" in library.unsupported(jnp.float32)


@pytest.mark.slow
def test_gpt_with_the_kernels_matches_the_plain_jax_gpt():
    cfg = gpt.GPTConfig(vocab_size=50, max_len=24, num_layers=2, d_model=32, num_heads=4)
    tokens = jax.random.randint(jax.random.key(9), (2, 24), 0, 50)
    kernels = gpt.GPT(cfg.__class__(**{**cfg.__dict__, "attention_impl": "fused_cpu", "norm_impl": "fused_cpu",
                                       "activation_impl": "fused_cpu"}))
    plain = gpt.GPT(cfg.__class__(**{**cfg.__dict__, "attention_impl": "einsum", "norm_impl": "flax",
                                     "activation_impl": "xla"}))
    params = plain.init(jax.random.key(0), tokens)

    def loss(model):
        def value(p):
            logits = model.apply(p, tokens)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1).mean()
        return jax.jit(jax.value_and_grad(value))(params)

    (got, got_grads), (want, want_grads) = loss(kernels), loss(plain)
    text = jax.jit(kernels.apply).lower(params, tokens).as_text()
    for target in ("attention", "norm", "bias_gelu"):
        assert f"bigmodel_cpu_{'packed_' if target == 'attention' else ''}{target}_forward" in text
    np.testing.assert_allclose(got, want, rtol=1e-5)
    flat = jax.tree_util.tree_leaves_with_path(got_grads)
    for (path, g), w in zip(flat, jax.tree.leaves(want_grads)):
        if "key_bias" in jax.tree_util.keystr(path):  # softmax ignores a shift of all logits: zero up to rounding
            continue
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-cxx'"):
        library.build("no-such-cxx")
    # A compiler that writes half a library and fails: the error shows its message, and the
    # cache holds no library (nor a temporary file) that a later run could load.
    broken = tmp_path / "broken-cxx"
    broken.write_text('#!/bin/sh\ncase "$1" in --version) echo "broken 1.0"; exit 0;; esac\n'
                      'for a; do out=$a; done\necho partial > "$out"\necho "error: out of memory" >&2\nexit 1\n')
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="failed:\n.*out of memory"):
        library.build("broken-cxx")
    assert not list((tmp_path / "cache").iterdir())
    # The real build is reused: the second call compiles nothing.
    first = library.build()
    mtime = first.stat().st_mtime_ns
    assert library.build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]
