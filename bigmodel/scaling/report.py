"""Reading a sweep directory: live progress of running runs, the current fit, the sweep's plots.

    bigmodel scaling report DIR

prints one line per planned run (finished, running with its step and ETA, failed with its
error, planned) and the scaling fit of the finished runs; it only reads files, so it works
while the sweep is still running. The same module fits a sweep's finished rows into
fit.json and draws the sweep's own plots (loss against parameters per budget, loss against
compute per size, and model families overlaid). results.py owns results.csv itself.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.scaling import results
from bigmodel.scaling.results import RESULTS, read_rows

STATUSES = ("finished", "running", "failed", "planned")


# --------------------------------------------------------------------------- the table


def duration(seconds: float) -> str:
    """Seconds as '45s', '12m05s' or '3h20m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _num(text: Any) -> float:
    """A CSV cell as a float (NaN when empty)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _count(text: Any) -> str:
    """A count cell as 1.2M etc."""
    value = _num(text)
    if not math.isfinite(value):
        return "?"
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def live_progress(run_dir: Path, steps: int) -> str:
    """'step 40/122, loss 2.10, 5.2k tok/s, ETA 16s, updated 3s ago' from a running run's metrics.jsonl."""
    from bigmodel.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path)
    if not rows:
        return "starting (no metrics yet)"
    last = rows[-1]
    text = f"step {last['step']}/{steps}, loss {last.get('loss', math.nan):.3f}"
    rate = last.get("tokens_per_s")
    if rate:
        tokens_per_step = _tokens_per_step(run_dir)
        text += f", {_count(rate)} tok/s"
        if tokens_per_step:
            text += f", ETA {duration((steps - last['step']) * tokens_per_step / rate)}"
    import time

    return text + f", updated {duration(time.time() - path.stat().st_mtime)} ago"


def _process_gone(run_dir: Path) -> bool:
    """Whether a run marked running was started on this host by a process that no longer exists."""
    try:
        status = json.loads((run_dir / "sweep_status.json").read_text())
        if status.get("host") != os.uname().nodename:
            return False  # another node of a cluster: cannot tell from here
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return False


def _tokens_per_step(run_dir: Path) -> int:
    """batch_size * seq_len from the run's config.json (0 when unreadable)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0


def _cell(value: float, spec: str) -> str:
    """A number formatted by spec, or '' when it is missing."""
    return format(value, spec) if math.isfinite(value) else ""


def format_table(workdir: Path, rows: Sequence[dict[str, str]]) -> str:
    """The runs as a fixed-width table, with live progress for running runs."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = [f"{workdir}: {len(rows)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES),
             f"{'run':<28}{'params':>8}{'tokens':>8}{'6ND':>10}{'loss':>8}{'bpb':>7}{'wall':>8}  status"]
    for r in rows:
        status = r["status"]
        if status == "running":
            run_dir = workdir / "runs" / r["run"]
            status += f": {live_progress(run_dir, int(_num(r['steps'])))}"
            if _process_gone(run_dir):
                status += " (its process is gone: the sweep was stopped; rerun it to resume)"
        elif status == "failed":
            status += f": {r['error']}"
        wall = _num(r["wall_s"])
        lines.append(
            f"{r['run']:<28}{_count(r['params']):>8}{_count(r['tokens']):>8}{_cell(_num(r['flops']), '.3g'):>10}"
            f"{_cell(_num(r['loss']), '.4f'):>8}{_cell(_num(r['bits_per_byte']), '.3f'):>7}"
            f"{duration(wall) if math.isfinite(wall) else '':>8}  {status}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the fit


def active_params(row: dict[str, Any]) -> float:
    """N for fits: the active parameters where the table has them (mixtures of experts), else params."""
    return _num(row["params_active"]) if row.get("params_active", "") != "" else _num(row["params"])


def fit_dir(workdir: Path, family: str, families: Sequence[str]) -> Path:
    """Where `bigmodel sweep` writes a family's fit: DIR/fit, or DIR/fit/FAMILY with several."""
    return workdir / "fit" if len(families) == 1 else workdir / "fit" / family


def _scaling_data(rows: Sequence[dict[str, Any]]):
    """ScalingData (fit API) from finished rows; flops are the 6ND column."""
    family = rows[0]["model"] if rows else "?"
    return results.from_arrays([active_params(r) for r in rows], [_num(r["tokens"]) for r in rows],
                              [_num(r["loss"]) for r in rows], [_num(r["flops"]) for r in rows],
                              source=f"{RESULTS} ({family}, finished runs)")


def fit_rows(rows: Sequence[dict[str, Any]], outdir: Path, starts: str = "hoffmann", n_bootstrap: int = 100,
             holdout: str = "") -> str:
    """Fit finished rows and write outdir/fit.json with the fit plots; returns a one-line outcome.

    With a hold-out rule (holdout.py, e.g. 'largest:1') the fit leaves those runs out and fit.json
    records its predictions for them against their measured losses.
    """
    from bigmodel.scaling import fit as fitlib, holdout as holdouts, laws, output

    if starts not in fitlib.STARTS:
        raise ValueError(f"config.sweep.fit_starts={starts!r}; use one of {tuple(fitlib.STARTS)}")
    if len(rows) < laws.MIN_POINTS_APPROACH3:
        return f"skipped: {len(rows)} finished runs; approach 3 needs {laws.MIN_POINTS_APPROACH3}"
    try:
        data = _scaling_data(rows)
        held = None
        if holdout:
            rule = holdouts.parse_rule(holdout)
            data, held = holdouts.split(data, rule)
        result = fitlib.fit_all(data, n_bootstrap=n_bootstrap, starts=fitlib.STARTS[starts]())
        if held is not None:
            result.holdout = holdouts.check(result, held, rule)
    except results.ScalingDataError as e:
        return f"skipped: {e}" + _record_failure(outdir, len(rows), str(e))
    except ArithmeticError as e:  # an optimum at absurd parameters (too few or too noisy runs)
        reason = f"the approach-3 optimiser diverged ({e}); add runs or budgets"
        return f"failed: {reason}" + _record_failure(outdir, len(rows), reason)
    output.write_fit(result, outdir)
    f3 = result.approach3
    checked = (f"; {len(result.holdout.held)} held out ({result.holdout.rule}): median |error| "
               f"{100 * result.holdout.median_abs_relative_error:.2f}%" if result.holdout is not None else "")
    return (f"{len(data)} runs: E={f3.E:.3g} alpha={f3.alpha:.3g} beta={f3.beta:.3g}{checked}; "
            f"wrote {outdir / output.FIT_JSON}")


def _record_failure(outdir: Path, n_points: int, reason: str) -> str:
    """Write outdir/fit.json saying the fit failed (so `scaling predict` and the report say why); ' (recorded)'."""
    from bigmodel.scaling import output

    outdir.mkdir(parents=True, exist_ok=True)
    record = {"n_points": n_points, "approach3": {"failed": reason}, "degenerate": [f"the fit failed: {reason}"]}
    results.write_text_atomic(outdir / output.FIT_JSON, json.dumps(record, indent=2) + "\n")
    return f" (recorded in {outdir / output.FIT_JSON})"


def summarize_fit(fit: dict[str, Any]) -> list[str]:
    """A few lines from a fit.json dict: approach 3, approach 2 and the Kaplan exponents."""
    a3 = fit["approach3"]
    if "failed" in a3:
        return [f"  failed: {a3['failed']}"]
    lines = [(f"  L(N, D) = E + A/N^alpha + B/D^beta: E={a3['E']:.4g} A={a3['A']:.4g} B={a3['B']:.4g} "
              f"alpha={a3['alpha']:.4g} beta={a3['beta']:.4g}; N_opt ~ C^{a3['a']:.3f}, "
              f"D_opt ~ C^{a3['b']:.3f} (RMS log residual {a3['rms_log_residual']:.3g})")]
    a2 = fit.get("approach2", {})
    lines.append("  approach 2: " + (f"skipped ({a2['skipped']})" if "skipped" in a2
                                     else f"a={a2['a']:.3f}, b={a2['b']:.3f}"))
    for variable, k in fit.get("kaplan", {}).items():
        lines.append(f"  Kaplan L({variable}): " + (f"skipped ({k['skipped']})" if "skipped" in k
                                                    else f"alpha={k['alpha']:.4g}, x_c={k['x_c']:.3g}"))
    return lines


def current_fit(workdir: Path, rows: Sequence[dict[str, str]]) -> list[str]:
    """Per family: the sweep's fit.json if it covers every finished run, else a quick fit now."""
    from bigmodel.scaling import fit as fitlib, laws, output

    families = list(dict.fromkeys(r["model"] for r in rows))
    lines = []
    for family in families:
        finished = [r for r in rows if r["model"] == family and r["status"] == "finished"]
        path = fit_dir(workdir, family, families) / output.FIT_JSON
        saved = json.loads(path.read_text()) if path.is_file() else None
        covered = (saved.get("n_points", 0) + (saved.get("holdout") or {}).get("n_held_out", 0)) if saved else -1
        if saved is not None and covered == len(finished):
            lines += [f"fit of {family} ({path}, {len(finished)} runs):", *summarize_fit(saved)]
            continue
        if len(finished) < laws.MIN_POINTS_APPROACH3:
            lines.append(f"fit of {family}: not yet ({len(finished)} finished runs; "
                         f"approach 3 needs {laws.MIN_POINTS_APPROACH3})")
            continue
        try:
            quick = fitlib.fit_all(_scaling_data(finished), n_bootstrap=0, starts=fitlib.STARTS["small"]())
        except results.ScalingDataError as e:
            lines.append(f"fit of {family}: not yet ({len(finished)} finished runs): {e}")
            continue
        except ArithmeticError as e:
            lines.append(f"fit of {family}: the optimiser diverged on {len(finished)} finished runs ({e})")
            continue
        lines.append(f"fit of {family} (quick look at {len(finished)} finished runs: 32 starts, "
                     "no bootstrap; the sweep writes the full fit when it ends):")
        lines += summarize_fit(output.fit_json(quick))
    return lines


def format_report(workdir: str | Path, fit: bool = True, html: bool = False) -> str:
    """The report printed by `bigmodel scaling report DIR`; with `html` it also writes DIR/report.html (page.py)."""
    workdir = Path(workdir)
    rows = read_rows(workdir)
    text = format_table(workdir, rows)
    fit_lines = current_fit(workdir, rows) if fit else []
    if fit:
        text += "\n\n" + "\n".join(fit_lines)
    if html:
        from bigmodel.scaling import page

        text += f"\n\nwrote {page.write_page(workdir, fit_lines)}"
    return text


# --------------------------------------------------------------------------- plots


def _axes(title: str, xlabel: str):
    """A Figure (Agg canvas, no pyplot) with one log-log axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(7.0, 4.8), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats/token)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3.5 rather than 3.5x10^0 on the loss axis
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones collide on short ranges
    return fig, ax


def _budget(row: dict[str, Any]) -> tuple[str, float]:
    """('tokens' or 'FLOPs', value) of the budget a run belongs to."""
    if _num(row["budget_tokens"]) > 0:
        return "tokens", _num(row["budget_tokens"])
    return "FLOPs", _num(row["budget_flops"])


def _groups(rows: Iterable[dict[str, Any]], key) -> dict[Any, list[dict[str, Any]]]:
    """Rows grouped by key(row), in first-seen order."""
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_loss_vs_params(rows: Sequence[dict[str, Any]], path: Path, x: str = "params") -> None:
    """Loss against parameters, one line per (family, budget): colour is the budget, marker the family."""
    from matplotlib import colormaps

    label = "parameters N (with embeddings)" if x == "params" else "non-embedding parameters"
    fig, ax = _axes("Loss against model size per budget", label)
    budgets = sorted({_budget(r) for r in rows}, key=lambda b: b[1])
    shades = [i / max(len(budgets) - 1, 1) * 0.85 for i in range(len(budgets))]
    colours = {b: colormaps["viridis"](v) for b, v in zip(budgets, shades)}
    families = list(dict.fromkeys(r["model"] for r in rows))
    for (family, budget), group in _groups(rows, lambda r: (r["model"], _budget(r))).items():
        group = sorted(group, key=lambda r: _num(r[x]))
        ax.plot([_num(r[x]) for r in group], [_num(r["loss"]) for r in group], color=colours[budget],
                marker=MARKERS[families.index(family) % len(MARKERS)], ls="-" if families.index(family) == 0 else "--",
                label=f"{family}, {_count(budget[1])} {budget[0]}")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)


def plot_loss_vs_compute(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss against 6ND compute, one line per model size (the budgets of one size joined)."""
    fig, ax = _axes("Loss against compute per model size", "training compute 6·N·D (FLOPs)")
    for (family, width), group in _groups(rows, lambda r: (r["model"], r["width"])).items():
        group = sorted(group, key=lambda r: _num(r["flops"]))
        ax.plot([_num(r["flops"]) for r in group], [_num(r["loss"]) for r in group], marker="o",
                label=f"{family} w{width} ({_count(group[0]['params'])} params)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)


def plot_families(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Kaplan et al. 2020 fig. 7 style: L(N_nonembed) of every family at its largest budget."""
    fig, ax = _axes("Model families: loss against non-embedding parameters", "non-embedding parameters")
    for family, group in _groups(rows, lambda r: r["model"]).items():
        top = max(_budget(r)[1] for r in group)
        group = sorted((r for r in group if _budget(r)[1] == top), key=lambda r: _num(r["params_nonembed"]))
        ax.plot([_num(r["params_nonembed"]) for r in group], [_num(r["loss"]) for r in group], marker="o",
                label=f"{family} ({_count(top)} {_budget(group[0])[0]})")
    ax.legend(fontsize=8)
    fig.savefig(path)


FAMILY_BOOTSTRAP = 1000  # resamples per family for the interval of alpha_C (each is one small least-squares fit)


def compare_families(rows: Sequence[dict[str, Any]], n_bootstrap: int = FAMILY_BOOTSTRAP,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Per family: sizes, a Kaplan L(C) = (C_c/C)^alpha_C fit on its compute envelope with a bootstrap
    interval, the lowest loss reached within the largest compute budget every family covers, and
    (alpha_c_vs) each other family's exponent difference with its interval and whether it is significant.

    C is the flops column (6·N_active·D), so mixtures of experts are charged for the
    experts a token uses, not for all of them. The bootstrap resamples a family's runs with
    replacement and refits its envelope law; a resample whose envelope cannot carry the law
    (too few points or too narrow a range) is counted in n_failed. A difference is significant
    when the 95% interval of alpha_C(family) - alpha_C(other), from independent resamples of
    the two families, excludes 0.
    """
    from bigmodel.scaling import powerlaws

    groups = _groups(rows, lambda r: r["model"])
    common = min(max(_num(r["flops"]) for r in g) for g in groups.values())
    rng = np.random.default_rng(seed)
    table, replicates = [], {}
    for family, group in groups.items():
        largest = max(group, key=lambda r: _num(r["params"]))
        entry: dict[str, Any] = {
            "model": family, "runs": len(group), "params": int(_num(largest["params"])),
            "params_active": int(active_params(largest)), "common_flops": common,
            "loss_at_common_flops": min(_num(r["loss"]) for r in group if _num(r["flops"]) <= common * (1 + 1e-9)),
        }
        data = results.from_arrays([active_params(r) for r in group], [_num(r["tokens"]) for r in group],
                                  [_num(r["loss"]) for r in group], [_num(r["flops"]) for r in group], source=family)
        try:
            law = powerlaws.fit_kaplan(data, "flops")
            entry.update(alpha_c=law.alpha, alpha_c_se=law.alpha_se, c_c=law.x_c,
                         envelope=[int(i) for i in law.envelope])
        except results.NotSupported as e:
            entry["alpha_c"] = f"skipped: {e}"
            table.append(entry)
            continue
        alphas = []
        for _ in range(n_bootstrap):
            try:
                alphas.append(powerlaws.fit_kaplan(data.subset(rng.integers(0, len(data), len(data))), "flops").alpha)
            except results.NotSupported:
                pass
        replicates[family] = np.asarray(alphas)
        entry["alpha_c_bootstrap"] = {"n_resamples": n_bootstrap, "n_failed": n_bootstrap - len(alphas), "seed": seed}
        if len(alphas) >= 2:
            entry["alpha_c_ci95"] = [float(q) for q in np.percentile(alphas, [2.5, 97.5])]
        table.append(entry)
    for entry in table:
        mine = replicates.get(entry["model"])
        if mine is None or len(mine) < 2:
            continue
        entry["alpha_c_vs"] = {}
        for other in table:
            theirs = replicates.get(other["model"])
            if other is entry or theirs is None or len(theirs) < 2:
                continue
            k = min(len(mine), len(theirs))
            lo, hi = (float(q) for q in np.percentile(mine[:k] - theirs[:k], [2.5, 97.5]))
            entry["alpha_c_vs"][other["model"]] = {"difference": entry["alpha_c"] - other["alpha_c"],
                                                   "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}
    return table


def format_families(table: Sequence[dict[str, Any]]) -> str:
    """The family comparison as a terminal table, then which exponent differences are significant."""
    lines = [(f"{'model':<10} {'runs':>4} {'params':>9} {'active':>9} {'alpha_C':>14} {'95% interval':>17} "
             f"{'loss @ ' + _count(table[0]['common_flops']) + ' FLOPs':>20}")]
    for e in table:
        alpha = (f"{e['alpha_c']:.4f} ± {e['alpha_c_se']:.3f}" if not isinstance(e["alpha_c"], str) else "-")
        ci = e.get("alpha_c_ci95")
        interval = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"
        lines.append(f"{e['model']:<10} {e['runs']:>4} {_count(e['params']):>9} {_count(e['params_active']):>9} "
                     f"{alpha:>14} {interval:>17} {e['loss_at_common_flops']:>20.4f}")
    pairs = [(e["model"], other, d) for i, e in enumerate(table) for other, d in e.get("alpha_c_vs", {}).items()
             if other in [t["model"] for t in table[i + 1:]]]
    if pairs:
        lines.append("alpha_C differences (95% bootstrap interval; significant when it excludes 0):")
        for a, b, d in pairs:
            lines.append(f"  {a} - {b}: {d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] "
                         f"{'significant' if d['significant'] else 'not significant'}")
        significant = [f"{a} vs {b}" for a, b, d in pairs if d["significant"]]
        lines.append("  significant: " + (", ".join(significant) if significant else "none"))
    return "\n".join(lines)


def plot_families_compute(rows: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]], path: Path) -> None:
    """Every family's runs against compute, its envelope and its fitted L(C), overlaid."""
    fig, ax = _axes("Model families: loss against compute", "training compute 6·N_active·D (FLOPs)")
    groups = _groups(rows, lambda r: r["model"])
    for i, entry in enumerate(table):
        family, group = entry["model"], groups[entry["model"]]
        colour = f"C{i}"
        c = np.asarray([_num(r["flops"]) for r in group])
        loss = np.asarray([_num(r["loss"]) for r in group])
        ax.scatter(c, loss, color=colour, marker=MARKERS[i % len(MARKERS)], s=18, alpha=0.6)
        label = family
        if not isinstance(entry["alpha_c"], str):
            env = np.asarray(entry["envelope"])
            ax.plot(c[env], loss[env], color=colour, lw=1)
            grid = np.geomspace(c.min(), c.max(), 50)
            ax.plot(grid, (entry["c_c"] / grid) ** entry["alpha_c"], color=colour, ls="--", lw=1)
            label = f"{family}: alpha_C {entry['alpha_c']:.3f}"
        ax.plot([], [], color=colour, marker=MARKERS[i % len(MARKERS)], label=label)
    ax.axvline(table[0]["common_flops"], color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_sweep(rows: Sequence[dict[str, Any]], outdir: Path) -> list[Path]:
    """The sweep's plots from finished rows into outdir; returns the files written.

    With several families it also writes families.json (`compare_families`).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    written = [outdir / "loss_vs_params.png", outdir / "loss_vs_compute_by_size.png"]
    plot_loss_vs_params(rows, written[0])
    plot_loss_vs_compute(rows, written[1])
    if len({r["model"] for r in rows}) > 1:
        written.append(outdir / "families_loss_vs_params.png")
        plot_families(rows, written[-1])
        table = compare_families(rows)
        written.append(outdir / "families_loss_vs_compute.png")
        plot_families_compute(rows, table, written[-1])
        from bigmodel.metrics import atomic_write_text

        atomic_write_text(outdir / "families.json", json.dumps(table, indent=2) + "\n")
        print(format_families(table), flush=True)
    return written
