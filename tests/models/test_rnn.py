"""LSTM / GRU language model and classifier: shapes, padding, parameter counts, logical names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import build, rnn
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
    """Embedding + per-layer cell weights + head, from the cell equations."""
    total, width = cfg.vocab_size * cfg.d_model, cfg.d_model
    for _ in range(cfg.num_layers):
        h = cfg.hidden
        if cfg.cell == "lstm":  # 4 gates: input kernel, recurrent kernel, one bias
            total += 4 * (width * h + h * h + h)
        else:  # 3 gates with input biases, plus the bias inside the candidate's reset term
            total += 3 * (width * h + h * h + h) + h
        width = h
    out = cfg.vocab_size if cfg.head == "lm" else cfg.num_classes
    return total + width * out + out


def random_params(abstract, seed: int = 0, std: float = 0.3):
    """Normal(0, std) values for an abstract parameter tree, from NumPy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype), nn.unbox(abstract))


def config(cell: str, head: str, size: str = "tiny"):
    cfg = rnn.model_config(size)
    cfg.cell, cfg.head = cell, head
    return cfg


TOKENS = jnp.array([[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]], jnp.int32)


@pytest.mark.parametrize("cell", sorted(rnn.CELLS))
def test_lm_shapes_and_causality(cell):
    model = build(config(cell, "lm"))
    with nn.logical_axis_rules(RULES):
        variables = jax.jit(model.init)(key(), TOKENS)
        apply = jax.jit(model.apply)
        logits = apply(variables, TOKENS)
        changed = apply(variables, TOKENS.at[:, 3].set(9))
    assert logits.shape == (2, 6, 384) and logits.dtype == jnp.float32
    assert n_params(variables["params"]) == expected_count(config(cell, "lm"))
    assert_logical_names(variables["params"])
    # A recurrent LM is causal: step 3 changes logits from step 3 on, never before.
    np.testing.assert_array_equal(changed[:, :3], logits[:, :3])
    assert not np.allclose(changed[:, 3:], logits[:, 3:])


@pytest.mark.parametrize("cell", sorted(rnn.CELLS))
def test_classifier_shapes_and_padding(cell):
    cfg = config(cell, "classify")
    cfg.dtype = "bfloat16"
    model = build(cfg)
    # rows: a padded sequence, a full one, the first with a real token changed
    tokens = jnp.concatenate([TOKENS, TOKENS[:1].at[0, 1].set(9)])
    # the same, but with junk after each sequence's end that explicit lengths must hide
    junk = tokens.at[0, 3:].set(8).at[2, 4:].set(8)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    assert n_params(abstract["params"]) == expected_count(cfg)
    assert_logical_names(abstract["params"])
    variables = {"params": random_params(abstract["params"])}  # real init is tested with the LM
    with nn.logical_axis_rules(RULES):
        apply = jax.jit(model.apply)
        logits = apply(variables, tokens)
        explicit = apply(variables, junk, jnp.array([3, 6, 3]))
    assert logits.shape == (3, 2) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(explicit, logits)
    assert not np.allclose(logits[2], logits[0])


@pytest.mark.parametrize("cell", sorted(rnn.CELLS))
@pytest.mark.parametrize("head", rnn.HEADS)
@pytest.mark.parametrize("size", sorted(rnn.SIZES))
def test_every_size_param_count(size, head, cell):
    cfg = config(cell, head, size)
    variables = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), TOKENS))
    assert n_params(variables["params"]) == expected_count(cfg)
    assert_logical_names(variables["params"])
    print(f"rnn:{size} cell={cell} head={head} {n_params(variables['params']):,}")


def test_unknown_cell_is_refused():
    cfg = config("rnn_tanh", "lm")
    with pytest.raises(ValueError, match="model.cell"):
        jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), TOKENS))
