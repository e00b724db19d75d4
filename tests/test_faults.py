"""Faults injected for real: signals to a training subprocess, damaged files, a size limit.

Every case ends by rerunning the same command and comparing its metrics.jsonl with an
uninterrupted run of the same config: on CPU they must agree bitwise, with one row per step.
"""

import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from bigmodel import metrics

from conftest import GPT_TINY

pytestmark = pytest.mark.slow  # every test here trains, kills and resumes runs

STEPS = 60
TIMED = {"tokens_per_s", "mfu"}  # wall-clock figures differ between runs


def command(workdir, overrides):
    return [sys.executable, "-m", "bigmodel.cli", "train", "--config", GPT_TINY + ":tiny", "--workdir", str(workdir),
            *[f"--config.{o}" for o in overrides]]


ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def overrides(data_dir):
    from conftest import SMALL_CORPUS

    return [f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2", f"data.data_dir={data_dir}",
            "log.progress=false", f"train.steps={STEPS}", f"optim.decay_steps={STEPS}", "log.every=2",
            "eval.every=10", "eval.num_batches=30", "checkpoint.every=10", "checkpoint.keep=3"]


def run(workdir, overrides, limit_file_size=None):
    def limits():
        if limit_file_size:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run(command(workdir, overrides), env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=limits)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides):
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


def rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMED} for r in metrics.read_jsonl(workdir / "metrics.jsonl")]


def assert_same_as_reference(workdir, reference):
    got, want = rows(workdir), rows(reference)
    steps = [r["step"] for r in got]
    assert steps == sorted(set(steps)), "duplicate or out-of-order rows"
    assert got == want


def interrupt(workdir, overrides, when, sig):
    """Start training, send `sig` as soon as when(stdout_lines, workdir) is true, return (rc, stderr)."""
    proc = subprocess.Popen(command(workdir, overrides), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    fired = False
    while proc.poll() is None and time.time() < deadline:
        if when(lines, workdir):
            proc.send_signal(sig)
            fired = True
            break
        time.sleep(0.002)
    stderr = proc.communicate(timeout=300)[1]
    assert fired, f"the run ended before the fault could be injected: {stderr[-1500:]}"
    return proc.returncode, stderr, lines


def logged_step(workdir):
    r = metrics.read_jsonl(workdir / "metrics.jsonl")
    return r[-1]["step"] if r else 0


def test_sigterm_checkpoints_and_exits_to_be_resumed(tmp_path, overrides, reference):
    rc, stderr, _ = interrupt(tmp_path, overrides, lambda lines, w: logged_step(w) >= 13, signal.SIGTERM)
    assert rc == 75, stderr[-2000:]
    assert "Run the same command again to resume" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] >= 13 and saved[-1] % 10 != 0  # an extra checkpoint at the step it stopped
    result = run(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints' / str(saved[-1])}" in result.stdout
    assert_same_as_reference(tmp_path, reference)


@pytest.mark.parametrize("moment", ["mid-step", "mid-eval", "during-async-save"])
def test_sigkill_then_rerun_resumes_exactly(tmp_path, overrides, reference, moment):
    def when(lines, workdir):
        if moment == "mid-step":
            return logged_step(workdir) >= 23
        if moment == "mid-eval":
            return any(line.startswith("step 30: evaluating") for line in lines)
        ckpts = workdir / "checkpoints"
        return ckpts.exists() and any("tmp" in p and p.startswith("30") for p in os.listdir(ckpts))

    rc, _stderr, _ = interrupt(tmp_path, overrides, when, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    complete = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    if moment != "mid-step":
        assert 30 not in complete  # killed before (eval) or while (async write) saving step 30
    result = run(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints' / str(complete[-1])}" in result.stdout
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]
    assert_same_as_reference(tmp_path, reference)


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, overrides, reference, damage):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    victim = largest_file(workdir / "checkpoints" / str(STEPS) / "state")
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        victim.write_bytes(data)
    (workdir / "summary.json").unlink()
    result = run(workdir, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint {workdir / 'checkpoints' / str(STEPS)} is damaged" in result.stderr
    assert f"resumed from {workdir / 'checkpoints' / str(STEPS - 10)}" in result.stdout
    quarantined = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith(f"corrupt-{STEPS}-")]
    assert len(quarantined) == 1  # moved aside, not deleted
    assert_same_as_reference(workdir, reference)


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, overrides, reference, on_error):
    first = run(tmp_path, overrides + ["train.steps=10"])
    assert first.returncode == 0, first.stderr[-2000:]
    # Every checkpoint write needs a file larger than this: each save from now on fails (EFBIG).
    limited = run(tmp_path, overrides + [f"checkpoint.on_error={on_error}"], limit_file_size=64 * 1024)
    if on_error == "stop":
        assert limited.returncode == 74, limited.stderr[-2000:]
        assert "saving the checkpoint of step 20" in limited.stderr
        assert "File too large" in limited.stderr or "Errno 27" in limited.stderr
        assert f"the previous checkpoint {tmp_path / 'checkpoints' / '10'} is intact" in limited.stderr
    else:
        assert limited.returncode == 0, limited.stderr[-2000:]
        assert limited.stderr.count("training continues and the next save retries") >= 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    result = run(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints' / '10'}" in result.stdout
    assert_same_as_reference(tmp_path, reference)


def test_nonfinite_loss_halts_naming_the_step(tmp_path, overrides):
    result = run(tmp_path, overrides + ["optim.learning_rate=1e30", "train.steps=20"])
    assert result.returncode == 3
    assert "non-finite loss or gradients in step" in result.stderr
    assert "halted without saving" in result.stderr and "train.on_nonfinite='skip'" in result.stderr
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_nonfinite_updates_can_be_skipped_and_counted(tmp_path, overrides):
    result = run(tmp_path, overrides + ["optim.learning_rate=1e30", "train.steps=20", "train.on_nonfinite=skip"])
    assert result.returncode == 0, result.stderr[-2000:]
    last = metrics.read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 20 and 0 < last["skipped_steps"] <= 20
    assert last["loss"] is None or last["loss"] == last["loss"]  # NaN is written as null, never as NaN


def test_incompatible_resume_is_refused_then_restart_moves_the_old_run(tmp_path, overrides):
    assert run(tmp_path, overrides + ["train.steps=4"]).returncode == 0
    changed = run(tmp_path, overrides + ["train.steps=8", "model.num_layers=3"])
    assert changed.returncode == 2
    assert "model.num_layers: 2 -> 3" in changed.stderr and "--restart" in changed.stderr
    assert (tmp_path / "checkpoints" / "4").exists()
    proc = subprocess.run(command(tmp_path, overrides + ["train.steps=8", "model.num_layers=3"]) + ["--restart"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    previous = list(tmp_path.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "4").exists()
    assert next(r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")) == 2
