"""Running a planned sweep here: run directories, results.csv, and runs as local `bigmodel train` processes.

Each run lives in ``DIR/runs/<id>/`` with ``run_config.py`` (its resolved config, so
``bigmodel train --config DIR/runs/<id>/run_config.py --workdir DIR/runs/<id>`` repeats it
exactly), ``sweep_status.json`` (the sweep's bookkeeping: status, error, wall time, pid),
the trainer's usual outputs and ``stdout.log`` / ``stderr.log``. ``DIR/results.csv`` is
rebuilt from the plan and these directories on every state change, under a lock, so array
tasks of one sweep can share the directory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import pprint
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bigmodel import exit_codes
from bigmodel.scaling import report, results
from bigmodel.scaling.plan import Run, Sweep, human

POLL_S = 0.5  # how often the local runner looks at its child processes
ERROR_LINES = 3  # stderr lines kept as a failed run's error
STOP_TIMEOUT_S = 300  # how long a stopped run may take to write its checkpoint


# --------------------------------------------------------------------------- run files


def run_config_text(run: Run, sweep_spec: str) -> str:
    """A get_config file that returns exactly this run's config."""
    literal = pprint.pformat(run.config.to_dict(), indent=1, width=100, sort_dicts=True)
    return (
        f'"""Run {run.id} of the sweep {sweep_spec} (written by `bigmodel sweep`; edit the sweep config instead).\n\n'
        f"Command: bigmodel train --config runs/{run.id}/run_config.py --workdir runs/{run.id}  (from the sweep dir)\n"
        f'"""\n\nimport ml_collections\n\nCONFIG = {literal}\n\n\n'
        "def get_config(arg: str = \"\") -> ml_collections.ConfigDict:\n"
        '    """This run\'s resolved training config."""\n'
        "    return ml_collections.ConfigDict(CONFIG)\n"
    )


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    """The trainer's summary.json of a run (a local folder or one in a bucket), or None."""
    from bigmodel import storage

    try:
        return json.loads(storage.read_text(f"{run_dir}/summary.json"))
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(sweep: Sweep, run: Run) -> bool:
    """Whether the run's summary says it reached its planned steps."""
    summary = read_summary(sweep.train_dir(run))
    return summary is not None and summary.get("step") == run.steps


def read_status(run_dir: Path) -> dict[str, Any]:
    """The sweep's bookkeeping for one run ({} when it never started)."""
    try:
        return json.loads((run_dir / "sweep_status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(run_dir: Path, **fields: Any) -> None:
    """Update (atomically) the sweep's bookkeeping for one run."""
    from bigmodel.metrics import atomic_write_text

    status = read_status(run_dir) | fields | {"updated": time.time()}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "sweep_status.json", json.dumps(status, indent=1, sort_keys=True) + "\n")


def write_run_files(sweep: Sweep) -> None:
    """Write run_config.py for every valid run that has not finished (finished runs keep theirs)."""
    from bigmodel.metrics import atomic_write_text

    for run in sweep.runs:
        if run.error or is_finished(sweep, run):
            continue
        run_dir = sweep.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run_config.py", run_config_text(run, sweep.spec))


# --------------------------------------------------------------------------- results.csv


def result_row(sweep: Sweep, run: Run) -> dict[str, Any]:
    """One results.csv row: the plan, the sweep's status and the trainer's summary."""
    run_dir = sweep.run_dir(run)
    summary, status = read_summary(sweep.train_dir(run)), read_status(run_dir)
    row: dict[str, Any] = {
        "run": run.id, "model": run.family, "width": run.width, "depth": run.depth,
        "params": run.params or "", "params_nonembed": run.params_nonembed if run.params else "",
        "params_active": run.params_active if run.params else "",
        "tokens": run.tokens, "steps": run.steps, "flops": run.flops or "",
        "learning_rate": run.learning_rate, "weight_decay": run.weight_decay,
        "budget_tokens": run.budget_tokens or "", "budget_flops": run.budget_flops or "",
        "flops_with_attention": "", "loss": "", "bits_per_byte": "",
        "wall_s": status.get("wall_s", ""), "status": status.get("status", "planned"),
        "error": status.get("error", ""),
    }
    if run.error:
        row.update(status="failed", error=run.error)
    elif summary is not None and summary.get("step") == run.steps:
        row.update(status="finished", error="", loss=summary["eval_loss"],
                   bits_per_byte=summary.get("eval_bits_per_byte", ""),
                   flops_with_attention=summary.get("flops", ""))
        if row["wall_s"] == "":
            row["wall_s"] = summary.get("wall_s", "")  # trained outside the sweep
    return row


@contextlib.contextmanager
def _results_lock(workdir: Path) -> Iterator[None]:
    """Serialise results.csv writers (array tasks of one sweep share the directory)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".results.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_results(sweep: Sweep) -> list[dict[str, Any]]:
    """Rebuild DIR/results.csv from the plan and the run directories; returns the rows."""
    with _results_lock(sweep.workdir):
        rows = [result_row(sweep, run) for run in sweep.runs]
        results.write_csv_atomic(sweep.workdir / results.RESULTS, rows)
        sweep.upload()
    return rows


# --------------------------------------------------------------------------- running


def train_command(run_config: Path, run_dir: Path | str) -> list[str]:
    """`bigmodel train` for one run (through this interpreter, so no PATH lookup)."""
    return [sys.executable, "-m", "bigmodel.cli", "train", "--config", str(run_config), "--workdir", str(run_dir)]


def error_tail(path: Path, lines: int = ERROR_LINES) -> str:
    """The last non-empty lines of a log, joined on one line for the CSV."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # tqdm and absl write carriage returns and warnings; the exception is at the end.
    kept = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])[-1000:]


@dataclasses.dataclass
class _Active:
    """A run in flight."""

    run: Run
    proc: subprocess.Popen
    started: float
    files: list


class Progress:
    """Start/finish lines with an ETA from the runs finished so far (seconds ≈ overhead + 6ND / rate)."""

    def __init__(self, runs: Sequence[Run], parallel: int) -> None:
        self.total, self.parallel = len(runs), parallel
        self.left = {r.id: r.flops for r in runs}
        self.done: list[tuple[float, float]] = []  # (6ND FLOPs, seconds) of finished runs

    def predict(self, flops: float) -> float:
        """Seconds a run of this compute should take, from a line through the finished runs."""
        x = [f for f, _ in self.done]
        y = [s for _, s in self.done]
        if len(set(x)) < 2:
            return flops * sum(y) / max(sum(x), 1.0)
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
        slope = max(slope, 0.0)
        overhead = max(my - slope * mx, 0.0)  # start-up and compilation, paid by every run
        return overhead + slope * flops

    def eta(self) -> str:
        """Remaining wall time of the runs not finished yet."""
        if not self.left:
            return "done"
        if not self.done:
            return "ETA after the first run"
        seconds = sum(self.predict(f) for f in self.left.values()) / min(self.parallel, len(self.left))
        return f"ETA {report.duration(seconds)}"

    def start(self, run: Run, n: int) -> None:
        """Print a run's start line."""
        print(f"[sweep] start {n}/{self.total} {run.id}: {human(run.params)} params, {human(run.tokens)} tokens, "
              f"{run.steps} steps, lr {run.learning_rate:.3g}", flush=True)

    def finish(self, run: Run, row: dict[str, Any], seconds: float) -> None:
        """Print a run's finish line and update the estimate."""
        self.left.pop(run.id, None)
        if row["status"] == "finished":
            self.done.append((float(run.flops), seconds))
            what = f"loss {float(row['loss']):.4f}"
        else:
            what = f"{row['status'].upper()}: {row['error']}"
        print(f"[sweep] {row['status']} {run.id} in {report.duration(seconds)}: {what}; "
              f"{len(self.left)} left, {self.eta()}", flush=True)


def _launch(sweep: Sweep, run: Run) -> _Active:
    """Start `bigmodel train` for one run, logging to its directory."""
    run_dir = sweep.run_dir(run)
    # The logs stay open while the child writes to them; _settle closes them.
    out = open(run_dir / "stdout.log", "w")  # noqa: SIM115
    err = open(run_dir / "stderr.log", "w")  # noqa: SIM115
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(train_command(run_dir / "run_config.py", sweep.train_dir(run)), stdout=out, stderr=err,
                            env=env)
    write_status(run_dir, status="running", error="", pid=proc.pid, host=os.uname().nodename)
    return _Active(run, proc, time.time(), [out, err])


def _settle(sweep: Sweep, active: _Active) -> float:
    """Record a finished process's outcome in its status file; returns its wall seconds."""
    for f in active.files:
        f.close()
    run, run_dir, rc = active.run, sweep.run_dir(active.run), active.proc.returncode
    seconds = time.time() - active.started
    wall = round(float(read_status(run_dir).get("wall_s") or 0.0) + seconds, 2)  # all attempts together
    summary = read_summary(sweep.train_dir(run))
    if rc == 0 and summary is not None and summary.get("step") == run.steps:
        write_status(run_dir, status="finished", error="", wall_s=wall)
    elif rc == exit_codes.PREEMPTED:  # the trainer saved a checkpoint on SIGTERM/SIGINT
        write_status(run_dir, status="planned", error="preempted; a rerun resumes it", wall_s=wall)
    else:
        error = error_tail(run_dir / "stderr.log") or f"exit status {rc}"
        if rc == 0:
            error = f"stopped at step {summary and summary.get('step')} of {run.steps}; {error}"
        write_status(run_dir, status="failed", error=error, wall_s=wall)
    return seconds


class Interrupted(Exception):
    """The sweep itself got SIGTERM or SIGINT."""


def _interrupt(signum: int, frame: Any) -> None:
    """Signal handler: unwind the runner so it can stop its children cleanly."""
    raise Interrupted(signal.Signals(signum).name)


def _stop(sweep: Sweep, active: Sequence[_Active]) -> None:
    """SIGTERM the runs in flight (the trainer checkpoints and exits), wait, and mark them resumable."""
    for item in active:
        item.proc.terminate()
    for item in active:
        try:
            item.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            item.proc.kill()
            item.proc.wait()
        _settle(sweep, item)
    write_results(sweep)


def run_local(sweep: Sweep, todo: Sequence[Run], parallel: int) -> None:
    """Run `todo` as up to `parallel` local processes; failures are recorded, not raised."""
    progress = Progress(todo, parallel)
    queue, active, started = collections.deque(todo), [], 0
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or active:
            while queue and len(active) < parallel:
                run = queue.popleft()
                started += 1
                progress.start(run, started)
                active.append(_launch(sweep, run))
                write_results(sweep)
            time.sleep(POLL_S)
            for item in [a for a in active if a.proc.poll() is not None]:
                active.remove(item)
                seconds = _settle(sweep, item)
                rows = write_results(sweep)
                progress.finish(item.run, rows[item.run.index], seconds)
    except Interrupted:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # a second signal now kills the sweep at once
        _stop(sweep, active)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

