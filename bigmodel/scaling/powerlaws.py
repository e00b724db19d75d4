"""Power laws through a sweep's frontier: Chinchilla approaches 1 and 2, and Kaplan et al. 2020 laws.

* Approach 2: runs grouped into isoFLOP budgets; per budget a parabola of loss in log N gives
  N_opt, then N_opt ~ C^a and D_opt = C/(6 N_opt) ~ C^b.
* Approach 1: the minimum-loss envelope over compute (lowest loss per compute bin, kept only where
  it improves on every cheaper bin); N and D of the envelope points as power laws of C.
* Kaplan et al. 2020 style: L(X) = (X_c/X)^alpha_X for X in N, D, C, each fitted to the lower
  envelope of loss over X. The pure power law has no irreducible term on purpose: with a
  handful of envelope points a third parameter is poorly determined, and approach 3 already
  estimates E. Read alpha_X as the local slope over the sampled range.

Each fit raises `NotSupported` with the reason when the data cannot carry it. Approaches 1
and 2 allocate a budget by extrapolating their N_opt and D_opt power laws
(`optimal(C) -> (N_opt, D_opt, loss)`, as laws.Approach3Fit does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from bigmodel.scaling.results import NotSupported, ScalingData, n_distinct

MIN_SIZES_PER_BUDGET = 3  # a parabola needs three distinct model sizes
MIN_BUDGETS = 3  # a power law through two points has no check on it
MIN_ENVELOPE_POINTS = 3
MIN_SPREAD = 4.0  # envelope fits need x to span at least this factor
DEFAULT_FLOPS_RTOL = 0.1
DEFAULT_BIN_FACTOR = 1.5  # approach-1 / Kaplan bins: each spans at most this factor in x


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coef * x^exponent, fitted by least squares in log-log space."""

    coef: float
    exponent: float
    exponent_se: float  # OLS standard error; NaN with two points
    n_points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        """Evaluate the law."""
        return self.coef * np.asarray(x, float) ** self.exponent


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least-squares fit of log y = log coef + exponent log x."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise NotSupported("a power law needs at least 2 distinct x values")
    (slope, intercept), residuals, *_ = np.polyfit(lx, ly, 1, full=True)
    n = len(lx)
    if n > 2:
        sigma2 = float(residuals[0]) / (n - 2) if len(residuals) else 0.0
        se = math.sqrt(sigma2 / float(np.sum((lx - lx.mean()) ** 2)))
    else:
        se = math.nan
    return PowerLaw(coef=math.exp(intercept), exponent=float(slope), exponent_se=se, n_points=n)


def group_by_flops(flops: np.ndarray, rtol: float = DEFAULT_FLOPS_RTOL) -> list[np.ndarray]:
    """Split runs into compute groups: sorted by flops, a new group starts after a gap > rtol."""
    order = np.argsort(flops, kind="stable")
    c = flops[order]
    breaks = np.flatnonzero(c[1:] > c[:-1] * (1.0 + rtol)) + 1
    return [order[g] for g in np.split(np.arange(len(c)), breaks)]


def _anchored_bins(x: np.ndarray, factor: float) -> list[np.ndarray]:
    """Split runs into bins in x, each starting at its smallest x and spanning at most factor."""
    order = np.argsort(x, kind="stable")
    bins, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or x[order[i]] > x[order[start]] * factor:
            bins.append(order[start:i])
            start = i
    return bins


def lower_envelope(x: np.ndarray, loss: np.ndarray,
                   factor: float = DEFAULT_BIN_FACTOR) -> np.ndarray:
    """Indices of the lowest-loss run per x bin, kept only where loss beats all smaller-x bins."""
    keep, best = [], math.inf
    for members in _anchored_bins(x, factor):
        i = members[np.argmin(loss[members])]
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.asarray(keep, dtype=int)


def _require_spread(x: np.ndarray, what: str) -> None:
    """Refuse envelope fits with too few points or too narrow a range."""
    if len(x) < MIN_ENVELOPE_POINTS:
        raise NotSupported(f"the lower envelope of loss over {what} has {len(x)} point(s); "
                           f"at least {MIN_ENVELOPE_POINTS} are needed")
    spread = float(np.max(x) / np.min(x))
    if spread < MIN_SPREAD:
        raise NotSupported(f"the envelope spans only a factor {spread:.2g} in {what}; "
                           f"at least {MIN_SPREAD:g} is needed")


@dataclasses.dataclass(frozen=True)
class IsoflopBudget:
    """One isoFLOP group and the minimum of its parabola."""

    flops: float  # geometric mean of the group's compute
    members: np.ndarray  # row indices
    coeffs: tuple[float, float, float]  # loss = c0 (log N)^2 + c1 log N + c2
    params_opt: float
    tokens_opt: float
    loss_opt: float


@dataclasses.dataclass(frozen=True)
class Approach2Fit:
    """IsoFLOP parabola minima and the power laws through them."""

    budgets: list[IsoflopBudget]
    excluded: list[dict[str, Any]]  # groups not used and why
    params_law: PowerLaw  # N_opt = k C^a
    tokens_law: PowerLaw  # D_opt = k C^b
    loss_law: PowerLaw  # L_opt = k C^-gamma, the loss at the parabola minima
    rtol: float

    def optimal(self, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Extrapolated (N_opt, D_opt, loss) for budgets C."""
        n_opt = self.params_law(flops)
        return n_opt, np.asarray(flops, float) / (6.0 * n_opt), self.loss_law(flops)


def fit_approach2(data: ScalingData, rtol: float = DEFAULT_FLOPS_RTOL) -> Approach2Fit:
    """Chinchilla approach 2: parabola minima of loss in log N per isoFLOP budget, then power laws."""
    budgets, excluded = [], []
    for members in group_by_flops(data.flops, rtol):
        c = data.flops[members]
        budget = float(np.exp(np.mean(np.log(c))))
        n_sizes = n_distinct(data.params[members])
        if n_sizes < MIN_SIZES_PER_BUDGET:
            if n_sizes > 1:
                excluded.append({"flops": budget, "runs": len(members),
                                 "reason": f"{n_sizes} distinct sizes; a parabola needs "
                                           f"{MIN_SIZES_PER_BUDGET}"})
            continue
        span = float(c.max() / c.min())
        if span > (1.0 + rtol) ** 2:
            excluded.append({"flops": budget, "runs": len(members),
                             "reason": f"compute in the group spans a factor {span:.3g}, more "
                                       f"than an isoFLOP group may ({(1 + rtol) ** 2:.3g})"})
            continue
        log_n = np.log(data.params[members])
        c0, c1, c2 = np.polyfit(log_n, data.loss[members], 2)
        if c0 <= 0:
            excluded.append({"flops": budget, "runs": len(members),
                             "reason": "the parabola opens downward (no minimum)"})
            continue
        log_n_opt = -c1 / (2 * c0)
        if not log_n.min() <= log_n_opt <= log_n.max():
            excluded.append({"flops": budget, "runs": len(members),
                             "reason": "the parabola minimum lies outside the sampled sizes"})
            continue
        n_opt = math.exp(log_n_opt)
        budgets.append(IsoflopBudget(
            flops=budget, members=members, coeffs=(float(c0), float(c1), float(c2)),
            params_opt=n_opt, tokens_opt=budget / (6.0 * n_opt),
            loss_opt=float(np.polyval((c0, c1, c2), log_n_opt))))
    if len(budgets) < MIN_BUDGETS:
        found = f"found {len(budgets)} usable isoFLOP budget(s)"
        if excluded:
            found += f" ({len(excluded)} more group(s) excluded, e.g. {excluded[0]['reason']})"
        raise NotSupported(
            f"{found}; approach 2 needs at least {MIN_BUDGETS} groups of runs sharing a compute "
            f"budget (flops within {rtol:.0%} of each other), each with "
            f"{MIN_SIZES_PER_BUDGET}+ distinct model sizes")
    c = np.array([b.flops for b in budgets])
    return Approach2Fit(
        budgets=budgets, excluded=excluded,
        params_law=fit_power_law(c, np.array([b.params_opt for b in budgets])),
        tokens_law=fit_power_law(c, np.array([b.tokens_opt for b in budgets])),
        loss_law=fit_power_law(c, np.array([b.loss_opt for b in budgets])),
        rtol=rtol)


@dataclasses.dataclass(frozen=True)
class Approach1Fit:
    """Minimum-loss envelope over compute and the power laws of its N and D."""

    envelope: np.ndarray  # row indices, increasing compute
    params_law: PowerLaw
    tokens_law: PowerLaw
    loss_law: PowerLaw

    def optimal(self, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Extrapolated (N_opt, D_opt, loss) for budgets C."""
        return self.params_law(flops), self.tokens_law(flops), self.loss_law(flops)


def fit_approach1(data: ScalingData, bin_factor: float = DEFAULT_BIN_FACTOR) -> Approach1Fit:
    """Chinchilla approach 1 on final losses: N and D of the min-loss envelope as powers of C."""
    env = lower_envelope(data.flops, data.loss, bin_factor)
    _require_spread(data.flops[env], "compute")
    c = data.flops[env]
    return Approach1Fit(envelope=env, params_law=fit_power_law(c, data.params[env]),
                        tokens_law=fit_power_law(c, data.tokens[env]),
                        loss_law=fit_power_law(c, data.loss[env]))


@dataclasses.dataclass(frozen=True)
class KaplanFit:
    """L(X) = (X_c / X)^alpha fitted to the lower envelope of loss over X."""

    variable: str  # 'params', 'tokens' or 'flops'
    alpha: float
    x_c: float
    alpha_se: float
    envelope: np.ndarray

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        """Evaluate the law."""
        return (self.x_c / np.asarray(x, float)) ** self.alpha


def fit_kaplan(data: ScalingData, variable: str,
               bin_factor: float = DEFAULT_BIN_FACTOR) -> KaplanFit:
    """Kaplan-style pure power law of loss in one of params, tokens, flops."""
    x = getattr(data, variable)
    env = lower_envelope(x, data.loss, bin_factor)
    _require_spread(x[env], variable)
    law = fit_power_law(x[env], data.loss[env])
    alpha = -law.exponent
    if alpha <= 0:
        raise NotSupported(f"loss does not fall with {variable} along the envelope")
    # log L = alpha log X_c - alpha log X  =>  X_c = coef^(1/alpha)
    return KaplanFit(variable=variable, alpha=alpha, x_c=law.coef ** (1.0 / alpha),
                     alpha_se=law.exponent_se, envelope=env)



@dataclasses.dataclass(frozen=True)
class KaplanNDFit:
    """Kaplan et al. 2020 eq. 1.5: L(N, D) = ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D, fitted to every run."""

    n_c: float
    d_c: float
    alpha_n: float
    alpha_d: float
    rms_log_residual: float
    n_points: int

    def predict(self, params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray:
        """Loss at (N, D)."""
        n, d = np.asarray(params, float), np.asarray(tokens, float)
        return ((self.n_c / n) ** (self.alpha_n / self.alpha_d) + self.d_c / d) ** self.alpha_d


def _kaplan_nd_log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log L of eq. 1.5 at theta = (log N_c, log D_c, alpha_N, alpha_D)."""
    log_nc, log_dc, alpha_n, alpha_d = theta
    return alpha_d * np.logaddexp(alpha_n / alpha_d * (log_nc - log_n), log_dc - log_d)


def fit_kaplan_nd(data: ScalingData) -> KaplanNDFit:
    """Least squares of log residuals of Kaplan's L(N, D) from a small grid of starts."""
    import itertools

    from scipy import optimize

    if len(data) < 5 or n_distinct(data.params) < 2 or n_distinct(data.tokens) < 2:
        raise NotSupported("Kaplan's L(N, D) fits 4 parameters: it needs 5 or more runs over 2+ sizes and budgets")
    log_n, log_d, log_l = np.log(data.params), np.log(data.tokens), np.log(data.loss)
    best = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for a_n, a_d, k_n, k_d in itertools.product((0.05, 0.15, 0.4), (0.05, 0.15, 0.4), (3, 10), (3, 10)):
            start = np.array([log_n.max() + k_n, log_d.max() + k_d, a_n, a_d])
            res = optimize.least_squares(lambda t: _kaplan_nd_log_loss(t, log_n, log_d) - log_l, start,
                                         bounds=([-np.inf, -np.inf, 1e-4, 1e-4], np.inf))
            if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
                best = res
    if best is None:
        raise NotSupported("Kaplan's L(N, D): the optimiser found no finite solution")
    log_nc, log_dc, alpha_n, alpha_d = (float(v) for v in best.x)
    return KaplanNDFit(n_c=math.exp(log_nc), d_c=math.exp(log_dc), alpha_n=alpha_n, alpha_d=alpha_d,
                       rms_log_residual=float(np.sqrt(np.mean(best.fun ** 2))), n_points=len(data))
