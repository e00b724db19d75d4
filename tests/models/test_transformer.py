"""Encoder-decoder Transformer: shapes, masking, parameter counts, greedy and beam decoding."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models import build, transformer
from bigmodel.sharding import DEFAULT_RULES

RULES = DEFAULT_RULES  # every logical name a model uses must have a rule here
WEIGHT_NAMES = {name for name, _ in RULES if not name.startswith("act_")}
BOS, EOS, MAX_LEN = 1, 2, 8


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
    """Shared embedding + encoder + decoder + two final LayerNorms (sinusoidal positions)."""
    d, f = cfg.d_model, cfg.d_ff
    attn, ln, mlp = 4 * (d * d + d), 2 * d, d * f + f + f * d + d
    encoder = cfg.num_layers * (attn + 2 * ln + mlp)
    decoder = cfg.num_layers * (2 * attn + 3 * ln + mlp)
    return cfg.vocab_size * d + encoder + decoder + 2 * ln


@pytest.fixture(scope="module")
def tiny():
    cfg = transformer.model_config("tiny")
    model = build(cfg)
    src = jax.random.randint(key(1), (2, 7), 3, cfg.vocab_size).at[0, 5:].set(0)
    tgt = jax.random.randint(key(2), (2, 6), 3, cfg.vocab_size).at[:, 0].set(BOS)
    with nn.logical_axis_rules(RULES):
        variables = jax.jit(model.init)(key(), src, tgt)
    return model, variables, src, tgt


def test_tiny_shapes_and_masking(tiny):
    model, variables, src, tgt = tiny
    with nn.logical_axis_rules(RULES):
        apply = jax.jit(model.apply)
        logits = apply(variables, src, tgt)
        future = apply(variables, src, tgt.at[:, 4].set(7))  # a later target token
        padded = apply(variables, jnp.pad(src, ((0, 0), (0, 3))), tgt)  # more source padding
        other_src = apply(variables, src.at[:, 0].set(9), tgt)
    assert logits.shape == (2, 6, 384) and logits.dtype == jnp.float32
    # Causal decoder: position t sees target tokens <= t only.
    np.testing.assert_allclose(future[:, :4], logits[:, :4], atol=1e-5)
    assert not np.allclose(future[:, 4:], logits[:, 4:])
    np.testing.assert_allclose(padded, logits, atol=1e-5)  # padding keys are masked out
    assert not np.allclose(other_src, logits)


def test_bfloat16_and_learned_positions(tiny):
    _, _, src, tgt = tiny
    cfg = transformer.model_config("tiny")
    cfg.dtype, cfg.positions = "bfloat16", "learned"
    model = build(cfg)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), src, tgt))
    assert n_params(variables["params"]) == expected_count(cfg) + cfg.max_len * cfg.d_model
    assert_logical_names(variables["params"])
    logits = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), src, tgt), src, tgt))
    assert logits.shape == (2, 6, 384) and logits.dtype == jnp.float32


def test_logical_names_tiny(tiny):
    assert_logical_names(tiny[1]["params"])


@pytest.mark.parametrize("size", sorted(transformer.SIZES))
def test_every_size_param_count(size):
    cfg = transformer.model_config(size)
    ids = jnp.ones((1, 8), jnp.int32)
    variables = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), ids, ids))
    assert n_params(variables["params"]) == expected_count(cfg)
    assert_logical_names(variables["params"])
    print(f"transformer:{size} {n_params(variables['params']):,}")


def test_base_matches_the_paper_layout():
    cfg = transformer.model_config("base")
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_ff) == (6, 512, 8, 2048)
    assert expected_count(cfg) == 60_524_544  # with the 32000-token shared vocabulary


def random_params(abstract, seed: int, std: float):
    """Normal(0, std) values for an abstract parameter tree, from NumPy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype), nn.unbox(abstract))


@pytest.fixture(scope="module")
def decoder():
    """A small random model whose greedy outputs vary (a fresh init mostly repeats one token)."""
    cfg = transformer.model_config("tiny")
    cfg.vocab_size, cfg.num_layers, cfg.d_model, cfg.d_ff = 12, 1, 32, 64
    model = build(cfg)
    src = jnp.asarray(np.random.default_rng(3).integers(3, 12, (4, 6)), jnp.int32).at[0, 4:].set(0)
    params = random_params(jax.eval_shape(lambda: model.init(jax.random.key(0), src, src))["params"], 0, 0.3)
    # eos is an argument, not a constant, so the jitted decoder compiles once.
    greedy = jax.jit(lambda p, s, eos: transformer.greedy_decode(model, p, s, MAX_LEN, BOS, eos))
    # Choose as EOS a token the model emits mid-sequence, so some rows end early.
    eos = int(greedy(params, src, -1)[0, 3])
    return model, params, src, greedy, eos


@functools.partial(jax.jit, static_argnames="model")
def sequence_logprob(model, params, src, tokens, eos):
    """Teacher-forced log p(tokens | src) up to and including the first EOS."""
    tgt_in = jnp.concatenate([jnp.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(model.apply({"params": params}, src, tgt_in))
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    after_eos = jnp.cumsum(tokens == eos, axis=1) - (tokens == eos)
    return jnp.sum(jnp.where(after_eos > 0, 0.0, picked), axis=1)


def test_greedy_beam_shapes_and_beam1_equals_greedy(decoder):
    model, params, src, greedy, eos = decoder
    out = np.asarray(greedy(params, src, eos))
    beam = jax.jit(lambda p, s: transformer.beam_search(model, p, s, 1, MAX_LEN, BOS, eos, 0.6))
    tokens, scores = beam(params, src)
    assert out.shape == (4, MAX_LEN) and out.dtype == np.int32
    assert tokens.shape == (4, 1, MAX_LEN) and scores.shape == (4, 1)
    np.testing.assert_array_equal(tokens[:, 0], out)
    ended = np.cumsum(out == eos, axis=1) - (out == eos) > 0
    assert ended[0].any() and not ended.all()  # row 0 stops at the chosen EOS...
    assert np.all(out[ended] == 0)  # ...and everything after EOS is padding
    assert np.all(out[~ended] != 0)  # padding is never emitted before it


def test_beam_scores_are_sequence_logprobs(decoder):
    model, params, src, _greedy, eos = decoder
    k = 3
    search = jax.jit(lambda p, s: transformer.beam_search(model, p, s, k, MAX_LEN, BOS, eos, 0.0))
    tokens, scores = search(params, src)
    assert tokens.shape == (4, k, MAX_LEN) and scores.shape == (4, k)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
    expected = sequence_logprob(model, params, jnp.repeat(src, k, axis=0), tokens.reshape(4 * k, MAX_LEN), eos)
    np.testing.assert_allclose(scores, expected.reshape(4, k), rtol=1e-4, atol=1e-4)
    for row in np.asarray(tokens):
        assert len({tuple(h) for h in row}) == k  # distinct hypotheses
