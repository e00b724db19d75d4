"""Out-of-sample checks: hold runs out by a rule, fit the rest, compare each prediction with its measurement.

    rule = parse_rule("largest:3")
    used, held = split(data, rule)
    report = fit.fit_all(used, n_bootstrap=100)
    report.holdout = check(report, held, rule)

Each rule answers a different question about the law:

    largest:K        the K runs with the most compute: does the law extrapolate to the next budget?
    params-above:N   every run with more than N parameters: does it predict larger models?
    tokens-above:D   every run trained on more than D tokens: does it predict longer training?

For every held-out run the check gives the approach-3 prediction with two bootstrap intervals
(laws.loss_intervals: ci95 for the law, pi95 for a new run's measurement) and, where the used
runs support its fit, the prediction of Kaplan et al.'s joint form L(N, D) =
((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D (powerlaws.fit_kaplan_nd; no irreducible term).
Errors are signed (predicted - measured) and relative to the measurement; the summary is the
median absolute relative error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from bigmodel.scaling.backtest import Backtest
from bigmodel.scaling.laws import MIN_POINTS_APPROACH3, approach3_residuals, loss_intervals, replicate_losses
from bigmodel.scaling.powerlaws import KaplanNDFit, fit_kaplan_nd
from bigmodel.scaling.results import NotSupported, ScalingData, ScalingDataError

if TYPE_CHECKING:
    from bigmodel.scaling.fit import FitReport

RULES = {
    "largest": "the K runs with the most compute (does the law extrapolate to the next budget?)",
    "params-above": "every run with more than N parameters (does it predict larger models?)",
    "tokens-above": "every run trained on more than D tokens (does it predict longer training?)",
}
RULE_HELP = ("hold runs out of the fit and report predicted against measured loss for each: "
             + "; ".join(f"{k}:{x} holds out {RULES[k]}"
                         for k, x in (("largest", "K"), ("params-above", "N"), ("tokens-above", "D"))))


@dataclasses.dataclass(frozen=True)
class HoldoutRule:
    """Which runs a fit leaves out: `kind` is a key of RULES, `value` its K or threshold."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{int(self.value) if self.kind == 'largest' else format(self.value, 'g')}"

    def held_out(self, data: ScalingData) -> np.ndarray:
        """Boolean mask of the runs this rule holds out."""
        if self.kind == "largest":
            mask = np.zeros(len(data), bool)
            mask[np.argsort(-data.flops, kind="stable")[: int(self.value)]] = True
            return mask
        column = data.params if self.kind == "params-above" else data.tokens
        return column > self.value


def parse_rule(text: str) -> HoldoutRule:
    """'largest:3', 'params-above:1e9' or 'tokens-above:2e10'; ValueError naming the fix otherwise."""
    kind, _, value = text.strip().partition(":")
    example = "write largest:3, params-above:1e9 or tokens-above:2e10"
    if kind not in RULES:
        raise ValueError(f"unknown hold-out rule {text!r}; {example}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"hold-out rule {text!r} needs a number after the colon; {example}") from None
    if not (math.isfinite(number) and number > 0) or (kind == "largest" and number != int(number)):
        raise ValueError(f"hold-out rule {text!r}: the value must be a positive "
                         f"{'whole number of runs' if kind == 'largest' else 'number'}; {example}")
    return HoldoutRule(kind, number)


def split(data: ScalingData, rule: HoldoutRule) -> tuple[ScalingData, ScalingData]:
    """(used, held out) by the rule; refuses a rule that holds out nothing or leaves too few runs."""
    mask = rule.held_out(data)
    held, used = int(mask.sum()), int((~mask).sum())
    if held == 0:
        raise ScalingDataError(f"{data.source}: --holdout {rule} holds out no run (largest params "
                               f"{data.params.max():.3g}, tokens {data.tokens.max():.3g}); lower the threshold.")
    if used < MIN_POINTS_APPROACH3:
        raise ScalingDataError(f"{data.source}: --holdout {rule} leaves {used} of {len(data)} runs to fit; approach 3 "
                               f"needs at least {MIN_POINTS_APPROACH3}. Raise the threshold or hold out fewer runs.")
    return data.subset(~mask), data.subset(mask)


@dataclasses.dataclass(frozen=True)
class HoldoutCheck:
    """Predictions of a fit for the runs it did not see, against their measured losses."""

    rule: HoldoutRule
    n_used: int
    held: ScalingData
    predicted: np.ndarray  # approach 3
    ci95: np.ndarray | None  # (runs, 2): interval of the law; None without a bootstrap
    pi95: np.ndarray | None  # (runs, 2): interval for a measurement
    kaplan: KaplanNDFit | str  # Kaplan's L(N, D) fitted to the used runs, or why there is none
    pi95_extrapolation: np.ndarray | None = None  # pi95 widened by the backtest's error per decade beyond the fit

    @property
    def signed_error(self) -> np.ndarray:
        """Predicted minus measured loss."""
        return self.predicted - self.held.loss

    @property
    def relative_error(self) -> np.ndarray:
        """Signed error over the measured loss."""
        return self.signed_error / self.held.loss

    @property
    def median_abs_relative_error(self) -> float:
        """The summary figure: median |predicted - measured| / measured."""
        return float(np.median(np.abs(self.relative_error)))

    def kaplan_predicted(self) -> np.ndarray | None:
        """Kaplan's L(N, D) at each held-out run (None when it was not fitted)."""
        if isinstance(self.kaplan, str):
            return None
        return self.kaplan.predict(self.held.params, self.held.tokens)

    def inside(self, interval: np.ndarray | None) -> np.ndarray | None:
        """Whether each measurement lies within an interval."""
        if interval is None:
            return None
        return (interval[:, 0] <= self.held.loss) & (self.held.loss <= interval[:, 1])

    def _intervals(self) -> tuple[tuple[str, np.ndarray | None], ...]:
        return ("ci95", self.ci95), ("pi95", self.pi95), ("pi95_extrapolation", self.pi95_extrapolation)

    def to_json(self) -> dict[str, Any]:
        """The fit.json 'holdout' entry: the rule, one record per held-out run, the summary."""
        kaplan = self.kaplan_predicted()
        runs = []
        for i in range(len(self.held)):
            run: dict[str, Any] = {
                "params": self.held.params[i], "tokens": self.held.tokens[i], "flops": self.held.flops[i],
                "measured": self.held.loss[i], "predicted": self.predicted[i],
                "signed_error": self.signed_error[i], "relative_error": self.relative_error[i]}
            for name, interval in self._intervals():
                if interval is not None:
                    run[name] = list(interval[i])
                    run[f"inside_{name}"] = bool(self.inside(interval)[i])
            if kaplan is not None:
                run["kaplan_predicted"] = kaplan[i]
                run["kaplan_relative_error"] = (kaplan[i] - self.held.loss[i]) / self.held.loss[i]
            runs.append(run)
        out: dict[str, Any] = {
            "rule": str(self.rule), "question": RULES[self.rule.kind], "n_used": self.n_used,
            "n_held_out": len(self.held), "runs": runs,
            "median_abs_relative_error": self.median_abs_relative_error,
            "intervals": ("ci95: 2.5-97.5 percentiles of the bootstrap laws' predictions; pi95: the same "
                          "with the fitted runs' log residuals added (where a new run's measurement should fall); "
                          "pi95_extrapolation: pi95 widened by the backtest's error per decade of compute beyond "
                          "the fitted runs (fit.json 'backtest')"),
        }
        for name, interval in self._intervals():
            if interval is not None:
                out[f"fraction_inside_{name}"] = float(np.mean(self.inside(interval)))
        if kaplan is not None:
            k = self.kaplan
            out["kaplan"] = {"law": "L(N, D) = ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D", "N_c": k.n_c,
                             "D_c": k.d_c, "alpha_N": k.alpha_n, "alpha_D": k.alpha_d,
                             "rms_log_residual": k.rms_log_residual,
                             "median_abs_relative_error": float(np.median(np.abs(kaplan / self.held.loss - 1)))}
        else:
            out["kaplan"] = {"skipped": self.kaplan}
        return out


def check(report: FitReport, held: ScalingData, rule: HoldoutRule) -> HoldoutCheck:
    """Predict the held-out runs from a report fitted on the others."""
    predicted = report.approach3.predict(held.params, held.tokens)
    ci = pi = widened = None
    boot = report.bootstrap
    if boot is not None and boot.samples["E"].size:
        losses = replicate_losses(boot.samples, held.params, held.tokens)
        ci, pi = loss_intervals(losses, approach3_residuals(report.data, report.approach3))
        if isinstance(report.backtest, Backtest):
            widened = report.backtest.widen(pi, Backtest.decades(held.flops, report.data))
    try:
        kaplan: KaplanNDFit | str = fit_kaplan_nd(report.data)
    except NotSupported as e:
        kaplan = str(e)
    return HoldoutCheck(rule=rule, n_used=len(report.data), held=held, predicted=predicted, ci95=ci, pi95=pi,
                        kaplan=kaplan, pi95_extrapolation=widened)


def format_check(c: HoldoutCheck) -> str:
    """The hold-out table for the terminal."""
    kaplan = c.kaplan_predicted()
    lines = [(f"Hold-out check ({c.rule}: {RULES[c.rule.kind]}): fitted on {c.n_used} runs, predicting "
              f"{len(c.held)}"),
             f"  {'params':>9} {'tokens':>9} {'flops':>9} {'measured':>9} {'predicted':>9} {'error':>8} "
             f"{'rel.':>7}  {'95% interval (run)':<19} in  {'with backtest':<19} in"
             + (f" {'Kaplan L(N,D)':>13}" if kaplan is not None else "")]
    inside, inside_wide = c.inside(c.pi95), c.inside(c.pi95_extrapolation)

    def cell(interval: np.ndarray | None, within: np.ndarray | None, i: int) -> str:
        if interval is None:
            return f"{'-':<19} {'-':<3}"
        return f"{f'[{interval[i, 0]:.4f}, {interval[i, 1]:.4f}]':<19} {'yes' if within[i] else 'NO':<3}"

    for i in range(len(c.held)):
        line = (f"  {c.held.params[i]:>9.3g} {c.held.tokens[i]:>9.3g} {c.held.flops[i]:>9.3g} "
                f"{c.held.loss[i]:>9.4f} {c.predicted[i]:>9.4f} {c.signed_error[i]:>+8.4f} "
                f"{100 * c.relative_error[i]:>+6.2f}%  {cell(c.pi95, inside, i)} "
                f"{cell(c.pi95_extrapolation, inside_wide, i)}")
        if kaplan is not None:
            line += f" {kaplan[i]:>13.4f}"
        lines.append(line)
    summary = f"  median |relative error| {100 * c.median_abs_relative_error:.2f}%"
    if inside is not None:
        summary += f"; {int(inside.sum())}/{len(inside)} measurements inside the 95% interval for a run"
    if inside_wide is not None:
        summary += f" ({int(inside_wide.sum())}/{len(inside_wide)} inside it widened by the backtest)"
    if kaplan is not None:
        summary += (f"; Kaplan L(N, D) median |relative error| "
                    f"{100 * float(np.median(np.abs(kaplan / c.held.loss - 1))):.2f}%")
    else:
        summary += f"; Kaplan L(N, D): skipped ({c.kaplan})"
    return "\n".join([*lines, summary])
