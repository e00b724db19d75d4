"""Kubernetes JobSet manifests (GPU and GKE TPU) and the TPU VM commands, read back and checked."""

import shlex

import jax
import pytest
import yaml
from bigmodel.launch import k8s, tpu_vm

from bigmodel import cli, distributed
from bigmodel.config import ConfigError

from conftest import GPT_TINY


def pod_spec(manifest):
    (job,) = manifest["spec"]["replicatedJobs"]
    return job, job["template"]["spec"], job["template"]["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_gpu_jobset(tmp_path, capsys):
    out = tmp_path / "run.yaml"
    assert cli.main(["launch", "k8s", "--name", "gpt-run", "--image", "reg/bigmodel:1", "--nodes", "4",
                     "--gpus-per-node", "8", "--pvc", "runs", "--config", GPT_TINY, "--workdir", "/runs/gpt",
                     "--output", str(out), "--config.train.steps=50"]) == 0
    manifest = yaml.safe_load(out.read_text())
    assert yaml.safe_load(capsys.readouterr().out) == manifest  # what is printed is what is written
    assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    job, job_spec, pod = pod_spec(manifest)
    # Stable pod names through the JobSet's headless service: pod 0 is NAME-workers-0-0.NAME.
    assert manifest["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "gpt-run"}
    assert (job["name"], job["replicas"]) == ("workers", 1)
    assert (job_spec["parallelism"], job_spec["completions"], job_spec["completionMode"]) == (4, 4, "Indexed")
    # Failures restart the whole set (all processes together), never single pods.
    assert job_spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 120  # time to checkpoint on TERM
    assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 3}
    (container,) = pod["containers"]
    assert container["command"] == ["bigmodel", "train", "--config", GPT_TINY, "--workdir", "/runs/gpt",
                                    "--config.train.steps=50"]
    env = env_of(container)
    assert env["BIGMODEL_COORDINATOR"] == "gpt-run-workers-0-0.gpt-run:8476"
    assert env["BIGMODEL_NUM_PROCESSES"] == "4"
    assert env["BIGMODEL_PROCESS_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert container["ports"] == [{"name": "coordinator", "containerPort": 8476}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert {"name": "runs", "mountPath": "/runs"} in container["volumeMounts"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}} in pod["volumes"]

    # What pod 2 makes of that environment (the index annotation resolved by Kubernetes):
    pod_env = {**{k: v for k, v in env.items() if isinstance(v, str)}, "BIGMODEL_PROCESS_ID": "2"}
    assert distributed.detect(env=pod_env, tpu=False) == distributed.Cluster(
        "env", "gpt-run-workers-0-0.gpt-run:8476", 4, 2)


def test_tpu_jobset():
    manifest = k8s.jobset(name="tpu-run", image="img", config=GPT_TINY, workdir="/runs/t", overrides=[],
                          tpu_type="v5p-64", tpu_topology="2x4x4", max_restarts=5)
    manifest = yaml.safe_load(k8s.to_yaml(manifest))
    _job, job_spec, pod = pod_spec(manifest)
    # v5p-64 = 64 TensorCores = 32 chips = 8 hosts of 4 chips: 8 pods, one process each.
    assert (job_spec["parallelism"], job_spec["completions"]) == (8, 8)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    (container,) = pod["containers"]
    assert container["resources"] == {"limits": {"google.com/tpu": 4}}
    env = env_of(container)
    assert env["BIGMODEL_COORDINATOR"] == "tpu-run-workers-0-0.tpu-run:8476"
    assert env["BIGMODEL_NUM_PROCESSES"] == "8"
    assert "job-completion-index" in env["BIGMODEL_PROCESS_ID"]["fieldRef"]["fieldPath"]
    assert manifest["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 5} and pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("accelerator, chips, hosts, per_host, label", [
    ("v5p-64", 32, 8, 4, "tpu-v5p-slice"),
    ("v4-8", 4, 1, 4, "tpu-v4-podslice"),
    ("v5litepod-16", 16, 4, 4, "tpu-v5-lite-podslice"),
    ("v5litepod-8", 8, 1, 8, "tpu-v5-lite-podslice"),
    ("v6e-256", 256, 64, 4, "tpu-v6e-slice"),
])
def test_tpu_slices(accelerator, chips, hosts, per_host, label):
    s = tpu_vm.tpu_slice(accelerator)
    assert (s.chips, s.hosts, s.chips_per_host, s.gke_accelerator) == (chips, hosts, per_host, label)


def test_bad_tpu_requests_are_refused():
    with pytest.raises(ConfigError, match="does not hold the 32 chips of v5p-64"):
        k8s.jobset(name="x", image="i", config=GPT_TINY, workdir="/w", overrides=[], tpu_type="v5p-64",
                   tpu_topology="4x4x4")
    with pytest.raises(ConfigError, match="needs --tpu-topology"):
        k8s.jobset(name="x", image="i", config=GPT_TINY, workdir="/w", overrides=[], tpu_type="v5p-64")
    with pytest.raises(ConfigError, match="is not like"):
        tpu_vm.tpu_slice("v9-8")
    with pytest.raises(ConfigError, match="DNS label"):
        k8s.jobset(name="Bad_Name", image="i", config=GPT_TINY, workdir="/w", overrides=[])


def test_tpu_vm_commands(capsys):
    assert cli.main(["launch", "tpu-vm", "--name", "pod1", "--zone", "us-east5-a", "--accelerator", "v5p-64",
                     "--project", "proj", "--config", "experiments/gpt_tiny.py", "--workdir", "/mnt/runs/a",
                     "--config.train.steps=100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# v5p-64: 32 chips on 8 worker(s), one `bigmodel train` process each"
    tar, scp, install, train = (shlex.split(line) for line in lines[1:])
    assert tar[:2] == ["tar", "czf"] and "--exclude=.git" in tar
    where = ["--zone", "us-east5-a", "--project", "proj", "--worker=all"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[-5:] == where
    assert scp[5:7] == [tar[2], "pod1:bigmodel.tar.gz"]
    for cmd in (install, train):  # both run on every worker of the slice
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
        assert cmd[6:11] == where and cmd[11] == "--command"
    assert "pip install -q -e ./bigmodel" in install[12]
    assert f'"jax[tpu]=={jax.__version__}"' in install[12]  # the JAX version this checkout runs
    remote = shlex.split(train[12])
    assert remote[:3] == ["cd", "bigmodel", "&&"]
    assert remote[3:] == ["../venv/bin/bigmodel", "train", "--config", "experiments/gpt_tiny.py",
                          "--workdir", "/mnt/runs/a", "--config.train.steps=100"]
