"""ResNet and small CNN: shapes, parameter counts, logical names, BatchNorm statistics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import build, resnet
from bigmodel.sharding import DEFAULT_RULES

RULES = DEFAULT_RULES  # every logical name a model uses must have a rule here
WEIGHT_NAMES = {name for name, _ in RULES if not name.startswith("act_")}

# torchvision's counts (conv weights, BN scale/bias, fc weight/bias; running statistics excluded).
EXPECTED = {
    "tiny": 78_042,
    "cifar18": 11_173_962,
    "18": 11_689_512,
    "34": 21_797_672,
    "50": 25_557_032,
    "101": 44_549_160,
    "152": 60_192_808,
}
EXPECTED_CNN = {"small": 87_178, "mnist": 824_458}


def key(seed: int = 0) -> jax.Array:
    # 'rbg' keys compile far faster on CPU than threefry: init costs ~1 s instead of ~8 s.
    return jax.random.key(seed, impl="rbg")


def n_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))


def assert_logical_names(params) -> None:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
        assert set(leaf.names) - {None} <= WEIGHT_NAMES, leaf.names


def init_shapes(cfg):
    model = build(cfg)
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))


@pytest.fixture(scope="module")
def tiny():
    model = build(resnet.model_config("tiny"))
    images = jax.random.normal(key(1), (4, 8, 8, 3))
    with nn.logical_axis_rules(RULES):
        variables = jax.jit(model.init, static_argnames="train")(key(), images, train=False)
    return model, variables, images


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_shapes_and_dtype(tiny, dtype):
    _, variables, images = tiny
    cfg = resnet.model_config("tiny")
    cfg.dtype = dtype
    model = build(cfg)
    with nn.logical_axis_rules(RULES):  # every activation name must have a rule
        apply = jax.jit(model.apply, static_argnames="train")
        logits = apply(variables, images, train=False)
        other = apply(variables, images + 1.0, train=False)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert not np.allclose(logits, other)
    assert {"params", "batch_stats"} == set(variables)


@pytest.mark.parametrize("size", sorted(resnet.SIZES))
def test_every_size_param_count(size):
    variables = init_shapes(resnet.model_config(size))
    assert n_params(variables["params"]) == EXPECTED[size]
    assert_logical_names(variables["params"])
    print(f"resnet:{size} {n_params(variables['params']):,}")


def test_golden_counts():
    assert n_params(init_shapes(resnet.model_config("18"))["params"]) == 11_689_512
    assert n_params(init_shapes(resnet.model_config("50"))["params"]) == 25_557_032


def test_small_stem_changes_only_the_stem():
    big, small = resnet.model_config("18"), resnet.model_config("18")
    small.stem = "small"
    delta = n_params(init_shapes(big)["params"]) - n_params(init_shapes(small)["params"])
    assert delta == 64 * 3 * (7 * 7 - 3 * 3)
    small.image_size = 32
    model, images = build(small), jnp.zeros((2, 32, 32, 3))
    logits = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), images), images))
    assert logits.shape == (2, 1000)


def test_logical_names_tiny(tiny):
    _, variables, _ = tiny
    assert_logical_names(variables["params"])


def bn_applies(model):
    """Jitted eval and train applies; both return (logits, batch_stats after the call)."""
    def run(variables, images, train):
        logits, updates = model.apply(variables, images, train=train, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    return jax.jit(run, static_argnames="train")


def test_batch_stats_updated_in_train_mode(tiny):
    model, variables, images = tiny
    _logits, stats = bn_applies(model)(variables, images, train=True)
    before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(stats)
    assert len(before) == len(after) > 0
    assert all(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
    # momentum 0.9 from the initial (mean 0, var 1): every running variance is 0.9 + 0.1·batch var
    for name, leaf in jax.tree_util.tree_leaves_with_path(stats):
        if "var" in jax.tree_util.keystr(name):
            assert np.all(leaf >= 0.9 - 1e-6), name


def test_batch_stats_unused_and_unchanged_in_eval_mode(tiny):
    model, variables, images = tiny
    run = bn_applies(model)
    logits, stats = run(variables, images, train=False)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # Eval normalises with the running statistics, so an example's logits do not depend on
    # the rest of its batch; train mode normalises with batch statistics, so they do.
    others = images.at[1:].set(jax.random.normal(key(7), images[1:].shape))
    np.testing.assert_allclose(run(variables, others, train=False)[0][0], logits[0], rtol=1e-5, atol=1e-5)
    train_logits = run(variables, images, train=True)[0]
    assert not np.allclose(run(variables, others, train=True)[0][0], train_logits[0], atol=1e-4)
    # ...and eval does read the stored statistics.
    shifted = jax.tree.map(lambda x: x, variables)  # a copy of the nested dicts
    shifted["batch_stats"]["stem_bn"]["bn"]["mean"] = shifted["batch_stats"]["stem_bn"]["bn"]["mean"] + 1.0
    assert not np.allclose(run(shifted, images, train=False)[0], logits)


@pytest.mark.parametrize("size", sorted(resnet.CNN_SIZES))
def test_cnn(size):
    cfg = resnet.cnn_model_config(size)
    variables = init_shapes(cfg)
    assert n_params(variables["params"]) == EXPECTED_CNN[size]
    assert_logical_names(variables["params"])
    print(f"cnn:{size} {n_params(variables['params']):,}")


def test_cnn_tiny_shapes():
    cfg = resnet.cnn_model_config("small")
    model = build(cfg)
    images = jax.random.normal(key(1), (3, 8, 8, 1))
    with nn.logical_axis_rules(RULES):
        variables = jax.jit(model.init)(key(), images)
        logits = model.apply(variables, images)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert not np.allclose(logits, model.apply(variables, -images))
