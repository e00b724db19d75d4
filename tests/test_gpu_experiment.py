"""experiments/gpt_gpu.py: the GPU benchmark configs load, and their remat choices follow `bigmodel plan`."""

import pathlib

import pytest

from bigmodel import config as config_lib
from bigmodel import plan

GPT_GPU = str(pathlib.Path(__file__).parents[1] / "experiments" / "gpt_gpu.py")


@pytest.mark.parametrize("variant, layers, seq, remat", [
    ("124m", 12, 1024, "none"), ("350m,2048", 24, 2048, "none"), ("1.3b", 24, 1024, "dots"),
])
def test_variants_are_bfloat16_gpts_of_the_named_size(variant, layers, seq, remat):
    c = config_lib.load(f"{GPT_GPU}:{variant}")
    assert (c.model.num_layers, c.data.seq_len, c.model.max_len, c.model.remat) == (layers, seq, seq, remat)
    assert c.model.dtype == "bfloat16" and c.model.scan_layers and c.model.attention_impl == ""
    assert 16_384 <= c.train.batch_size * seq <= 32_768


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown variant '2b' for gpt_gpu; use one of ':1.3b', ':124m', ':350m'"):
        config_lib.load(f"{GPT_GPU}:2b")
    with pytest.raises(ValueError, match=r"unknown variant '124m,long' for gpt_gpu; .* with ',2048'"):
        config_lib.load(f"{GPT_GPU}:124m,long")


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
