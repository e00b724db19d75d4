"""experiments/gpt_gpu.py: the GPU configs load, their remat follows `bigmodel plan`, and ':tiny' trains on a CPU."""

import json
import math
import pathlib

import pytest

from bigmodel import cli, config as config_lib, metrics, plan

GPT_GPU = str(pathlib.Path(__file__).parents[1] / "experiments" / "gpt_gpu.py")


@pytest.mark.parametrize("variant, layers, seq, remat", [
    ("124m", 12, 1024, "none"), ("350m,2048", 24, 2048, "none"), ("1.3b", 24, 1024, "dots"),
])
def test_variants_are_bfloat16_gpts_of_the_named_size(variant, layers, seq, remat):
    c = config_lib.load(f"{GPT_GPU}:{variant}")
    assert (c.model.num_layers, c.data.seq_len, c.model.max_len, c.model.remat) == (layers, seq, seq, remat)
    assert c.model.dtype == "bfloat16" and c.model.scan_layers and c.model.attention_impl == ""
    assert 16_384 <= c.train.batch_size * seq <= 32_768


def test_tiny_trains_the_gpu_recipe_on_a_cpu(tmp_path, tiny_overrides):
    """bfloat16 compute, scanned blocks and 'dots' remat through the trainer, at gpt_tiny's ':tiny' size."""
    args = ["train", "--config", GPT_GPU + ":tiny", "--workdir", str(tmp_path), "--config.train.steps=4"]
    assert cli.main(args + [f"--config.{o}" for o in tiny_overrides]) == 0
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert (model["size"], model["dtype"], model["remat"], model["scan_layers"]) == ("nano", "bfloat16", "dots", True)
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["eval_loss"] < math.log(384)  # below a uniform guess over the byte vocabulary


@pytest.mark.parametrize("variant, fits_without_remat", [
    ("124m,2048", True), ("350m,2048", True), ("1.3b", True), ("1.3b,2048", False),
])
def test_remat_follows_the_plan_on_an_80gb_h100(variant, fits_without_remat):
    config, sizes = plan.configure(f"{GPT_GPU}:{variant}", ["model.remat=none"], plan.parse_mesh("1,1,1"), None)
    p = plan.make_plan(config, sizes, "h100-80gb", compile=False)
    assert p.fits == fits_without_remat
    # Where it does not fit (or fits by under 16 GiB), the config recomputes: 'dots'.
    tight = not p.fits or p.budget - p.total < 16 * 2**30
    assert config_lib.load(f"{GPT_GPU}:{variant}").model.remat == ("dots" if tight else "none")
