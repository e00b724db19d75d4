"""Tests for bigmodel.scaling results / laws / powerlaws / fit / output / plot / cli: published refit, recovery of
known laws, CLI, errors."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from bigmodel.scaling import cli, fit as fitlib, laws, output, powerlaws, results

TRUE = dict(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.30)


def true_loss(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The synthetic ground-truth law."""
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def true_a() -> float:
    """Exponent of N_opt ~ C^a implied by TRUE."""
    return TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def true_n_opt(c: np.ndarray) -> np.ndarray:
    """Closed-form compute-optimal N of TRUE."""
    al, be = TRUE["alpha"], TRUE["beta"]
    g = (al * TRUE["A"] / (be * TRUE["B"])) ** (1 / (al + be))
    return g * (np.asarray(c) / 6) ** (be / (al + be))


def grid_data(noise: float = 0.01, seed: int = 0) -> results.ScalingData:
    """An 8x8 grid of (N, D) with multiplicative noise on the loss."""
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.logspace(7, 10, 8), np.logspace(8.5, 11.5, 8))
    n, d = n.ravel(), d.ravel()
    loss = true_loss(n, d) * np.exp(noise * rng.standard_normal(n.shape))
    return results.from_arrays(n, d, loss, source="grid")


def isoflop_data(budgets=(1e17, 1e18, 1e19, 1e20, 1e21), sizes: int = 7, noise: float = 0.003,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """IsoFLOP sweeps: per budget, sizes spread +-0.5 decade around a jittered guess of N_opt."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {"params": [], "tokens": [], "flops": [], "loss": []}
    for c in budgets:
        centre = true_n_opt(c) * math.exp(rng.uniform(-0.3, 0.3))
        n = centre * np.exp(np.linspace(-1.2, 1.2, sizes))
        flops = c * np.exp(rng.uniform(-0.03, 0.03, sizes))  # actual compute jitters a little
        d = flops / (6 * n)
        loss = true_loss(n, d) * np.exp(noise * rng.standard_normal(sizes))
        for k, v in (("params", n), ("tokens", d), ("flops", flops), ("loss", loss)):
            cols[k].extend(v)
    return {k: np.asarray(v) for k, v in cols.items()}


def write_csv(path: Path, columns: dict[str, list], extra: bool = True) -> Path:
    """Write columns as a CSV (with the run/model columns a sweep writes when extra)."""
    names = list(columns)
    n = len(columns[names[0]])
    if extra:
        columns = {"run": [f"r{i}" for i in range(n)], "model": ["gpt"] * n, **columns}
        names = list(columns)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(n):
            w.writerow([columns[k][i] for k in names])
    return path


# ------------------------------------------------------------------------------------------
# 1. Published refit of the Chinchilla data (Besiroglu et al. 2024)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow  # Hoffmann et al.'s 4,500-start fit
def test_reference_refit_matches_published_within_standard_errors(reference_file):
    data = results.read_chinchilla_reference(reference_file("chinchilla_fig4_epoch_extracted.csv"))
    assert len(data) == 245
    data = results.drop_highest_loss(data, 5)
    assert len(data) == 240 and data.loss.max() < 4.0
    np.testing.assert_allclose(data.tokens * data.params * 6, data.flops, rtol=1e-12)
    fit = laws.fit_approach3(data)  # Hoffmann et al.'s full 4,500-start grid
    assert fit.n_starts == 4500 and fit.n_points == 240
    published = {"E": (1.817, 0.026), "A": (482.01, 124.52), "B": (2085.43, 1293.28),
                 "alpha": (0.3478, 0.0154), "beta": (0.3659, 0.0206)}
    for name, (value, se) in published.items():
        assert abs(getattr(fit, name) - value) < se, (name, getattr(fit, name), value, se)
    # The optimum is well converged: tighter than the published SEs by two orders.
    assert abs(fit.E - 1.817) < 0.003 and abs(fit.alpha - 0.3478) < 0.002
    assert abs(fit.beta - 0.3659) < 0.003
    assert 1.0e-3 < fit.objective < 1.03e-3
    # Compute-optimal exponent near the paper's approach-3 value (a ~ 0.51 in the refit).
    assert 0.50 < fit.a < 0.53


# ------------------------------------------------------------------------------------------
# 2. Recovery of known constants, closed-form optimum
# ------------------------------------------------------------------------------------------


def test_approach3_recovers_known_law_from_noisy_grid():
    data = grid_data(noise=0.01, seed=1)
    fit = laws.fit_approach3(data, starts=laws.small_grid())
    assert abs(fit.E - TRUE["E"]) < 0.1
    assert abs(fit.alpha - TRUE["alpha"]) < 0.03
    assert abs(fit.beta - TRUE["beta"]) < 0.03
    assert abs(math.log(fit.A / TRUE["A"])) < 0.4  # A and B trade off against the exponents
    assert abs(math.log(fit.B / TRUE["B"])) < 0.4
    assert abs(fit.a - true_a()) < 0.03
    # Noise-free data is fitted essentially exactly.
    exact = results.from_arrays(data.params, data.tokens, true_loss(data.params, data.tokens))
    fit0 = laws.fit_approach3(exact, starts=laws.small_grid())
    for k, v in TRUE.items():
        assert getattr(fit0, k) == pytest.approx(v, rel=2e-3), k


def test_closed_form_optimum_minimises_loss_along_isoflop():
    fit = laws.Approach3Fit(objective=0.0, n_points=0, n_starts=0, **TRUE)
    for c in (1e18, 1e21, 1e24):
        n_opt, d_opt, l_opt = fit.optimal(c)
        assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-12)
        res = optimize.minimize_scalar(lambda u, c=c: fit.predict(math.exp(u), c / (6 * math.exp(u))),
                                       bounds=(5, 40), method="bounded",
                                       options={"xatol": 1e-10})
        assert math.log(n_opt) == pytest.approx(res.x, abs=1e-4)
        assert l_opt == pytest.approx(res.fun, rel=1e-10)
    assert float(fit.optimal(1e21)[0]) == pytest.approx(float(true_n_opt(1e21)), rel=1e-12)


def test_bootstrap_intervals_cover_truth_and_shrink_with_less_noise():
    data = grid_data(noise=0.01, seed=2)
    fit = laws.fit_approach3(data, starts=laws.small_grid())
    boot = laws.bootstrap_approach3(data, fit, n_resamples=8, seed=0, budgets=[1e21])
    se, ci = boot.se(), boot.ci95()
    assert boot.n_failed == 0 and len(boot.samples["E"]) == 8
    assert 0 < se["alpha"] < 0.05 and 0 < se["E"] < 0.1
    assert ci["E"][0] <= ci["E"][1] and ci["loss_opt[0]"][0] < ci["loss_opt[0]"][1]
    quiet = grid_data(noise=0.001, seed=2)
    fitq = laws.fit_approach3(quiet, starts=laws.small_grid())
    bootq = laws.bootstrap_approach3(quiet, fitq, n_resamples=8, seed=0)
    assert bootq.se()["alpha"] < se["alpha"] / 3


# ------------------------------------------------------------------------------------------
# 3. Approach 2, approach 1, Kaplan
# ------------------------------------------------------------------------------------------


def test_approach2_recovers_compute_optimal_exponents():
    cols = isoflop_data()
    data = results.from_arrays(**cols)
    a2 = powerlaws.fit_approach2(data)
    assert len(a2.budgets) == 5 and not a2.excluded
    assert a2.params_law.exponent == pytest.approx(true_a(), abs=0.02)
    assert a2.tokens_law.exponent == pytest.approx(1 - true_a(), abs=0.02)
    for b in a2.budgets:  # each parabola minimum lies near the true optimum
        assert abs(math.log(b.params_opt / true_n_opt(b.flops))) < 0.2
        assert b.loss_opt == pytest.approx(
            true_loss(true_n_opt(b.flops), b.flops / (6 * true_n_opt(b.flops))), rel=0.01)
    # Approach 1 on the same runs: the lowest loss per budget is the sampled size nearest N_opt.
    a1 = powerlaws.fit_approach1(data)
    assert len(a1.envelope) == 5
    assert a1.params_law.exponent == pytest.approx(true_a(), abs=0.08)


def test_approach2_skipped_without_isoflop_structure():
    # A geometric N x D grid with equal ratios has isoFLOP diagonals; random sizes do not.
    rng = np.random.default_rng(0)
    n, d = 10 ** rng.uniform(7, 10, 40), 10 ** rng.uniform(8.5, 11.5, 40)
    data = results.from_arrays(n, d, true_loss(n, d))
    with pytest.raises(results.NotSupported, match="isoFLOP"):
        powerlaws.fit_approach2(data)
    report = fitlib.fit_all(data, budgets=[1e20], n_bootstrap=0, starts=laws.small_grid())
    assert "approach2" not in report.allocators() and "approach3" in report.allocators()
    out = output.fit_json(report)
    assert "skipped" in out["approach2"] and "isoFLOP" in out["approach2"]["skipped"]
    assert "approach2" not in out["predictions"][0]


def test_group_by_flops_tolerates_jitter_and_separates_budgets():
    flops = np.array([1e18, 1.04e18, 0.97e18, 3e18, 3.05e18, 1e19])
    groups = powerlaws.group_by_flops(flops, rtol=0.1)
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 1, 2], [3, 4], [5]]


def test_power_law_and_kaplan_fit_exact_laws():
    law = powerlaws.fit_power_law(np.array([1e3, 1e4, 1e5, 1e6]), 2.5 * np.array([1e3, 1e4, 1e5, 1e6]) ** 0.7)
    assert law.coef == pytest.approx(2.5, rel=1e-9) and law.exponent == pytest.approx(0.7)
    # Loss depending on N only, several token counts per size: L(N) = (N_c / N)^0.076.
    n = np.repeat(np.logspace(6, 9, 7), 3)
    d = np.tile([1e9, 2e9, 4e9], 7)
    loss = (8.8e13 / n) ** 0.076
    k = powerlaws.fit_kaplan(results.from_arrays(n, d, loss), "params")
    assert k.alpha == pytest.approx(0.076, rel=1e-6)
    assert k.x_c == pytest.approx(8.8e13, rel=1e-4)
    narrow = np.logspace(6, 6.5, 3)  # three sizes spanning a factor 3.2 only
    with pytest.raises(results.NotSupported, match="spans only a factor 3.2 in params"):
        powerlaws.fit_kaplan(results.from_arrays(narrow, [1e9] * 3, (8.8e13 / narrow) ** 0.076), "params")


# ------------------------------------------------------------------------------------------
# 4. CLI end to end
# ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_fit_end_to_end(tmp_path, capsys):
    cols = isoflop_data(budgets=(1e17, 1e18, 1e19, 1e20), sizes=6, seed=3)
    n = len(cols["loss"])
    csv_path = write_csv(tmp_path / "results.csv",
                         {"params": cols["params"], "params_nonembed": 0.9 * cols["params"],
                          "tokens": cols["tokens"], "flops": cols["flops"], "loss": cols["loss"]})
    out = tmp_path / "fit"
    args = _parser().parse_args(["scaling", "fit", str(csv_path), "--out", str(out),
                                 "--budgets", "1e21,1e23", "--bootstrap", "4", "--seed", "1",
                                 "--starts", "small"])
    assert args.func(args) == 0
    result = json.loads((out / "fit.json").read_text())

    a3 = result["approach3"]
    assert result["n_points"] == n == a3["n_points"] == 24
    assert set(laws.APPROACH3_PARAMS) <= set(a3)
    assert a3["E"] == pytest.approx(TRUE["E"], abs=0.15)
    assert a3["a"] == pytest.approx(true_a(), abs=0.05)
    assert 0 < a3["objective"] < 1e-2
    assert a3["bootstrap"]["n_resamples"] == 4
    for k in laws.APPROACH3_PARAMS:
        lo, hi = a3["ci95"][k]
        assert lo <= hi and a3["se"][k] >= 0

    a2 = result["approach2"]
    assert "skipped" not in a2 and len(a2["budgets"]) == 4
    assert a2["a"] == pytest.approx(true_a(), abs=0.03)

    preds = result["predictions"]
    assert [p["flops"] for p in preds] == [1e21, 1e23]
    for p in preds:
        q = p["approach3"]
        assert 6 * q["params"] * q["tokens"] == pytest.approx(p["flops"], rel=1e-9)
        assert q["loss"] > a3["E"]
        assert q["params"] == pytest.approx(float(true_n_opt(p["flops"])), rel=0.5)
        assert p["approach2"]["params"] == pytest.approx(float(true_n_opt(p["flops"])), rel=0.3)
        lo, hi = q["ci95"]["params"]
        assert lo <= hi
    assert preds[1]["approach3"]["params"] > preds[0]["approach3"]["params"]
    # The law in fit.json evaluates again without refitting: same allocation and loss.
    law = laws.Approach3Fit.from_json(a3)
    for p in preds:
        n_opt, d_opt, loss = law.optimal(p["flops"])
        assert (float(n_opt), float(d_opt), float(loss)) == pytest.approx(
            (p["approach3"]["params"], p["approach3"]["tokens"], p["approach3"]["loss"]), rel=1e-12)

    assert set(result["plots"]) == {"loss_vs_compute", "isoflops", "optimal_allocation",
                                    "residuals"}
    for name in result["plots"].values():
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 8_000, name

    printed = capsys.readouterr().out
    assert "Approach 3" in printed and "1e+21" in printed and "approach2" in printed


def test_cli_bad_input_exits_with_message(tmp_path):
    bad = write_csv(tmp_path / "r.csv", {"params": [1e6, 2e6], "loss": [3.0, 2.9]})
    args = _parser().parse_args(["scaling", "fit", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="missing column.*'tokens'"):
        args.func(args)
    with pytest.raises(SystemExit):  # argparse refuses a malformed budget list
        _parser().parse_args(["scaling", "fit", str(bad), "--out", "o", "--budgets", "1e20,x"])
    with pytest.raises(SystemExit):  # and a missing subcommand
        _parser().parse_args(["scaling"])


# ------------------------------------------------------------------------------------------
# 5. Bad input
# ------------------------------------------------------------------------------------------


def _good_columns(n: int = 8) -> dict[str, list]:
    return {"params": list(np.logspace(6, 8, n)), "tokens": list(np.logspace(8, 10, n)),
            "loss": list(np.linspace(4.0, 3.0, n))}


def test_missing_columns_are_named(tmp_path):
    cols = _good_columns()
    del cols["tokens"], cols["loss"]
    with pytest.raises(results.ScalingDataError, match=r"missing column\(s\) 'tokens', 'loss'"):
        results.read_results(write_csv(tmp_path / "r.csv", cols))


@pytest.mark.parametrize("column, value, problem", [
    ("loss", "nan", "nan"), ("loss", "", "nan"), ("tokens", "0", "0.0"),
    ("params", "-5e6", "-5000000.0"), ("loss", "inf", "inf")])
def test_bad_values_name_row_and_column(tmp_path, column, value, problem):
    cols = _good_columns()
    cols[column][2] = value
    with pytest.raises(results.ScalingDataError) as err:
        results.read_results(write_csv(tmp_path / "r.csv", cols))
    msg = str(err.value)
    assert f"row 3 (line 4), column '{column}' = {problem}" in msg
    assert "finite positive" in msg


def test_non_numeric_value_is_named(tmp_path):
    cols = _good_columns()
    cols["params"][5] = "7M"
    with pytest.raises(results.ScalingDataError, match=r"row 6 \(line 7\), column 'params': '7M' is not"):
        results.read_results(write_csv(tmp_path / "r.csv", cols))


def test_too_few_points_says_how_many_are_needed(tmp_path):
    data = results.read_results(write_csv(tmp_path / "r.csv", _good_columns(4)))
    with pytest.raises(results.ScalingDataError, match="needs at least 6 runs, but the table has 4"):
        laws.fit_approach3(data)
    same_size = results.from_arrays([1e6] * 8, np.logspace(8, 10, 8), np.linspace(4, 3, 8))
    with pytest.raises(results.ScalingDataError, match="at least 2 distinct values of params"):
        laws.fit_approach3(same_size)


def test_empty_table_and_missing_file(tmp_path):
    (tmp_path / "empty.csv").write_text("params,tokens,loss\n")
    with pytest.raises(results.ScalingDataError, match="no runs"):
        results.read_results(tmp_path / "empty.csv")
    with pytest.raises(results.ScalingDataError, match="no such file"):
        results.read_results(tmp_path / "absent.csv")


def test_flops_column_is_optional(tmp_path):
    cols = _good_columns()
    data = results.read_results(write_csv(tmp_path / "r.csv", cols))
    assert data.flops_source == "6ND"
    np.testing.assert_allclose(data.flops, 6 * data.params * data.tokens)
    cols["flops"] = [7.0 * p * t for p, t in zip(cols["params"], cols["tokens"])]
    data = results.read_results(write_csv(tmp_path / "r2.csv", cols))
    assert data.flops_source == "column"
    np.testing.assert_allclose(data.flops, 7 * data.params * data.tokens)


def test_params_column_and_several_files_are_read_together(tmp_path):
    cols = _good_columns()
    cols["params_nonembed"] = [0.5 * float(p) for p in cols["params"]]
    first = write_csv(tmp_path / "a.csv", cols)
    more = {k: v[:3] for k, v in cols.items()}
    more["flops"] = [7.0 * float(p) * float(t) for p, t in zip(more["params"], more["tokens"])]
    second = write_csv(tmp_path / "b.csv", more)
    both = results.read_many([first, second], "params_nonembed")
    n = len(cols["params"])
    assert len(both) == n + 3 and both.source == f"{first} + {second}" and both.flops_source == "mixed"
    np.testing.assert_allclose(both.params, [0.5 * float(p) for p in cols["params"] + cols["params"][:3]])
    np.testing.assert_allclose(both.flops[:n], 6 * both.params[:n] * both.tokens[:n])  # no flops column: 6ND, N as read
    np.testing.assert_allclose(both.flops[n:], 7 * 2 * both.params[n:] * both.tokens[n:])
    assert results.read_many([first]).params.tolist() == [float(p) for p in cols["params"]]
    with pytest.raises(results.ScalingDataError, match=r"missing column\(s\) 'params_active'"):
        results.read_results(first, "params_active")


def test_a_fit_whose_loss_rises_with_size_is_refused_with_the_reason():
    n = np.array([1e5, 1e5, 3e5, 3e5, 1e6, 1e6, 3e6, 3e6])
    d = np.array([1e7, 4e7] * 4)
    loss = 2.0 + 1e-3 * n**0.3 + 50.0 / d**0.3  # bigger models do worse
    data = results.from_arrays(n, d, loss)
    with pytest.raises(results.ScalingDataError, match="does not fall with both N and D"):
        laws.fit_approach3(data, starts=laws.small_grid())
