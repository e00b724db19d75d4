"""Scaling-law fits on a results table: Chinchilla approaches 1, 2 and 3, and Kaplan power laws.

Input is any CSV with columns ``params`` (N, parameters), ``tokens`` (D, training tokens) and
``loss`` (final validation loss); ``flops`` (C) is optional and defaults to 6·N·D.

Fits, each recorded only when the data supports it (otherwise with the reason it was skipped):

* Approach 3 (Hoffmann et al. 2022): L(N, D) = E + A/N^alpha + B/D^beta, minimising the summed
  Huber loss (delta 1e-3) of log-space residuals with L-BFGS-B from their grid of 4,500 starts,
  with bootstrap standard errors and 95% intervals. Always fitted; too little data is an error.
* Approach 2: runs grouped into isoFLOP budgets; per budget a parabola of loss in log N gives
  N_opt, then N_opt ~ C^a and D_opt = C/(6 N_opt) ~ C^b.
* Approach 1: the minimum-loss envelope over compute (lowest loss per compute bin, kept only where
  it improves on every cheaper bin); N and D of the envelope points as power laws of C.
* Kaplan et al. 2020 style: L(X) = (X_c/X)^alpha_X for X in N, D, C, each fitted to the lower
  envelope of loss over X. The pure power law has no irreducible term on purpose: with a
  handful of envelope points a third parameter is poorly determined, and approach 3 already
  estimates E. Read alpha_X as the local slope over the sampled range.

Compute-optimal predictions for requested budgets come from approach 3 in closed form,
N_opt = G (C/6)^(beta/(alpha+beta)) with G = (alpha A/(beta B))^(1/(alpha+beta)), and from
approaches 2 and 1 by extrapolating their N_opt and D_opt power laws. The predicted loss is the
approach-3 law at each approach's allocation (a pure power law through a few frontier points
ignores the irreducible loss and undershoots E within a few decades). Budgets are 6·N·D FLOPs.

Typical use::

    data = read_results("results.csv")
    report = fit_all(data, budgets=[1e21, 1e23], n_bootstrap=100)
    print(format_report(report))
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

REQUIRED_COLUMNS = ("params", "tokens", "loss")
OPTIONAL_COLUMNS = ("flops",)
HUBER_DELTA = 1e-3
APPROACH3_PARAMS = ("E", "A", "B", "alpha", "beta")
MIN_POINTS_APPROACH3 = 6  # five free parameters; 20 or more runs give usable intervals
MIN_SIZES_PER_BUDGET = 3  # a parabola needs three distinct model sizes
MIN_BUDGETS = 3  # a power law through two points has no check on it
MIN_ENVELOPE_POINTS = 3
MIN_SPREAD = 4.0  # envelope fits need x to span at least this factor
DEFAULT_FLOPS_RTOL = 0.1
DEFAULT_BIN_FACTOR = 1.5  # approach-1 / Kaplan bins: each spans at most this factor in x


class ScalingDataError(ValueError):
    """The results table cannot be fitted; the message names the problem and the fix."""


class NotSupported(Exception):
    """The data does not support an optional fit; the message says why."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScalingData:
    """One row per training run: parameters N, tokens D, compute C and final loss L."""

    params: np.ndarray  # N, float64
    tokens: np.ndarray  # D
    flops: np.ndarray  # C; 6·N·D where the table had no flops column
    loss: np.ndarray  # L
    flops_source: str = "6ND"  # 'column' or '6ND'
    source: str = "<arrays>"

    def __len__(self) -> int:
        """Number of runs."""
        return int(self.loss.shape[0])

    def subset(self, index: np.ndarray | Sequence[int]) -> ScalingData:
        """Rows selected by an index array or boolean mask."""
        index = np.asarray(index)
        return dataclasses.replace(
            self,
            params=self.params[index],
            tokens=self.tokens[index],
            flops=self.flops[index],
            loss=self.loss[index],
        )


def _as_float(text: str) -> float:
    """Parse one CSV cell; empty cells become NaN."""
    text = text.strip()
    if not text:
        return math.nan
    return float(text)


def _check_values(
    columns: Mapping[str, np.ndarray], source: str, row_numbers: np.ndarray | None = None
) -> None:
    """Refuse NaN, infinite and non-positive values, naming row and column."""
    problems = []
    for name, values in columns.items():
        for i in np.flatnonzero(~(np.isfinite(values) & (values > 0))):
            where = f"row {i + 1}" if row_numbers is None else (
                f"row {i + 1} (line {row_numbers[i]})")
            problems.append(f"{where}, column '{name}' = {float(values[i])!r}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ScalingDataError(
            f"{source}: every value of {', '.join(columns)} must be a finite positive number, "
            f"but found NaN, infinite, empty or non-positive values at {shown}{more}. "
            "Fix or remove those runs (a failed or unfinished run has no final loss).")


def _read_table(path: str | Path, wanted: Sequence[str], optional: Sequence[str] = (),
                hint: str = "") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read named numeric columns of a CSV; returns the columns and each row's file line."""
    path = Path(path)
    if not path.is_file():
        raise ScalingDataError(f"{path}: no such file. Pass the results CSV written by a sweep.")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ScalingDataError(
                f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; found "
                f"{', '.join(repr(h) for h in header) or 'no header'}. The fitter needs "
                f"{', '.join(wanted)}{' (' + ', '.join(optional) + ' optional)' if optional else ''}"
                f". {hint}".rstrip())
        reader.fieldnames = header
        present = [c for c in optional if c in header]
        values: dict[str, list[float]] = {c: [] for c in (*wanted, *present)}
        lines = []
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            lines.append(reader.line_num)
            row_index = len(lines)
            for c in values:
                cell = row.get(c)
                try:
                    values[c].append(_as_float(cell or ""))
                except ValueError:
                    raise ScalingDataError(
                        f"{path}: row {row_index} (line {reader.line_num}), column '{c}': "
                        f"{cell!r} is not a number. Write plain numbers such as 1.2e9."
                    ) from None
    if not lines:
        raise ScalingDataError(f"{path}: the table has a header but no runs.")
    columns = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    return columns, np.asarray(lines)


def from_arrays(params: Iterable[float], tokens: Iterable[float], loss: Iterable[float],
                flops: Iterable[float] | None = None, source: str = "<arrays>") -> ScalingData:
    """Validated ScalingData from arrays; flops default to 6·N·D."""
    columns = {"params": np.asarray(params, dtype=np.float64),
               "tokens": np.asarray(tokens, dtype=np.float64),
               "loss": np.asarray(loss, dtype=np.float64)}
    if flops is not None:
        columns["flops"] = np.asarray(flops, dtype=np.float64)
    return _make_data(columns, source)


def _make_data(columns: dict[str, np.ndarray], source: str,
               row_numbers: np.ndarray | None = None) -> ScalingData:
    """Check values and assemble ScalingData."""
    shapes = {c: v.shape for c, v in columns.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ScalingDataError(f"{source}: columns must be 1-D and of equal length, got {shapes}.")
    _check_values(columns, source, row_numbers)
    has_flops = "flops" in columns
    return ScalingData(
        params=columns["params"], tokens=columns["tokens"], loss=columns["loss"],
        flops=columns["flops"] if has_flops else 6.0 * columns["params"] * columns["tokens"],
        flops_source="column" if has_flops else "6ND", source=source)


def read_results(path: str | Path) -> ScalingData:
    """Read a results CSV with columns params, tokens, loss (flops optional).

    With a params_active column (mixtures of experts: the parameters one token uses) N is
    that column rather than params.
    """
    columns, lines = _read_table(
        path, REQUIRED_COLUMNS, (*OPTIONAL_COLUMNS, "params_active"),
        hint="Rename the columns, or read other layouts with an adapter such as "
             "read_chinchilla_reference.")
    if "params_active" in columns:
        columns["params"] = columns.pop("params_active")
    return _make_data(columns, str(path), lines)


def read_chinchilla_reference(path: str | Path) -> ScalingData:
    """Adapter for the digitised Chinchilla Figure 4 runs ('Model Size', 'Training FLOP', 'loss')."""
    columns, lines = _read_table(path, ("Model Size", "Training FLOP", "loss"))
    _check_values(columns, str(path), lines)
    n, c = columns["Model Size"], columns["Training FLOP"]
    return _make_data({"params": n, "tokens": c / (6.0 * n), "loss": columns["loss"], "flops": c},
                      str(path), lines)


def drop_highest_loss(data: ScalingData, k: int) -> ScalingData:
    """Data without its k highest-loss runs (Hoffmann et al. drop early-divergence outliers)."""
    if k <= 0:
        return data
    keep = np.sort(np.argsort(data.loss, kind="stable")[: max(len(data) - k, 0)])
    return data.subset(keep)


# --------------------------------------------------------------------------------------------
# Approach 3: L(N, D) = E + A/N^alpha + B/D^beta
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Approach3Fit:
    """Fitted parametric law L(N, D) = E + A/N^alpha + B/D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss of log residuals at the optimum
    n_points: int
    n_starts: int
    delta: float = HUBER_DELTA

    @property
    def a(self) -> float:
        """Exponent of N_opt ~ C^a, beta/(alpha+beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ~ C^b, alpha/(alpha+beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1/(alpha+beta)), so N_opt = G (C/6)^a."""
        if self.alpha <= 0 or self.beta <= 0:  # no compute-optimal split (and no real power of a negative)
            return math.nan
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def theta(self) -> np.ndarray:
        """Optimiser coordinates (log A, log B, log E, alpha, beta)."""
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E),
                         self.alpha, self.beta])

    def predict(self, params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Predicted loss at (N, D)."""
        params, tokens = np.asarray(params, float), np.asarray(tokens, float)
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compute-optimal (N_opt, D_opt, loss) for budgets C = 6·N·D."""
        c6 = np.asarray(flops, float) / 6.0
        n_opt = self.G * c6**self.a
        d_opt = c6**self.b / self.G
        return n_opt, d_opt, self.predict(n_opt, d_opt)


def hoffmann_grid() -> np.ndarray:
    """The 4,500 starts of Hoffmann et al.: rows (a, b, e, alpha, beta) with A=e^a, B=e^b, E=e^e."""
    ab = np.arange(0.0, 26.0, 5.0)  # 0, 5, ..., 25
    e = np.arange(-1.0, 1.01, 0.5)  # -1, -0.5, ..., 1
    exps = np.arange(0.0, 2.01, 0.5)  # 0, 0.5, ..., 2
    return np.array(list(itertools.product(ab, ab, e, exps, exps)))


def small_grid() -> np.ndarray:
    """32 corner starts from Hoffmann's grid, for bootstrap refits and quick looks."""
    return np.array(list(itertools.product((5.0, 15.0), (5.0, 15.0), (-0.5, 0.5),
                                           (0.5, 1.0), (0.5, 1.0))))


class _HuberLogObjective:
    """Summed Huber loss of LSE(a - alpha x, b - beta y, e) - log L and its analytic gradient.

    The optimiser works in centred coordinates (a - alpha mean(x), b - beta mean(y), e, alpha,
    beta), the same function with the strong a-alpha and b-beta correlations removed, which
    cuts the L-BFGS iterations per start; starts and results are mapped to and from (a, b, ...).
    """

    def __init__(self, params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, delta: float):
        x, y = np.log(params), np.log(tokens)
        self.x_mean, self.y_mean = float(x.mean()), float(y.mean())
        self.x = x - self.x_mean
        self.y = y - self.y_mean
        self.log_loss = np.log(loss)
        self.delta = delta

    def to_centred(self, theta: np.ndarray) -> np.ndarray:
        """(a, b, e, alpha, beta) rows to centred coordinates."""
        t = np.array(theta, dtype=np.float64, copy=True)
        t[..., 0] -= t[..., 3] * self.x_mean
        t[..., 1] -= t[..., 4] * self.y_mean
        return t

    def from_centred(self, theta: np.ndarray) -> np.ndarray:
        """Centred coordinates back to (a, b, e, alpha, beta)."""
        t = np.array(theta, dtype=np.float64, copy=True)
        t[..., 0] += t[..., 3] * self.x_mean
        t[..., 1] += t[..., 4] * self.y_mean
        return t

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective value and gradient at centred coordinates theta."""
        a, b, e, alpha, beta = theta
        x, y, delta = self.x, self.y, self.delta
        u1 = a - alpha * x
        u2 = b - beta * y
        m = np.maximum(u1, u2)
        np.maximum(m, e, out=m)
        w1 = np.exp(u1 - m)
        w2 = np.exp(u2 - m)
        w3 = np.exp(e - m)
        s = w1 + w2
        s += w3
        r = np.log(s)
        r += m
        r -= self.log_loss
        c = np.clip(r, -delta, delta)  # Huber'(r)
        # Huber(r) = c^2/2 + delta (|r| - |c|) with c = clip(r, -delta, delta)
        value = 0.5 * (c @ c) + delta * (np.abs(r).sum() - np.abs(c).sum())
        c /= s  # chain rule through the log-sum-exp: d r / d u_k = w_k / s
        grad = np.array([c @ w1, c @ w2, c @ w3, -(w1 @ (c * x)), -(w2 @ (c * y))])
        return float(value), grad


def _minimise(objective: _HuberLogObjective, starts: np.ndarray, progress: bool = False,
              desc: str = "approach 3 starts") -> tuple[np.ndarray, float]:
    """Run L-BFGS-B from every start, then polish the best with tight tolerances."""
    best_x, best_f = None, math.inf
    iterator: Iterable[np.ndarray] = objective.to_centred(starts)
    if progress:
        iterator = _progress(iterator, desc=desc)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
            warnings.catch_warnings(), _single_threaded_blas():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x0 in iterator:
            res = optimize.minimize(objective, x0, jac=True, method="L-BFGS-B")
            if np.isfinite(res.fun) and res.fun < best_f:
                best_x, best_f = res.x, float(res.fun)
        if best_x is None:
            raise ScalingDataError("approach 3: the optimiser found no finite solution from any "
                                   "start; check the table for corrupted values.")
        res = optimize.minimize(objective, best_x, jac=True, method="L-BFGS-B",
                                options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
        if np.isfinite(res.fun) and res.fun <= best_f:
            best_x, best_f = res.x, float(res.fun)
    return objective.from_centred(best_x), best_f


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread: L-BFGS-B's tiny matrix ops run ~10x slower with a thread pool."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _check_approach3_data(data: ScalingData) -> None:
    """Refuse tables too small or too uniform to determine the five parameters."""
    if len(data) < MIN_POINTS_APPROACH3:
        raise ScalingDataError(
            f"{data.source}: approach 3 fits 5 parameters and needs at least "
            f"{MIN_POINTS_APPROACH3} runs, but the table has {len(data)}. Add runs "
            "(20 or more across several model sizes and token counts give usable intervals).")
    for name, values in (("params", data.params), ("tokens", data.tokens)):
        if _n_distinct(values) < 2:
            raise ScalingDataError(
                f"{data.source}: approach 3 needs at least 2 distinct values of {name}, but every "
                f"run has {name}={values[0]:.4g}. Vary {name} across runs.")


def fit_approach3(data: ScalingData, starts: np.ndarray | None = None,
                  delta: float = HUBER_DELTA, progress: bool = False) -> Approach3Fit:
    """Fit L = E + A/N^alpha + B/D^beta by Huber-in-log-space with L-BFGS-B from a grid of starts."""
    _check_approach3_data(data)
    starts = hoffmann_grid() if starts is None else np.atleast_2d(np.asarray(starts, float))
    objective = _HuberLogObjective(data.params, data.tokens, data.loss, delta)
    theta, value = _minimise(objective, starts, progress=progress)
    fit = _fit_from_theta(theta, value, len(data), len(starts), delta)
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ScalingDataError(
            f"{data.source}: the best approach-3 fit has alpha={fit.alpha:.3g}, beta={fit.beta:.3g}: over "
            "these runs the loss does not fall with both N and D. Add runs that span more sizes and budgets.")
    return fit


def _fit_from_theta(theta: np.ndarray, value: float, n_points: int, n_starts: int,
                    delta: float) -> Approach3Fit:
    """Approach3Fit from optimiser coordinates."""
    a, b, e, alpha, beta = (float(t) for t in theta)
    return Approach3Fit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                        objective=value, n_points=n_points, n_starts=n_starts, delta=delta)


def approach3_residuals(data: ScalingData, fit: Approach3Fit) -> np.ndarray:
    """log(L_pred) - log(L_obs) per run."""
    return np.log(fit.predict(data.params, data.tokens)) - np.log(data.loss)


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Bootstrap replicates of approach 3 and their summaries."""

    samples: dict[str, np.ndarray]  # name -> (n_ok,) replicate values
    n_resamples: int
    n_failed: int
    seed: int

    def se(self) -> dict[str, float]:
        """Standard error (sample standard deviation of the replicates)."""
        return {k: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                for k, v in self.samples.items()}

    def ci95(self) -> dict[str, list[float]]:
        """2.5 and 97.5 percentiles of the replicates."""
        return {k: [float(q) for q in np.percentile(v, [2.5, 97.5])] if len(v) else
                [math.nan, math.nan] for k, v in self.samples.items()}


def bootstrap_approach3(data: ScalingData, fit: Approach3Fit, n_resamples: int = 100,
                        seed: int = 0, budgets: Sequence[float] = (),
                        progress: bool = False) -> Bootstrap:
    """Resample runs with replacement and refit from the best start plus small_grid()."""
    rng = np.random.default_rng(seed)
    starts = np.vstack([fit.theta()[None], small_grid()])
    budgets = np.asarray(budgets, float)
    names = [*APPROACH3_PARAMS, "a", "b"]
    for i in range(len(budgets)):
        names += [f"params_opt[{i}]", f"tokens_opt[{i}]", f"loss_opt[{i}]"]
    rows, failed = [], 0
    iterator: Iterable[int] = range(n_resamples)
    if progress:
        iterator = _progress(iterator, desc="bootstrap", total=n_resamples)
    for _ in iterator:
        idx = rng.integers(0, len(data), len(data))
        sample = data.subset(idx)
        if _n_distinct(sample.params) < 2 or _n_distinct(sample.tokens) < 2:
            failed += 1
            continue
        objective = _HuberLogObjective(sample.params, sample.tokens, sample.loss, fit.delta)
        try:
            theta, value = _minimise(objective, starts)
        except ScalingDataError:
            failed += 1
            continue
        f = _fit_from_theta(theta, value, len(sample), len(starts), fit.delta)
        if f.alpha <= 0 or f.beta <= 0:  # a resample the law does not describe: counted as failed
            failed += 1
            continue
        row = [f.E, f.A, f.B, f.alpha, f.beta, f.a, f.b]
        if len(budgets):
            n_opt, d_opt, l_opt = f.optimal(budgets)
            row += list(np.column_stack([n_opt, d_opt, l_opt]).ravel())
        rows.append(row)
    table = np.asarray(rows, float).reshape(len(rows), len(names))
    return Bootstrap(samples={k: table[:, j] for j, k in enumerate(names)},
                     n_resamples=n_resamples, n_failed=failed, seed=seed)


# --------------------------------------------------------------------------------------------
# Power laws, envelopes, approaches 1 and 2, Kaplan
# --------------------------------------------------------------------------------------------


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


def _n_distinct(values: np.ndarray, rtol: float = 1e-6) -> int:
    """Number of distinct values up to a relative tolerance."""
    v = np.sort(np.asarray(values, float))
    if len(v) == 0:
        return 0
    return 1 + int(np.sum(np.diff(v) > rtol * np.abs(v[1:])))


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
        n_sizes = _n_distinct(data.params[members])
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


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


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

    def predictions(self) -> list[dict[str, Any]]:
        """Compute-optimal N, D and loss per requested budget, from every available approach."""
        out = []
        sources: list[tuple[str, Any]] = [("approach3", self.approach3)]
        sources += [(k, v) for k, v in (("approach2", self.approach2),
                                        ("approach1", self.approach1)) if not isinstance(v, str)]
        for i, c in enumerate(self.budgets):
            row: dict[str, Any] = {"flops": float(c)}
            for name, fit in sources:
                n_opt, d_opt, _ = fit.optimal(c)
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

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (written to fit.json)."""
        d, f3 = self.data, self.approach3
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
        })
        if self.bootstrap is not None:
            keys = [*APPROACH3_PARAMS, "a", "b"]
            se, ci = self.bootstrap.se(), self.bootstrap.ci95()
            a3["se"] = {k: se[k] for k in keys}
            a3["ci95"] = {k: ci[k] for k in keys}
            a3["bootstrap"] = {"n_resamples": self.bootstrap.n_resamples,
                               "n_failed": self.bootstrap.n_failed, "seed": self.bootstrap.seed,
                               "refit_starts": "best fit + small grid (32)"}
        else:
            a3["se"] = a3["ci95"] = None
            a3["bootstrap"] = {"skipped": "no resamples requested (--bootstrap 0)"}
        out: dict[str, Any] = {
            "input": {"source": d.source, "n_points": len(d), "flops": d.flops_source},
            "n_points": len(d),
            "approach3": a3,
            "approach2": _approach2_json(self.approach2),
            "approach1": _approach1_json(self.approach1, d),
            "kaplan": {k: _kaplan_json(v) for k, v in self.kaplan.items()},
            "predictions": self.predictions(),
            "predictions_note": "budgets are C = 6ND FLOPs; 'loss' is the approach-3 law "
                                "evaluated at each approach's (params, tokens)",
            "plots": dict(self.plots),
        }
        return _jsonable(out)


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
        budgets=budgets)


# --------------------------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------------------------


def format_report(report: FitReport) -> str:
    """Readable text summary of a FitReport."""
    d, f3, boot = report.data, report.approach3, report.bootstrap
    lines = [f"{d.source}: {len(d)} runs, N {d.params.min():.3g}..{d.params.max():.3g}, "
             f"D {d.tokens.min():.3g}..{d.tokens.max():.3g}, C {d.flops.min():.3g}.."
             f"{d.flops.max():.3g} FLOPs ({'flops column' if d.flops_source == 'column' else 'C = 6ND'})",
             "",
             "Approach 3: L(N, D) = E + A/N^alpha + B/D^beta",
             f"  Huber (delta={f3.delta:g}) in log space, L-BFGS-B from {f3.n_starts} starts; "
             f"objective {f3.objective:.6g}"]
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
        lines += ["", "Compute-optimal predictions (C = 6ND FLOPs; loss from the approach-3 "
                      "law at each allocation):",
                  f"  {'budget C':>9}  {'approach':<10}{'N_opt':>22}{'D_opt':>22}{'D/N':>9}"
                  f"{'loss':>17}"]
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


def _progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A tqdm bar on an interactive stderr, otherwise a line every 10 s (log-friendly)."""
    if total is None:
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False,
                    mininterval=0.5, dynamic_ncols=True)
    return _progress_lines(iterable, desc, total)


def _progress_lines(iterable: Iterable, desc: str, total: int,
                    every_s: float = 10.0) -> Iterator:
    """Yield from iterable, printing 'desc: i/total' to stderr every every_s seconds and at the end."""
    start = last = time.monotonic()
    for i, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or i == total:
            print(f"{desc}: {i}/{total} ({now - start:.0f} s)", file=sys.stderr, flush=True)
            last = now
