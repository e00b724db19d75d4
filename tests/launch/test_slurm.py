"""`bigmodel launch slurm` on the Slurm running on this machine, plus the script itself.

The job test needs a Slurm with an idle node (`sinfo` on PATH, SLURM_CONF if the config is
not the system's). It never installs or starts one: `.ci/slurm.sh start` provisions a
one-node Slurm as root, and CI runs it and sets BIGMODEL_REQUIRE_SLURM=1, which turns the
skip into a failure.
"""

import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from bigmodel.launch import slurm

from bigmodel import cli, exit_codes

from conftest import GPT_TINY
from test_local_multiprocess import STEPS, logged, prepare_data, run_overrides, two_process_workdir


def run(cmd, timeout=60, check=True) -> subprocess.CompletedProcess:
    """Run a Slurm command; a failure fails the test with its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
    return done


def slurm_problem() -> str | None:
    """Why no Slurm job can run here, or None when `sinfo` shows an idle node."""
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if "idle" not in done.stdout.split():
        said = (done.stdout.strip() or done.stderr.strip()).splitlines()  # the node states, or sinfo's last error
        return f"no idle node (sinfo: {said[-1][:200] if said else 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """The running Slurm: skip without one, or fail when BIGMODEL_REQUIRE_SLURM=1 (CI)."""
    problem = slurm_problem()
    if problem:
        reason = f"no running Slurm: {problem}; .ci/slurm.sh provisions one as root"
        if os.environ.get("BIGMODEL_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (BIGMODEL_REQUIRE_SLURM=1)")
        pytest.skip(reason)


def wait_for_job(job: str, timeout: float = 240) -> str:
    """Poll until the job leaves the queue; its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = run(["scontrol", "show", "job", job, "-o"], check=False).stdout
        state = re.search(r"JobState=(\S+)", info)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
            return state.group(1)
        time.sleep(1)
    run(["scancel", job], check=False)
    pytest.fail(f"job {job} did not finish within {timeout:.0f} s")


@pytest.mark.slow
def test_two_task_job_matches_the_local_two_process_run(slurm_cluster, tmp_path_factory, data_dir, capsys):
    prepare_data(data_dir)
    workdir = tmp_path_factory.mktemp("slurm-run") / "tiny"
    assert cli.main(["launch", "slurm", "--nodes", "1", "--tasks-per-node", "2", "--job-name", "bigmodel-test",
                     "--env", "JAX_PLATFORMS=cpu", "--env", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
                     "--config", GPT_TINY + ":tiny", "--workdir", str(workdir),
                     *(f"--config.{o}" for o in run_overrides(data_dir)), "--submit"]) == 0
    out = capsys.readouterr().out
    job = re.search(r"Submitted batch job (\d+)", out)
    assert job, out
    state = wait_for_job(job.group(1))
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
    directives = re.findall(r"^#SBATCH (\S+)$", text, re.MULTILINE)
    assert directives[:6] == ["--job-name=bigmodel-gpt_tiny", "--nodes=4", "--ntasks-per-node=8",
                              "--gpus-per-node=8", "--partition=gpu", "--time=12:00:00"]
    output = f"--output={tmp_path}/w/launch/slurm-%j.out"
    assert {"--requeue", "--signal=TERM@120", "--open-mode=append", output} <= set(directives)
    assert "source /opt/venv/bin/activate\nexport NCCL_DEBUG=WARN\n" in text
    assert (f"srun --label --wait=60 bigmodel train --config experiments/gpt_tiny.py --workdir {tmp_path}/w "
            "--config.train.steps=500\n") in text
    # Stopped by the time-limit notice after a checkpoint (`bigmodel train` exits 75): requeue.
    assert exit_codes.PREEMPTED == 75  # the README documents the number
    assert f'if [ $status -eq {exit_codes.PREEMPTED} ]; then\n' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    (tmp_path / "s.sh").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")], check=False).returncode == 0


def test_gpus_and_tasks_must_agree():
    with pytest.raises(Exception, match="one process per GPU"):
        slurm.sbatch_script(config="c.py", workdir="/w", overrides=[], nodes=1, gpus_per_node=8, tasks_per_node=3)
