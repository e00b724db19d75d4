"""`bigmodel launch slurm`: an sbatch script that runs `bigmodel train` as one task per node or per GPU.

The tasks find their rank, the task count and the coordinator (the step's first node) in
the SLURM_* variables (bigmodel.distributed). Before the time limit Slurm sends the tasks
TERM; `bigmodel train` then checkpoints and exits with status 75, and the script requeues
the job, which resumes from that checkpoint. Jobs preempted by Slurm itself are requeued
by Slurm (`--requeue`) and resume the same way. `batch_script` and `resumable_directives`
also write the job arrays of `bigmodel sweep --emit slurm` (bigmodel.scaling.emit).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

from bigmodel.launch import parse_env, train_command

from bigmodel.config import ConfigError
from bigmodel.exit_codes import PREEMPTED  # `bigmodel train` stopped by TERM after checkpointing

# Seconds of notice before the time limit: enough for a checkpoint to be written.
NOTICE_S = 120
STOP_WAIT_S = 60


def resumable_directives() -> list[str]:
    """sbatch directives of a job that checkpoints on notice and requeues itself (see batch_script)."""
    return [
        "--open-mode=append",  # a requeued job adds to the same log
        "--requeue",
        f"--signal=TERM@{NOTICE_S}",  # to every task (not the batch shell): checkpoint and stop
    ]


def batch_script(*, title: str, directives: Sequence[str], notes: Sequence[str], setup: Sequence[str], step: str,
                 job: str = "$SLURM_JOB_ID") -> str:
    """An sbatch script that runs `step` (an srun line) and requeues `job` when the step exits with PREEMPTED.

    title and notes become comment lines; setup lines (environment) run before the step. The
    step runs under srun because `--signal` reaches job steps, not the batch shell.
    """
    return "\n".join([
        "#!/bin/bash",
        f"# {title}",
        *(f"#SBATCH {d}" for d in directives),
        "",
        *(f"# {note}" for note in notes),
        *setup,
        "",
        step,
        "status=$?",
        f"# {PREEMPTED} = stopped early (time limit or preemption notice) after a checkpoint: run again.",
        f"if [ $status -eq {PREEMPTED} ]; then",
        f"  echo \"bigmodel: checkpointed before the end of the allocation; requeueing job {job}\"",
        f"  scontrol requeue \"{job}\"",
        "fi",
        "exit $status",
    ]) + "\n"


def sbatch_script(*, config: str, workdir: str, overrides: Sequence[str], nodes: int, gpus_per_node: int = 0,
                  tasks_per_node: int = 1, cpus_per_task: int | None = None, partition: str | None = None,
                  time: str | None = None, account: str | None = None, job_name: str | None = None,
                  env: Mapping[str, str] | None = None, chdir: str | None = None,
                  venv: str | None = None) -> str:
    """The text of the sbatch script."""
    if nodes < 1 or tasks_per_node < 1 or gpus_per_node < 0:
        raise ConfigError("--nodes and --tasks-per-node must be at least 1, --gpus-per-node at least 0")
    if gpus_per_node and tasks_per_node not in (1, gpus_per_node):
        raise ConfigError(f"--tasks-per-node={tasks_per_node} with --gpus-per-node={gpus_per_node}: use 1 "
                          f"(one process per node) or {gpus_per_node} (one process per GPU)")
    workdir = os.path.abspath(workdir)
    name = job_name or "bigmodel-" + re.sub(r"[^A-Za-z0-9_.-]", "_", pathlib.Path(config.split(":")[0]).stem)
    directives = [f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}"]
    directives += [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    directives += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    directives += [f"--partition={partition}"] if partition else []
    directives += [f"--account={account}"] if account else []
    directives += [f"--time={time}"] if time else []
    directives += [f"--chdir={chdir or os.getcwd()}", f"--output={workdir}/launch/slurm-%j.out",
                   *resumable_directives()]
    # --wait: once a task ends the others get that long to end too, then are killed; a task that
    # crashed thus stops the run, and tasks stopping together after a preemption checkpoint are
    # not cut short (--kill-on-bad-exit would treat the first exit status 75 as a failure).
    srun = ["srun", "--label", f"--wait={STOP_WAIT_S}", *train_command(config, workdir, overrides)]
    setup = [f"source {shlex.quote(venv)}/bin/activate"] if venv else []
    setup += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    script = f"{workdir}/launch/slurm.sbatch"
    return batch_script(
        title=f"bigmodel training job (written by `bigmodel launch slurm`); submit: sbatch {script}",
        directives=directives,
        notes=[f"{nodes * tasks_per_node} process(es): each srun task runs `bigmodel train`, which takes its rank,",
               "the task count and the coordinator (the first node) from the SLURM_* variables."],
        setup=setup, step=shlex.join(srun))


def _venv() -> str | None:
    """The virtual environment this command runs in (activated in the job too), if any."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def main(args: argparse.Namespace) -> int:
    """Write, print and (with --submit) sbatch the script."""
    text = sbatch_script(
        config=args.config, workdir=args.workdir, overrides=args.overrides, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition, time=args.time, account=args.account, job_name=args.job_name,
        env=parse_env(args.env), venv=_venv(),
    )
    path = pathlib.Path(args.workdir).resolve() / "launch" / "slurm.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"# {path}\n{text}", flush=True)
    if not args.submit:
        print(f"submit with: sbatch {path}")
        return 0
    try:
        done = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print("bigmodel launch slurm: sbatch is not installed here; submit the script from a login node",
              file=sys.stderr)
        return 127
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode
