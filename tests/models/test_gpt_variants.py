"""GPT structural switches: rotary positions, RMSNorm, SwiGLU, grouped/multi-query attention, no biases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import config as config_lib, flops, models
from bigmodel.config import ConfigError
from bigmodel.models import gpt, layers

from conftest import GPT_TINY


def build(cfg, length=16):
    module = models.build(cfg)
    return module, nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros((2, length), jnp.int32)))


def count(cfg):
    abstract = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return flops.param_count(abstract)


@pytest.mark.parametrize("size, expected", [
    ("llama2_7b", 6_738_415_616),  # Touvron et al. 2023, Hugging Face Llama-2-7b
    ("llama3_8b", 8_030_261_248),  # grouped-query (8 kv heads), vocabulary 128,256
    ("llama3_1b", 1_235_814_400),  # Llama 3.2 1B: tied embeddings
])
def test_llama_sizes_count_exactly(size, expected):
    assert count(gpt.model_config(size)) == expected


def test_llama_tiny_parameter_tree():
    cfg = gpt.model_config("llama_tiny")
    _, variables = build(cfg)
    p = variables["params"]
    assert "wpe" not in p  # rotary: no position table
    blk = p["block_0"]
    assert set(blk["ln_1"]["RMSNorm_0"]) == {"scale"}  # RMSNorm: no bias
    assert set(blk["mlp"]) == {"fc_gate", "fc_in", "fc_out"} and set(blk["mlp"]["fc_in"]) == {"kernel"}
    attn = blk["attn"]
    assert attn["query_kernel"].shape == (128, 4, 32) and attn["key_kernel"].shape == (128, 2, 32)
    assert not any("bias" in k for k in attn)
    d, f, v, L = 128, 352, 384, 4
    per_layer = 2 * d * 4 * 32 + 2 * d * 2 * 32 + 3 * d * f + 2 * d
    assert flops.param_count(variables) == 2 * v * d + L * per_layer + d


def test_each_switch_changes_the_count_as_expected():
    base = gpt.model_config("nano")  # d 64, 4 heads of 16, F 256, 2 layers, V 384, T 128
    n0 = count(base)
    d, L = 64, 2
    for key, value, delta in [
        ("position", "rope", -128 * d),
        ("position", "none", -128 * d),
        ("norm", "rmsnorm", -(2 * L + 1) * d),  # no LayerNorm biases
        # gated: three matrices of F = 8/3·D rounded up to 16 (176) instead of two of 4·D
        ("activation", "swiglu", L * ((3 * d * 176 + 2 * 176) - (2 * d * 256 + 256))),
        ("num_kv_heads", 2, -L * 2 * (2 * d * 16 + 2 * 16)),  # key and value lose 2 of 4 heads
        ("num_kv_heads", 1, -L * 2 * (3 * d * 16 + 3 * 16)),  # multi-query
        ("tie_embeddings", False, 384 * d),
    ]:
        cfg = gpt.model_config("nano")
        cfg[key] = value
        assert count(cfg) == n0 + delta, (key, value)
    cfg = gpt.model_config("nano")
    cfg.use_bias = False
    biases = L * (3 * d + d + 256 + d + 2 * d) + d  # qkv, out, fc_in, fc_out, two LNs; final LN
    assert count(cfg) == n0 - biases


def test_rotary_is_relative():
    """q·k after rotation depends on the offset between positions only, and norms are kept."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
    def score(i, j):
        return float(jnp.sum(layers.rotary(jnp.tile(q, (1, 40, 1, 1)), jnp.arange(40), 100.0)[0, i]
                             * layers.rotary(jnp.tile(k, (1, 40, 1, 1)), jnp.arange(40), 100.0)[0, j]))
    assert score(7, 3) == pytest.approx(score(30, 26), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-2)
    rotated = layers.rotary(jnp.tile(q, (1, 40, 1, 1)), jnp.arange(40), 100.0)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rotated[0, 0], q[0, 0], rtol=1e-6)  # position 0 is not turned


def test_grouped_query_equals_repeated_heads():
    """K kv heads shared by N/K query heads = multi-head attention with each kv head repeated."""
    cfg = gpt.model_config("nano")
    cfg.num_kv_heads = 2
    module, variables = build(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 257)
    grouped = module.apply(variables, tokens)
    full_cfg = gpt.model_config("nano")
    full = models.build(full_cfg)
    params = jax.tree.map(lambda x: x, variables["params"])
    for i in range(cfg.num_layers):
        attn = params[f"block_{i}"]["attn"]
        for name in ("key", "value"):
            attn[f"{name}_kernel"] = jnp.repeat(attn[f"{name}_kernel"], 2, axis=1)
            attn[f"{name}_bias"] = jnp.repeat(attn[f"{name}_bias"], 2, axis=0)
    np.testing.assert_allclose(full.apply({"params": params}, tokens), grouped, rtol=1e-5, atol=1e-5)


def test_gqa_validation_names_the_fix():
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide"):
        config_lib.validate(config_lib.load(GPT_TINY + ":tiny", ["model.num_kv_heads=3"]), 8)
    bad = config_lib.load(GPT_TINY + ":tiny", ["model.num_kv_heads=1", "mesh.data=4", "mesh.tensor=2"])
    with pytest.raises(ConfigError, match=r"replicate the key/value heads with \('kv_heads', None\)"):
        config_lib.validate(bad, 8)


def test_hf_export_takes_llama_layout_and_refuses_hybrids():
    from bigmodel import hf
    llama = hf.hf_config(gpt.model_config("llama_tiny"))
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["num_key_value_heads"] == 2
    hybrid = gpt.model_config("tiny")
    hybrid.position = "rope"  # rotary positions with GPT-2's LayerNorm and GELU: neither layout
    with pytest.raises(ValueError, match="model.position='rope' has no Hugging Face GPT-2 equivalent"):
        hf.hf_config(hybrid)
    moe = gpt.model_config("tiny")
    moe.num_experts = 4
    with pytest.raises(ValueError, match="model.num_experts=4 has no Hugging Face GPT-2 equivalent"):
        hf.hf_config(moe)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama", "moe"])
def test_gpt_tiny_variants_train(variant, tmp_path, tiny_overrides, monkeypatch):
    """One short run of experiments/gpt_tiny.py:llama / :moe through the trainer."""
    import json

    from bigmodel import train

    config = config_lib.load(f"{GPT_TINY}:{variant}", tiny_overrides + [
        "data.seq_len=64", "model.num_layers=1", "train.steps=4", "train.batch_size=8", "eval.every=4",
        "eval.batch_size=8", "eval.num_batches=1", "checkpoint.every=4", "log.every=2"])
    train.train(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4 and np.isfinite(summary["eval_loss"])
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    if variant == "moe":
        assert summary["params_active"] < summary["params"]
        assert all("moe_load_max" in m for m in logged if "loss" in m)
    else:
        assert summary["params_active"] == summary["params"]
        assert not any("moe_load_max" in m for m in logged)
