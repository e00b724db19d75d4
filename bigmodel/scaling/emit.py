"""Cluster jobs for a planned sweep: a Slurm job array or a Kubernetes indexed Job, one task per run.

Each task runs `bigmodel sweep … --only INDEX` against the shared sweep directory (the plan is
the same on every node, so index i is run i of results.csv), and the last task to finish
writes the fit. The job header, the requeue on preemption (exit status 75 after a
checkpoint) and the Job manifest are the launchers' (bigmodel.launch.slurm / .k8s).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from bigmodel.scaling.plan import Sweep
from bigmodel.scaling.results import write_text_atomic


def _task_command(sweep: Sweep, index_expr: str) -> str:
    """The shell command of one array task; index_expr is the scheduler's task-index variable."""
    head = ["bigmodel", "sweep", "--config", sweep.spec, "--workdir", str(sweep.workdir.resolve()), "--only"]
    return " ".join([shlex.join(head), index_expr, shlex.join(f"--config.{o}" for o in sweep.overrides)]).rstrip()


def _name(sweep: Sweep) -> str:
    """The sweep config's file name without suffix."""
    return Path(sweep.spec.partition(":")[0]).stem


def emit_slurm(sweep: Sweep, parallel: int | None) -> Path:
    """Write DIR/sweep.slurm: a job array with one task per planned run."""
    from bigmodel.launch import slurm

    n = len(sweep.runs)
    workdir = sweep.workdir.resolve()
    path = sweep.workdir / "sweep.slurm"
    directives = [f"--job-name=sweep-{_name(sweep)}", f"--array=0-{n - 1}" + (f"%{parallel}" if parallel else ""),
                  "--ntasks=1", f"--chdir={Path.cwd()}", f"--output={workdir}/slurm/%A_%a.out",
                  *slurm.resumable_directives()]
    text = slurm.batch_script(
        title=f"bigmodel sweep (written by `bigmodel sweep --emit slurm`); submit: sbatch {workdir}/sweep.slurm",
        directives=directives,
        notes=["Add the resources of one run as #SBATCH lines above, e.g. --gres=gpu:1 --time=04:00:00.",
               f"{n} runs; task i trains run i of the plan (results.csv lists them in order). A task whose run",
               "has finished exits at once, so resubmitting the array finishes what is missing."],
        setup=["set -uo pipefail"],
        step="srun " + _task_command(sweep, '"$SLURM_ARRAY_TASK_ID"'),
        job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}",
    )
    (sweep.workdir / "slurm").mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def emit_k8s(sweep: Sweep, parallel: int | None, image: str) -> Path:
    """Write DIR/sweep_k8s.yaml: an indexed Job with one completion per planned run."""
    from bigmodel.launch import k8s

    n = len(sweep.runs)
    container = {"name": "run", "image": image, "workingDir": str(Path.cwd()),
                 "command": ["sh", "-c", "exec " + _task_command(sweep, '"$JOB_COMPLETION_INDEX"')]}
    manifest = k8s.job("sweep-" + _name(sweep).replace("_", "-").lower(),
                       k8s.indexed_job_spec(k8s.pod_spec([container]), n, parallel or n, 2 * n))
    path = sweep.workdir / "sweep_k8s.yaml"
    write_text_atomic(path, k8s.to_yaml(manifest, header=(
        f"{n} runs; completion index i trains run i of the plan. The sweep directory must be on a\n"
        "volume every pod mounts at the same path (add it under volumes/volumeMounts).")))
    return path
