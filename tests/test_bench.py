"""Benchmarks print figures; here we only check they are complete and consistent."""

import json

import pytest

from bigmodel import cli

from conftest import GPT_TINY


def bench(capsys, kind, overrides, *extra):
    assert cli.main(["bench", kind, "--config", GPT_TINY + ":tiny", *extra,
                     *[f"--config.{o}" for o in overrides]]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


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


def test_bench_compare_uses_the_same_model(capsys, tiny_overrides):
    ours, theirs, ratio = bench(capsys, "compare", tiny_overrides + ["mesh.data=8"], "--steps", "2")
    assert theirs["params"] == ours["params"]  # identical shapes
    assert theirs["flops_per_token"] == pytest.approx(ours["flops_per_token"])
    assert ratio["tokens_per_s_ratio"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
