"""The parametric law L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3): its fit and bootstrap.

Hoffmann et al. 2022 minimise the summed Huber loss (delta 1e-3) of log-space residuals with
L-BFGS-B from their grid of 4,500 starts; bootstrap resamples of the runs give standard
errors and 95% intervals. A fitted `Approach3Fit` evaluates the loss at any (N, D)
(`predict`) and the compute-optimal allocation of any budget C = 6·N·D in closed form
(`optimal`): N_opt = G (C/6)^(beta/(alpha+beta)) with G = (alpha A/(beta B))^(1/(alpha+beta)).
Every fitted law of this package that allocates compute (approaches 1, 2 and 3) has the same
`optimal(C) -> (N_opt, D_opt, loss)`, the `ComputeOptimal` protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from scipy import optimize

from bigmodel.scaling.results import ScalingData, ScalingDataError, n_distinct

HUBER_DELTA = 1e-3
APPROACH3_PARAMS = ("E", "A", "B", "alpha", "beta")
MIN_POINTS_APPROACH3 = 6  # five free parameters; 20 or more runs give usable intervals


class ComputeOptimal(Protocol):
    """A fitted law that allocates compute: approaches 1, 2 and 3."""

    def optimal(self, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N_opt, D_opt, loss) for budgets C = 6·N·D."""
        ...


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

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Approach3Fit:
        """The law recorded as fit.json's 'approach3' entry, ready to evaluate."""
        return cls(**{k: float(entry[k]) for k in APPROACH3_PARAMS}, objective=float(entry["objective"]),
                   n_points=int(entry["n_points"]), n_starts=int(entry["n_starts"]))


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
        if n_distinct(values) < 2:
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


def replicate_losses(replicates: Mapping[str, np.ndarray], params: np.ndarray,
                     tokens: np.ndarray) -> np.ndarray:
    """Loss of every bootstrap replicate law at each (N, D): shape (replicates, points)."""
    r = {k: np.asarray(replicates[k], float)[:, None] for k in APPROACH3_PARAMS}
    n, d = np.asarray(params, float)[None], np.asarray(tokens, float)[None]
    return r["E"] + r["A"] / n ** r["alpha"] + r["B"] / d ** r["beta"]


def loss_intervals(losses: np.ndarray, log_residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% intervals per point from replicate losses (replicates, points): (ci95, pi95), each (points, 2).

    ci95 is the spread of the law itself (the bootstrap percentiles); pi95, the interval a new
    run's measurement should fall in, also carries the scatter of the fitted runs about the law:
    every replicate's prediction times exp(-r) for every log residual r = log(L_fit / L_run).
    """
    ci = np.percentile(losses, [2.5, 97.5], axis=0).T
    scatter = np.exp(-np.asarray(log_residuals, float))
    combined = losses[:, None, :] * scatter[None, :, None]  # (replicates, residuals, points)
    pi = np.percentile(combined.reshape(-1, losses.shape[1]), [2.5, 97.5], axis=0).T
    return ci, pi


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
        if n_distinct(sample.params) < 2 or n_distinct(sample.tokens) < 2:
            failed += 1
            continue
        objective = _HuberLogObjective(sample.params, sample.tokens, sample.loss, fit.delta)
        try:
            theta, value = _minimise(objective, starts)
        except ScalingDataError:
            failed += 1
            continue
        try:
            f = _fit_from_theta(theta, value, len(sample), len(starts), fit.delta)
        except OverflowError:  # a refit that ran off to an unbounded A, B or E (a few runs, one N or D)
            failed += 1
            continue
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
# Progress of long fits
# --------------------------------------------------------------------------------------------


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
