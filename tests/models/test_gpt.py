"""GPT: shapes, golden parameter counts, logical names, scan/remat equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import flops, models
from bigmodel.models import gpt


def init(cfg, length=16, batch=2):
    module = models.build(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    return module, module.init(jax.random.key(0), tokens)


def test_shapes_and_dtype():
    cfg = gpt.model_config("nano")
    module, variables = init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 257)
    logits = module.apply(variables, tokens)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    other = module.apply(variables, tokens.at[:, 0].set((tokens[:, 0] + 1) % 257))
    assert not np.allclose(logits, other)


@pytest.mark.parametrize("size", ["nano", "llama_nano"])  # learned positions; rotary with grouped-query heads
def test_causality(size):
    cfg = gpt.model_config(size)
    module, variables = init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 257)
    changed = tokens.at[0, 10].set((tokens[0, 10] + 7) % 257)
    a, b = module.apply(variables, tokens), module.apply(variables, changed)
    np.testing.assert_allclose(a[0, :10], b[0, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 10:], b[0, 10:])


def test_gpt2_124m_counts_exactly():
    cfg = gpt.model_config("124m")
    abstract = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert flops.param_count(abstract) == 124_439_808
    # The token and position tables are the embedding parameters.
    assert flops.embedding_param_count(abstract["params"]) == 50257 * 768 + 1024 * 768


@pytest.mark.parametrize("size, expected", [
    ("350m", 354_823_168), ("774m", 774_030_080), ("1.3b", 1_313_626_112), ("1.5b", 1_557_611_200),
    ("nano", 132_864), ("tiny", 875_264),
])
def test_every_size_by_eval_shape(size, expected):
    cfg = gpt.model_config(size)
    abstract = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert flops.param_count(abstract) == expected


def test_untied_adds_a_head():
    cfg = gpt.model_config("nano")
    tied = flops.param_count(init(cfg)[1])
    cfg.tie_embeddings = False
    assert flops.param_count(init(cfg)[1]) == tied + cfg.vocab_size * cfg.d_model


def test_every_parameter_has_logical_names():
    for scan in (False, True):
        cfg = gpt.model_config("nano")
        cfg.scan_layers = scan
        _, variables = init(cfg)
        leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
        assert all(len(x.names) == x.value.ndim for x in leaves)
        if scan:
            assert all(x.names[0] == "layers" for x in jax.tree.leaves(
                variables["params"]["blocks"], is_leaf=lambda x: isinstance(x, nn.Partitioned)))


def test_scan_and_remat_compute_the_same_function():
    cfg = gpt.model_config("nano")
    module, variables = init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 257)
    ref = module.apply(variables, tokens)
    # Stack the per-layer parameters to feed the scanned model.
    p = nn.meta.unbox(variables)["params"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[f"block_{i}"] for i in range(cfg.num_layers)])
    scanned = {k: v for k, v in p.items() if not k.startswith("block_")} | {"blocks": stacked}
    for remat in ("none", "full", "dots"):
        cfg2 = gpt.model_config("nano")
        cfg2.scan_layers, cfg2.remat = True, remat
        out = models.build(cfg2).apply({"params": scanned}, tokens)
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_bfloat16_compute_keeps_float32_params():
    cfg = gpt.model_config("nano")
    cfg.dtype = "bfloat16"
    module, variables = init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))
    logits = module.apply(variables, jnp.ones((2, 16), jnp.int32))
    assert logits.dtype == jnp.float32 and jnp.isfinite(logits).all()


def test_too_long_sequence_is_refused():
    cfg = gpt.model_config("nano")
    module = models.build(cfg)
    with pytest.raises(ValueError, match="exceeds model.max_len=128"):
        module.init(jax.random.key(0), jnp.zeros((1, 129), jnp.int32))


def test_flops_per_token_formula():
    cfg = gpt.model_config("124m")
    nonembed = 124_439_808 - 50257 * 768 - 1024 * 768
    per_token = flops.gpt_flops_per_token(cfg, nonembed, 1024)
    assert per_token == 6 * (nonembed + 50257 * 768) + 12 * 12 * 1024 * 768


def test_deep_sizes_scan_their_layers_by_default():
    assert {s for s in gpt.SIZES if gpt.model_config(s).scan_layers} == {
        s for s, f in gpt.SIZES.items() if f["num_layers"] >= gpt.SCAN_FROM_LAYERS}
    assert gpt.model_config("124m").scan_layers and not gpt.model_config("tiny").scan_layers
