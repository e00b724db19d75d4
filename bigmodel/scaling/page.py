"""One self-contained HTML page per sweep: `bigmodel scaling report DIR` writes DIR/report.html.

The page holds the runs table (status, size, tokens, compute, loss), each family's approach-3 fit
with its 95% bootstrap intervals and compute-optimal predictions, the hold-out check when the fit
has one, the family comparison (exponents with intervals, significant differences) and every PNG
under DIR/fit embedded as base64, so the one file can be copied anywhere and opened in a browser.
It is built from the files the sweep writes (results.csv, fit.json, families.json, the plots).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bigmodel.scaling.results import read_rows, write_text_atomic

REPORT_HTML = "report.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
.failed, .no { color: #b00020; font-weight: bold; } .warn { background: #fff3cd; padding: 0.5em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; } figure { margin: 0 0 1.5em; }
"""
RUN_COLUMNS = ("run", "model", "width", "depth", "params", "params_nonembed", "tokens", "flops", "loss",
               "bits_per_byte", "wall_s", "status")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, spec: str = ".4g") -> str:
    """A number for a table cell ('' when missing)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _esc(value if value is not None else "")
    return format(number, spec) if math.isfinite(number) else ""


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], text_columns: Sequence[int] = (0,)) -> str:
    """An HTML table; cells are already escaped."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='text'>{c}</td>" if i in text_columns else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _interval(pair: Sequence[float] | None, spec: str = ".4g") -> str:
    return f"[{_fmt(pair[0], spec)}, {_fmt(pair[1], spec)}]" if pair else ""


def runs_section(rows: Sequence[dict[str, str]]) -> str:
    """The runs table."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    cells = []
    for r in rows:
        status = _esc(r["status"]) + (f": {_esc(r.get('error', ''))}" if r["status"] == "failed" else "")
        cells.append([_esc(r["run"]), _esc(r["model"]), _esc(r.get("width", "")), _esc(r.get("depth", "")),
                      _fmt(r["params"], ".4g"), _fmt(r.get("params_nonembed"), ".4g"), _fmt(r["tokens"], ".4g"),
                      _fmt(r["flops"], ".3g"), _fmt(r["loss"], ".4f"), _fmt(r.get("bits_per_byte"), ".3f"),
                      _fmt(r.get("wall_s"), ".0f"),
                      f"<span class='{'failed' if r['status'] == 'failed' else ''}'>{status}</span>"])
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return (f"<h2>Runs</h2><p>{len(rows)} runs: {_esc(summary)}</p>"
            + _table(RUN_COLUMNS, cells, text_columns=(0, 1, 11)))


def fit_section(title: str, fit: dict[str, Any]) -> str:
    """A fit.json: approach-3 constants with intervals, degeneracy, predictions and the hold-out check."""
    a3 = fit["approach3"]
    if "failed" in a3:
        return f"<h2>{_esc(title)}</h2><p class='warn'>The fit failed: {_esc(a3['failed'])}</p>"
    ci = a3.get("ci95") or {}
    parts = [f"<h2>{_esc(title)}</h2>",
             (f"<p>L(N, D) = E + A/N<sup>alpha</sup> + B/D<sup>beta</sup> fitted on {fit['n_points']} runs "
              f"(RMS log residual {_fmt(a3.get('rms_log_residual'), '.3g')}); "
              f"N<sub>opt</sub> ~ C<sup>a</sup>, D<sub>opt</sub> ~ C<sup>b</sup>.</p>"),
             _table(["constant", "value", "95% bootstrap interval"],
                    [[k, _fmt(a3[k]), _interval(ci.get(k))] for k in ("E", "A", "B", "alpha", "beta", "a", "b")])]
    if fit.get("degenerate"):
        parts.append("<p class='warn'>Degenerate law (predictions are refused): "
                     + _esc("; ".join(fit["degenerate"])) + "</p>")
    rows = []
    for p in fit.get("predictions", []):
        q = p["approach3"]
        qci = q.get("ci95", {})
        rows.append([_fmt(p["flops"], ".3g"), _fmt(q["params"], ".3g"), _interval(qci.get("params"), ".3g"),
                     _fmt(q["tokens"], ".3g"), _interval(qci.get("tokens"), ".3g"), _fmt(q["loss"], ".4f"),
                     _interval(qci.get("loss"), ".4f")])
    if rows:
        parts += ["<h3>Compute-optimal predictions (approach 3)</h3>",
                  _table(["budget C (FLOPs)", "N_opt", "95%", "D_opt", "95%", "loss", "95%"], rows)]
    if "holdout" in fit:
        parts.append(holdout_section(fit["holdout"]))
    return "".join(parts)


def holdout_section(h: dict[str, Any]) -> str:
    """The hold-out check of a fit.json: one row per held-out run."""
    def yes(inside: bool | None) -> str:
        return "" if inside is None else ("yes" if inside else "<span class='no'>no</span>")

    rows = []
    for r in h["runs"]:
        rows.append([_fmt(r["params"], ".3g"), _fmt(r["tokens"], ".3g"), _fmt(r["flops"], ".3g"),
                     _fmt(r["measured"], ".4f"), _fmt(r["predicted"], ".4f"), _fmt(r["signed_error"], "+.4f"),
                     _fmt(100 * r["relative_error"], "+.2f") + "%", _interval(r.get("pi95"), ".4f"),
                     yes(r.get("inside_pi95")), _interval(r.get("pi95_extrapolation"), ".4f"),
                     yes(r.get("inside_pi95_extrapolation")), _fmt(r.get("kaplan_predicted"), ".4f")])
    inside = h.get("fraction_inside_pi95")
    return (f"<h3>Hold-out check: {_esc(h['rule'])}</h3><p>{_esc(h['question'])}: fitted on {h['n_used']} runs, "
            f"predicting {h['n_held_out']}. Median |relative error| "
            f"<b>{100 * h['median_abs_relative_error']:.2f}%</b>"
            + (f"; {100 * inside:.0f}% of the measurements inside the 95% interval for a run" if inside is not None
               else "") + ".</p>"
            + _table(["params", "tokens", "flops", "measured", "predicted", "error", "relative",
                      "95% interval (run)", "inside", "widened by the backtest", "inside", "Kaplan"], rows))


def families_section(table: Sequence[dict[str, Any]]) -> str:
    """families.json: per-family exponents with intervals, then the significant differences."""
    rows, pairs = [], []
    names = [e["model"] for e in table]
    for i, e in enumerate(table):
        alpha = "" if isinstance(e["alpha_c"], str) else f"{e['alpha_c']:.4f}"
        rows.append([_esc(e["model"]), str(e["runs"]), _fmt(e["params"], ".3g"), _fmt(e["params_active"], ".3g"),
                     alpha or _esc(e["alpha_c"]), _interval(e.get("alpha_c_ci95")),
                     _fmt(e["loss_at_common_flops"], ".4f")])
        for other, d in e.get("alpha_c_vs", {}).items():
            if other in names[i + 1:]:
                pairs.append([_esc(f"{e['model']} - {other}"), f"{d['difference']:+.4f}", _interval(d["ci95"]),
                              "yes" if d["significant"] else "no"])
    text = ("<h2>Model families</h2>"
            + _table(["model", "runs", "params", "active", "alpha_C", "95% interval",
                      f"loss @ {_fmt(table[0]['common_flops'], '.3g')} FLOPs"], rows))
    if pairs:
        text += ("<p>Differences of alpha_C (95% bootstrap interval; significant when it excludes 0):</p>"
                 + _table(["pair", "difference", "95% interval", "significant"], pairs))
    return text


def plots_section(fit_root: Path) -> str:
    """Every PNG under DIR/fit, embedded."""
    figures = []
    for png in sorted(fit_root.rglob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = png.relative_to(fit_root.parent).as_posix()
        figures.append(f"<figure><img alt='{_esc(name)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_esc(name)}</figcaption></figure>")
    return "<h2>Plots</h2>" + ("".join(figures) or "<p>No plots yet (the sweep draws them when it ends).</p>")


def render(workdir: Path, fit_lines: Sequence[str] = ()) -> str:
    """The report page of a sweep directory."""
    from bigmodel.scaling import output, report

    rows = read_rows(workdir)
    families = list(dict.fromkeys(r["model"] for r in rows))
    body = [f"<h1>Sweep {_esc(workdir.resolve().name)}</h1>", runs_section(rows)]
    for family in families:
        path = report.fit_dir(workdir, family, families) / output.FIT_JSON
        if path.is_file():
            body.append(fit_section(f"Fit of {family} ({path.relative_to(workdir).as_posix()})",
                                    json.loads(path.read_text())))
    comparison = workdir / "fit" / "families.json"
    if comparison.is_file():
        body.append(families_section(json.loads(comparison.read_text())))
    if fit_lines:
        body.append("<h2>Current fit</h2><pre>" + _esc("\n".join(fit_lines)) + "</pre>")
    body.append(plots_section(workdir / "fit"))
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Sweep "
            f"{_esc(workdir.resolve().name)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_page(workdir: str | Path, fit_lines: Sequence[str] = ()) -> Path:
    """Write DIR/report.html (atomically) and return its path."""
    workdir = Path(workdir)
    path = workdir / REPORT_HTML
    write_text_atomic(path, render(workdir, fit_lines))
    return path
