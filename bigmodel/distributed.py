"""Multi-process start-up: find the cluster from the environment, then `jax.distributed.initialize`.

One process per host (or per GPU) runs the same `bigmodel train` command; this module tells
each one the coordinator address, the process count and its own index. Sources, first
match wins, and explicit arguments (the `--coordinator/--num_processes/--process_id`
flags) override any of the detected values:

  env    BIGMODEL_COORDINATOR=host:port, BIGMODEL_NUM_PROCESSES, BIGMODEL_PROCESS_ID
         (`bigmodel launch local`, and the Kubernetes manifests of `bigmodel launch k8s`,
         where the index comes from JOB_COMPLETION_INDEX of an indexed Job / JobSet)
  slurm  an `srun` step with several tasks: SLURM_STEP_NODELIST, SLURM_STEP_NUM_TASKS,
         SLURM_PROCID (the coordinator is the step's first node)
  tpu    a Cloud TPU VM or GKE TPU slice: JAX detects everything itself
  single anything else: nothing to do

Call `initialize` before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Mapping

import jax

from bigmodel.config import ConfigError

# Slurm gives no port; derive one from the job id the way JAX does, so every task agrees.
_SLURM_PORT_BASE = 65535 - 2**12 + 1


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process takes part in a run."""

    source: str  # 'single' | 'flags' | 'env' | 'k8s' | 'slurm' | 'tpu'
    coordinator: str | None = None  # host:port of process 0's coordinator service
    num_processes: int | None = None  # None: JAX works it out (TPU)
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # GPUs this process owns; None = all visible

    @property
    def multi_process(self) -> bool:
        """True when jax.distributed must be initialised."""
        return self.source == "tpu" or (self.num_processes or 1) > 1


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-010,020],cpu1' -> 'gpu003'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    head = nodelist[:end].strip()
    if "[" not in head:
        return head
    prefix, _, ranges = head.partition("[")
    return prefix + re.split(r"[,\-\]]", ranges)[0]


def _slurm(env: Mapping[str, str]) -> Cluster | None:
    # Only inside an srun step: the batch script itself also sees SLURM_NTASKS but is one process.
    if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
        return None
    count = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or 1
    if count <= 1:
        return None
    port = _int(env, "BIGMODEL_COORDINATOR_PORT") or _SLURM_PORT_BASE + (_int(env, "SLURM_JOB_ID") or 0) % 2**12
    nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES") or 1
    local_ids = None
    if count > nodes:
        # Several tasks per node means one task per GPU: each owns the GPU at its local rank,
        # unless Slurm already narrowed CUDA_VISIBLE_DEVICES to one device.
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if len(visible) != 1:
            local_ids = (_int(env, "SLURM_LOCALID") or 0,)
    return Cluster("slurm", f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}", count,
                   _int(env, "SLURM_PROCID"), local_ids)


def _bigmodel_env(env: Mapping[str, str]) -> Cluster | None:
    count = _int(env, "BIGMODEL_NUM_PROCESSES")
    if count is None:
        return None
    process_id = _int(env, "BIGMODEL_PROCESS_ID")
    source = "env"
    if process_id is None and "JOB_COMPLETION_INDEX" in env:
        # Kubernetes indexed Job / JobSet: the pod's index is its process id.
        process_id, source = _int(env, "JOB_COMPLETION_INDEX"), "k8s"
    return Cluster(source, env.get("BIGMODEL_COORDINATOR") or None, count, process_id)


def _tpu_present(env: Mapping[str, str]) -> bool:
    """A TPU host: libtpu installed and TPU chips (or a GKE TPU slice's variables) present."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool("TPU_WORKER_HOSTNAMES" in env or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           env: Mapping[str, str] | None = None, tpu: bool | None = None) -> Cluster:
    """Work out this process's place in the run; explicit arguments override the environment."""
    env = os.environ if env is None else env
    found = _bigmodel_env(env) or _slurm(env)
    if found is None and (tpu if tpu is not None else _tpu_present(env)):
        hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
        if len(hosts) != 1:  # one named host is a single-host slice: nothing to set up
            found = Cluster("tpu")
    explicit = (coordinator, num_processes, process_id) != (None, None, None)
    if found is None and not explicit:
        return Cluster("single", num_processes=1, process_id=0)
    found = found or Cluster("flags")
    cluster = dataclasses.replace(
        found,
        source="flags" if explicit and found.source != "tpu" else found.source,
        coordinator=coordinator or found.coordinator,
        num_processes=num_processes if num_processes is not None else found.num_processes,
        process_id=process_id if process_id is not None else found.process_id,
    )
    if cluster.source == "tpu":
        return cluster  # JAX fills in whatever was not given
    if (cluster.num_processes or 1) <= 1:
        return Cluster("single", num_processes=1, process_id=0)
    missing = [name for name, value in (("coordinator", cluster.coordinator), ("process_id", cluster.process_id))
               if value is None]
    if missing:
        raise ConfigError(
            f"{cluster.num_processes} processes but no {' or '.join(missing)}: pass --{missing[0]} "
            f"(or set BIGMODEL_{missing[0].upper()})"
        )
    if not 0 <= cluster.process_id < cluster.num_processes:
        raise ConfigError(f"process_id {cluster.process_id} is outside 0..{cluster.num_processes - 1}")
    return cluster


def _fail_fast() -> None:
    """Make an uncaught exception end this process at once, with a non-zero status."""

    # Otherwise JAX's exit handler waits at a shutdown barrier for peers that are themselves
    # stuck waiting for this process in a collective; exiting lets the launcher stop them all.
    def hook(kind, value, tb):
        traceback.print_exception(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def _cpu_only(env: Mapping[str, str]) -> bool:
    """True when JAX will compute on the CPU (no accelerator plugin, or JAX_PLATFORMS=cpu)."""
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
    return not any(importlib.util.find_spec(p) for p in plugins)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Cluster:
    """Join the multi-process run this process belongs to; a no-op for a single process."""
    cluster = detect(coordinator, num_processes, process_id)
    if not cluster.multi_process:
        return cluster
    if _cpu_only(os.environ):
        # Cross-process collectives on the CPU backend need an implementation; gloo works over TCP.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.source == "tpu":
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
    else:
        # Everything is known: stop JAX's own detection from second-guessing (e.g. pinning GPUs).
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
            cluster_detection_method="deactivate",
        )
    _fail_fast()
    return cluster
