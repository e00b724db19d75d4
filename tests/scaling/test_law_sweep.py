"""The sweep whose law is checked out of sample (experiments/scaling/gpt_stdlib_law.py): its plan, and
its ':tiny' version end to end with the held-out run, checked by `bigmodel scaling fit --holdout`."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from bigmodel import cli, config as config_lib
from bigmodel.scaling import laws, plan as planning, results

from conftest import REPO, SMALL_CORPUS

LAW = str(REPO / "experiments" / "scaling" / "gpt_stdlib_law.py")
COUNTS = ("params", "params_nonembed")  # N with and without the embedding tables


def runs(spec: str, *overrides: str) -> list[planning.Run]:
    """The planned runs of a sweep config (one device per run)."""
    return planning.load(spec, list(overrides), "unused", num_devices=1).runs


def _get(cfg, key: str):
    """cfg's value at a dotted key."""
    return functools.reduce(getattr, key.split("."), cfg)


def test_max_flops_leaves_out_the_runs_above_the_cap():
    uncapped = runs(LAW, "sweep.max_flops=0")
    capped = runs(LAW, "sweep.max_flops=3e12")
    assert 0 < len(capped) < len(uncapped)
    assert {r.id for r in capped} == {r.id for r in uncapped if r.flops <= 3e12}


def test_tokens_per_param_band_keeps_the_runs_near_a_ratio():
    every = runs(LAW, "sweep.tokens_per_param=()")
    banded = runs(LAW, "sweep.tokens_per_param=(10, 100)")
    low_only = runs(LAW, "sweep.tokens_per_param=(10, 0)")
    ratio = {r.id: r.tokens / r.params_active for r in every}
    assert len(every) == len(config_lib.experiment_module(LAW).WIDTHS) * len(config_lib.experiment_module(LAW).FLOPS)
    assert {r.id for r in banded} == {k for k, v in ratio.items() if 10 <= v <= 100}
    assert {r.id for r in low_only} == {k for k, v in ratio.items() if v >= 10}
    assert 0 < len(banded) < len(low_only) < len(every)
    for bad in ("(10,)", "(-1, 100)", "(100, 10)"):
        with pytest.raises(config_lib.ConfigError, match="tokens_per_param"):
            runs(LAW, f"sweep.tokens_per_param={bad}")


def test_plan_spans_a_decade_near_the_optimum_and_the_holdout_is_4x_the_largest_run():
    law = config_lib.experiment_module(LAW)
    sweep = runs(LAW)
    nonembed = [r.params_nonembed for r in sweep]
    assert max(nonembed) / min(nonembed) >= 10
    low, high = law.TOKENS_PER_PARAM
    assert all(low <= r.tokens / r.params <= high for r in sweep)
    for budget in law.FLOPS:  # isoFLOP profiles: at least 3 sizes a budget, each run's 6ND on it to a step
        profile = [r for r in sweep if r.budget_flops == budget]
        assert len(profile) >= 3
        assert all(abs(r.flops - budget) <= 6 * r.params * 32 * law.SEQ_LEN for r in profile)
    (held,) = runs(LAW + ":holdout")
    assert held.flops >= 4 * max(r.flops for r in sweep)
    assert held.id not in {r.id for r in sweep}
    assert low <= held.tokens / held.params <= high
    # The held-out run is trained the way the sweep's runs are: same context, batch, data order and rate rule.
    for key in ("data.seq_len", "model.max_len", "train.batch_size", "data.sources", "eval.num_batches"):
        assert _get(held.config, key) == _get(sweep[0].config, key), key
    assert held.config.data.seq_len == law.SEQ_LEN and held.config.data.sources == (law.STORE,)
    assert held.learning_rate == pytest.approx(law.LR * (16 / held.width) ** law.LR_EXPONENT)
    assert held.config.optim.warmup_steps == round(0.05 * held.steps)
    # Every run, the held-out one too, shrinks its matrices by the same lr x weight decay a step.
    for r in (*sweep, held):
        assert r.config.optim.learning_rate * r.config.optim.weight_decay == pytest.approx(law.DECAY_PER_STEP)
    assert sweep[0].width == 16 and sweep[0].config.optim.weight_decay == pytest.approx(0.01, rel=0.03)


def test_a_store_not_yet_prepared_stops_the_sweep_before_any_run(tmp_path):
    from bigmodel.scaling import sweep as sweep_lib

    missing = tmp_path / "stores" / "stdlib_bytes"
    planned = planning.load(LAW + ":holdout", [f"base.data.sources=('{missing}',)"], str(tmp_path / "w"), num_devices=1)
    with pytest.raises(config_lib.ConfigError, match=r"stdlib_bytes is not a prepared token store: .*bigmodel prepare"):
        sweep_lib.execute(planned)
    assert not (tmp_path / "w").exists()


def test_lr_variant_scans_the_smallest_and_largest_scanned_widths():
    law = config_lib.experiment_module(LAW)
    scan = runs(LAW + ":lr", "base.optim.learning_rate=0.01")
    assert [r.width for r in scan] == list(law.LR_SCAN_WIDTHS)
    assert {r.tokens for r in scan} == {law.LR_SCAN_TOKENS}
    expected = [0.01 * (16 / w) ** law.LR_EXPONENT for w in law.LR_SCAN_WIDTHS]
    assert [r.learning_rate for r in scan] == pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny_law(tmp_path_factory, data_dir):
    """The ':tiny' sweep, its ':tiny,holdout' run, and `scaling fit --holdout largest:1` on both tables."""
    top = tmp_path_factory.mktemp("law")
    mp = pytest.MonkeyPatch()
    mp.setenv("XLA_FLAGS", "")  # one CPU device per run
    common = ["--parallel", "2", "--devices", "1", f"--config.base.data.source={SMALL_CORPUS}",
              "--config.base.data.validation_fraction=0.2", f"--config.base.data.data_dir={data_dir}"]
    codes = [cli.main(["sweep", "--config", f"{LAW}:{variant}", "--workdir", str(top / name), *common])
             for variant, name in (("tiny", "sweep"), ("tiny,holdout", "holdout"))]
    mp.undo()
    fits = {}
    for count in COUNTS:
        try:
            cli.main(["scaling", "fit", str(top / "sweep" / "results.csv"), str(top / "holdout" / "results.csv"),
                      "--out", str(top / count), "--params-column", count, "--holdout", "largest:1",
                      "--starts", "small", "--bootstrap", "20", "--no-plots"])
            fits[count] = json.loads((top / count / "fit.json").read_text())
        except SystemExit as e:  # a one-line refusal (no law in these rows)
            fits[count] = str(e)
    return {"top": top, "codes": codes, "fits": fits}


@pytest.mark.slow
def test_tiny_law_sweep_and_holdout_check_end_to_end(tiny_law):
    assert tiny_law["codes"] == [0, 0]
    sweep = [r for r in results.read_rows(tiny_law["top"] / "sweep") if r["status"] == "finished"]
    (held,) = results.read_rows(tiny_law["top"] / "holdout")
    assert len(sweep) == 6 and (tiny_law["top"] / "sweep" / "fit" / "fit.json").exists()
    assert float(held["flops"]) >= 4 * max(float(r["flops"]) for r in sweep)
    for count in COUNTS:
        fit = tiny_law["fits"][count]
        n_sweep = np.array([float(r[count]) for r in sweep])
        d_sweep = np.array([float(r["tokens"]) for r in sweep])
        loss = np.array([float(r["loss"]) for r in sweep])
        if isinstance(fit, str):  # no law to check: the fit itself must refuse these rows
            assert "does not fall with both N and D" in fit
            with pytest.raises(results.ScalingDataError, match="does not fall with both N and D"):
                laws.fit_approach3(results.from_arrays(n_sweep, d_sweep, loss), starts=laws.small_grid())
            continue
        check = fit["holdout"]
        assert (check["rule"], check["n_used"], check["n_held_out"]) == ("largest:1", 6, 1)
        (h,) = check["runs"]
        law = fit["approach3"]
        n, d = float(held[count]), float(held["tokens"])
        assert (h["params"], h["tokens"], h["measured"]) == (n, d, pytest.approx(float(held["loss"])))
        assert h["predicted"] == pytest.approx(law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"])
        assert h["relative_error"] == pytest.approx((h["predicted"] - h["measured"]) / h["measured"])
        # The law is fitted on the sweep's rows with N counted this way.
        pred = law["E"] + law["A"] / n_sweep ** law["alpha"] + law["B"] / d_sweep ** law["beta"]
        assert law["rms_log_residual"] == pytest.approx(np.sqrt(np.mean(np.log(pred / loss) ** 2)), rel=1e-6)
        assert fit["input"]["n_points"] == 6
    # The two counts differ by the embedding tables, so they are two different fits.
    assert tiny_law["fits"]["params"] != tiny_law["fits"]["params_nonembed"]
