"""Predictions from a saved fit, and whether a fit is fit to predict with.

    bigmodel scaling predict FIT.json --params N --tokens D [--json]
    bigmodel scaling predict FIT.json --flops C [--json]

The first gives the approach-3 loss of a model of N parameters trained on D tokens; the second
the compute-optimal N and D of a budget of C = 6·N·D FLOPs and their loss. Intervals come from
the bootstrap replicate laws that fit.json keeps (laws.loss_intervals): ci95 for the law itself,
pi95 for what one training run should measure, and beyond the fitted runs' compute
pi95_extrapolation, that interval widened by the error per decade the fit's backtest measured
(backtest.py). A fit.json whose law is degenerate (a parameter
at zero, or an interval reaching it) or that records no law is refused with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.scaling.backtest import widen
from bigmodel.scaling.laws import APPROACH3_PARAMS, Approach3Fit, loss_intervals, replicate_losses
from bigmodel.scaling.results import ScalingDataError

E_FLOOR = 0.01  # E below this fraction of the lowest fitted loss is no irreducible loss at all
MIN_EXPONENT = 0.01  # alpha or beta below this: the loss does not fall with N or D over these runs
MAX_FAILED_FRACTION = 0.5  # more failed bootstrap refits than this: the law is not determined


def degenerate_reasons(fit: Mapping[str, Any]) -> list[str]:
    """Why a fit.json dict holds no law to predict with (an empty list when it does)."""
    a3 = fit.get("approach3")
    if not isinstance(a3, Mapping) or not all(k in a3 for k in APPROACH3_PARAMS):
        why = a3.get("failed") or a3.get("skipped") if isinstance(a3, Mapping) else None
        return [f"it records no approach-3 law ({why or 'no approach3 entry'})"]
    bad = [k for k in APPROACH3_PARAMS if not (isinstance(a3[k], (int, float)) and math.isfinite(a3[k]) and a3[k] > 0)]
    if bad:
        return [f"{k} = {a3[k]} is not a positive number" for k in bad]
    reasons = []
    ci = a3.get("ci95") or {}
    lowest = (fit.get("input") or {}).get("loss_range", [None])[0]
    if lowest:
        floor = E_FLOOR * lowest
        if a3["E"] < floor:
            reasons.append(f"E = {a3['E']:.3g} is below {E_FLOOR:.0%} of the lowest fitted loss ({lowest:.4g}): "
                           "the fit found no irreducible loss")
        elif ci.get("E") and ci["E"][0] is not None and ci["E"][0] < floor:
            reasons.append(f"the 95% interval of E [{ci['E'][0]:.3g}, {ci['E'][1]:.3g}] reaches 0")
    for k in ("alpha", "beta"):
        if a3[k] < MIN_EXPONENT:
            reasons.append(f"{k} = {a3[k]:.3g}: the loss hardly falls with {'N' if k == 'alpha' else 'D'}")
        elif ci.get(k) and ci[k][0] is not None and ci[k][0] < MIN_EXPONENT:
            reasons.append(f"the 95% interval of {k} [{ci[k][0]:.3g}, {ci[k][1]:.3g}] reaches 0")
    boot = a3.get("bootstrap") or {}
    if boot.get("n_resamples") and boot.get("n_failed", 0) > MAX_FAILED_FRACTION * boot["n_resamples"]:
        reasons.append(f"{boot['n_failed']} of {boot['n_resamples']} bootstrap refits failed")
    return reasons


def load_fit(path: str | Path) -> dict[str, Any]:
    """A fit.json to predict with; ScalingDataError naming the problem and the fix otherwise."""
    path = Path(path)
    try:
        fit = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScalingDataError(f"{path}: no such file; pass the fit.json written by `bigmodel scaling fit`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScalingDataError(f"{path}: not a JSON file ({e}); pass the fit.json written by "
                               "`bigmodel scaling fit`") from None
    if not isinstance(fit, dict):
        raise ScalingDataError(f"{path}: not a fit.json (no JSON object); pass the fit.json written by "
                               "`bigmodel scaling fit`")
    reasons = degenerate_reasons(fit)
    if reasons:
        raise ScalingDataError(f"{path}: refusing to predict from a degenerate or failed fit: {'; '.join(reasons)}. "
                               "Refit on runs spanning more sizes and budgets.")
    return fit


def _law(fit: Mapping[str, Any]) -> Approach3Fit:
    return Approach3Fit.from_json(fit["approach3"])


def _replicates(fit: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The bootstrap replicate constants kept in fit.json, or None."""
    reps = (fit["approach3"].get("bootstrap") or {}).get("replicates")
    if not reps or not len(reps.get("E", [])):
        return None
    return {k: np.asarray(reps[k], float) for k in APPROACH3_PARAMS}


def _extrapolation(fit: Mapping[str, Any], flops: float) -> float | None:
    """Compute of the prediction over the largest fitted run's."""
    top = (fit.get("input") or {}).get("flops_range", [None, None])[1]
    return flops / top if top else None


def _widen(fit: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Add pi95_extrapolation (pi95 widened by the backtest's error per decade) beyond the fitted runs."""
    rates = (fit.get("backtest") or {}).get("rate_per_decade")
    x = out.get("flops_over_largest_fitted")
    if rates is None or "pi95" not in out or x is None or x <= 1.0:
        return
    out["pi95_extrapolation"] = [float(v) for v in widen(out["pi95"], math.log10(x), *rates)[0]]


def predict_point(fit: Mapping[str, Any], params: float, tokens: float) -> dict[str, Any]:
    """Loss of N parameters trained on D tokens, with intervals when the fit has a bootstrap."""
    out: dict[str, Any] = {"optimal": False, "params": params, "tokens": tokens, "flops": 6.0 * params * tokens,
                           "loss": float(_law(fit).predict(params, tokens))}
    reps = _replicates(fit)
    if reps is not None:
        ci, pi = loss_intervals(replicate_losses(reps, np.array([params]), np.array([tokens])),
                                np.asarray(fit["approach3"].get("log_residuals") or [0.0], float))
        out["ci95"], out["pi95"] = [float(v) for v in ci[0]], [float(v) for v in pi[0]]
    out["flops_over_largest_fitted"] = _extrapolation(fit, out["flops"])
    _widen(fit, out)
    return out


def predict_budget(fit: Mapping[str, Any], flops: float) -> dict[str, Any]:
    """Compute-optimal N and D of a 6ND budget and their loss, with intervals when the fit has a bootstrap."""
    n_opt, d_opt, loss = (float(v) for v in _law(fit).optimal(flops))
    out: dict[str, Any] = {"optimal": True, "flops": flops, "params": n_opt, "tokens": d_opt, "loss": loss}
    reps = _replicates(fit)
    if reps is not None:
        laws = [Approach3Fit(**{k: float(reps[k][i]) for k in APPROACH3_PARAMS}, objective=math.nan,
                             n_points=0, n_starts=0) for i in range(len(reps["E"]))]
        allocations = np.array([[float(v) for v in law.optimal(flops)] for law in laws])  # (replicates, 3)
        for j, key in enumerate(("params", "tokens")):
            out[f"{key}_ci95"] = [float(v) for v in np.percentile(allocations[:, j], [2.5, 97.5])]
        ci, pi = loss_intervals(allocations[:, 2:3], np.asarray(fit["approach3"].get("log_residuals") or [0.0]))
        out["ci95"], out["pi95"] = [float(v) for v in ci[0]], [float(v) for v in pi[0]]
    out["flops_over_largest_fitted"] = _extrapolation(fit, flops)
    _widen(fit, out)
    return out


def format_prediction(p: Mapping[str, Any]) -> str:
    """A prediction as a few readable lines."""
    def span(key: str, fmt: str) -> str:
        return f" (95% interval {p[key][0]:{fmt}} .. {p[key][1]:{fmt}})" if key in p else ""

    lines = []
    if p.get("optimal"):
        lines += [f"compute-optimal allocation of C = {p['flops']:.3g} FLOPs (6ND):",
                  f"  N_opt = {p['params']:.4g} parameters{span('params_ci95', '.3g')}",
                  f"  D_opt = {p['tokens']:.4g} tokens{span('tokens_ci95', '.3g')}"]
    else:
        lines.append(f"N = {p['params']:.4g} parameters, D = {p['tokens']:.4g} tokens "
                     f"(C = 6ND = {p['flops']:.3g} FLOPs):")
    lines.append(f"  loss = {p['loss']:.4f}{span('ci95', '.4f')}")
    if "pi95" in p:
        lines.append(f"  a training run should measure {p['pi95'][0]:.4f} .. {p['pi95'][1]:.4f} (95%, with the "
                     "fitted runs' scatter)")
    else:
        lines.append("  no interval: the fit was made without a bootstrap (--bootstrap 0)")
    x = p.get("flops_over_largest_fitted")
    if x is not None and x > 1.0:
        lines.append(f"  extrapolates {x:.3g}x beyond the largest fitted run's compute")
        if "pi95_extrapolation" in p:
            low, high = p["pi95_extrapolation"]
            lines.append(f"  with the error the fit's backtest shows at that distance: {low:.4f} .. {high:.4f}")
    return "\n".join(lines)
