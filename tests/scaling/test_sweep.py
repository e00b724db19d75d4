"""Sweeps: planning (grid, isoFLOP, families, rules), the ':tiny' sweep end to end, reruns, failures,
the report, cluster emitters and atomic results.csv."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from bigmodel import cli, config as config_lib
from bigmodel.scaling import plan as planning, report, results, runner

from conftest import REPO, SMALL_CORPUS

GPT_STDLIB = str(REPO / "experiments" / "scaling" / "gpt_stdlib.py")
VS_LSTM = str(REPO / "experiments" / "scaling" / "transformer_vs_lstm.py")
FAIL_RUN = "gpt_w32_l1_t25k"


def plan(spec: str, *overrides: str, devices: int = 1) -> list[planning.Run]:
    """The planned runs of a sweep config for runs that see `devices` devices."""
    return planning.load(spec, list(overrides), "unused", num_devices=devices).runs


# --------------------------------------------------------------------------- planning


def test_grid_plan_applies_the_ladder_and_size_rules():
    runs = plan(GPT_STDLIB)
    assert len(runs) == 4 * 3
    assert [r.id for r in runs[:4]] == ["gpt_w48_l2_t410k", "gpt_w64_l2_t410k", "gpt_w96_l3_t410k", "gpt_w128_l4_t410k"]
    assert runs[-1].id == "gpt_w128_l4_t1.6M"
    assert [r.steps for r in runs[::4]] == [100, 200, 400]
    for r in runs:
        c = r.config
        assert r.error == ""
        assert r.tokens == r.steps * 32 * 128 == r.budget_tokens
        assert (c.model.d_model, c.model.num_layers, c.model.num_heads) == (r.width, round(r.width / 32), r.width // 16)
        assert c.optim.learning_rate == pytest.approx(3e-3 * 128 / r.width)  # lr ∝ 1/width
        assert c.optim.warmup_steps == round(0.05 * r.steps)
        assert (c.train.steps, c.optim.decay_steps, c.log.progress) == (r.steps, 0, False)
        assert r.flops == 6 * r.params * r.tokens
    # Parameters with embeddings (384-byte vocab tied, 128 positions) and without.
    w48 = runs[0]
    assert w48.params - w48.params_nonembed == (384 + 128) * 48
    assert w48.params_nonembed == 2 * (12 * 48 * 48 + 13 * 48) + 2 * 48


def test_learning_rate_falls_with_the_token_budget_when_asked():
    runs = plan(GPT_STDLIB, "sweep.lr_tokens_exponent=0.5", "sweep.base_tokens=819200")
    for r in runs:
        want = 3e-3 * 128 / r.width * (819_200 / r.tokens) ** 0.5
        assert r.config.optim.learning_rate == pytest.approx(want) == r.learning_rate
    by_budget = {r.tokens: r.learning_rate for r in runs if r.width == 128}
    assert by_budget[409_600] == pytest.approx(2 * by_budget[1_638_400])  # 4x the tokens: half the rate
    with pytest.raises(config_lib.ConfigError, match="base_tokens"):
        plan(GPT_STDLIB, "sweep.base_tokens=0")


def test_independent_weight_decay_gives_every_run_one_shrink_a_step():
    coupled = plan(GPT_STDLIB)
    assert {r.config.optim.weight_decay for r in coupled} == {0.1} == {r.weight_decay for r in coupled}
    runs = plan(GPT_STDLIB, "sweep.independent_weight_decay=3e-4")
    for r in runs:  # lr x weight decay, AdamW's shrink a step, is the same for every width
        assert r.config.optim.learning_rate * r.config.optim.weight_decay == pytest.approx(3e-4)
        assert r.weight_decay == r.config.optim.weight_decay == pytest.approx(3e-4 * r.width / 3e-3 / 128)
    assert runs[0].width < runs[-1].width and runs[0].weight_decay < runs[-1].weight_decay
    with pytest.raises(config_lib.ConfigError, match="independent_weight_decay"):
        plan(GPT_STDLIB, "sweep.independent_weight_decay=-1e-4")


def test_isoflop_plan_has_d_equal_c_over_6n_in_whole_steps():
    runs = plan(GPT_STDLIB + ":isoflop")
    budgets = (5e11, 1.5e12, 4.5e12)
    tokens_per_step = 32 * 128
    assert len(runs) == 12 and [r.budget_flops for r in runs[::4]] == list(budgets)
    for r in runs:
        exact = r.budget_flops / (6 * r.params)
        assert abs(r.tokens - exact) <= tokens_per_step / 2
        assert r.tokens % tokens_per_step == 0
        assert r.flops == pytest.approx(r.budget_flops, rel=6 * r.params * tokens_per_step / 2 / r.budget_flops + 1e-12)
    # Within one budget, bigger models get fewer tokens.
    first = runs[:4]
    assert [r.tokens for r in first] == sorted((r.tokens for r in first), reverse=True)


def test_min_steps_drops_runs_that_are_too_short():
    runs = plan(GPT_STDLIB + ":isoflop", "sweep.min_steps=100")
    assert all(r.steps >= 100 for r in runs) and 0 < len(runs) < 12


def test_run_config_invalid_for_one_size_is_marked_not_raised():
    runs = plan(GPT_STDLIB + ":tiny", "sweep.head_dim=32")  # 16 is not a multiple of 32
    bad = [r for r in runs if r.error]
    assert {r.width for r in bad} == {16} and len(bad) == 2
    assert "not a multiple of config.sweep.head_dim=32" in bad[0].error
    # validate() runs on each config: heads not divisible by the tensor axis fail only that size.
    runs = plan(GPT_STDLIB + ":tiny", "base.mesh.tensor=2", "sweep.head_dim=16", devices=2)
    assert {r.width for r in runs if r.error} == {16}
    assert "num_heads=1 is not divisible by the tensor axis" in next(r.error for r in runs if r.error)


def test_families_share_the_ladder():
    runs = plan(VS_LSTM + ":tiny")
    gpt_runs = [r for r in runs if r.family == "gpt"]
    lstm = [r for r in runs if r.family == "lstm"]
    assert len(gpt_runs) == len(lstm) > 0
    assert [r.width for r in gpt_runs] == [r.width for r in lstm]
    for r in lstm:
        assert r.id.startswith("lstm_w") and r.error == ""
        m = r.config.model
        assert (m.name, m.cell, m.head, m.d_model, m.hidden) == ("rnn", "lstm", "lm", r.width, r.width)
        assert m.num_layers == r.depth == 1
    assert [r.tokens for r in gpt_runs] == [r.tokens for r in lstm]


def test_run_config_file_reproduces_the_run(tmp_path):
    s = planning.load(GPT_STDLIB + ":tiny", [], tmp_path, num_devices=1)
    runner.write_run_files(s)
    for run in s.runs:
        loaded = config_lib.load(str(tmp_path / "runs" / run.id / "run_config.py"))
        assert loaded.to_dict() == run.config.to_dict()


def test_emit_slurm_and_k8s(tmp_path, capsys):
    args = ["sweep", "--config", GPT_STDLIB + ":tiny", "--workdir", str(tmp_path), "--devices", "1",
            "--config.base.train.batch_size=16", "--parallel", "2"]
    assert cli.main(args + ["--emit", "slurm"]) == 0
    script = (tmp_path / "sweep.slurm").read_text()
    directives = re.findall(r"^#SBATCH (\S+)$", script, re.MULTILINE)
    assert directives[:3] == ["--job-name=sweep-gpt_stdlib", "--array=0-5%2", "--ntasks=1"]
    # Resumable as a launched job is: TERM to the step before the limit, requeue, appended logs.
    assert {"--requeue", "--signal=TERM@120", "--open-mode=append",
            f"--output={tmp_path.resolve()}/slurm/%A_%a.out"} <= set(directives)
    task = f'bigmodel sweep --config {GPT_STDLIB}:tiny --workdir {tmp_path.resolve()} --only "$SLURM_ARRAY_TASK_ID"'
    assert f"\nsrun {task} --config.base.train.batch_size=16\n" in script
    # The task's own array element is requeued when `bigmodel sweep --only` exits 75 after a checkpoint.
    assert 'if [ $status -eq 75 ]; then\n' in script
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "sweep.slurm")]).returncode == 0

    assert cli.main(args + ["--emit", "k8s", "--image", "me/bigmodel:1"]) == 0
    job = yaml.safe_load((tmp_path / "sweep_k8s.yaml").read_text())
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("batch/v1", "Job", "sweep-gpt-stdlib")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed", 6, 2, 12)
    assert (pod["restartPolicy"], pod["terminationGracePeriodSeconds"]) == ("Never", 120)  # time to checkpoint
    (container,) = pod["containers"]
    assert container["image"] == "me/bigmodel:1" and container["workingDir"] == str(Path.cwd())
    assert container["command"] == ["sh", "-c", (f'exec bigmodel sweep --config {GPT_STDLIB}:tiny --workdir '
                                    f'{tmp_path.resolve()} --only "$JOB_COMPLETION_INDEX" '
                                    "--config.base.train.batch_size=16")]
    rows = results.read_rows(tmp_path)
    assert [r["status"] for r in rows] == ["planned"] * 6
    assert all((tmp_path / "runs" / r["run"] / "run_config.py").is_file() for r in rows)
    assert "gpt_w64_l1_t25k" in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, data_dir):
    """The ':tiny' sweep run twice: first with one run forced to fail, then fixed."""
    workdir = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    # Runs see one CPU device (compiling for the suite's 8 fake devices would double the time).
    mp.setenv("XLA_FLAGS", "")
    base = ["sweep", "--config", GPT_STDLIB + ":tiny", "--workdir", str(workdir), "--parallel", "2",
            "--devices", "1", f"--config.base.data.source={SMALL_CORPUS}",
            "--config.base.data.validation_fraction=0.2", f"--config.base.data.data_dir={data_dir}"]
    bad = f"--config.sweep.run_overrides=('{FAIL_RUN}:data.source=/no/such/dir/*.py',)"
    first = cli.main(base + [bad])
    after_first = {
        "rows": results.read_rows(workdir),
        "fit_existed": (workdir / "fit" / "fit.json").exists(),
        "metrics": {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in workdir.glob("runs/*/metrics.jsonl")},
        "report": report.format_report(workdir),
    }
    second = cli.main(base)
    mp.undo()
    return {"workdir": workdir, "first": first, "second": second, **after_first, "base": base}


@pytest.mark.slow
def test_failed_run_is_recorded_and_others_finish(tiny_sweep):
    assert tiny_sweep["first"] == 1
    rows = {r["run"]: r for r in tiny_sweep["rows"]}
    assert len(rows) == 6 and next(iter(rows)) == "gpt_w16_l1_t8.2k"
    assert rows[FAIL_RUN]["status"] == "failed"
    assert "matches no files" in rows[FAIL_RUN]["error"]
    others = {k: (r["status"], r["error"]) for k, r in rows.items() if k != FAIL_RUN}
    assert {status for status, _ in others.values()} == {"finished"}, others
    assert not tiny_sweep["fit_existed"]  # 5 finished runs: approach 3 needs 6
    assert f"{FAIL_RUN}" in tiny_sweep["report"] and "failed: " in tiny_sweep["report"]


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_retries_the_failed_one(tiny_sweep):
    assert tiny_sweep["second"] == 0
    workdir = tiny_sweep["workdir"]
    rows = results.read_rows(workdir)
    assert [r["status"] for r in rows] == ["finished"] * 6 and all(r["error"] == "" for r in rows)
    for run, (mtime, text) in tiny_sweep["metrics"].items():
        path = workdir / "runs" / run / "metrics.jsonl"
        assert path.stat().st_mtime_ns == mtime and path.read_text() == text, run
    assert FAIL_RUN not in tiny_sweep["metrics"]  # it failed before logging anything
    assert (workdir / "runs" / FAIL_RUN / "summary.json").is_file()


@pytest.mark.slow
def test_results_csv_matches_the_runs(tiny_sweep):
    workdir = tiny_sweep["workdir"]
    with open(workdir / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == results.COLUMNS
        rows = list(reader)
    for r in rows:
        summary = json.loads((workdir / "runs" / r["run"] / "summary.json").read_text())
        assert int(r["params"]) == summary["params"]  # the planner counts parameters as the trainer does
        assert int(r["params_nonembed"]) == summary["params_nonembed"]
        assert int(r["tokens"]) == summary["tokens"] == int(r["steps"]) * 8 * 64
        assert int(r["flops"]) == 6 * int(r["params"]) * int(r["tokens"])
        assert float(r["flops_with_attention"]) == pytest.approx(summary["flops"])
        assert float(r["loss"]) == pytest.approx(summary["eval_loss"])
        assert float(r["bits_per_byte"]) == pytest.approx(summary["eval_bits_per_byte"])
        assert 1.0 < float(r["loss"]) < math.log(257) and float(r["wall_s"]) > 0
    assert [int(r["steps"]) for r in rows] == [16, 16, 16, 48, 48, 48]


@pytest.mark.slow
def test_fit_and_plots_written(tiny_sweep):
    fit_dir = tiny_sweep["workdir"] / "fit"
    fit = json.loads((fit_dir / "fit.json").read_text())
    assert fit["n_points"] == 6 and fit["approach3"]["n_starts"] == 32
    for name in ("loss_vs_params.png", "loss_vs_compute_by_size.png", "loss_vs_compute.png"):
        assert (fit_dir / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_only_a_finished_run_does_nothing(tiny_sweep, capsys):
    workdir = tiny_sweep["workdir"]
    before = (workdir / "runs" / "gpt_w16_l1_t8.2k" / "metrics.jsonl").stat().st_mtime_ns
    assert cli.main(tiny_sweep["base"] + ["--only", "0"]) == 0
    assert "1 finished before, 0 to run" in capsys.readouterr().out
    assert (workdir / "runs" / "gpt_w16_l1_t8.2k" / "metrics.jsonl").stat().st_mtime_ns == before


@pytest.mark.slow
def test_report_lists_every_run_and_the_fit(tiny_sweep, capsys):
    assert cli.main(["scaling", "report", str(tiny_sweep["workdir"])]) == 0
    out = capsys.readouterr().out
    assert "6 runs: 6 finished, 0 running, 0 failed, 0 planned" in out
    for r in results.read_rows(tiny_sweep["workdir"]):
        assert f"{r['run']} " in out
    assert out.count("  finished") == 6
    assert "L(N, D) = E + A/N^alpha + B/D^beta: E=" in out and "fit.json, 6 runs" in out


# --------------------------------------------------------------------------- report of a live sweep


def test_report_shows_progress_of_running_runs(tmp_path):
    rows = [dict.fromkeys(results.COLUMNS, "")
            | {"run": run, "model": "gpt", "width": w, "params": p, "tokens": t, "steps": s,
               "flops": 6 * p * t, "status": st}
            for run, w, p, t, s, st in (("gpt_w32_l1_t4.1k", 32, 29000, 4096, 8, "running"),
                                        ("gpt_w64_l1_t4.1k", 64, 83000, 4096, 8, "planned"))]
    results.write_csv_atomic(tmp_path / "results.csv", rows)
    run_dir = tmp_path / "runs" / "gpt_w32_l1_t4.1k"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": {"batch_size": 8}, "data": {"seq_len": 64}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 3.5, "tokens_per_s": 1024.0}) + "\n")
    out = report.format_report(tmp_path)
    assert "2 runs: 0 finished, 1 running, 0 failed, 1 planned" in out
    assert "running: step 4/8, loss 3.500, 1.02k tok/s, ETA 2s" in out
    assert "gpt_w64_l1_t4.1k" in out and "fit of gpt: not yet (0 finished runs; approach 3 needs 6)" in out


def test_results_csv_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    good = [dict.fromkeys(results.COLUMNS, "") | {"run": f"r{i}", "status": "planned"} for i in range(3)]
    results.write_csv_atomic(path, good)
    before = path.read_text()
    with pytest.raises(ValueError):  # a bad row fails before the table is touched
        results.write_csv_atomic(path, good + [{"run": "x", "nonsense": 1}])
    assert path.read_text() == before
    seen = []
    real_replace = results.os.replace

    def spy(src, dst):
        seen.append((Path(src).read_text(), Path(dst).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", spy)
    results.write_csv_atomic(path, good[:1])
    # The new table is complete before it replaces the old one, which stays whole until then.
    assert seen == [(path.read_text(), before)] and len(path.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_eta_separates_start_up_from_compute():
    progress = runner.Progress([], parallel=2)
    progress.done = [(1e9, 11.0), (3e9, 13.0)]  # 10 s start-up, 1 s per 1e9 FLOPs
    assert progress.predict(5e9) == pytest.approx(15.0)
    progress.left = {"a": 5e9, "b": 5e9, "c": 5e9}
    assert progress.eta() == "ETA 22s"  # 45 s of runs over 2 processes


def test_mup_models_refuse_a_second_width_scaling_of_the_learning_rate():
    with pytest.raises(config_lib.ConfigError, match="lr_exponent=0"):
        plan(GPT_STDLIB + ":tiny", "base.model.mup=true", "base.model.tie_embeddings=false", "sweep.lr_exponent=1")
    runs = plan(GPT_STDLIB + ":tiny", "base.model.mup=true", "base.model.tie_embeddings=false", "sweep.lr_exponent=0")
    assert {r.config.optim.learning_rate for r in runs} == {1e-2} and all(r.config.model.mup for r in runs)
