"""The fused CPU attention kernel equals the einsum attention, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.kernels.cpu import attention as cpu_attention
from bigmodel.models import layers


def reference(q, k, v, causal, scale):
    """einsum_attention in the kernel's [B, T, N, H] layout."""
    t = lambda a: a.transpose(0, 2, 1, 3)
    return t(layers.einsum_attention(t(q), t(k), t(v), None, causal, scale))


def loss(attend):
    """A scalar of attend's output with a different cotangent for every element."""
    def value(*args):
        y = attend(*args)
        return (y * jnp.cos(jnp.arange(y.size).reshape(y.shape))).sum()
    return value


@pytest.mark.parametrize("shape", [
    (2, 37, 4, 16, 4, 37),  # multi-head, T not a multiple of the 16-wide vectors
    (2, 100, 4, 16, 2, 100),  # grouped-query; two query blocks of 64 and 36 rows
    (1, 70, 3, 24, 1, 70),  # multi-query; head size 24 is padded to 32 inside
    (2, 20, 2, 8, 2, 29),  # more keys than queries: query t sees keys <= t + 9 when causal
])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_equals_einsum_attention(shape, causal):
    b, t, n, h, kv, s = shape
    kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, n, h))
    k, v = jax.random.normal(kk, (b, s, kv, h)), jax.random.normal(kv_, (b, s, kv, h))
    scale = 0.7 / np.sqrt(h)
    got = jax.jit(cpu_attention.attention, static_argnums=(3, 4))(q, k, v, causal, scale)
    np.testing.assert_allclose(got, reference(q, k, v, causal, scale), rtol=1e-5, atol=2e-6)
    ours = jax.jit(jax.grad(loss(lambda q, k, v: cpu_attention.attention(q, k, v, causal, scale)), (0, 1, 2)))
    want = jax.jit(jax.grad(loss(lambda q, k, v: reference(q, k, v, causal, scale)), (0, 1, 2)))
    for name, a, w in zip("qkv", ours(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_packed_kernel_reads_and_differentiates_the_stacked_projection(causal):
    qkv = jax.random.normal(jax.random.key(5), (2, 45, 3, 3, 16))  # [B, T, N, 3, H]
    split = lambda x: [x[..., i, :] for i in range(3)]
    got = cpu_attention.packed_attention(qkv, causal, 0.25)
    np.testing.assert_allclose(got, reference(*split(qkv), causal, 0.25), rtol=1e-5, atol=2e-6)
    ours = jax.grad(loss(lambda x: cpu_attention.packed_attention(x, causal, 0.25)))(qkv)
    want = jax.grad(loss(lambda x: reference(*split(x), causal, 0.25)))(qkv)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)


def test_leading_dimensions_and_vmap_are_batch():
    q, k, v = jax.random.normal(jax.random.key(2), (3, 3, 2, 33, 2, 16))
    # [3, 2] leading dimensions as batch, and the same through vmap over the first one
    got = cpu_attention.attention(q, k, v, True, 0.25)
    mapped = jax.vmap(lambda q, k, v: cpu_attention.attention(q, k, v, True, 0.25))(q, k, v)
    want = jnp.stack([reference(q[i], k[i], v[i], True, 0.25) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(mapped, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kv_heads, rope", [(4, 0.0), (2, 0.0), (4, 100.0)])  # packed, GQA, RoPE
def test_attention_module_kernel_matches_einsum(kv_heads, rope):
    x = jax.random.normal(jax.random.key(1), (2, 40, 32))
    module = lambda impl: layers.Attention(4, 8, causal=True, num_kv_heads=kv_heads, rope_base=rope,
                                           implementation=impl)
    params = module("einsum").init(jax.random.key(2), x)
    run = lambda impl: jax.value_and_grad(lambda p: (module(impl).apply(p, x) ** 2).sum())(params)
    (got_loss, got_grads), (want_loss, want_grads) = run("fused_cpu"), run("einsum")
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    flat_got, flat_want = jax.tree.leaves_with_path(got_grads), jax.tree.leaves(want_grads)
    for (path, a), w in zip(flat_got, flat_want):
        if "key_bias" in jax.tree_util.keystr(path):  # softmax ignores a shift of all logits: zero up to rounding
            assert float(jnp.abs(a).max()) < 1e-4
            continue
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_default_on_one_cpu_device_is_the_kernel_with_a_fallback_for_masks(monkeypatch):
    assert layers.default_attention_impl(jnp.float32) == "einsum"  # 8 devices in the tests
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert layers.default_attention_impl(jnp.float32) == "fused_cpu"
    assert layers.default_attention_impl(jnp.bfloat16) == "einsum"
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    mask = (jnp.arange(12) < 9)[None, None, None, :]
    auto, kernel, einsum = (layers.Attention(2, 8, implementation=i) for i in (None, "fused_cpu", "einsum"))
    params = einsum.init(jax.random.key(0), x)
    # a mask: the automatic choice falls back to einsum; the kernel asked for by name says why not
    np.testing.assert_array_equal(auto.apply(params, x, mask=mask), einsum.apply(params, x, mask=mask))
    with pytest.raises(ValueError, match="'fused_cpu' cannot run here: it takes no mask"):
        kernel.apply(params, x, mask=mask)
    # no mask: the automatic choice is the kernel
    np.testing.assert_array_equal(auto.apply(params, x), kernel.apply(params, x))
    assert not np.array_equal(kernel.apply(params, x), einsum.apply(params, x))  # a different summation order


def test_unsupported_names_each_reason(monkeypatch):
    assert cpu_attention.unsupported(jnp.float32, 8, 8, None, True) is None
    assert "float32" in cpu_attention.unsupported(jnp.bfloat16, 8, 8, None, True)
    assert "at least as many keys" in cpu_attention.unsupported(jnp.float32, 8, 5, None, True)
    assert cpu_attention.unsupported(jnp.float32, 8, 5, None, False) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "CPU only" in cpu_attention.unsupported(jnp.float32, 8, 8, None, True)
