"""PNG plots of scaling fits: loss against compute, isoFLOP profiles, N_opt/D_opt, residuals.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module
never changes the backend of an interactive shell or notebook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from bigmodel.scaling.fit import FitReport
from bigmodel.scaling.laws import approach3_residuals

DPI = 130
LOSS_LABEL = "final validation loss (nats)"
FLOPS_LABEL = "training compute C (FLOPs)"


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    """A Figure on an Agg canvas with ncols axes."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    return fig, axes


def _plain_log_ticks(axis) -> None:
    """Label a log-scaled loss axis 2, 3, 4 rather than 2x10^0."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _compute_range(report: FitReport) -> np.ndarray:
    """Log-spaced compute grid covering the runs and the requested budgets."""
    c = np.concatenate([report.data.flops, report.budgets])
    return np.logspace(np.log10(c.min()) - 0.2, np.log10(c.max()) + 0.2, 200)


def plot_loss_vs_compute(report: FitReport, path: Path) -> None:
    """Every run's loss against compute, coloured by size, with the approach-3 frontier."""
    d, f3 = report.data, report.approach3
    fig, (ax,) = _figure(7.5, 5.0)
    sc = ax.scatter(d.flops, d.loss, c=d.params, norm=LogNorm(), cmap="viridis", s=18,
                    alpha=0.85, edgecolors="none", label="runs")
    fig.colorbar(sc, ax=ax, label="model size N (parameters)")
    cs = _compute_range(report)
    _, _, l_opt = f3.optimal(cs)
    ax.plot(cs, l_opt, color="black", lw=1.8,
            label=f"approach 3 frontier (E={f3.E:.3g}, a={f3.a:.3f})")
    ax.axhline(f3.E, color="grey", lw=1, ls=":", label=f"irreducible loss E = {f3.E:.3g}")
    if not isinstance(report.approach1, str):
        env = report.approach1.envelope
        ax.scatter(d.flops[env], d.loss[env], facecolors="none", edgecolors="tab:red", s=60,
                   lw=1.2, label="min-loss envelope (approach 1)")
    if len(report.budgets):
        _, _, lb = f3.optimal(report.budgets)
        ax.scatter(report.budgets, lb, marker="*", s=160, color="tab:orange",
                   edgecolors="black", lw=0.6, zorder=5, label="prediction at requested budgets")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(FLOPS_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    _plain_log_ticks(ax.yaxis)
    ax.set_title("Loss against compute with the compute-optimal frontier")
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path)


def plot_isoflops(report: FitReport, path: Path) -> None:
    """IsoFLOP profiles: loss against N per budget with the fitted parabola and its minimum."""
    d, a2 = report.data, report.approach2
    assert not isinstance(a2, str), "plot_isoflops needs an approach-2 fit"
    fig, (ax,) = _figure(7.5, 5.0)
    colours = _colours(len(a2.budgets))
    for colour, b in zip(colours, a2.budgets):
        n = d.params[b.members]
        ax.scatter(n, d.loss[b.members], color=colour, s=22, alpha=0.9,
                   label=f"C = {b.flops:.2g} FLOPs")
        log_n = np.linspace(np.log(n.min()) - 0.1, np.log(n.max()) + 0.1, 100)
        ax.plot(np.exp(log_n), np.polyval(b.coeffs, log_n), color=colour, lw=1.2)
        ax.scatter([b.params_opt], [b.loss_opt], marker="x", s=70, color="black", zorder=5)
    ax.scatter([], [], marker="x", s=70, color="black", label="parabola minimum (N_opt)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model size N (parameters)")
    ax.set_ylabel(LOSS_LABEL)
    _plain_log_ticks(ax.yaxis)
    ax.set_title(f"IsoFLOP profiles (approach 2: N_opt ~ C^{a2.params_law.exponent:.3f})")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.savefig(path)


def plot_optimal_allocation(report: FitReport, path: Path) -> None:
    """Compute-optimal N and D against compute from every available approach."""
    f3 = report.approach3
    fig, (ax_n, ax_d) = _figure(11.0, 4.6, ncols=2)
    cs = _compute_range(report)
    n3, d3, _ = f3.optimal(cs)
    ax_n.plot(cs, n3, color="black", lw=1.8, label=f"approach 3: N_opt ~ C^{f3.a:.3f}")
    ax_d.plot(cs, d3, color="black", lw=1.8, label=f"approach 3: D_opt ~ C^{f3.b:.3f}")
    if not isinstance(report.approach2, str):
        a2 = report.approach2
        c = np.array([b.flops for b in a2.budgets])
        ax_n.scatter(c, [b.params_opt for b in a2.budgets], color="tab:blue", s=30, zorder=4,
                     label="isoFLOP minima")
        ax_d.scatter(c, [b.tokens_opt for b in a2.budgets], color="tab:blue", s=30, zorder=4,
                     label="isoFLOP minima")
        n2, d2, _ = a2.optimal(cs)
        ax_n.plot(cs, n2, color="tab:blue", ls="--",
                  label=f"approach 2: N_opt ~ C^{a2.params_law.exponent:.3f}")
        ax_d.plot(cs, d2, color="tab:blue", ls="--",
                  label=f"approach 2: D_opt ~ C^{a2.tokens_law.exponent:.3f}")
    if not isinstance(report.approach1, str):
        a1, d = report.approach1, report.data
        env = a1.envelope
        ax_n.scatter(d.flops[env], d.params[env], facecolors="none", edgecolors="tab:red",
                     s=40, label="min-loss envelope")
        ax_d.scatter(d.flops[env], d.tokens[env], facecolors="none", edgecolors="tab:red",
                     s=40, label="min-loss envelope")
        n1, d1, _ = a1.optimal(cs)
        ax_n.plot(cs, n1, color="tab:red", ls=":",
                  label=f"approach 1: N_opt ~ C^{a1.params_law.exponent:.3f}")
        ax_d.plot(cs, d1, color="tab:red", ls=":",
                  label=f"approach 1: D_opt ~ C^{a1.tokens_law.exponent:.3f}")
    if len(report.budgets):
        nb, db, _ = f3.optimal(report.budgets)
        ax_n.scatter(report.budgets, nb, marker="*", s=140, color="tab:orange",
                     edgecolors="black", lw=0.6, zorder=5, label="requested budgets")
        ax_d.scatter(report.budgets, db, marker="*", s=140, color="tab:orange",
                     edgecolors="black", lw=0.6, zorder=5, label="requested budgets")
    for ax, what, unit in ((ax_n, "Compute-optimal model size", "parameters N_opt"),
                           (ax_d, "Compute-optimal training data", "training tokens D_opt")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(FLOPS_LABEL)
        ax.set_ylabel(unit)
        ax.set_title(what)
        ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path)


def plot_residuals(report: FitReport, path: Path) -> None:
    """Approach-3 residuals against compute, and predicted against observed loss."""
    d, f3 = report.data, report.approach3
    res = approach3_residuals(d, f3)
    fig, (ax_r, ax_p) = _figure(11.0, 4.6, ncols=2)
    sc = ax_r.scatter(d.flops, 100.0 * res, c=d.params, norm=LogNorm(), cmap="viridis", s=16,
                      edgecolors="none")
    ax_r.axhline(0.0, color="black", lw=1)
    ax_r.set_xscale("log")
    ax_r.set_xlabel(FLOPS_LABEL)
    ax_r.set_ylabel("residual log(L_fit / L_run) (%)")
    ax_r.set_title(f"Approach 3 residuals (RMS {100 * np.sqrt(np.mean(res**2)):.2f}%)")
    fig.colorbar(sc, ax=[ax_r, ax_p], label="model size N (parameters)")
    pred = f3.predict(d.params, d.tokens)
    lo, hi = min(pred.min(), d.loss.min()) * 0.97, max(pred.max(), d.loss.max()) * 1.03
    ax_p.plot([lo, hi], [lo, hi], color="black", lw=1, label="perfect fit")
    ax_p.scatter(d.loss, pred, c=d.params, norm=LogNorm(), cmap="viridis", s=16,
                 edgecolors="none", label="runs")
    ax_p.set_xscale("log")
    ax_p.set_yscale("log")
    ax_p.set_xlabel(f"observed {LOSS_LABEL}")
    ax_p.set_ylabel("approach-3 prediction (nats)")
    _plain_log_ticks(ax_p.xaxis)
    _plain_log_ticks(ax_p.yaxis)
    ax_p.set_title("Predicted against observed loss")
    ax_p.legend(fontsize=8, loc="upper left")
    fig.savefig(path)


def plot_holdout(report: FitReport, path: Path, max_curves: int = 8) -> None:
    """Held-out runs against the law fitted without them: loss against compute, and predicted against measured."""
    from matplotlib import colormaps

    d, f3, check = report.data, report.approach3, report.holdout
    assert check is not None, "plot_holdout needs a hold-out check"
    h = check.held
    fig, (ax_c, ax_p) = _figure(11.0, 4.8, ncols=2)
    norm = LogNorm(min(d.params.min(), h.params.min()), max(d.params.max(), h.params.max()) * 1.0001)
    cmap = colormaps["viridis"]
    ax_c.scatter(d.flops, d.loss, color="grey", s=12, alpha=0.5, edgecolors="none", label=f"runs fitted ({len(d)})")
    cs = np.logspace(np.log10(min(d.flops.min(), h.flops.min())) - 0.1,
                     np.log10(max(d.flops.max(), h.flops.max())) + 0.2, 200)
    sizes = np.unique(h.params)
    for n in sizes[np.unique(np.linspace(0, len(sizes) - 1, min(len(sizes), max_curves)).round().astype(int))]:
        near = cs[cs >= h.flops.min() / 4]  # the law near the held-out runs, not up the steep undertrained end
        ax_c.plot(near, f3.predict(n, near / (6.0 * n)), color=cmap(norm(n)), lw=1, alpha=0.9)
    ax_c.plot([], [], color="black", lw=1, label="fitted law L(N, C/6N) at held-out sizes")
    err = None
    if check.pi95 is not None:
        err = np.abs(np.vstack([check.predicted - check.pi95[:, 0], check.pi95[:, 1] - check.predicted]))
    ax_c.errorbar(h.flops, check.predicted, yerr=err, fmt="none", ecolor="tab:red", elinewidth=1, capsize=2,
                  label="prediction, 95% interval for a run" if err is not None else None)
    ax_c.scatter(h.flops, h.loss, c=h.params, norm=norm, cmap=cmap, marker="D", s=34, edgecolors="tab:red",
                 zorder=5, label=f"held out ({check.rule}): measured")
    ax_c.set_xscale("log")
    ax_c.set_yscale("log")
    ax_c.set_xlabel(FLOPS_LABEL)
    ax_c.set_ylabel(LOSS_LABEL)
    _plain_log_ticks(ax_c.yaxis)
    ax_c.set_title(f"Hold-out check: median |error| {100 * check.median_abs_relative_error:.2f}%")
    ax_c.legend(fontsize=7, loc="upper right")
    lo = min(h.loss.min(), check.predicted.min()) * 0.98
    hi = max(h.loss.max(), check.predicted.max()) * 1.02
    if err is not None:
        lo, hi = min(lo, check.pi95[:, 0].min()), max(hi, check.pi95[:, 1].max())
    ax_p.plot([lo, hi], [lo, hi], color="black", lw=1, label="prediction = measurement")
    ax_p.errorbar(h.loss, check.predicted, yerr=err, fmt="none", ecolor="tab:red", elinewidth=1, capsize=2)
    sc = ax_p.scatter(h.loss, check.predicted, c=h.params, norm=norm, cmap=cmap, marker="D", s=34, zorder=5,
                      label="held-out runs")
    fig.colorbar(sc, ax=[ax_c, ax_p], label="model size N (parameters)")
    ax_p.set_xlabel(f"measured {LOSS_LABEL}")
    ax_p.set_ylabel("predicted by the law fitted without them (nats)")
    ax_p.set_title("Held-out runs: predicted against measured")
    ax_p.legend(fontsize=8, loc="upper left")
    fig.savefig(path)


def _colours(n: int) -> list:
    """n colours along a perceptually ordered colormap (small budgets dark)."""
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    return [cmap(v) for v in np.linspace(0.05, 0.85, max(n, 1))]


def plot_all(report: FitReport, outdir: str | Path) -> dict[str, str]:
    """Write every plot the report supports into outdir; returns {name: file name}."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = [("loss_vs_compute", plot_loss_vs_compute),
            ("optimal_allocation", plot_optimal_allocation),
            ("residuals", plot_residuals)]
    if not isinstance(report.approach2, str):
        jobs.insert(1, ("isoflops", plot_isoflops))
    if report.holdout is not None:
        jobs.append(("holdout", plot_holdout))
    written = {}
    for name, fn in jobs:
        fn(report, outdir / f"{name}.png")
        written[name] = f"{name}.png"
    return written
