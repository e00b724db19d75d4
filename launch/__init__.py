"""`bigmodel launch {local,slurm,k8s,tpu-vm}`: run one experiment as a multi-process job.

Every launcher starts the same entry point on every process,

    bigmodel train --config EXPERIMENT --workdir WORKDIR [--config.KEY=VALUE ...]

and lets bigmodel.distributed find the coordinator, the process count and the process
index in the environment that the launcher (or the cluster) provides. Scripts and
manifests are written out and printed, so what runs is what you can read.

Installed as the package `bigmodel.launch` (the folder is the top-level launch/).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from bigmodel.config import ConfigError


def train_command(config: str, workdir: str, overrides: Sequence[str], program: str = "bigmodel") -> list[str]:
    """The argv of `bigmodel train` for a config, a workdir and 'KEY=VALUE' overrides."""
    return [*shlex.split(program), "train", "--config", config, "--workdir", workdir,
            *(f"--config.{o}" for o in overrides)]


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """'KEY=VALUE' strings from repeated --env flags as a dict."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiments/NAME.py[:VARIANT], as for `bigmodel train`")
    p.add_argument("--workdir", required=True, help="run directory (shared by all processes; resumed if it exists)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every process (repeatable)")
    p.set_defaults(takes_overrides=True)


def _cmd_local(args: argparse.Namespace) -> int:
    from bigmodel.launch import local

    argv = train_command(args.config, args.workdir, args.overrides)[2:]  # after 'bigmodel train'
    return local.run(argv, args.processes, args.devices_per_process, extra_env=parse_env(args.env))


def _cmd_slurm(args: argparse.Namespace) -> int:
    from bigmodel.launch import slurm

    return slurm.main(args)


def _cmd_k8s(args: argparse.Namespace) -> int:
    from bigmodel.launch import k8s

    return k8s.main(args)


def _cmd_tpu_vm(args: argparse.Namespace) -> int:
    from bigmodel.launch import tpu_vm

    return tpu_vm.main(args)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bigmodel launch …` to the command's sub-parsers."""
    launch = subparsers.add_parser(
        "launch", help="run an experiment on several processes: local, Slurm, Kubernetes, TPU VM",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = launch.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)

    p = sub.add_parser("local", help="P cooperating processes on this machine (CPU: fake devices per process)")
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--devices_per_process", "--devices-per-process", type=int, default=None,
                   help="fake CPU devices per process (sets JAX_PLATFORMS=cpu and XLA_FLAGS)")
    _common(p)
    p.set_defaults(func=_cmd_local)

    p = sub.add_parser("slurm", help="write WORKDIR/launch/slurm.sbatch (and sbatch it with --submit)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", "--gpus-per-node", type=int, default=0, help="0 for CPU nodes")
    p.add_argument("--tasks_per_node", "--tasks-per-node", type=int, default=1,
                   help="processes per node: 1 (one owns all the node's GPUs) or the GPU count (one per GPU)")
    p.add_argument("--cpus_per_task", "--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (the job requeues itself when it ends)")
    p.add_argument("--account", default=None)
    p.add_argument("--job_name", "--job-name", default=None)
    p.add_argument("--submit", action="store_true", help="run sbatch on the script")
    _common(p)
    p.set_defaults(func=_cmd_slurm)

    p = sub.add_parser("k8s", help="write a JobSet manifest for GPU nodes or a GKE TPU slice")
    p.add_argument("--name", required=True, help="JobSet name (a DNS label: lower case, digits, '-')")
    p.add_argument("--image", required=True, help="container image with bigmodel installed")
    p.add_argument("--nodes", type=int, default=1, help="GPU pods (one per node)")
    p.add_argument("--gpus_per_node", "--gpus-per-node", type=int, default=0)
    p.add_argument("--tpu_type", "--tpu-type", default=None, help="e.g. v5p-64, v5litepod-16, v6e-16")
    p.add_argument("--tpu_topology", "--tpu-topology", default=None, help="e.g. 4x4x2 (v4/v5p) or 4x4 (v5e/v6e)")
    p.add_argument("--port", type=int, default=8476, help="coordinator port on pod 0")
    p.add_argument("--max_restarts", "--max-restarts", type=int, default=3,
                   help="times the whole set is restarted after a failure")
    p.add_argument("--pvc", default=None, help="PersistentVolumeClaim holding the workdir")
    p.add_argument("--mount_path", "--mount-path", default="/runs", help="where --pvc is mounted")
    p.add_argument("--output", default=None, help="manifest path (default: NAME.yaml)")
    p.add_argument("--submit", action="store_true", help="kubectl apply the manifest")
    _common(p)
    p.set_defaults(func=_cmd_k8s)

    p = sub.add_parser("tpu-vm", help="print (or run) the gcloud commands for a Cloud TPU VM slice")
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-64")
    p.add_argument("--project", default=None)
    p.add_argument("--submit", action="store_true", help="run the commands instead of printing them")
    _common(p)
    p.set_defaults(func=_cmd_tpu_vm)
    return launch


def print_command(argv: Sequence[str], out=None) -> None:
    """Print a command line, shell-quoted."""
    print(shlex.join(argv), file=out or sys.stdout, flush=True)
