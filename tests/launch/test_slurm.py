"""`bigmodel launch slurm` on a real single-node Slurm started on this machine, plus the script itself.

The fixture installs Debian's slurm-wlm and munge when they are missing (as root, with
apt-get), starts munged, slurmctld and slurmd with a private slurm.conf (SLURM_CONF), and
stops what it started, by process id, at the end. If Slurm cannot be had the test fails
and says why: it is part of the suite, not optional.
"""

import os
import pathlib
import re
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from bigmodel import cli
from bigmodel.launch import slurm

from conftest import GPT_TINY
from test_local_multiprocess import STEPS, logged, prepare_data, run_overrides, two_process_workdir

SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge")


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def run(cmd, env=None, timeout=60, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
    return done


def install_slurm() -> None:
    """apt-get install slurm-wlm munge, refreshing the package lists once if the first try fails."""
    if all(which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not which("apt-get"):
        apt = "found" if which("apt-get") else "missing"
        pytest.fail("Slurm is not installed and cannot be installed here: installing slurm-wlm and munge "
                    f"needs root and apt-get (uid {os.geteuid()}, apt-get {apt})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    if run(install, env, timeout=600, check=False).returncode:
        run(["apt-get", "update", "-q"], env, timeout=600)
        run(install, env, timeout=600)
    missing = [b for b in BINARIES if not which(b)]
    if missing:
        pytest.fail(f"after installing slurm-wlm and munge, {missing} are still missing")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def read_pid(path: pathlib.Path, timeout: float = 15) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.2)
    pytest.fail(f"{path} did not appear")


def munge_works() -> bool:
    cred = subprocess.run([which("munge"), "-n"], capture_output=True, timeout=10)
    if cred.returncode:
        return False
    return subprocess.run([which("unmunge")], input=cred.stdout, capture_output=True, timeout=10).returncode == 0


def start_munge() -> int | None:
    """Start munged (as the munge user) unless one already works; its pid if we started it."""
    if munge_works():
        return None
    key = pathlib.Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    pidfile = pathlib.Path("/run/munge/munged.pid")
    pidfile.unlink(missing_ok=True)
    run([which("runuser") or "runuser", "-u", "munge", "--", which("munged")])
    pid = read_pid(pidfile)
    deadline = time.time() + 10
    while not munge_works():
        if time.time() > deadline:
            pytest.fail("munged started but credentials do not verify (munge -n | unmunge)")
        time.sleep(0.2)
    return pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(root: pathlib.Path) -> str:
    host = socket.gethostname().split(".")[0]
    memory_mb = int(pathlib.Path("/proc/meminfo").read_text().split()[1]) // 1024 // 2
    for d in ("state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return "\n".join([
        "ClusterName=bigmodeltest",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "ReturnToService=2",
        "MpiDefault=none",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running one-node Slurm; yields the environment its commands need (SLURM_CONF)."""
    install_slurm()
    started: list[tuple[str, int]] = []
    root = tmp_path_factory.mktemp("slurm")
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        munged = start_munge()
        if munged:
            started.append(("munged", munged))
        for daemon in ("slurmctld", "slurmd"):
            run([which(daemon), "-f", str(conf)], env)
            started.append((daemon, read_pid(root / f"{daemon}.pid")))
        deadline = time.time() + 60
        while (state := run(["sinfo", "-h", "-o", "%T"], env, check=False).stdout.strip()) != "idle":
            if time.time() > deadline:
                logs = "\n".join((root / f"{d}.log").read_text()[-1500:] for d in ("slurmctld", "slurmd")
                                 if (root / f"{d}.log").exists())
                pytest.fail(f"the Slurm node did not become idle (state {state!r}); logs:\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for name, pid in reversed(started):
            if pid_alive(pid):
                os.kill(pid, 15)
        for name, pid in started:
            deadline = time.time() + 15
            while pid_alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):
                os.kill(pid, 9)


def wait_for_job(job: str, env, timeout: float = 240) -> str:
    """Poll until the job leaves the queue; its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = run(["scontrol", "show", "job", job, "-o"], env, check=False).stdout
        state = re.search(r"JobState=(\S+)", info)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
            return state.group(1)
        time.sleep(1)
    run(["scancel", job], env, check=False)
    pytest.fail(f"job {job} did not finish within {timeout:.0f} s")


def test_two_task_job_matches_the_local_two_process_run(slurm_cluster, tmp_path_factory, data_dir, monkeypatch,
                                                         capsys):
    prepare_data(data_dir)
    workdir = tmp_path_factory.mktemp("slurm-run") / "tiny"
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])  # sbatch, and the job's srun, find the cluster
    assert cli.main(["launch", "slurm", "--nodes", "1", "--tasks-per-node", "2", "--job-name", "bigmodel-test",
                     "--env", "JAX_PLATFORMS=cpu", "--env", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
                     "--config", GPT_TINY + ":tiny", "--workdir", str(workdir),
                     *(f"--config.{o}" for o in run_overrides(data_dir)), "--submit"]) == 0
    out = capsys.readouterr().out
    job = re.search(r"Submitted batch job (\d+)", out)
    assert job, out
    state = wait_for_job(job.group(1), slurm_cluster)
    log = (workdir / "launch" / f"slurm-{job.group(1)}.out").read_text()
    assert state == "COMPLETED", log[-4000:]

    # Both tasks joined one run: 2 processes × 2 CPU devices, set up from the SLURM_* variables.
    info = (workdir / "run_info.json").read_text()
    assert '"process_count": 2' in info and '"device_count": 4' in info
    ours = logged(workdir)
    local = logged(two_process_workdir(tmp_path_factory, data_dir))
    assert sorted(ours) == sorted(local) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ours[s] for s in local], list(local.values()), rtol=1e-5)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_script_contents(tmp_path):
    text = slurm.sbatch_script(config="experiments/gpt_tiny.py", workdir=str(tmp_path / "w"),
                               overrides=["train.steps=500"], nodes=4, gpus_per_node=8, tasks_per_node=8,
                               partition="gpu", time="12:00:00", env={"NCCL_DEBUG": "WARN"}, venv="/opt/venv")
    directives = re.findall(r"^#SBATCH (\S+)$", text, re.M)
    assert directives[:6] == ["--job-name=bigmodel-gpt_tiny", "--nodes=4", "--ntasks-per-node=8",
                              "--gpus-per-node=8", "--partition=gpu", "--time=12:00:00"]
    output = f"--output={tmp_path}/w/launch/slurm-%j.out"
    assert {"--requeue", "--signal=TERM@120", "--open-mode=append", output} <= set(directives)
    assert "source /opt/venv/bin/activate\nexport NCCL_DEBUG=WARN\n" in text
    assert (f"srun --label --wait=60 bigmodel train --config experiments/gpt_tiny.py --workdir {tmp_path}/w "
            "--config.train.steps=500\n") in text
    # Stopped by the time-limit notice after a checkpoint (`bigmodel train` exits 75): requeue.
    from bigmodel import train

    assert slurm.PREEMPTED == train.PREEMPTED_EXIT_CODE
    assert 'if [ $status -eq 75 ]; then\n' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    (tmp_path / "s.sh").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0


def test_gpus_and_tasks_must_agree():
    with pytest.raises(Exception, match="one process per GPU"):
        slurm.sbatch_script(config="c.py", workdir="/w", overrides=[], nodes=1, gpus_per_node=8, tasks_per_node=3)
