"""The architectures sweep: GPT-2, Llama-style, MoE and LSTM families, active-parameter compute, comparison."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bigmodel import cli
from bigmodel.scaling import plan, report, results

from conftest import REPO, SMALL_CORPUS

ARCHITECTURES = str(REPO / "experiments" / "scaling" / "architectures.py")


def test_plan_has_four_families_and_charges_moe_its_active_parameters():
    runs = plan.load(ARCHITECTURES, [], "unused", num_devices=1).runs
    assert [r.family for r in runs[::6]] == ["gpt", "llama", "moe", "lstm"] and len(runs) == 24
    by = {(r.family, r.width, r.tokens): r for r in runs}
    for (family, width, tokens), r in by.items():
        assert r.error == "", r.error
        m = r.config.model
        if family == "gpt":
            assert (m.position, m.norm, m.activation, m.num_experts) == ("learned", "layernorm", "gelu_tanh", 0)
            assert r.params_active == r.params
        if family in ("llama", "moe"):
            assert (m.position, m.norm, m.activation, m.use_bias) == ("rope", "rmsnorm", "swiglu", False)
        if family == "moe":
            dense = by[("llama", width, tokens)]
            assert (m.num_experts, m.experts_per_token) == (4, 2)
            # Two of four experts are idle per token: the idle half of the expert weights.
            hidden = 16 * math.ceil(8 * width / 3 / 16)
            experts = r.depth * 4 * 3 * width * hidden
            assert r.params - r.params_active == experts // 2
            assert r.params_active == dense.params + experts // 2 - r.depth * 3 * width * hidden + r.depth * width * 4
            assert r.flops == 6 * r.params_active * r.tokens


def rows_following(family: str, alpha: float, c_c: float, offset: float = 0.0) -> list[dict]:
    rows = []
    for i, c in enumerate([1e11, 3e11, 1e12, 3e12, 1e13]):
        n = c / 6 / 1e6
        rows.append({"model": family, "run": f"{family}{i}", "params": str(2 * n), "params_active": str(n),
                     "tokens": "1e6", "flops": str(c), "loss": str((c_c / c) ** alpha + offset)})
    return rows


def test_family_comparison_recovers_exponents_and_compares_at_common_compute():
    rows = rows_following("a", 0.10, 1e20) + rows_following("b", 0.05, 1e30)[:4]
    table = {e["model"]: e for e in report.compare_families(rows)}
    assert table["a"]["alpha_c"] == pytest.approx(0.10, rel=1e-6)
    assert table["b"]["alpha_c"] == pytest.approx(0.05, rel=1e-6)
    assert table["a"]["common_flops"] == 3e12  # b stops there
    assert table["a"]["loss_at_common_flops"] == pytest.approx((1e20 / 3e12) ** 0.10)
    assert (table["a"]["params"], table["a"]["params_active"]) == (int(2 * 1e13 / 6e6), int(1e13 / 6e6))
    text = report.format_families(list(table.values()))
    assert "0.1000" in text and "0.0500" in text


@pytest.mark.slow
def test_tiny_architectures_sweep_end_to_end(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # runs see one CPU device
    args = ["sweep", "--config", ARCHITECTURES + ":tiny", "--workdir", str(tmp_path), "--parallel", "2",
            "--devices", "1", f"--config.base.data.source={SMALL_CORPUS}",
            "--config.base.data.validation_fraction=0.2", f"--config.base.data.data_dir={data_dir}"]
    assert cli.main(args) == 0
    rows = results.read_rows(tmp_path)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
    moe = [r for r in rows if r["model"] == "moe"]
    assert all(int(r["params_active"]) < int(r["params"]) for r in moe)
    summary = json.loads((tmp_path / "runs" / moe[0]["run"] / "summary.json").read_text())
    assert summary["params_active"] == int(moe[0]["params_active"])
    metrics = [json.loads(line) for line in (tmp_path / "runs" / moe[0]["run"] / "metrics.jsonl").open()]
    logged = [m for m in metrics if "moe_balance" in m]
    assert logged and all(0.0 <= m["moe_dropped"] < 1.0 for m in logged)
    assert all(sum(m[f"moe_load/{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5) for m in logged)
    table = json.loads((tmp_path / "fit" / "families.json").read_text())
    assert [e["model"] for e in table] == ["gpt", "llama", "moe", "lstm"]
    assert (tmp_path / "fit" / "families_loss_vs_compute.png").stat().st_size > 10_000


def noisy_family(family: str, alpha: float, noise: float, seed: int) -> list[dict]:
    """Eight runs on L(C) = (1e20/C)^alpha, each loss off by a random factor exp(noise * z)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, c in enumerate(np.geomspace(1e11, 1e14, 8)):
        loss = (1e20 / c) ** alpha * math.exp(noise * rng.standard_normal())
        rows.append({"model": family, "run": f"{family}{i}", "params": str(c / 6e6), "tokens": "1e6",
                     "flops": str(c), "loss": str(loss)})
    return rows


def test_family_exponents_have_bootstrap_intervals_and_only_real_differences_are_significant():
    rows = noisy_family("a", 0.10, 0.002, 1) + noisy_family("b", 0.10, 0.002, 2) + noisy_family("c", 0.05, 0.002, 3)
    table = {e["model"]: e for e in report.compare_families(rows, n_bootstrap=300)}
    for family, alpha in (("a", 0.10), ("b", 0.10), ("c", 0.05)):
        lo, hi = table[family]["alpha_c_ci95"]
        assert lo < table[family]["alpha_c"] < hi and lo < alpha < hi and hi - lo < 0.01
        assert table[family]["alpha_c_bootstrap"]["n_failed"] < 30
    same, apart = table["a"]["alpha_c_vs"]["b"], table["a"]["alpha_c_vs"]["c"]
    assert not same["significant"] and same["ci95"][0] < 0 < same["ci95"][1]
    assert apart["significant"] and apart["difference"] == pytest.approx(0.05, abs=0.005) and apart["ci95"][0] > 0
    assert table["c"]["alpha_c_vs"]["a"]["difference"] == pytest.approx(-apart["difference"])
    text = report.format_families(list(table.values()))
    assert "a - b:" in text and "a - c:" in text and "significant: a vs c, b vs c" in text
