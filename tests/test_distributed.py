"""Cluster detection from the environment: Slurm, Kubernetes, BIGMODEL_* variables, flags, single process."""

import jax
import pytest

from bigmodel import distributed
from bigmodel.config import ConfigError

SLURM_STEP = {  # what srun sets in each task of a 2-node, 4-task step (task 3 shown)
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
}


def detect(env, **flags):
    return distributed.detect(env=env, tpu=False, **flags)


def test_single_process_is_a_no_op(monkeypatch):
    assert detect({}) == distributed.Cluster("single", num_processes=1, process_id=0)
    assert not detect({}).multi_process
    # A one-task Slurm step and a one-pod Job are single processes too.
    one_task = {**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert detect(one_task).source == "single"
    assert detect({"BIGMODEL_NUM_PROCESSES": "1"}).source == "single"
    # initialize() itself: no env, nothing happens (JAX here is already running with 8 local devices).
    for name in list(distributed.os.environ):
        if name.startswith(("SLURM_", "BIGMODEL_", "JOB_COMPLETION")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_tpu_present", lambda env: False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
    assert distributed.initialize().source == "single"
    assert called == [] and jax.process_count() == 1


def test_slurm_step():
    c = detect(SLURM_STEP)
    assert c.source == "slurm" and c.multi_process
    # Coordinator: the step's first node, on a port derived from the job id (the same in every task).
    assert c.coordinator == f"gpu007:{65535 - 4096 + 1 + 4242 % 4096}"
    assert (c.num_processes, c.process_id) == (4, 3)
    # Two tasks per node: one per GPU, each owning the GPU at its local rank.
    assert c.local_device_ids == (1,)
    one_per_node = detect({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert one_per_node.local_device_ids is None  # the process sees all its node's GPUs
    assert detect({**SLURM_STEP, "BIGMODEL_COORDINATOR_PORT": "1234"}).coordinator == "gpu007:1234"


def test_slurm_batch_script_is_not_a_step():
    # The batch script sees SLURM_NTASKS=4 and SLURM_PROCID=0 but is one process: no step node list.
    env = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    assert detect(env).source == "single"


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("a1,b2", "a1"), ("gpu[003-010,020],cpu1", "gpu003"), ("n[7,9]", "n7"),
    ("rack1-n[12-13]", "rack1-n12"),
])
def test_first_host(nodelist, first):
    assert distributed.first_host(nodelist) == first


def test_kubernetes_indexed_job():
    env = {"BIGMODEL_COORDINATOR": "run-workers-0-0.run:8476", "BIGMODEL_NUM_PROCESSES": "4",
           "JOB_COMPLETION_INDEX": "2", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert detect(env) == distributed.Cluster("k8s", "run-workers-0-0.run:8476", 4, 2)
    # The manifest's BIGMODEL_PROCESS_ID (from the completion-index annotation) is taken as is.
    assert detect({**env, "BIGMODEL_PROCESS_ID": "3"}) == distributed.Cluster("env", "run-workers-0-0.run:8476", 4, 3)


def test_explicit_flags_win():
    c = detect(SLURM_STEP, coordinator="10.1.2.3:999", process_id=0)
    assert c == distributed.Cluster("flags", "10.1.2.3:999", 4, 0, (1,))  # the rest still comes from Slurm
    c = detect({"BIGMODEL_COORDINATOR": "a:1", "BIGMODEL_NUM_PROCESSES": "4", "BIGMODEL_PROCESS_ID": "1"},
               num_processes=2)
    assert (c.coordinator, c.num_processes, c.process_id) == ("a:1", 2, 1)
    assert detect({}, coordinator="h:1", num_processes=2, process_id=1) == distributed.Cluster("flags", "h:1", 2, 1)
    assert detect(SLURM_STEP, num_processes=1).source == "single"  # --num_processes 1 runs alone


def test_incomplete_or_inconsistent_setups_are_refused():
    with pytest.raises(ConfigError, match="no coordinator"):
        detect({}, num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match="no process_id"):
        detect({"BIGMODEL_NUM_PROCESSES": "2", "BIGMODEL_COORDINATOR": "h:1"})
    with pytest.raises(ConfigError, match="outside 0..1"):
        detect({}, coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="BIGMODEL_NUM_PROCESSES='two'"):
        detect({"BIGMODEL_NUM_PROCESSES": "two"})


def test_tpu_is_left_to_jax():
    assert distributed.detect(env={}, tpu=True) == distributed.Cluster("tpu")
    assert distributed.detect(env={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, tpu=True).multi_process
    # A single-host slice has nothing to set up.
    assert distributed.detect(env={"TPU_WORKER_HOSTNAMES": "localhost"}, tpu=True).source == "single"


def test_initialize_passes_the_detected_values(monkeypatch):
    calls, updates = [], []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
    monkeypatch.setattr(distributed.sys, "excepthook", distributed.sys.excepthook)  # restored afterwards
    for name, value in {**SLURM_STEP, "JAX_PLATFORMS": "cpu"}.items():
        monkeypatch.setenv(name, value)
    cluster = distributed.initialize()
    assert cluster.source == "slurm"
    assert calls == [dict(coordinator_address=cluster.coordinator, num_processes=4, process_id=3,
                          local_device_ids=[1], cluster_detection_method="deactivate")]
    assert updates == [("jax_cpu_collectives_implementation", "gloo")]  # CPU collectives across processes
