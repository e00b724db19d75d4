"""`bigmodel launch k8s`: a JobSet manifest running `bigmodel train` on GPU nodes or a GKE TPU slice.

One pod per node (GPU) or per TPU host. The pods form an indexed Job inside a JobSet, so
each has a stable DNS name NAME-workers-0-INDEX.NAME (JobSet creates the headless service
NAME). Every pod gets

    BIGMODEL_COORDINATOR    pod 0's name and the coordinator port
    BIGMODEL_NUM_PROCESSES  the number of pods
    BIGMODEL_PROCESS_ID     its completion index (Kubernetes' job-completion-index annotation)

which bigmodel.distributed reads. A failed pod fails the JobSet, which then restarts all
pods together (up to --max-restarts times); they resume from the newest checkpoint, so
the workdir must be shared storage (--pvc, or a bucket mounted by the image). pod_spec,
indexed_job_spec, job and to_yaml also write the indexed Job of `bigmodel sweep --emit k8s`
(bigmodel.scaling.emit).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml  # PyYAML: already a dependency of flax, orbax and ml_collections
from bigmodel.launch import parse_env, train_command
from bigmodel.launch.tpu_vm import check_topology, tpu_slice

from bigmodel.config import ConfigError

REPLICATED_JOB = "workers"
# On TERM (node drain, preemption) `bigmodel train` checkpoints before it exits: give it time.
TERMINATION_GRACE_S = 120


def coordinator_address(name: str, port: int) -> str:
    """DNS name and port of pod 0 of the JobSet `name`."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}:{port}"


def pod_spec(containers: list[dict[str, Any]], volumes: list[dict[str, Any]] | None = None,
             node_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A pod spec whose pods are replaced rather than restarted in place and get time to checkpoint on TERM."""
    spec: dict[str, Any] = {"restartPolicy": "Never", "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                            "containers": containers}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if volumes:
        spec["volumes"] = volumes
    return spec


def indexed_job_spec(pod: dict[str, Any], completions: int, parallelism: int, backoff_limit: int) -> dict[str, Any]:
    """A Job spec with one completion index per pod (the index annotation, JOB_COMPLETION_INDEX in the pod)."""
    return {"parallelism": parallelism, "completions": completions, "completionMode": "Indexed",
            "backoffLimit": backoff_limit, "template": {"spec": pod}}


def job(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A batch/v1 Job manifest."""
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": dict(spec)}


def jobset(*, name: str, image: str, config: str, workdir: str, overrides: Sequence[str], nodes: int = 1,
           gpus_per_node: int = 0, tpu_type: str | None = None, tpu_topology: str | None = None,
           port: int = 8476, max_restarts: int = 3, pvc: str | None = None, mount_path: str = "/runs",
           env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JobSet manifest as a dict."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
        raise ConfigError(f"--name {name!r} must be a short DNS label: lower-case letters, digits and '-'")
    resources: dict[str, Any] = {}
    node_selector: dict[str, str] = {}
    annotations: dict[str, str] = {}
    if tpu_type:
        tpu = tpu_slice(tpu_type)
        if not tpu_topology:
            raise ConfigError(f"--tpu-type {tpu_type} needs --tpu-topology (the slice's chip grid, e.g. 4x4x2)")
        node_selector = {"cloud.google.com/gke-tpu-accelerator": tpu.gke_accelerator,
                         "cloud.google.com/gke-tpu-topology": check_topology(tpu, tpu_topology)}
        resources = {"google.com/tpu": tpu.chips_per_host}
        # One slice per node pool: the pods of a slice must not share hosts with another job's.
        annotations = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
        pods = tpu.hosts
    else:
        if nodes < 1:
            raise ConfigError("--nodes must be at least 1")
        resources = {"nvidia.com/gpu": gpus_per_node} if gpus_per_node else {}
        pods = nodes

    container: dict[str, Any] = {
        "name": "train",
        "image": image,
        "command": train_command(config, workdir, overrides),
        "ports": [{"name": "coordinator", "containerPort": port}],
        "env": [
            {"name": "BIGMODEL_COORDINATOR", "value": coordinator_address(name, port)},
            {"name": "BIGMODEL_NUM_PROCESSES", "value": str(pods)},
            {"name": "BIGMODEL_PROCESS_ID", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            *({"name": k, "value": v} for k, v in (env or {}).items()),
        ],
        "volumeMounts": [],
    }
    if resources:
        container["resources"] = {"limits": resources}
    volumes: list[dict[str, Any]] = []
    if pvc:
        container["volumeMounts"].append({"name": "runs", "mountPath": mount_path})
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": pvc}})
    if gpus_per_node and not tpu_type:
        # NCCL needs more shared memory than a container's default 64 MB /dev/shm.
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if not container["volumeMounts"]:
        del container["volumeMounts"]

    metadata: dict[str, Any] = {"name": name, **({"annotations": annotations} if annotations else {})}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            # Any failed pod fails the set and restarts every pod: processes only run together.
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                # No per-pod retries (backoffLimit 0): the JobSet restarts all pods together.
                "template": {"spec": indexed_job_spec(pod_spec([container], volumes, node_selector), pods, pods, 0)},
            }],
        },
    }


def to_yaml(manifest: Mapping[str, Any], header: str = "") -> str:
    """YAML text of a manifest, keys in the order written, with an optional comment header."""
    text = yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False, width=120)
    return "".join(f"# {line}\n" for line in header.splitlines()) + text


def main(args: argparse.Namespace) -> int:
    """Write and print the manifest; kubectl apply it with --submit."""
    manifest = jobset(
        name=args.name, image=args.image, config=args.config, workdir=args.workdir, overrides=args.overrides,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tpu_type=args.tpu_type, tpu_topology=args.tpu_topology,
        port=args.port, max_restarts=args.max_restarts, pvc=args.pvc, mount_path=args.mount_path,
        env=parse_env(args.env),
    )
    path = pathlib.Path(args.output or f"{args.name}.yaml")
    header = (f"bigmodel training job (written by `bigmodel launch k8s`); apply: kubectl apply -f {path}\n"
              "needs the JobSet controller: https://jobset.sigs.k8s.io")
    text = to_yaml(manifest, header)
    path.write_text(text)
    print(f"# {path}\n{text}", flush=True)
    if not args.submit:
        return 0
    try:
        return subprocess.run(["kubectl", "apply", "-f", str(path)]).returncode
    except FileNotFoundError:
        print("bigmodel launch k8s: kubectl is not installed", file=sys.stderr)
        return 127
