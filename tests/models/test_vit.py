"""Vision Transformer: shapes, pooling variants, parameter counts, logical names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import build, vit
from bigmodel.sharding import DEFAULT_RULES

RULES = DEFAULT_RULES  # every logical name a model uses must have a rule here
WEIGHT_NAMES = {name for name, _ in RULES if not name.startswith("act_")}


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


def expected_count(cfg) -> int:
    """Patch conv + [class token] + positions + blocks + final LN + [MAP head] + classifier."""
    d, f, p = cfg.d_model, cfg.d_ff, cfg.patch_size
    tokens = (cfg.image_size // p) ** 2 + (cfg.pool == "token")
    attn, mlp = 4 * (d * d + d), d * f + f + f * d + d
    total = p * p * cfg.num_channels * d + d + (d if cfg.pool == "token" else 0) + tokens * d
    total += cfg.num_layers * (attn + mlp + 4 * d) + 2 * d
    if cfg.pool == "map":
        total += d + attn + 2 * d + mlp
    return total + d * cfg.num_classes + cfg.num_classes


def images_for(cfg, batch: int = 2) -> jax.Array:
    return jax.random.uniform(key(1), (batch, cfg.image_size, cfg.image_size, cfg.num_channels))


def random_params(abstract, seed: int = 0, std: float = 0.3):
    """Normal(0, std) values for an abstract parameter tree, from NumPy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype), nn.unbox(abstract))


@pytest.mark.parametrize("pool", ["token", "map"])  # 'gap' is only a mean: checked by eval_shape
def test_tiny_shapes(pool):
    cfg = vit.model_config("tiny")
    cfg.pool = pool
    model = build(cfg)
    images = images_for(cfg)
    with nn.logical_axis_rules(RULES):
        if pool == "token":  # the default: real initialisers
            variables = jax.jit(model.init)(key(), images)
        else:  # only the head differs: random values suffice and skip an init compile
            abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
            variables = {"params": random_params(abstract["params"])}
        apply = jax.jit(model.apply)
        logits = apply(variables, images)
        flipped = apply(variables, images[:, ::-1])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert not np.allclose(flipped, logits)  # learned positions: the layout matters
    assert n_params(variables["params"]) == expected_count(cfg)
    assert_logical_names(jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"])


@pytest.mark.parametrize("pool", vit.POOLS)
def test_bfloat16_logits_are_float32(pool):
    cfg = vit.model_config("tiny")
    cfg.dtype, cfg.pool = "bfloat16", pool
    model, images = build(cfg), images_for(cfg)
    logits = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), images), images))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_wrong_image_size_is_refused():
    cfg = vit.model_config("tiny")
    with pytest.raises(ValueError, match="model.image_size"):
        jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))


@pytest.mark.parametrize("pool", vit.POOLS)
@pytest.mark.parametrize("size", sorted(vit.SIZES))
def test_every_size_param_count(size, pool):
    cfg = vit.model_config(size)
    cfg.pool = pool
    variables = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), jnp.zeros((1, cfg.image_size,
                                                                                    cfg.image_size, cfg.num_channels))))
    assert n_params(variables["params"]) == expected_count(cfg)
    assert_logical_names(variables["params"])
    print(f"vit:{size} pool={pool} {n_params(variables['params']):,}")


def test_golden_vit_b16():
    cfg = vit.model_config("b16")
    assert (cfg.image_size, cfg.num_classes, cfg.pool) == (224, 1000, "token")
    images = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), images))
    assert n_params(variables["params"]) == 86_567_656
