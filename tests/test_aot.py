"""Ahead-of-time compiles for GPU nodes and TPU slices (`bigmodel plan --target`), and the TPU attention kernel.

The compile tests run the real compilers without the hardware: the CUDA plugin of the pinned
JAX (extra 'gpu-compile') and libtpu (extra 'tpu'); each skips, naming the extra, where its
compiler is not installed. The splash-attention tests run the Pallas kernel in interpret mode.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import aot
from bigmodel.config import ConfigError
from bigmodel.kernels.tpu import attention as tpu_attention
from bigmodel.models import layers

GiB = 1024**3
needs_cuda = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                reason="needs the CUDA compiler plugin: pip install -e '.[gpu-compile]'")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install -e '.[tpu]'")


def plan(*args: str, target: str, ok: bool = True) -> dict | str:
    """Run `bigmodel plan --target TARGET --json ARGS` in a fresh process; the JSON record (or stderr if not ok)."""
    env = aot.environment(aot.parse(target), dict(os.environ))
    out = subprocess.run([sys.executable, "-m", "bigmodel.cli", "plan", "--target", target, "--json", *args],
                         capture_output=True, text=True, env=env, timeout=900)
    if not ok:
        assert out.returncode != 0, out.stdout
        return out.stderr
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- target names and HLO reading


def test_target_names():
    t = aot.parse("h100x16")
    assert (t.platform, t.devices, t.topology, t.chip.memory_key) == ("cuda", 16, "1x2x8", "h100-80gb")
    assert aot.parse("a100-80gbx4").topology == "1x1x4"
    t = aot.parse("tpu-v5p-32")
    assert (t.platform, t.devices, t.topology, t.slices) == ("tpu", 16, "v5p:2x2x4", 1)
    t = aot.parse("tpu-v5p-32x2")
    assert (t.devices, t.slices) == (32, 2)
    assert aot.parse("tpu-v6e-64").devices == 64
    assert aot.parse("h100-80gb") is None  # a memory-only target of the analytic plan
    with pytest.raises(ConfigError, match="multiple of 8"):
        aot.parse("h100x12")
    with pytest.raises(ConfigError, match="known sizes are v5e-1, v5e-4"):
        aot.parse("tpu-v5e-12")


def test_missing_compiler_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install -e '.[gpu-compile]'" in aot.missing_compiler(aot.parse("h100x8"))
    assert "pip install -e '.[tpu]'" in aot.missing_compiler(aot.parse("tpu-v5e-16"))


HLO = """HloModule step

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %ag = bf16[16,1024]{1,0} all-gather(bf16[2,1024]{1,0} %x), replica_groups={}, dimensions={0}
  %ars = f32[1024]{0} all-reduce-start(f32[1024]{0} %y), to_apply=%add
  %ard = f32[1024]{0} all-reduce-done(f32[1024]{0} %ars)
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %v)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %a, s32[] %b), direction=LT
}

%body2 (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %cp = f32[4,8]{1,0:T(8,128)} collective-permute(f32[4,8]{1,0} %x), source_target_pairs={{0,1},{1,0}}
}

%cond2 (p: (s32[], f32[4,8])) -> pred[] {
  %bound = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %bound), direction=LT
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %w2 = (s32[], f32[4,8]) while((s32[], f32[4,8]) %init), condition=%cond2, body=%body2
  %w = (s32[], f32[4,8]) while((s32[], f32[4,8]) %init), condition=%cond, body=%body, """ + \
    """backend_config={"known_trip_count":{"n":"24"}}
  %a2a = (f32[8,64]{1,0}, f32[8,64]{1,0}) all-to-all(f32[8,64]{1,0} %p, f32[8,64]{1,0} %q), dimensions={0}
  ROOT %rs = f32[2,8]{1,0} reduce-scatter(f32[16,8]{1,0} %z), dimensions={0}, to_apply=%add
}
"""


def test_collectives_counts_loop_bodies_per_iteration():
    c = aot.collectives(HLO)
    assert c["all-gather"] == {"count": 24, "bytes": 24 * 16 * 1024 * 2}
    assert c["all-reduce"] == {"count": 24, "bytes": 24 * 1024 * 4}  # the async pair counts once
    assert c["all-to-all"] == {"count": 1, "bytes": 2 * 8 * 64 * 4}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 2 * 8 * 4}
    assert c["collective-permute"] == {"count": 3, "bytes": 3 * 4 * 8 * 4}  # the loop's `i < 3` bound


def test_roofline_without_cost_analysis_is_the_compute_bound():
    t = aot.parse("h100x8")
    r = aot.roofline(t, 8 * 989e12, {})
    assert r["step_s_lower_bound"] == pytest.approx(1.0)
    assert r["mfu_at_bound"] == pytest.approx(1.0)
    r = aot.roofline(t, 8 * 989e12, {"flops": 2 * 989e12, "bytes accessed": 3 * 3.35e12})
    assert (r["bound_by"], r["step_s_lower_bound"], r["mfu_at_bound"]) == ("memory", pytest.approx(3.0),
                                                                          pytest.approx(1 / 3))
    # XLA's count of a scanned model covers one layer: the model's FLOPs still bound the step.
    r = aot.roofline(t, 8 * 989e12, {"flops": 0.1 * 989e12, "bytes accessed": 0.5 * 3.35e12})
    assert (r["bound_by"], r["step_s_lower_bound"], r["mfu_at_bound"]) == ("compute", pytest.approx(1.0),
                                                                          pytest.approx(1.0))


# --------------------------------------------------------------------------- splash attention (interpret mode)


def _qkv(t, n, k, h=64, b=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
            jax.random.normal(keys[2], (b, t, k, h)))


def _einsum(q, k, v, causal, scale):
    hm = lambda a: a.transpose(0, 2, 1, 3)
    return hm(layers.einsum_attention(hm(q), hm(k), hm(v), None, causal, scale))


@pytest.mark.parametrize("t, n, kv, causal", [
    (256, 4, 4, True),  # causal, whole blocks
    (200, 4, 4, False),  # padded to the 256-row block, full attention
    (100, 4, 2, True),  # padded and grouped-query (2 query heads per key/value head)
])
def test_splash_attention_matches_einsum_with_gradients(t, n, kv, causal):
    q, k, v = _qkv(t, n, kv)
    scale = 64**-0.5
    splash = lambda q, k, v: tpu_attention.attention(q, k, v, causal, scale, interpret=True)
    ref = lambda q, k, v: _einsum(q, k, v, causal, scale)
    np.testing.assert_allclose(splash(q, k, v), ref(q, k, v), atol=2e-5, rtol=2e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(jnp.arange(q.shape[-1])))
    got, want = jax.grad(loss(splash), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_attention_layer_selects_splash_for_tpu_and_refuses_a_mask():
    x = jax.random.normal(jax.random.key(1), (2, 128, 64))
    module = layers.Attention(num_heads=4, head_dim=16, causal=True)
    params = module.init(jax.random.key(0), x)
    with layers.compiling_for("tpu"):
        assert layers.default_attention_impl(jnp.float32) == "splash"
    assert layers.default_attention_impl(jnp.float32) != "splash"  # the context is over
    # Asked for by name on this CPU, the kernel runs in interpret mode.
    y = layers.Attention(num_heads=4, head_dim=16, causal=True, implementation="splash").apply(params, x)
    np.testing.assert_allclose(y, layers.Attention(num_heads=4, head_dim=16, causal=True,
                                                   implementation="einsum").apply(params, x), atol=2e-5)
    forced = layers.Attention(num_heads=4, head_dim=16, implementation="splash")
    with pytest.raises(ValueError, match="config.model.attention_impl"):
        forced.apply(params, x, mask=jnp.ones((2, 1, 128, 128), bool))


# --------------------------------------------------------------------------- GPU compiles


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("size", ["124m", "350m", "1.3b"])
def test_gpt_gpu_compiles_for_8_h100_with_cudnn_attention(size):
    r = plan("--config", f"experiments/gpt_gpu.py:{size}", "--mesh", "fsdp=8", target="h100x8")
    assert r["attention"] == "cudnn (cuDNN fused attention)"
    assert r["matmul_dtypes"].get("bf16", 0) > r["matmul_dtypes"].get("f32", 0)
    assert r["fits"] and 0 < r["compiled"]["peak"] < 80 * GiB
    # The compiled state's shards are the sharding arithmetic, byte for byte.
    assert (r["compiled"]["params"], r["compiled"]["opt_state"]) == (r["params"], r["opt_state"])
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["reduce-scatter"]["count"] > 0
    assert 0 < r["roofline"]["mfu_at_bound"] <= 1


@needs_cuda
@pytest.mark.slow
def test_gpt_1_3b_without_remat_and_a_big_batch_does_not_fit_on_h100():
    r = plan("--config", "experiments/gpt_gpu.py:1.3b", "--mesh", "fsdp=8", "--config.model.remat=none",
             "--config.train.batch_size=256", target="h100x8")
    assert not r["fits"] and r["compiled"]["peak"] > 80 * GiB
    assert r["largest_arrays"] and "config.mesh.fsdp" in r["suggestion"]


@needs_cuda
def test_cudnn_refusing_the_shapes_names_the_config_key():
    err = plan("--config", "experiments/gpt_tiny.py:tiny", "--config.model.attention_impl=cudnn",
               "--config.model.dtype=bfloat16", "--config.model.num_heads=16", target="h100x1", ok=False)
    assert err.count("\n") == 1 and "does not compile for h100x1" in err and "config.model.attention_impl" in err


# --------------------------------------------------------------------------- TPU compiles


@needs_libtpu
@pytest.mark.slow
def test_llama2_7b_fsdp_fits_on_v5p_32_and_data_parallel_does_not():
    common = ("--config", "experiments/gpt_tiny.py", "--model", "gpt:llama2_7b", "--config.model.dtype=bfloat16",
              "--config.model.remat=full", "--config.data.seq_len=2048", "--config.train.batch_size=16")
    r = plan(*common, "--mesh", "fsdp=16", target="tpu-v5p-32")
    assert r["fits"] and r["attention"] == "splash (Pallas TPU kernel)"
    assert (r["compiled"]["params"], r["compiled"]["opt_state"]) == (r["params"], r["opt_state"])
    assert r["roofline"]["hlo_flops_per_device"] > 0 and 0 < r["roofline"]["mfu_at_bound"] <= 1
    r = plan(*common, "--mesh", "data=16", target="tpu-v5p-32")
    assert not r["fits"]
    names = [name for name, _ in r["largest_arrays"]]
    assert any("embedding" in n or "kernel" in n for n in names)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the capacity-based MoE dispatch is compiled to all-gathers, not an all-to-all "
                   "(libtpu and the CUDA compiler alike): bigmodel.models.moe's expert sharding needs rework")
def test_moe_on_an_expert_axis_compiles_with_all_to_all():
    r = plan("--config", "experiments/gpt_tiny.py:moe", "--mesh", "expert=4", target="tpu-v5e-4")
    assert r["collectives"]["all-to-all"]["count"] > 0 and r["fits"]


@needs_libtpu
@pytest.mark.slow
def test_two_slice_hybrid_mesh_compiles_for_a_multislice_target():
    r = plan("--config", "experiments/gpt_tiny.py:tiny", "--mesh", "data=2,fsdp=4", target="tpu-v5e-4x2")
    assert (r["slices"], r["devices"]) == (2, 8) and r["fits"]
    assert r["collectives"]["all-reduce"]["count"] + r["collectives"]["reduce-scatter"]["count"] > 0
