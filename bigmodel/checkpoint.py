"""Orbax checkpoints of the train state, the data iterator and the resolved config.

The data iterator's state is the same on every process (see bigmodel.data.pipeline), so
it is saved once as JSON and restores onto any number of processes.

Integrity: orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-write leaves no half checkpoint behind. Once a step is complete we also
record the size and CRC32 of each of its files (`bigmodel_integrity.json`); a checkpoint
truncated or garbled afterwards is detected on restore, moved aside (never deleted) and
the previous complete one is used instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp

INTEGRITY_FILE = "bigmodel_integrity.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be restored."""


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(step_dir)): (p.stat().st_size, _crc32(p))
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != INTEGRITY_FILE
    }


def seal(step_dir: pathlib.Path) -> None:
    """Record sizes and checksums of a complete checkpoint's files."""
    tmp = step_dir / f".{INTEGRITY_FILE}.tmp"
    tmp.write_text(json.dumps(_files(step_dir)))
    os.replace(tmp, step_dir / INTEGRITY_FILE)


def verify(step_dir: pathlib.Path) -> str | None:
    """None if the checkpoint matches its record (or has none yet), else what is wrong."""
    record = step_dir / INTEGRITY_FILE
    if not record.exists():
        return None
    try:
        expected = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable integrity record ({e})"
    actual = _files(step_dir)
    for name, (size, crc) in expected.items():
        if name not in actual:
            return f"missing file {name}"
        if actual[name][0] != size:
            return f"{name} has {actual[name][0]} bytes, expected {size} (truncated?)"
        if actual[name][1] != crc:
            return f"{name} fails its checksum (garbled)"
    return None


class Checkpointer:
    """Asynchronous, keep-the-last-k checkpoints under WORKDIR/checkpoints/STEP."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool) -> None:
        self.directory = pathlib.Path(os.path.abspath(workdir)) / "checkpoints"
        self._keep, self._async = keep, async_save
        self._pending: int | None = None  # step of the save that may still be in flight
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            enable_async_checkpointing=self._async,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def step_dir(self, step: int) -> pathlib.Path:
        """Directory of a step's checkpoint."""
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def _seal_complete(self) -> None:
        if jax.process_index() != 0:
            return
        for step in self.manager.all_steps():
            step_dir = self.step_dir(step)
            if step_dir.is_dir() and not (step_dir / INTEGRITY_FILE).exists():
                seal(step_dir)

    def save(self, step: int, state: Any, data_iter: Any | None, config: dict) -> None:
        """Start saving (returns before an asynchronous write finishes); data_iter None saves no 'data' item.

        Raises CheckpointError if this save or the previous asynchronous one failed.
        """
        self.wait()  # the previous asynchronous save must have succeeded (raises if not)
        try:
            self._pending = step
            items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
            if data_iter is not None:
                items["data"] = ocp.args.JsonSave(data_iter.get_state())
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            if not self._async:
                self.wait()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the writer is reported the same way
            self._pending = None
            raise CheckpointError(self._failure(step, e)) from e

    def _failure(self, step: int, error: Exception) -> str:
        good = [s for s in self.manager.all_steps() if s != step]
        last = f"the previous checkpoint {self.step_dir(max(good))} is intact" if good else "no earlier checkpoint exists"
        return f"saving the checkpoint of step {step} in {self.directory} failed: {type(error).__name__}: {error}; {last}"

    def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> tuple[int, Any] | None:
        """(step, state) from the newest checkpoint that verifies and loads; None if there is none.

        A damaged checkpoint is reported with its path and moved to checkpoints/corrupt-STEP-TIME.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            step_dir = self.step_dir(step)
            problem = verify(step_dir)
            if problem is None:
                try:
                    return step, self.restore(step, abstract_state, data_iter)
                except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on bad data
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._quarantine(step_dir, problem)
        if steps:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} could be restored; they were moved aside as "
                "corrupt-*; rerun with --restart to start over"
            )
        return None

    def _quarantine(self, step_dir: pathlib.Path, problem: str) -> None:
        target = self.directory / f"corrupt-{step_dir.name}-{int(time.time())}"
        print(f"checkpoint {step_dir} is damaged ({problem}); moved to {target}, trying the previous one",
              file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            os.replace(step_dir, target)
        self.manager.close()
        self._open()

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
        """Restore the state onto the shardings in `abstract_state` (and the iterator in place).

        A checkpoint saved without a data item (e.g. by `bigmodel import-hf`) leaves the
        iterator as it is: a fresh one starts from the beginning.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        with_data = data_iter is not None and (self.step_dir(step) / "data").is_dir()
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if with_data:
            data_iter.set_state(restored["data"])
        return restored["state"]

    def restore_raw(self, step: int) -> Any:
        """The saved train state as a tree of host arrays (no target structure needed)."""
        return ocp.StandardCheckpointer().restore(self.step_dir(step) / "state")

    def saved_config(self, step: int) -> dict | None:
        """The config stored with a checkpoint, if readable."""
        path = self.step_dir(step) / "config" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def wait(self) -> None:
        """Block until any asynchronous save has finished (raises CheckpointError on failure)."""
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(self._failure(pending if pending is not None else -1, e)) from e
        self._seal_complete()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
