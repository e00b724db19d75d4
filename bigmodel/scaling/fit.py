"""Scaling-law fits on a results table: Chinchilla approaches 1, 2 and 3, and Kaplan power laws.

Input is any CSV with columns ``params`` (N, parameters), ``tokens`` (D, training tokens) and
``loss`` (final validation loss); ``flops`` (C) is optional and defaults to 6·N·D
(results.py reads it).

Fits, each recorded only when the data supports it (otherwise with the reason it was skipped):

* Approach 3 (Hoffmann et al. 2022, laws.py): L(N, D) = E + A/N^alpha + B/D^beta, minimising
  the summed Huber loss (delta 1e-3) of log-space residuals with L-BFGS-B from their grid of
  4,500 starts, with bootstrap standard errors and 95% intervals. Always fitted; too little
  data is an error.
* Approach 2 (powerlaws.py): per isoFLOP budget a parabola of loss in log N gives N_opt, then
  N_opt ~ C^a and D_opt = C/(6 N_opt) ~ C^b.
* Approach 1 (powerlaws.py): N and D of the minimum-loss envelope over compute as power laws of C.
* Kaplan et al. 2020 style (powerlaws.py): L(X) = (X_c/X)^alpha_X for X in N, D, C, each on the
  lower envelope of loss over X.

The backtest (backtest.py) refits approach 3 on the lower budgets and predicts the best run of
each higher one, giving the law's error per decade of extrapolation, which widens the run
interval of predictions beyond the fitted runs (held-out checks, `scaling predict`).

Compute-optimal predictions for requested budgets come from approach 3 in closed form and
from approaches 2 and 1 by extrapolating their N_opt and D_opt power laws. The predicted loss
is the approach-3 law at each approach's allocation (a pure power law through a few frontier
points ignores the irreducible loss and undershoots E within a few decades). Budgets are
6·N·D FLOPs.

Typical use::

    data = results.read_results("results.csv")
    report = fit_all(data, budgets=[1e21, 1e23], n_bootstrap=100)
    output.write_fit(report, "fit/")          # fit.json and the plots
    print(output.format_report(report))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bigmodel.scaling import backtest as backtest_lib
from bigmodel.scaling.holdout import HoldoutCheck
from bigmodel.scaling.laws import (
    Approach3Fit,
    Bootstrap,
    ComputeOptimal,
    bootstrap_approach3,
    fit_approach3,
    hoffmann_grid,
    small_grid,
)
from bigmodel.scaling.powerlaws import (
    DEFAULT_FLOPS_RTOL,
    Approach1Fit,
    Approach2Fit,
    KaplanFit,
    fit_approach1,
    fit_approach2,
    fit_kaplan,
)
from bigmodel.scaling.results import NotSupported, ScalingData

# Approach-3 starting grids by name: Hoffmann et al.'s 4,500 points, or 32 corners of it for a quick look.
STARTS: dict[str, Callable[[], np.ndarray]] = {"hoffmann": hoffmann_grid, "small": small_grid}


@dataclasses.dataclass
class FitReport:
    """All fits on one table; fits that the data did not support hold the reason instead."""

    data: ScalingData
    approach3: Approach3Fit
    bootstrap: Bootstrap | None
    approach2: Approach2Fit | str
    approach1: Approach1Fit | str
    kaplan: dict[str, KaplanFit | str]
    budgets: np.ndarray
    plots: dict[str, str] = dataclasses.field(default_factory=dict)
    holdout: HoldoutCheck | None = None  # predictions for runs left out of the fit (holdout.py)
    backtest: backtest_lib.Backtest | str | None = None  # refits on the lower budgets (backtest.py), or why none

    def allocators(self) -> dict[str, ComputeOptimal]:
        """The fitted laws that allocate a compute budget, by approach: approach 3 always, 2 and 1 when fitted."""
        laws: dict[str, ComputeOptimal] = {"approach3": self.approach3}
        laws.update((k, v) for k, v in (("approach2", self.approach2), ("approach1", self.approach1))
                    if not isinstance(v, str))
        return laws

    def predictions(self) -> list[dict[str, Any]]:
        """Compute-optimal N, D and loss per requested budget, from every available approach."""
        out = []
        for i, c in enumerate(self.budgets):
            row: dict[str, Any] = {"flops": float(c)}
            for name, law in self.allocators().items():
                n_opt, d_opt, _ = law.optimal(c)
                # Every approach's loss is the approach-3 law at that approach's allocation:
                # extrapolating a pure power law through a few frontier points ignores the
                # irreducible loss and falls below E within a few decades.
                row[name] = {"params": float(n_opt), "tokens": float(d_opt),
                             "loss": float(self.approach3.predict(n_opt, d_opt))}
            if self.bootstrap is not None and self.bootstrap.samples["E"].size:
                ci = self.bootstrap.ci95()
                row["approach3"]["ci95"] = {k: ci[f"{k}_opt[{i}]"]
                                            for k in ("params", "tokens", "loss")}
            out.append(row)
        return out


def default_budgets(data: ScalingData) -> np.ndarray:
    """Powers of ten from the largest run's compute up to 1000 times it."""
    top = math.ceil(math.log10(float(data.flops.max())))
    return 10.0 ** np.arange(top, top + 4)


def fit_all(data: ScalingData, budgets: Sequence[float] | None = None, n_bootstrap: int = 100,
            seed: int = 0, starts: np.ndarray | None = None,
            flops_rtol: float = DEFAULT_FLOPS_RTOL, progress: bool = False) -> FitReport:
    """Every fit the data supports, plus compute-optimal predictions for the budgets."""
    budgets = default_budgets(data) if budgets is None else np.asarray(budgets, float)
    approach3 = fit_approach3(data, starts=starts, progress=progress)
    boot = None
    if n_bootstrap > 0:
        boot = bootstrap_approach3(data, approach3, n_bootstrap, seed, budgets, progress)

    def attempt(fn: Any, *args: Any) -> Any:
        """fn(*args), or the reason it is not supported."""
        try:
            return fn(*args)
        except NotSupported as e:
            return str(e)

    return FitReport(
        data=data, approach3=approach3, bootstrap=boot,
        approach2=attempt(fit_approach2, data, flops_rtol),
        approach1=attempt(fit_approach1, data),
        kaplan={v: attempt(fit_kaplan, data, v) for v in ("params", "tokens", "flops")},
        budgets=budgets,
        # Refits from the law's own optimum plus 32 corners of the grid, as the bootstrap's.
        backtest=backtest_lib.run(data, np.vstack([approach3.theta()[None], small_grid()]), flops_rtol))
