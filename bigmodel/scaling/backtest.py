"""Backtest of the approach-3 law on its own budgets: how its error grows beyond the runs it saw.

The bootstrap intervals of laws.py cover the law's parameter uncertainty and the fitted runs'
scatter about it, not the error of the form itself, which grows with the distance beyond the
runs. The backtest measures that error on the sweep alone (rolling-origin evaluation, as in
forecasting): for each of the last ORIGINS cut-offs it refits the law on the compute budgets
below the cut-off and predicts the best (lowest-loss) run of every budget at or above it. Each
error, divided by the decades of compute between that run and the largest fitted one, is an
error rate per decade. A prediction d decades beyond the fitted runs gets its run interval
widened by d times the extreme rates, each side by the rates that point its way:

    [pi_low / (1 + d * max(rates, 0)),  pi_high / (1 + d * min(rates, 0))]

(relative errors are (predicted - measured) / measured, so a law that predicted too high
lowers the bottom of the interval). The assumptions: the error grows in proportion to log
compute, and the few cut-offs of one sweep show its largest rate.

    bt = backtest.run(data, starts)          # Backtest, or the reason there is none
    bt.widen(pi95, bt.decades(flops, data))  # the interval beyond the fitted runs
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from bigmodel.scaling.laws import MIN_POINTS_APPROACH3, fit_approach3
from bigmodel.scaling.powerlaws import DEFAULT_FLOPS_RTOL, group_by_flops
from bigmodel.scaling.results import ScalingData, ScalingDataError

MIN_FITTED_BUDGETS = 3  # a cut-off's refit sees at least this many budgets
ORIGINS = 3  # cut-offs: below each of the last ORIGINS budgets (fewer when there are fewer budgets)
METHOD = ("approach 3 refitted on the budgets below each cut-off predicts the best run of every budget at or "
          "above it; rate = relative error / decades of compute beyond the largest fitted run; a prediction d "
          "decades beyond the fitted runs widens its run interval to [low / (1 + d max(rate, 0)), "
          "high / (1 + d min(rate, 0))]")


@dataclasses.dataclass(frozen=True)
class BacktestStep:
    """One prediction of the backtest: the law fitted on `n_budgets_fitted` budgets predicting one later run."""

    n_budgets_fitted: int
    fitted_flops: float  # the largest fitted run's compute
    params: float
    tokens: float
    flops: float
    measured: float
    predicted: float

    @property
    def decades(self) -> float:
        """log10 of this run's compute over the largest fitted run's."""
        return math.log10(self.flops / self.fitted_flops)

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured."""
        return self.predicted / self.measured - 1.0

    @property
    def rate(self) -> float:
        """Relative error per decade of extrapolation."""
        return self.relative_error / self.decades


@dataclasses.dataclass(frozen=True)
class Backtest:
    """The backtest's predictions and the error rates per decade they give."""

    steps: tuple[BacktestStep, ...]

    @property
    def rate_low(self) -> float:
        """The most negative error rate per decade (0 when the law never predicted too low)."""
        return min(0.0, *(s.rate for s in self.steps))

    @property
    def rate_high(self) -> float:
        """The largest positive error rate per decade (0 when the law never predicted too high)."""
        return max(0.0, *(s.rate for s in self.steps))

    @staticmethod
    def decades(flops: np.ndarray | float, data: ScalingData) -> np.ndarray:
        """Decades of compute beyond the largest fitted run (0 within the fitted range)."""
        return np.maximum(np.log10(np.asarray(flops, float) / float(data.flops.max())), 0.0)

    def widen(self, interval: np.ndarray, decades: np.ndarray) -> np.ndarray:
        """A (points, 2) interval widened for points `decades` beyond the fitted runs."""
        return widen(interval, decades, self.rate_low, self.rate_high)

    def to_json(self) -> dict[str, Any]:
        """The fit.json 'backtest' entry."""
        return {"method": METHOD, "rate_per_decade": [self.rate_low, self.rate_high],
                "steps": [{"n_budgets_fitted": s.n_budgets_fitted, "fitted_flops": s.fitted_flops,
                           "params": s.params, "tokens": s.tokens, "flops": s.flops, "measured": s.measured,
                           "predicted": s.predicted, "decades": s.decades, "relative_error": s.relative_error,
                           "rate_per_decade": s.rate} for s in self.steps]}


def widen(interval: np.ndarray, decades: np.ndarray | float, rate_low: float, rate_high: float) -> np.ndarray:
    """(points, 2) run intervals widened by error rates per decade (rate_low <= 0 <= rate_high).

    The top is unbounded where the law's under-prediction rate reaches -100% over the distance.
    """
    interval, decades = np.atleast_2d(np.asarray(interval, float)), np.asarray(decades, float)
    down = 1.0 + decades * rate_low
    with np.errstate(divide="ignore"):
        top = np.where(down > 0, interval[:, 1] / np.maximum(down, 1e-300), np.inf)
    return np.column_stack([interval[:, 0] / (1.0 + decades * rate_high), top])


def run(data: ScalingData, starts: np.ndarray | None = None,
        flops_rtol: float = DEFAULT_FLOPS_RTOL) -> Backtest | str:
    """The backtest of `data`'s approach-3 law, or the reason it cannot be run."""
    groups = group_by_flops(data.flops, flops_rtol)  # sorted by compute
    if len(groups) <= MIN_FITTED_BUDGETS:
        return (f"{len(groups)} compute budgets (flops within {flops_rtol:.0%} of each other); the backtest "
                f"needs at least {MIN_FITTED_BUDGETS + 1}, so that a refit on {MIN_FITTED_BUDGETS} can predict "
                "a later one")
    best = [int(g[np.argmin(data.loss[g])]) for g in groups]
    steps: list[BacktestStep] = []
    for cut in range(max(MIN_FITTED_BUDGETS, len(groups) - ORIGINS), len(groups)):
        fitted = np.concatenate(groups[:cut])
        if len(fitted) < MIN_POINTS_APPROACH3:
            continue
        try:
            law = fit_approach3(data.subset(fitted), starts=starts)
        except ScalingDataError:  # too few distinct sizes or budgets below this cut-off
            continue
        top = float(data.flops[fitted].max())
        for i in best[cut:]:
            steps.append(BacktestStep(
                n_budgets_fitted=cut, fitted_flops=top, params=float(data.params[i]),
                tokens=float(data.tokens[i]), flops=float(data.flops[i]), measured=float(data.loss[i]),
                predicted=float(law.predict(data.params[i], data.tokens[i]))))
    if not steps:
        return f"no cut-off leaves at least {MIN_POINTS_APPROACH3} runs of varied N and D to refit"
    return Backtest(tuple(steps))


def format_backtest(bt: Backtest | str) -> str:
    """The backtest for the terminal."""
    if isinstance(bt, str):
        return f"Backtest (refits on the lower budgets predicting the higher): skipped: {bt}"
    lines = [("Backtest: approach 3 refitted on the budgets below each cut-off, predicting the best run of "
              "each budget above it"),
             (f"  {'fitted':>6} {'params':>9} {'tokens':>9} {'decades':>7} {'measured':>9} {'predicted':>9} "
              f"{'error':>7} {'per decade':>10}")]
    for s in bt.steps:
        lines.append(f"  {s.n_budgets_fitted:>6} {s.params:>9.3g} {s.tokens:>9.3g} {s.decades:>7.3f} "
                     f"{s.measured:>9.4f} {s.predicted:>9.4f} {100 * s.relative_error:>+6.2f}% "
                     f"{100 * s.rate:>+9.2f}%")
    lines.append(f"  error per decade beyond the fitted runs: {100 * bt.rate_low:+.2f}% .. {100 * bt.rate_high:+.2f}% "
                 "(widens the run interval of predictions beyond them)")
    return "\n".join(lines)
