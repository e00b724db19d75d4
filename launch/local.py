"""`bigmodel launch local`: several training processes on this machine, as a cluster would run them.

Each process runs the ordinary `bigmodel train` command; the BIGMODEL_COORDINATOR /
BIGMODEL_NUM_PROCESSES / BIGMODEL_PROCESS_ID variables make them one run (see
bigmodel.distributed). With --devices_per_process every process computes on that many
fake CPU devices, which is how multi-host runs are tested without a cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
    """XLA_FLAGS with --xla_force_host_platform_device_count set to `count` (other flags kept)."""
    kept = re.sub(r"--xla_force_host_platform_device_count=\S*", "", xla_flags).split()
    return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


def process_env(index: int, processes: int, coordinator: str, devices_per_process: int | None,
                base: Mapping[str, str]) -> dict[str, str]:
    """The environment of local process `index`."""
    env = dict(base)
    env.update(BIGMODEL_COORDINATOR=coordinator, BIGMODEL_NUM_PROCESSES=str(processes),
               BIGMODEL_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if devices_per_process:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = with_device_count(base.get("XLA_FLAGS", ""), devices_per_process)
    return env


def _pump(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """TERM the still-running processes we started (their whole sessions), KILL after a grace period."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    for p in running:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(train_args: Sequence[str], processes: int, devices_per_process: int | None = None, *,
        extra_env: Mapping[str, str] | None = None, port: int | None = None, out: TextIO | None = None,
        program: Sequence[str] | None = None) -> int:
    """Run `bigmodel train TRAIN_ARGS` as `processes` cooperating processes; the first failure's exit code.

    `program` replaces `python -m bigmodel.cli train` (for tests).
    """
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, got {processes}")
    out = out or sys.stdout
    coordinator = f"127.0.0.1:{port or free_port()}"
    command = [*(program or [sys.executable, "-m", "bigmodel.cli", "train"]), *train_args]
    lock = threading.Lock()
    out.write(f"bigmodel launch local: {processes} process(es), coordinator {coordinator}"
              f"{f', {devices_per_process} CPU devices each' if devices_per_process else ''}: "
              f"{shlex.join(['bigmodel', 'train', *train_args])}\n")
    out.flush()
    procs, pumps = [], []
    try:
        for i in range(processes):
            env = process_env(i, processes, coordinator, devices_per_process, {**os.environ, **(extra_env or {})})
            # A session per process, so stopping one also stops anything it started.
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock), daemon=True)
            t.start()
            pumps.append(t)
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed or next((p for p in procs if p.returncode != 0), None)
        if failed is not None:
            # The others would wait for the dead one at their next collective until a timeout: stop them now.
            _stop(procs)
            with lock:
                out.write(f"bigmodel launch local: process {procs.index(failed)} exited with {failed.returncode}; "
                          "stopped the others\n")
            # A process killed by signal N reports -N; shells report 128+N.
            return failed.returncode if failed.returncode > 0 else 128 - failed.returncode
        return 0
    except KeyboardInterrupt:
        # The processes take TERM as a preemption notice: they checkpoint, then exit (status 75).
        _stop(procs, grace_s=60)
        return 130
    finally:
        for t in pumps:
            t.join(timeout=5)
