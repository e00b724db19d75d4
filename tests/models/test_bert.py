"""BERT encoder, MLM head and classifier: shapes, masking, parameter counts, logical names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import bert, build
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


def expected_encoder(cfg, pooler: bool) -> int:
    """HF BertModel: embeddings (+LN), layers, optional pooler."""
    d, f = cfg.d_model, cfg.d_ff or 4 * cfg.d_model
    embeddings = (cfg.vocab_size + cfg.max_len + cfg.type_vocab_size) * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d + (d * f + f + f * d + d) + 2 * d
    return embeddings + cfg.num_layers * layer + (d * d + d if pooler else 0)


def expected_mlm(cfg) -> int:
    """Encoder without pooler + transform dense + LN + output bias (output matrix tied)."""
    d = cfg.d_model
    return expected_encoder(cfg, pooler=False) + d * d + d + 2 * d + cfg.vocab_size


def encoder_count(cfg, pooler: bool) -> int:
    model = bert.BertEncoder(bert.BertConfig.from_config(cfg), add_pooler=pooler)
    return n_params(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))["params"])


TOKENS = jnp.array([[101, 7, 8, 9, 102, 0, 0, 0], [101, 5, 6, 102, 11, 12, 13, 102]], jnp.int32)
TYPES = jnp.array([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], jnp.int32)


@pytest.fixture(scope="module")
def tiny_mlm():
    cfg = bert.model_config("tiny")
    model = build(cfg)
    with nn.logical_axis_rules(RULES):
        variables = jax.jit(model.init)(key(), TOKENS, TYPES)
    return cfg, model, variables


def test_mlm_shapes_and_masking(tiny_mlm):
    cfg, model, variables = tiny_mlm
    assert isinstance(model, bert.BertMLM)
    # rows: the batch, then row 0 with one real token changed
    batch = jnp.concatenate([TOKENS, TOKENS[:1].at[0, 2].set(50)])
    types = jnp.concatenate([TYPES, TYPES[:1]])
    # row 0: new type ids under its padding only; row 1: segment B marked as A
    other_types = types.at[0, 5:].set(1).at[1].set(0)
    with nn.logical_axis_rules(RULES):
        apply = jax.jit(model.apply)
        logits = apply(variables, batch, types)
        swapped = apply(variables, batch, other_types)
    assert logits.shape == (3, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert not np.allclose(logits[2, 0], logits[0, 0])  # bidirectional: position 0 sees token 2
    assert not np.allclose(swapped[1], logits[1])  # token types matter
    # Padding keys are masked: row 0's real positions ignore what changed at its padding.
    np.testing.assert_allclose(swapped[0, :5], logits[0, :5], atol=1e-5)
    assert not np.allclose(swapped[0, 5:], logits[0, 5:])
    np.testing.assert_array_equal(swapped[2], logits[2])
    assert n_params(variables["params"]) == expected_mlm(cfg)


def test_mlm_output_is_tied_to_word_embeddings(tiny_mlm):
    _, _, variables = tiny_mlm
    params = nn.unbox(variables["params"])
    assert set(params) == {"bert", "mlm_transform", "mlm_transform_ln", "mlm_bias"}
    assert "pooler" not in params["bert"]
    assert params["bert"]["embeddings"]["word"]["embedding"].shape == (30522, 128)
    assert sorted(params["bert"]) == ["embeddings", "layer_0", "layer_1"]
    assert sorted(params["bert"]["layer_0"]) == ["attention", "attention_ln", "mlp", "output_ln"]


def test_logical_names(tiny_mlm):
    assert_logical_names(tiny_mlm[2]["params"])


def test_classifier_shapes():
    cfg = bert.model_config("tiny")
    cfg.head, cfg.num_classes, cfg.dtype = "classify", 3, "bfloat16"
    model = build(cfg)
    assert isinstance(model, bert.BertClassifier)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS, TYPES))
    assert n_params(variables["params"]) == expected_encoder(cfg, pooler=True) + 128 * 3 + 3
    assert_logical_names(variables["params"])
    logits = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), TOKENS), TOKENS, TYPES, train=True,
                                                rngs={"dropout": jax.random.key(1)}))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32


@pytest.mark.parametrize("size", sorted(bert.SIZES))
def test_every_size_param_count(size):
    cfg = bert.model_config(size)
    variables = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), TOKENS, TYPES))
    assert n_params(variables["params"]) == expected_mlm(cfg)
    assert_logical_names(variables["params"])
    print(
        f"bert:{size} encoder+pooler {encoder_count(cfg, True):,}  without pooler "
        f"{encoder_count(cfg, False):,}  with MLM head {n_params(variables['params']):,}"
    )


def test_golden_bert_base_counts():
    """HF `BertModel` (bert-base-uncased): embeddings + 12 layers + pooler, no MLM head."""
    cfg = bert.model_config("base")
    assert encoder_count(cfg, pooler=True) == 109_482_240
    assert encoder_count(cfg, pooler=False) == 108_891_648
    assert expected_mlm(cfg) == 109_514_298  # HF BertForMaskedLM: + transform, LN, output bias


def test_golden_bert_large_count():
    assert encoder_count(bert.model_config("large"), pooler=True) == 335_141_888


def test_rotary_positions_replace_the_table_and_see_order():
    cfg = bert.model_config("tiny")
    cfg.vocab_size, cfg.max_len, cfg.position = 300, 64, "rope"
    assert encoder_count(cfg, pooler=False) == expected_encoder(cfg, pooler=False) - cfg.max_len * cfg.d_model
    model = build(cfg)
    tokens = jnp.array([[258, 5, 6, 7, 8, 259]], jnp.int32)
    variables = model.init(key(), tokens)
    assert "position" not in variables["params"]["bert"]["embeddings"]
    # Without a table, order reaches the model through the rotation alone: swapping two tokens
    # changes the logits at a third position.
    a = model.apply(variables, tokens)
    b = model.apply(variables, tokens[:, jnp.array([0, 2, 1, 3, 4, 5])])
    assert not np.allclose(a[0, 4], b[0, 4], atol=1e-5)
    from bigmodel import hf
    with pytest.raises(ValueError, match="model.position='rope' has no Hugging Face BERT equivalent"):
        hf.hf_config(cfg)
