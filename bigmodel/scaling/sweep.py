"""Scaling sweeps: plan model sizes × data, run each point as an ordinary training run, fit.

    bigmodel sweep --config experiments/scaling/gpt_stdlib.py[:tiny] --workdir DIR
                   [--parallel P] [--emit slurm|k8s] [--only INDEX|RUN] [--dry-run]
                   [--config.KEY=VALUE ...]

The sweep config (``base``, ``sweep`` and ``families`` groups) and the size rules are
described in plan.py, which turns them into runs. runner.py gives each run its directory
``DIR/runs/<id>/`` with ``run_config.py`` (so ``bigmodel train --config
DIR/runs/<id>/run_config.py --workdir DIR/runs/<id>`` repeats it exactly) and trains the
runs as local processes. Rerunning the sweep skips finished runs, resumes interrupted ones
from their checkpoints and retries failed ones. ``DIR/results.csv`` (one row per planned
run, replaced atomically on every state change) is the table the fitter reads; at the end
``DIR/fit/`` gets fit.json and the plots. ``--emit slurm|k8s`` (emit.py) writes a job array
/ indexed Job that runs ``--only INDEX`` per task instead of running anything here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bigmodel import exit_codes
from bigmodel.config import ConfigError
from bigmodel.scaling import emit, plan, report, results
from bigmodel.scaling.plan import Sweep
from bigmodel.scaling.runner import Interrupted, is_finished, run_local, write_results, write_run_files


def finalize(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Fit every family with enough finished runs into DIR/fit[/family], and draw the sweep plots."""
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished:
        return
    families = list(dict.fromkeys(r["model"] for r in rows))
    s = sweep.config.sweep
    for family in families:
        family_rows = [r for r in finished if r["model"] == family]
        target = report.fit_dir(sweep.workdir, family, families)
        message = report.fit_rows(family_rows, target, starts=s.fit_starts, n_bootstrap=s.fit_bootstrap)
        print(f"[sweep] fit {family}: {message}", flush=True)
    for path in report.plot_sweep(finished, sweep.workdir / "fit"):
        print(f"[sweep] plot {path}", flush=True)


def check_stores(runs: list) -> None:
    """Open the token stores the runs read (their manifests) before any run starts, so that a store not yet
    prepared stops the sweep at once with the store's error instead of failing every run in turn."""
    from bigmodel.data import store

    for path in sorted({p for r in runs if r.config is not None for p in r.config.data.get("sources", ())}):
        store.Store(path)


def execute(sweep: Sweep, parallel: int = 1, only: str | None = None) -> int:
    """Run the sweep's unfinished runs here (or just one with `only`); 0 when every selected run finished."""
    selected = [plan.select(sweep.runs, only)] if only is not None else sweep.runs
    check_stores(selected)
    sweep.workdir.mkdir(parents=True, exist_ok=True)
    from bigmodel.metrics import atomic_write_text

    atomic_write_text(sweep.workdir / "sweep_config.json",
                      json.dumps({"spec": sweep.spec, "overrides": sweep.overrides,
                                  "config": sweep.config.to_dict()}, indent=1, default=str) + "\n")
    write_run_files(sweep)
    for run in selected:
        if run.error:
            print(f"[sweep] failed {run.id}: {run.error}", flush=True)
    todo = [r for r in selected if not r.error and not is_finished(sweep, r)]
    skipped = sum(1 for r in selected if not r.error and r not in todo)
    print(f"[sweep] {sweep.workdir}: {len(sweep.runs)} runs planned, {skipped} finished before, "
          f"{len(todo)} to run" + (f" ({parallel} at a time)" if len(todo) > 1 else ""), flush=True)
    write_results(sweep)
    run_local(sweep, todo, parallel)
    rows = write_results(sweep)
    # Fit after new results: at the end of a local sweep, or when an array task completes the table.
    complete = all(r["status"] == "finished" for r in rows)
    if (todo or not (sweep.workdir / "fit").exists()) and (complete or only is None):
        finalize(sweep, rows)
    sweep.upload()  # the fit and its plots
    failed = [r for r, run in zip(rows, sweep.runs) if run in selected and r["status"] != "finished"]
    print(f"[sweep] {sum(r['status'] == 'finished' for r in rows)}/{len(rows)} runs finished"
          + (f"; {len(failed)} failed (rerun the same command to retry them)" if failed else "")
          + f"; table: {sweep.remote or sweep.workdir}/{results.RESULTS}", flush=True)
    return 1 if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`bigmodel sweep`: plan, then run here, one run (--only), or emit cluster jobs."""
    sweep = plan.load(args.config, args.overrides, args.workdir, args.devices)
    if args.dry_run:
        plan.print_plan(sweep.runs)
        return 0
    if args.emit and sweep.remote:
        raise ConfigError(f"--emit writes job scripts for a local or shared --workdir, not a bucket ({sweep.remote}); "
                          "run the sweep here with --workdir in the bucket, or emit with a shared file system path")
    if args.emit:
        sweep.workdir.mkdir(parents=True, exist_ok=True)
        write_run_files(sweep)
        write_results(sweep)
        plan.print_plan(sweep.runs)
        if args.emit == "slurm":
            path = emit.emit_slurm(sweep, args.parallel)
            print(f"wrote {path}; submit it with: sbatch {path}")
        else:
            path = emit.emit_k8s(sweep, args.parallel, args.image)
            print(f"wrote {path}; submit it with: kubectl apply -f {path}")
        return 0
    try:
        return execute(sweep, args.parallel or 1, args.only)
    except Interrupted as e:
        print(f"[sweep] stopped by {e}; the runs in flight saved checkpoints: rerun the same command to go on",
              flush=True)
        return exit_codes.PREEMPTED


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bigmodel sweep` to the top-level sub-parsers."""
    p = subparsers.add_parser(
        "sweep", help="plan and run a scaling sweep (model sizes x data); --config.KEY=VALUE overrides",
        description="Plan a sweep from a sweep config (grid of sizes x token budgets, or isoFLOP budgets), "
                    "train every run as `bigmodel train` in DIR/runs/<id>, keep DIR/results.csv up to date "
                    "and fit scaling laws into DIR/fit at the end. Rerunning skips finished runs.")
    p.add_argument("--config", required=True, help="experiments/scaling/NAME.py[:VARIANT]")
    p.add_argument("--workdir", required=True, help="sweep directory (results.csv, runs/, fit/)")
    p.add_argument("--parallel", type=_positive_int, default=None, metavar="P",
                   help="runs at a time: local processes, or the array's concurrency with --emit [default: 1 / all]")
    p.add_argument("--emit", choices=("slurm", "k8s"), default=None,
                   help="write a Slurm job array or a Kubernetes indexed Job instead of running here")
    p.add_argument("--image", default="bigmodel:latest", help="container image for --emit k8s [default: %(default)s]")
    p.add_argument("--only", default=None, metavar="INDEX|RUN", help="run one run of the plan (what array tasks call)")
    p.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="devices each run sees, for validating the configs [default: this machine's]")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the plan and exit")
    p.set_defaults(func=cmd_sweep, takes_overrides=True)
    return p
