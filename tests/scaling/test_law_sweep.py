"""The sweep whose law is checked out of sample (experiments/scaling/gpt_stdlib_law.py): its plan, and
its ':tiny' version end to end with the held-out run and benchmarks/scaling_holdout.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bigmodel import cli
from bigmodel.scaling import laws, plan as planning, results

from conftest import REPO, SMALL_CORPUS

LAW = str(REPO / "experiments" / "scaling" / "gpt_stdlib_law.py")
CHECK = REPO / "benchmarks" / "scaling_holdout.py"


def runs(spec: str, *overrides: str) -> list[planning.Run]:
    """The planned runs of a sweep config (one device per run)."""
    return planning.load(spec, list(overrides), "unused", num_devices=1).runs


def test_max_flops_leaves_out_the_runs_above_the_cap():
    uncapped = runs(LAW, "sweep.max_flops=0")
    capped = runs(LAW, "sweep.max_flops=5e11")
    assert len(uncapped) == 5 * 3 and 0 < len(capped) < len(uncapped)
    assert {r.id for r in capped} == {r.id for r in uncapped if r.flops <= 5e11}


def test_plan_spans_a_decade_and_the_holdout_is_4x_the_largest_run():
    sweep = runs(LAW)
    nonembed = [r.params_nonembed for r in sweep]
    assert max(nonembed) / min(nonembed) >= 10
    assert len({r.tokens for r in sweep}) == 3 and max(r.tokens for r in sweep) / min(r.tokens for r in sweep) > 6
    (held,) = runs(LAW + ":holdout")
    assert held.flops >= 4 * max(r.flops for r in sweep)
    assert held.id not in {r.id for r in sweep}
    # The held-out run is trained the way the sweep's runs are: same rate rule at its width.
    (same_width,) = [r for r in sweep if r.width == held.width and r.tokens == sweep[0].tokens]
    assert held.learning_rate == same_width.learning_rate
    assert held.config.optim.warmup_steps == round(0.05 * held.steps)


@pytest.fixture(scope="module")
def tiny_law(tmp_path_factory, data_dir):
    """The ':tiny' sweep, its ':tiny,holdout' run, and the hold-out check on them."""
    top = tmp_path_factory.mktemp("law")
    mp = pytest.MonkeyPatch()
    mp.setenv("XLA_FLAGS", "")  # one CPU device per run
    common = ["--parallel", "2", "--devices", "1", f"--config.base.data.source={SMALL_CORPUS}",
              "--config.base.data.validation_fraction=0.2", f"--config.base.data.data_dir={data_dir}"]
    codes = [cli.main(["sweep", "--config", f"{LAW}:{variant}", "--workdir", str(top / name), *common])
             for variant, name in (("tiny", "sweep"), ("tiny,holdout", "holdout"))]
    mp.undo()
    out = top / "check.json"
    proc = subprocess.run([sys.executable, str(CHECK), str(top / "sweep"), str(top / "holdout"), "--bootstrap", "20",
                           "--starts", "small", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    return {"top": top, "codes": codes, "proc": proc, "check": json.loads(out.read_text()) if out.exists() else None}


@pytest.mark.slow
def test_tiny_law_sweep_and_holdout_check_end_to_end(tiny_law):
    assert tiny_law["codes"] == [0, 0], tiny_law["proc"].stderr
    assert tiny_law["proc"].returncode == 0, tiny_law["proc"].stderr
    check = tiny_law["check"]
    assert json.loads(tiny_law["proc"].stdout) == check  # printed and written alike
    sweep = [r for r in results.read_rows(tiny_law["top"] / "sweep") if r["status"] == "finished"]
    (held,) = results.read_rows(tiny_law["top"] / "holdout")
    assert len(sweep) == check["sweep_runs"] == 6 and (tiny_law["top"] / "sweep" / "fit" / "fit.json").exists()
    ratio = float(held["flops"]) / max(float(r["flops"]) for r in sweep)
    assert check["held_out_compute_ratio"] == [pytest.approx(ratio)] and ratio >= 4
    for count in ("params", "params_nonembed"):
        entry = check[count]
        if "refused" in entry:  # no law to check: the fit itself must refuse these rows
            with pytest.raises(results.ScalingDataError, match="does not fall with both N and D"):
                laws.fit_approach3(results.from_arrays([float(r[count]) for r in sweep],
                                                       [float(r["tokens"]) for r in sweep],
                                                       [float(r["loss"]) for r in sweep]), starts=laws.small_grid())
            continue
        (h,) = entry["held_out"]
        law = entry["law"]
        n, d = float(held[count]), float(held["tokens"])
        assert (h["N"], h["tokens"], h["measured"]) == (n, d, pytest.approx(float(held["loss"])))
        expected = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
        assert h["predicted"] == pytest.approx(expected)
        assert h["relative_error"] == pytest.approx((h["measured"] - h["predicted"]) / h["predicted"])
        low, high = h["interval95"]
        assert h["inside"] == bool(low <= h["measured"] <= high)
        # The fit is on the sweep's rows with N counted this way: its residuals are what it reports.
        n_sweep = np.array([float(r[count]) for r in sweep])
        d_sweep = np.array([float(r["tokens"]) for r in sweep])
        loss = np.array([float(r["loss"]) for r in sweep])
        pred = law["E"] + law["A"] / n_sweep ** law["alpha"] + law["B"] / d_sweep ** law["beta"]
        assert entry["rms_log_residual"] == pytest.approx(np.sqrt(np.mean(np.log(pred / loss) ** 2)), rel=1e-6)
    # The two counts differ by the embedding tables, so they are two different fits.
    assert check["params"] != check["params_nonembed"]
