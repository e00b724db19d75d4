"""Benchmarks print figures; here we only check they are complete and consistent."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bigmodel import bench as bench_lib, cli

from conftest import GPT_TINY


def bench(capsys, kind, overrides, *extra):
    assert cli.main(["bench", kind, "--config", GPT_TINY + ":tiny", *extra,
                     *[f"--config.{o}" for o in overrides]]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_bench_train_reports_every_figure(capsys, tiny_overrides):
    (result,) = bench(capsys, "train", tiny_overrides, "--steps", "3")
    for key in ("name", "device_kind", "device_count", "tokens_per_s", "step_s", "compile_s", "flops_per_token",
                "mfu", "peak_flops", "peak_memory_bytes"):
        assert key in result, key
    assert result["device_count"] == 8
    assert result["tokens_per_s"] == pytest.approx(8 * 64 / result["step_s"])
    assert result["achieved_flops"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"])
    assert 0 < result["mfu"] < 1


def test_bench_data_counts_tokens(capsys, tiny_overrides):
    (result,) = bench(capsys, "data", tiny_overrides, "--batches", "20")
    assert result["tokens_per_s"] == pytest.approx(20 * 8 * 64 / result["seconds"])


@pytest.mark.slow
def test_bench_compare_uses_the_same_model(capsys, tiny_overrides):
    ours, theirs, ratio = bench(capsys, "compare", tiny_overrides + ["mesh.data=8"], "--steps", "2")
    assert theirs["params"] == ours["params"]  # identical shapes
    assert theirs["flops_per_token"] == pytest.approx(ours["flops_per_token"])
    assert ratio["tokens_per_s_ratio"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    q1, median, q3 = ratio["round_ratio_quartiles"]
    assert 0 < q1 <= median <= q3


def test_round_ratio_quartiles_pair_the_rounds():
    # Per-round ratios theirs/ours: 2, 1, 1, 4 -> sorted 1, 1, 2, 4.
    assert bench_lib.round_ratio_quartiles([1.0, 1.0, 2.0, 1.0], [2.0, 1.0, 2.0, 4.0]) == \
        pytest.approx([1.0, 1.5, 2.5])
    assert bench_lib.round_ratio_quartiles([2.0], [1.0]) == pytest.approx([0.5, 0.5, 0.5])


@pytest.mark.parametrize("op_name, part", [
    ("jit(step)/transpose(jvp(GPT))/block_3/mlp/fc_in/dot_general", "backward block_*/mlp/fc_in"),
    ("jit(step)/jvp(GPT)/block_12/attn/zgth,zsh->zgts/dot_general", "forward block_*/attn/zgth,zsh->zgts"),
    ("jit(step)/transpose(jvp(GPT))/block_0/attn/jvp(GPT)/block_0/attn/reduce_sum", "backward block_*/attn"),
    ("jit(step)/jvp(GPT)/ln_f/LayerNorm_0/mul", "forward ln_f/LayerNorm_*"),
    ("jit(step)/transpose(jvp(GPT))/dot_general", "backward (model, top level)"),
    ("jit(step)/mul", "outside the model"),
    ("jit(step)/jit(clip)/min", "outside the model"),
    ("jit(step)/jvp(jit(take_along_axis))/select_n", "outside the model"),  # the loss
])
def test_profile_parts_name_the_pass_and_the_module(op_name, part):
    assert bench_lib.part_of(op_name) == part


@pytest.mark.slow
def test_bench_train_profile_says_where_the_time_goes(tmp_path, tiny_overrides):
    # A child process: XLA:CPU records per-operation times only with a flag read when JAX starts.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-m", "bigmodel.cli", "bench", "train", "--config", GPT_TINY + ":tiny", "--steps", "3",
         "--profile", str(tmp_path / "prof"), *[f"--config.{o}" for o in tiny_overrides]],
        env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    prof = result["profile"]
    assert pathlib.Path(prof["trace"]).is_file() and prof["trace"].startswith(str(tmp_path / "prof"))
    parts = prof["by_part_ms_per_step"]
    # Every pass of every block shows up; nano has 2 layers, the names collapse to block_*.
    for part in ("forward block_*/mlp/fc_in", "backward block_*/mlp/fc_out", "forward block_*/attn",
                 "backward block_*/attn", "outside the model"):
        assert parts.get(part, 0) > 0, (part, parts)
    assert sum(parts.values()) == pytest.approx(prof["ops_ms_per_step"])
    # Per step the operations take time, at most the step on each of the host's cores.
    assert 0 < prof["ops_ms_per_step"] < 1e3 * result["step_s"] * (os.cpu_count() or 1)
    assert len(prof["top_ops"]) == min(20, len(prof["top_ops"])) > 0
    assert all(op["part"] == bench_lib.part_of(op["op_name"]) for op in prof["top_ops"])


def test_profile_is_for_bench_train_only(capsys, tiny_overrides):
    assert cli.main(["bench", "data", "--config", GPT_TINY + ":tiny", "--profile", "x",
                     *[f"--config.{o}" for o in tiny_overrides]]) == 2
    assert "--profile applies to 'bench train', not 'bench data'" in capsys.readouterr().err


def test_profile_without_per_operation_events_says_what_is_missing(tmp_path, capsys):
    # In this process JAX started without XLA:CPU's trace flag: the profile is empty and says why.
    prof = bench_lib.profile(lambda: None, 1, str(tmp_path), "%dot.1 = f32[2] dot(), metadata={op_name=\"x\"}")
    assert prof["ops_ms_per_step"] == 0 and prof["top_ops"] == []
    assert "--xla_cpu_enable_xprof_traceme=true in XLA_FLAGS" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_generate_times_both_paths_on_the_same_tokens(capsys):
    rows = bench(capsys, "generate", [], "--tokens", "5,9", "--prompt_len", "3")
    assert [r["new_tokens"] for r in rows] == [5, 9]
    for r in rows:
        assert r["identical_tokens"] is True
        assert r["cache_tokens_per_s"] == pytest.approx(r["new_tokens"] / r["cache_s"])
        assert r["speedup"] == pytest.approx(r["recompute_s"] / r["cache_s"])


@pytest.mark.parametrize("tokens", ["0", "256,x", ""])
def test_bench_generate_refuses_bad_token_counts(capsys, tokens):
    assert cli.main(["bench", "generate", "--config", GPT_TINY + ":tiny", "--tokens", tokens]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tokens" in err and "256,1024" in err
