"""The sweep's HTML report: content, embedded plots, and rendering in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bigmodel import cli
from bigmodel.scaling import page, report, results

CHROMIUM = shutil.which("chromium")


def sweep_rows() -> list[dict[str, str]]:
    """Two families on a 4 x 4 grid of (N, D), a failed run and a planned one, as results.csv holds them."""
    rows = []
    rng = np.random.default_rng(0)
    for family, e in (("gpt", 1.9), ("llama", 1.7)):
        for n in np.geomspace(1e6, 3e7, 4):
            for d in np.geomspace(3e7, 1e9, 4):
                loss = (e + 400 / n**0.33 + 1500 / d**0.3) * np.exp(0.003 * rng.standard_normal())
                rows.append(dict.fromkeys(results.COLUMNS, "") | {
                    "run": f"{family}_n{n:.0f}_d{d:.0f}", "model": family, "width": "64", "depth": "2",
                    "params": f"{n:.0f}", "params_nonembed": f"{0.8 * n:.0f}", "tokens": f"{d:.0f}",
                    "flops": f"{6 * n * d:.6g}", "loss": f"{loss:.6f}", "wall_s": "12", "status": "finished"})
    rows.append(dict(rows[-1], run="llama_<broken>", loss="", status="failed", error="diverged: loss is NaN"))
    rows.append(dict(rows[-1], run="llama_next", error="", status="planned"))
    return rows


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A finished two-family sweep directory with gpt's fit (with a hold-out) and its plots."""
    workdir = tmp_path_factory.mktemp("sweep")
    rows = sweep_rows()
    results.write_csv_atomic(workdir / results.RESULTS, rows)
    gpt = [r for r in rows if r["model"] == "gpt"]
    outcome = report.fit_rows(gpt, workdir / "fit" / "gpt", starts="small", n_bootstrap=8, holdout="largest:2")
    assert outcome.startswith("14 runs: ") and "2 held out (largest:2): median |error|" in outcome, outcome
    finished = [r for r in rows if r["status"] == "finished"]
    (workdir / "fit" / "families.json").write_text(json.dumps(report.compare_families(finished, n_bootstrap=50)))
    return workdir


def test_report_writes_one_page_with_runs_fit_holdout_families_and_plots(sweep_dir, capsys):
    assert cli.main(["scaling", "report", str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {sweep_dir / page.REPORT_HTML}" in printed
    assert "fit of gpt (" in printed and "quick look" not in printed.split("fit of gpt")[1].split("fit of")[0]
    text = (sweep_dir / page.REPORT_HTML).read_text()
    fit = json.loads((sweep_dir / "fit" / "gpt" / "fit.json").read_text())
    assert text.count("<tr>") >= 34 + 7  # 34 runs and 7 constants, at least
    assert "llama_&lt;broken&gt;" in text and "diverged: loss is NaN" in text and "<broken>" not in text
    lo, hi = fit["approach3"]["ci95"]["alpha"]
    assert f"[{lo:.4g}, {hi:.4g}]" in text
    assert "Hold-out check: largest:2" in text
    assert f"{100 * fit['holdout']['median_abs_relative_error']:.2f}%" in text
    widened = [r["pi95_extrapolation"] for r in fit["holdout"]["runs"]]  # beyond the fit: the backtest's interval
    assert "widened by the backtest" in text and len(widened) == 2
    assert all(f"[{lo:.4f}, {hi:.4f}]" in text for lo, hi in widened)
    assert "Model families" in text and "Differences of alpha_C" in text
    # Every plot is embedded byte for byte: the page needs no other file.
    pngs = sorted((sweep_dir / "fit").rglob("*.png"))
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(pngs) >= 5 and sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert "src='http" not in text and "<link" not in text


@pytest.mark.slow  # starts a browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (apt-get install chromium)")
def test_report_page_renders_in_headless_chromium(sweep_dir, tmp_path):
    path = page.write_page(sweep_dir)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Hold-out check: largest:2" in dom.stdout and dom.stdout.count("<img") == len(list(
        (sweep_dir / "fit").rglob("*.png")))
    shot = tmp_path / "page.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,6000", "--hide-scrollbars",
                          path.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    # The plots' coloured points and curves are drawn: text and table borders alone are grey.
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert (saturation > 0.3).sum() > 10_000  # about 38,000 with the plots, 150 without
