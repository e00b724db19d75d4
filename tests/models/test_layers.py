"""Shared blocks: the heads-major einsum attention equals jax.nn.dot_product_attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import layers


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("block", [128, 5])  # one block, or causal blocks of 5, 5 and 2 query rows
def test_einsum_attention_equals_dot_product_attention(kv_heads, causal, padded, block):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 4, 12, 8))  # [B, N, T, H]
    k, v = jax.random.normal(kk, (2, kv_heads, 12, 8)), jax.random.normal(kv, (2, kv_heads, 12, 8))
    mask = None
    if padded:  # the last 3 keys of row 1 are padding
        mask = (jnp.arange(12)[None, :] < jnp.array([[12], [9]]))[:, None, None, :]
    got = layers.einsum_attention(q, k, v, mask, causal, scale=0.3, block=block)
    t = lambda x: x.transpose(0, 2, 1, 3)
    want = jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, is_causal=causal, scale=0.3,
                                        implementation="xla")
    np.testing.assert_allclose(got, t(want), rtol=1e-5, atol=1e-6)
    if block == 128:
        return
    # Gradients too: the blocks' key prefixes overlap, so dK and dV sum over blocks.
    loss = lambda f: lambda q, k, v: (f(q, k, v) * jnp.cos(q)).sum()
    ours = jax.jit(jax.grad(loss(lambda q, k, v: layers.einsum_attention(q, k, v, mask, causal, 0.3, block)),
                            (0, 1, 2)))
    ref = jax.jit(jax.grad(loss(lambda q, k, v: t(jax.nn.dot_product_attention(
        t(q), t(k), t(v), mask=mask, is_causal=causal, scale=0.3, implementation="xla"))), (0, 1, 2)))
    for a, b in zip(ours(q, k, v), ref(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_causal_blocks_skip_the_upper_triangle():
    # 12 queries in blocks of 5 see 5, 10 and 12 keys; with 3 cached keys ahead (S = 15), 8, 13, 15.
    assert layers._query_blocks(12, 12, True, 5) == [(0, 5, 5), (5, 10, 10), (10, 12, 12)]
    assert layers._query_blocks(12, 15, True, 5) == [(0, 5, 8), (5, 10, 13), (10, 12, 15)]
    assert layers._query_blocks(12, 12, False, 5) == [(0, 12, 12)]


def test_causal_attention_with_more_keys_than_queries():
    # The last of 7 queries is the last of 10 keys' position: query i sees keys j <= i + 3.
    q = jax.random.normal(jax.random.key(3), (1, 2, 7, 4))
    k, v = jax.random.normal(jax.random.key(4), (2, 1, 2, 10, 4))
    got = layers.einsum_attention(q, k, v, None, True, None, block=3)
    t = lambda x: x.transpose(0, 2, 1, 3)
    below = jnp.arange(10)[None, :] <= jnp.arange(7)[:, None] + 3
    want = jax.nn.dot_product_attention(t(q), t(k), t(v), mask=below, implementation="xla")
    np.testing.assert_allclose(got, t(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope", [0.0, 100.0])
def test_attention_module_gives_the_same_result_in_both_layouts(rope):
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    module = lambda impl: layers.Attention(4, 8, causal=True, num_kv_heads=2, rope_base=rope,
                                           implementation=impl)
    params = module("xla").init(jax.random.key(2), x)
    np.testing.assert_allclose(module("einsum").apply(params, x), module("xla").apply(params, x), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        module("flash").apply(params, x)


@pytest.mark.parametrize("backend, dtype, want", [
    ("cpu", jnp.float32, "einsum"), ("cpu", jnp.bfloat16, "einsum"), ("gpu", jnp.bfloat16, "cudnn"),
    ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, "xla"), ("tpu", jnp.bfloat16, "splash"),
    ("tpu", jnp.float32, "splash"),
])
def test_default_attention_impl_by_backend_and_dtype(monkeypatch, backend, dtype, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert layers.default_attention_impl(dtype) == want


def test_automatic_cudnn_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
    # On this host cuDNN cannot run, as on a GPU whose cuDNN refuses the shapes: the automatic
    # choice falls back to the XLA path; cuDNN asked for by name raises.
    x = jax.random.normal(jax.random.key(1), (2, 10, 32)).astype(jnp.bfloat16)
    module = lambda impl: layers.Attention(4, 8, causal=True, implementation=impl,
                                           dtype=jnp.bfloat16)
    params = module("xla").init(jax.random.key(2), x)
    want = module("xla").apply(params, x)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(module(None).apply(params, x), want)
    # Without the CUDA plugin JAX finds no cuDNN; with it (the gpu-compile extra) the kernel has no CPU lowering.
    with pytest.raises((RuntimeError, NotImplementedError), match="cuDNN|not found for platform cpu"):
        module("cudnn").apply(params, x)


def test_dense_equals_flax_dense_in_values_and_gradients():
    x = jax.random.normal(jax.random.key(5), (3, 7, 16))
    ours, theirs = layers.Dense(24, kernel_init=layers.dense_init()), nn.Dense(24)
    params = theirs.init(jax.random.key(6), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    assert jax.tree.structure(ours.init(jax.random.key(6), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-6)
    loss = lambda m: lambda p, x: (jnp.sin(m.apply(p, x)) * x.sum(-1, keepdims=True)).sum()
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                    jax.tree.leaves(jax.grad(loss(theirs), (0, 1))(params, x))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
def test_stacked_self_attention_projection_equals_separate_ones(use_bias):
    # Self-attention with as many kv heads as query heads runs one [D, N·3·H] matmul; the result
    # must be what the three parameter tensors give one by one.
    x = jax.random.normal(jax.random.key(7), (2, 9, 32))
    module = layers.Attention(4, 8, causal=True, use_bias=use_bias, implementation="xla")
    params = nn.meta.unbox(module.init(jax.random.key(8), x)["params"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(9), p.shape), params)
    proj = {n: jnp.einsum("btd,dnh->btnh", x, params[f"{n}_kernel"]) + (params[f"{n}_bias"] if use_bias else 0)
            for n in ("query", "key", "value")}
    y = jax.nn.dot_product_attention(proj["query"], proj["key"], proj["value"], is_causal=True)
    want = jnp.einsum("btnh,nhd->btd", y, params["out_kernel"]) + (params["out_bias"] if use_bias else 0)
    got = module.apply({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Cross-attention (context given) projects the context separately and still agrees.
    cross = module.apply({"params": params}, x, context=x)
    np.testing.assert_allclose(cross, want, rtol=1e-5, atol=1e-5)


def test_add_leading_sums_the_gradient_over_the_leading_axes():
    x, b = jax.random.normal(jax.random.key(10), (3, 5, 4)), jax.random.normal(jax.random.key(11), (5, 4))
    loss = lambda add: lambda x, b: (jnp.cos(add(x, b)) * jnp.arange(4.0)).sum()
    ours = jax.grad(loss(layers.add_leading), (0, 1))(x, b)
    want = jax.grad(loss(lambda x, b: x + b[None]), (0, 1))(x, b)
    np.testing.assert_allclose(layers.add_leading(x, b), x + b[None])
    for a, w in zip(ours, want):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)


def test_causal_block_default_is_a_quarter_of_the_sequence():
    q = jax.random.normal(jax.random.key(12), (1, 1, 512, 4))
    blocked = layers.einsum_attention(q, q, q, None, True, None)
    np.testing.assert_allclose(blocked, layers.einsum_attention(q, q, q, None, True, None, block=128),
                               rtol=0, atol=0)
    want = jax.nn.dot_product_attention(*(q.transpose(0, 2, 1, 3),) * 3, is_causal=True, implementation="xla")
    np.testing.assert_allclose(blocked, want.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)


def test_classifier_head_is_a_dense_layer_after_dropout():
    x = jax.random.normal(jax.random.key(1), (3, 16))
    head = layers.ClassifierHead(5, dropout=0.5, features_axis="mlp", dtype=jnp.bfloat16)
    variables = head.init(jax.random.key(0), x)
    boxed = variables["params"]
    assert {k: (v.value.shape, v.names) for k, v in boxed.items()} == {
        "kernel": ((16, 5), ("mlp", "classes")), "bias": ((5,), ("classes",))}
    params = nn.unbox(boxed)
    assert params["kernel"].dtype == jnp.float32 and not params["bias"].any()
    params["bias"] = jnp.arange(5.0)
    logits = head.apply({"params": params}, x)  # eval: no dropout; computed in bfloat16, returned as float32
    want = x.astype(jnp.bfloat16) @ params["kernel"].astype(jnp.bfloat16) + params["bias"].astype(jnp.bfloat16)
    assert logits.dtype == jnp.float32 and logits.shape == (3, 5)
    np.testing.assert_array_equal(logits, want.astype(jnp.float32))
    # Training drops features at the rate and scales the kept ones by 1/(1-rate).
    ones = layers.ClassifierHead(1, dropout=0.5, kernel_init=nn.initializers.ones)
    wide = jnp.ones((1, 1000))
    one_params = ones.init(jax.random.key(0), wide)
    kept = ones.apply(one_params, wide, train=True, rngs={"dropout": jax.random.key(3)})[0, 0] / 2
    assert ones.apply(one_params, wide)[0, 0] == 1000 and kept == int(kept) and 400 < kept < 600


def test_every_classifier_family_uses_the_shared_head():
    from bigmodel import models
    from bigmodel.models import bert, resnet, rnn, vit

    configs = [bert.model_config("tiny"), rnn.model_config("tiny"), vit.model_config("tiny"),
               resnet.model_config("tiny"), resnet.cnn_model_config("small")]
    configs[0].head = configs[1].head = "classify"
    for cfg in configs:
        model = models.build(cfg)
        image = "image_size" in cfg
        inputs = jnp.zeros((2, cfg.image_size, cfg.image_size, cfg.num_channels) if image else (2, 8),
                           jnp.float32 if image else jnp.int32)
        heads = []

        def record(f, args, kwargs, context, heads=heads):
            if context.method_name == "__call__" and isinstance(context.module, layers.ClassifierHead):
                heads.append((context.module.name, context.module.num_classes))
            return f(*args, **kwargs)

        with nn.intercept_methods(record):
            logits = jax.eval_shape(lambda m=model, x=inputs: m.init_with_output(jax.random.key(0), x)[0])
        assert heads == [("head", cfg.num_classes)], cfg.name
        assert logits.shape == (2, cfg.num_classes) and logits.dtype == jnp.float32
