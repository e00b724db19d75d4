"""Shared blocks: the heads-major einsum attention equals jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import layers


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True)])
def test_einsum_attention_equals_dot_product_attention(kv_heads, causal, padded):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 4, 12, 8))  # [B, N, T, H]
    k, v = jax.random.normal(kk, (2, kv_heads, 12, 8)), jax.random.normal(kv, (2, kv_heads, 12, 8))
    mask = None
    if padded:  # the last 3 keys of row 1 are padding
        mask = (jnp.arange(12)[None, :] < jnp.array([[12], [9]]))[:, None, None, :]
    got = layers.einsum_attention(q, k, v, mask, causal, scale=0.3)
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    want = jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, is_causal=causal, scale=0.3,
                                        implementation="xla")
    np.testing.assert_allclose(got, t(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope", [0.0, 100.0])
def test_attention_module_gives_the_same_result_in_both_layouts(rope):
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    module = lambda impl: layers.Attention(4, 8, causal=True, num_kv_heads=2, rope_base=rope,  # noqa: E731
                                           implementation=impl)
    params = module("xla").init(jax.random.key(2), x)
    np.testing.assert_allclose(module("einsum").apply(params, x), module("xla").apply(params, x), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        module("flash").apply(params, x)
