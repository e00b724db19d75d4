"""metrics.jsonl, TensorBoard event files and the run header of a workdir."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

import jax

from bigmodel import storage


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see the old or the new content, never a partial one (local or in a bucket)."""
    storage.write_text(path, text)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (crash mid-write) is ignored."""
    rows = []
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """Appends one JSON row per logged step and mirrors scalars to TensorBoard.

    On resume from step S, rows after S (written before a crash, to be recomputed) are
    dropped first, so the file never holds two rows for one step. In a bucket, where objects
    cannot be appended to, the file is rewritten whole at each row, and the event files are
    written locally and uploaded at each row (storage.Staged).
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = storage.as_path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self._remote = storage.is_remote(workdir)
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self._text = "".join(json.dumps(r) + "\n" for r in rows)  # the whole file (rewritten in a bucket)
        atomic_write_text(self.path, self._text)
        from tensorboardX import SummaryWriter

        self._events = storage.Staged(workdir)
        # purge_step makes TensorBoard drop points after the resume step from older event files.
        self._tb = SummaryWriter(str(self._events.local), flush_secs=10,
                                 purge_step=resume_step + 1 if resume_step else None)
        if not self._remote:
            self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run; close() closes it

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log one row: {'step': step, **scalars}."""
        if not self.enabled:
            return
        # Non-finite values become null: NaN/Infinity are not JSON.
        row = {"step": int(step), **{k: float(v) if math.isfinite(v) else None for k, v in scalars.items()}}
        if self._remote:
            self._text += json.dumps(row) + "\n"
            atomic_write_text(self.path, self._text)
        else:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        for key, value in scalars.items():
            if not math.isfinite(value):
                continue
            tag = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"
            self._tb.add_scalar(tag, float(value), int(step))
        if self._remote:
            self._tb.flush()
            self._events.sync()

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            if not self._remote:
                self._file.close()
            self._tb.close()
            self._events.close()


def git_revision(directory: str | os.PathLike) -> str:
    """The git commit of the code in `directory` (with '+dirty' when modified), or 'unknown'."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header() -> dict[str, Any]:
    """What makes a run reproducible: code revision, library versions, devices."""
    import flax
    import optax
    import orbax.checkpoint

    devices = jax.devices()
    return {
        "git_revision": git_revision(pathlib.Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "host": platform.node(),
    }
