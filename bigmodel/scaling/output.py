"""What a fit writes and prints: fit.json, the fit's plots (plot.py) and the terminal summary.

    report = fit.fit_all(data)
    write_fit(report, outdir)       # outdir/fit.json and the PNG plots
    print(format_report(report))
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bigmodel.scaling.backtest import Backtest, format_backtest
from bigmodel.scaling.holdout import format_check
from bigmodel.scaling.laws import APPROACH3_PARAMS, approach3_residuals
from bigmodel.scaling.powerlaws import Approach1Fit, Approach2Fit, KaplanFit, PowerLaw
from bigmodel.scaling.predict import degenerate_reasons
from bigmodel.scaling.results import ScalingData, write_text_atomic

if TYPE_CHECKING:
    from bigmodel.scaling.fit import FitReport

FIT_JSON = "fit.json"


# --------------------------------------------------------------------------------------------
# fit.json
# --------------------------------------------------------------------------------------------


def fit_json(report: FitReport) -> dict[str, Any]:
    """JSON-ready summary of a FitReport (the contents of fit.json)."""
    d, f3 = report.data, report.approach3
    res = approach3_residuals(d, f3)
    a3: dict[str, Any] = {k: getattr(f3, k) for k in APPROACH3_PARAMS}
    a3.update({
        "a": f3.a, "b": f3.b, "G": f3.G,
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "n_points": f3.n_points, "objective": f3.objective,
        "objective_name": f"summed Huber loss (delta={f3.delta:g}) of log-space residuals",
        "n_starts": f3.n_starts,
        "rms_log_residual": float(np.sqrt(np.mean(res**2))),
        "max_abs_log_residual": float(np.max(np.abs(res))),
        "log_residuals": res,  # log(L_fit / L_run) per fitted run: the scatter in prediction intervals
    })
    if report.bootstrap is not None:
        keys = [*APPROACH3_PARAMS, "a", "b"]
        se, ci = report.bootstrap.se(), report.bootstrap.ci95()
        a3["se"] = {k: se[k] for k in keys}
        a3["ci95"] = {k: ci[k] for k in keys}
        a3["bootstrap"] = {"n_resamples": report.bootstrap.n_resamples,
                           "n_failed": report.bootstrap.n_failed, "seed": report.bootstrap.seed,
                           "refit_starts": "best fit + small grid (32)",
                           "replicates": {k: report.bootstrap.samples[k] for k in APPROACH3_PARAMS}}
    else:
        a3["se"] = a3["ci95"] = None
        a3["bootstrap"] = {"skipped": "no resamples requested (--bootstrap 0)"}
    out: dict[str, Any] = {
        "input": {"source": d.source, "n_points": len(d), "flops": d.flops_source,
                  **{f"{k}_range": [float(getattr(d, k).min()), float(getattr(d, k).max())]
                     for k in ("params", "tokens", "flops", "loss")}},
        "n_points": len(d),
        "approach3": a3,
        "approach2": _approach2_json(report.approach2),
        "approach1": _approach1_json(report.approach1, d),
        "kaplan": {k: _kaplan_json(v) for k, v in report.kaplan.items()},
        "predictions": report.predictions(),
        "predictions_note": "budgets are C = 6ND FLOPs; 'loss' is the approach-3 law "
                            "evaluated at each approach's (params, tokens)",
        "plots": dict(report.plots),
    }
    if isinstance(report.backtest, Backtest):
        out["backtest"] = report.backtest.to_json()
    elif report.backtest is not None:
        out["backtest"] = {"skipped": report.backtest}
    if report.holdout is not None:
        out["holdout"] = report.holdout.to_json()
    out = _jsonable(out)
    out["degenerate"] = degenerate_reasons(out)  # empty when the law can be predicted with
    return out


def _law_json(law: PowerLaw) -> dict[str, Any]:
    """Coefficient, exponent and its standard error."""
    return {"coef": law.coef, "exponent": law.exponent, "exponent_se": law.exponent_se,
            "n_points": law.n_points}


def _approach2_json(fit: Approach2Fit | str) -> dict[str, Any]:
    """fit.json entry for approach 2."""
    if isinstance(fit, str):
        return {"skipped": fit}
    return {
        "a": fit.params_law.exponent, "a_se": fit.params_law.exponent_se,
        "b": fit.tokens_law.exponent, "b_se": fit.tokens_law.exponent_se,
        "params_opt": _law_json(fit.params_law), "tokens_opt": _law_json(fit.tokens_law),
        "loss_opt": _law_json(fit.loss_law),
        "flops_rtol": fit.rtol,
        "budgets": [{"flops": b.flops, "runs": len(b.members), "params_opt": b.params_opt,
                     "tokens_opt": b.tokens_opt, "loss_opt": b.loss_opt,
                     "parabola": list(b.coeffs)} for b in fit.budgets],
        "excluded": fit.excluded,
    }


def _approach1_json(fit: Approach1Fit | str, data: ScalingData) -> dict[str, Any]:
    """fit.json entry for approach 1."""
    if isinstance(fit, str):
        return {"skipped": fit}
    e = fit.envelope
    return {
        "a": fit.params_law.exponent, "a_se": fit.params_law.exponent_se,
        "b": fit.tokens_law.exponent, "b_se": fit.tokens_law.exponent_se,
        "params_opt": _law_json(fit.params_law), "tokens_opt": _law_json(fit.tokens_law),
        "loss_opt": _law_json(fit.loss_law),
        "envelope": [{"flops": data.flops[i], "params": data.params[i],
                      "tokens": data.tokens[i], "loss": data.loss[i]} for i in e],
    }


def _kaplan_json(fit: KaplanFit | str) -> dict[str, Any]:
    """fit.json entry for one Kaplan law."""
    if isinstance(fit, str):
        return {"skipped": fit}
    return {"law": f"L = ({fit.variable}_c / {fit.variable})^alpha", "alpha": fit.alpha,
            "alpha_se": fit.alpha_se, "x_c": fit.x_c, "n_points": len(fit.envelope)}


def _jsonable(obj: Any) -> Any:
    """Plain Python types for json.dump; non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_fit(report: FitReport, outdir: str | Path, plots: bool = True,
              started: float | None = None) -> dict[str, Any]:
    """Write outdir/fit.json (atomically) and, with `plots`, the fit's PNGs; returns what fit.json holds.

    `started` (a time.perf_counter() reading from before the fit) adds the wall time so far as wall_time_s.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if plots:
        from bigmodel.scaling import plot  # matplotlib: only when plots are drawn

        report.plots = plot.plot_all(report, outdir)
    result = fit_json(report)
    if started is not None:
        result["wall_time_s"] = round(time.perf_counter() - started, 2)
    write_text_atomic(outdir / FIT_JSON, json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------------------------


def format_report(report: FitReport) -> str:
    """Readable text summary of a FitReport."""
    d, f3, boot = report.data, report.approach3, report.bootstrap
    lines = [(f"{d.source}: {len(d)} runs, N {d.params.min():.3g}..{d.params.max():.3g}, "
             f"D {d.tokens.min():.3g}..{d.tokens.max():.3g}, C {d.flops.min():.3g}.."
             f"{d.flops.max():.3g} FLOPs ({'flops column' if d.flops_source == 'column' else 'C = 6ND'})"),
             "",
             "Approach 3: L(N, D) = E + A/N^alpha + B/D^beta",
             (f"  Huber (delta={f3.delta:g}) in log space, L-BFGS-B from {f3.n_starts} starts; "
             f"objective {f3.objective:.6g}")]
    se = boot.se() if boot is not None else {}
    ci = boot.ci95() if boot is not None else {}
    header = f"  {'':<6}{'value':>12}"
    if boot is not None:
        header += f"{'SE':>12}   {'95% interval':<24}"
    lines.append(header)
    for k in (*APPROACH3_PARAMS, "a", "b"):
        v = getattr(f3, k)
        row = f"  {k:<6}{_num(v):>12}"
        if boot is not None:
            row += f"{_num(se[k]):>12}   [{_num(ci[k][0])}, {_num(ci[k][1])}]"
        lines.append(row)
    lines.append("  (a, b: exponents of N_opt ~ C^a and D_opt ~ C^b)")
    if boot is not None:
        lines.append(f"  bootstrap: {boot.n_resamples} resamples, seed {boot.seed}"
                     + (f", {boot.n_failed} failed" if boot.n_failed else ""))
    if report.backtest is not None:
        lines += ["", format_backtest(report.backtest)]
    lines.append("")
    a2 = report.approach2
    if isinstance(a2, str):
        lines.append(f"Approach 2 (isoFLOP parabolas): skipped: {a2}")
    else:
        lines.append(f"Approach 2 (isoFLOP parabolas, {len(a2.budgets)} budgets): "
                     f"a = {a2.params_law.exponent:.4f} +- {a2.params_law.exponent_se:.2g}, "
                     f"b = {a2.tokens_law.exponent:.4f}"
                     + (f"; {len(a2.excluded)} group(s) excluded" if a2.excluded else ""))
    a1 = report.approach1
    if isinstance(a1, str):
        lines.append(f"Approach 1 (min-loss envelope): skipped: {a1}")
    else:
        lines.append(f"Approach 1 (min-loss envelope, {len(a1.envelope)} points): "
                     f"a = {a1.params_law.exponent:.4f} +- {a1.params_law.exponent_se:.2g}, "
                     f"b = {a1.tokens_law.exponent:.4f} +- {a1.tokens_law.exponent_se:.2g}")
    for v, k in report.kaplan.items():
        sym = {"params": "N", "tokens": "D", "flops": "C"}[v]
        if isinstance(k, str):
            lines.append(f"Kaplan L({sym}) = ({sym}_c/{sym})^alpha: skipped: {k}")
        else:
            lines.append(f"Kaplan L({sym}) = ({sym}_c/{sym})^alpha: alpha = {k.alpha:.4f} "
                         f"+- {k.alpha_se:.2g}, {sym}_c = {k.x_c:.3g} "
                         f"({len(k.envelope)} envelope points)")
    preds = report.predictions()
    if preds:
        lines += ["", ("Compute-optimal predictions (C = 6ND FLOPs; loss from the approach-3 "
                      "law at each allocation):"),
                  (f"  {'budget C':>9}  {'approach':<10}{'N_opt':>22}{'D_opt':>22}{'D/N':>9}"
                  f"{'loss':>17}")]
        for p in preds:
            first = True
            for name in ("approach3", "approach2", "approach1"):
                if name not in p:
                    continue
                q = p[name]
                c = f"{p['flops']:.3g}" if first else ""
                lines.append(f"  {c:>9}  {name:<10}{q['params']:>22.3g}{q['tokens']:>22.3g}"
                             f"{q['tokens'] / q['params']:>9.4g}{q['loss']:>17.4f}")
                if "ci95" in q:
                    ci_p = q["ci95"]
                    lines.append(f"  {'':>9}  {'  95% CI':<10}{_span(ci_p['params']):>22}"
                                 f"{_span(ci_p['tokens']):>22}{'':>9}"
                                 f"{_span(ci_p['loss'], '.4f'):>17}")
                first = False
    if report.holdout is not None:
        lines += ["", format_check(report.holdout)]
    degenerate = degenerate_reasons(fit_json(report))
    if degenerate:
        lines += ["", "The approach-3 law is degenerate (`scaling predict` refuses it): " + "; ".join(degenerate)]
    if report.plots:
        lines += ["", "Plots: " + ", ".join(report.plots.values())]
    return "\n".join(lines)


def _num(v: float) -> str:
    """Compact number for tables."""
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"


def _span(pair: Sequence[float], fmt: str = ".3g") -> str:
    """'[lo, hi]' for an interval column."""
    return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"

