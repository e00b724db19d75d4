"""Orbax checkpoints of the train state, the data iterator and the resolved config.

The data iterator's state is the same on every process (see bigmodel.data.pipeline), so
it is saved once as JSON and restores onto any number of processes.

Integrity: orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-write leaves no half checkpoint behind. Once a step is complete, each process
records the size and CRC32C of the files it wrote (`bigmodel_integrity.process_I.json`): orbax
puts process I's array data under `ocdbt.process_I/` and `array_metadatas/process_I`, and
process 0 writes everything else. This runs in a background thread after the asynchronous
save, off the training path; the next save (or close) waits for it. A checkpoint truncated or
garbled afterwards is detected on restore (the records are split over the processes, which
then agree), moved aside (never deleted) and the previous complete one is used instead. A
step whose records were never written (a crash right after it completed) is not checked.
CRC32C is what object stores keep per object (GCS, S3); OCDBT files end with their own
CRC32C, so every intact one has the same whole-file value (0x48674bc7), and any change
to one still changes it.

The file handling goes through `etils.epath` (what orbax itself uses), so it needs no more
of a directory than listing, stat, reading, writing and renaming.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import threading
import time
import zlib
from typing import Any

import google_crc32c
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bigmodel import storage

RECORD_PREFIX = "bigmodel_integrity"
LEGACY_RECORD = "bigmodel_integrity.json"  # one record of every file by process 0, zlib CRC32 (older checkpoints)
_RECORD = re.compile(r"bigmodel_integrity\.process_(\d+)\.json")
_PROCESS_PART = re.compile(r"(?:.*\.)?process_(\d+)")  # orbax's 'ocdbt.process_3', 'array_metadatas/process_3'
CHUNK = 8 << 20  # bytes read at a time


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be restored."""


def record_name(process: int) -> str:
    """File name of process `process`'s integrity record in a step directory."""
    return f"{RECORD_PREFIX}.process_{process}.json"


def writer(relative: str) -> int:
    """The process that writes a checkpoint file (a path relative to the step directory).

    Orbax (OCDBT layout) has process I write its array data under `ocdbt.process_I/` and
    its array metadata to `array_metadatas/process_I`; the primary process 0 writes the rest.
    """
    for part in relative.split("/"):
        if match := _PROCESS_PART.fullmatch(part):
            return int(match.group(1))
    return 0


def crc32c(path: epath.Path) -> tuple[int, str]:
    """(size, CRC32C as hex) of a file, read once in CHUNK-sized pieces."""
    crc, size = google_crc32c.Checksum(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc.update(chunk)
            size += len(chunk)
    return size, crc.hexdigest().decode()


def _zlib_crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def checkpoint_files(step_dir: epath.Path) -> list[str]:
    """Paths (relative to the step directory) of a checkpoint's files, the integrity records left out."""
    step_dir = epath.Path(step_dir)
    found = []
    for directory, _, names in step_dir.walk():
        base = str(directory)[len(str(step_dir)):].strip("/")
        for name in names:
            if not name.startswith(RECORD_PREFIX) and not name.startswith(f".{RECORD_PREFIX}"):
                found.append(f"{base}/{name}" if base else name)
    return sorted(found)


def seal(step_dir: str | os.PathLike, process: int = 0) -> int:
    """Record the size and CRC32C of the files of a complete checkpoint that `process` wrote; returns their bytes."""
    step_dir = epath.Path(step_dir)
    files = {name: crc32c(step_dir / name) for name in checkpoint_files(step_dir) if writer(name) == process}
    record = {"process": process, "checksum": "crc32c", "files": files}
    tmp = step_dir / f".{record_name(process)}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(step_dir / record_name(process))
    return sum(size for size, _ in files.values())


def _records(step_dir: epath.Path) -> list[tuple[int, epath.Path]]:
    """(process, path) of each integrity record in a step directory; the legacy one counts as process 0's."""
    found = []
    for path in step_dir.glob(f"{RECORD_PREFIX}*.json"):
        match = _RECORD.fullmatch(path.name)
        if match or path.name == LEGACY_RECORD:
            found.append((int(match.group(1)) if match else 0, path))
    return sorted(found, key=lambda r: (r[0], r[1].name))


def verify(step_dir: str | os.PathLike, process: int = 0, processes: int = 1) -> str | None:
    """None if the checkpoint matches its records (or has none yet), else what is wrong.

    Process `process` of `processes` checks the records of processes r with r % processes ==
    process, so together they read each file once.
    """
    step_dir = epath.Path(step_dir)
    for owner, record in _records(step_dir):
        if owner % processes != process:
            continue
        try:
            data = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable integrity record {record.name} ({e})"
        legacy = record.name == LEGACY_RECORD
        for name, (size, digest) in (data if legacy else data["files"]).items():
            path = step_dir / name
            if not path.is_file():
                return f"missing file {name}"
            actual = path.stat().length
            if actual != size:
                return f"{name} has {actual} bytes, expected {size} (truncated?)"
            if (_zlib_crc32(path) if legacy else crc32c(path)[1]) != digest:
                return f"{name} fails its checksum (garbled)"
    return None


class Checkpointer:
    """Asynchronous, keep-the-last-k checkpoints under WORKDIR/checkpoints/STEP."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool) -> None:
        # Orbax writes locally: into the workdir, or into a cache folder mirrored to the bucket.
        self.remote = storage.is_remote(workdir)
        self.directory = (storage.as_path(workdir) if self.remote else pathlib.Path(os.path.abspath(workdir))) \
            / "checkpoints"
        self.local = storage.cache_dir(str(self.directory)) if self.remote else self.directory
        self._keep, self._async = keep, async_save
        self._pending: int | None = None  # step of the save that may still be in flight
        self._finisher: threading.Thread | None = None  # waits for that save, then seals it
        self._error: tuple[str, BaseException] | None = None  # what the finisher failed at
        self._open()

    def _open(self) -> None:
        if self.remote:
            self._mirror()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            enable_async_checkpointing=self._async,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(epath.Path(self.local), options=options)

    def step_dir(self, step: int) -> epath.Path | pathlib.Path:
        """Directory of a step's checkpoint (in the bucket for a workdir in one)."""
        return self.directory / str(step)

    def _local(self, step: int) -> epath.Path:
        """The local directory orbax reads and writes a step in."""
        return epath.Path(self.local) / str(step)

    # ------------------------------------------------------------------ the bucket mirror

    def _bucket_steps(self) -> dict[int, set[int]]:
        """{step: processes whose integrity record is in the bucket} of the step folders in the bucket."""
        fs, steps = storage.filesystem(str(self.directory)), {}
        for path in fs.glob(f"{self.directory}/*/{RECORD_PREFIX}.process_*.json"):
            step, name = path.rstrip("/").split("/")[-2:]
            if step.isdigit() and (match := _RECORD.fullmatch(name)):
                steps.setdefault(int(step), set()).add(int(match.group(1)))
        return steps

    def _mirror(self) -> None:
        """Make the local cache hold the bucket's complete steps, and the bucket this process's sealed local ones.

        A step is complete in the bucket once process 0's integrity record is there: each
        process uploads its record after its files. Local steps of an older cache that the
        bucket lacks are uploaded (a run killed mid-upload); step folders of the bucket
        without records are partial uploads and are left to `_prune`.
        """
        in_bucket = self._bucket_steps()
        process = jax.process_index()
        for step, owners in sorted(in_bucket.items()):
            if 0 in owners and not (self._local(step) / record_name(process)).exists():
                self._download(step, owners)
        local = epath.Path(self.local)
        if local.exists():
            for path in local.iterdir():
                if path.name.isdigit() and (path / record_name(process)).exists() \
                        and process not in in_bucket.get(int(path.name), set()):
                    self._upload(int(path.name), process)

    def _download(self, step: int, owners: set[int]) -> None:
        """Copy a step from the bucket into the local cache, the integrity records last."""
        storage.download_tree(str(self.step_dir(step)), self._local(step), last=[record_name(p) for p in owners])

    def _upload(self, step: int, process: int) -> None:
        """Upload the files of a sealed step that `process` wrote, its integrity record last."""
        for name in checkpoint_files(self._local(step)):
            if writer(name) == process:
                storage.upload_file(self._local(step) / name, f"{self.step_dir(step)}/{name}")
        storage.upload_file(self._local(step) / record_name(process), f"{self.step_dir(step)}/{record_name(process)}")

    def _prune(self) -> None:
        """Delete the bucket's step folders that orbax no longer keeps (older than the last k, or partial)."""
        kept = {str(s) for s in self.manager.all_steps()}
        fs = storage.filesystem(str(self.directory))
        bare = str(self.directory).split("://", 1)[1]
        for path in fs.ls(bare, detail=False) if fs.exists(bare) else []:
            name = path.rstrip("/").split("/")[-1]
            if name.isdigit() and name not in kept:
                storage.remove_tree(f"{self.directory}/{name}")

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def _finish(self, step: int) -> None:
        """Background thread: wait for orbax to complete the step, then seal this process's files of it."""
        try:
            self.manager.wait_until_finished()
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self._error = ("save", e)
            return
        try:
            seal(self._local(step), jax.process_index())
        except BaseException as e:  # noqa: BLE001
            self._error = ("seal", e)
            return
        if self.remote:
            try:
                self._upload(step, jax.process_index())
                if jax.process_index() == 0:
                    self._prune()
            except BaseException as e:  # noqa: BLE001
                self._error = ("upload", e)

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
        except Exception as e:
            self._pending = None
            raise CheckpointError(self._failure(step, e)) from e
        self._finisher = threading.Thread(target=self._finish, args=(step,), name=f"checkpoint-{step}", daemon=True)
        self._finisher.start()
        if not self._async:
            self.wait()

    def _failure(self, step: int, error: Exception) -> str:
        good = [s for s in self.manager.all_steps() if s != step]
        last = (f"the previous checkpoint {self.step_dir(max(good))} is intact" if good
                else "no earlier checkpoint exists")
        return (f"saving the checkpoint of step {step} in {self.directory} failed: {type(error).__name__}: "
                f"{error}; {last}")

    def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> tuple[int, Any] | None:
        """(step, state) from the newest checkpoint that verifies and loads; None if there is none.

        A damaged checkpoint is reported with its path and moved to checkpoints/corrupt-STEP-TIME.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            step_dir = self._local(step)
            problem = self._verify(step_dir)
            if problem is None:
                try:
                    return step, self.restore(step, abstract_state, data_iter)
                except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on bad data
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._quarantine(step, problem)
        if steps:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} could be restored; they were moved aside as "
                "corrupt-*; rerun with --restart to start over"
            )
        return None

    def _verify(self, step_dir: os.PathLike) -> str | None:
        """`verify` split over the processes; all of them return a problem if any found one."""
        index, count = jax.process_index(), jax.process_count()
        problem = verify(step_dir, index, count)
        if count > 1:
            found = multihost_utils.process_allgather(np.int32(problem is not None))
            if problem is None and found.any():
                problem = f"process {int(np.argmax(found))} found a damaged file"
        return problem

    def _quarantine(self, step: int, problem: str) -> None:
        name = f"corrupt-{step}-{int(time.time())}"
        target = self.directory / name
        print(f"checkpoint {self.step_dir(step)} is damaged ({problem}); moved to {target}, trying the previous one",
              file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            if self.remote:  # the bucket's copy is moved aside too, so no later run downloads it again
                fs = storage.filesystem(str(self.directory))
                if fs.exists(str(self.step_dir(step))):
                    fs.mv(str(self.step_dir(step)), str(target), recursive=True)
            self._local(step).rename(epath.Path(self.local) / name)
        self.manager.close()
        self._open()

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
        """Restore the state onto the shardings in `abstract_state` (and the iterator in place).

        A checkpoint saved without a data item (e.g. by `bigmodel import-hf`) leaves the
        iterator as it is: a fresh one starts from the beginning.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        with_data = data_iter is not None and (self._local(step) / "data").is_dir()
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if with_data:
            data_iter.set_state(restored["data"])
        return restored["state"]

    def restore_raw(self, step: int) -> Any:
        """The saved train state as a tree of host arrays (no target structure needed)."""
        return ocp.StandardCheckpointer().restore(self._local(step) / "state")

    def saved_config(self, step: int) -> dict | None:
        """The config stored with a checkpoint, if readable."""
        path = self._local(step) / "config" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def wait(self) -> None:
        """Block until any asynchronous save and its sealing have finished (raises CheckpointError on failure)."""
        pending, self._pending = self._pending, None
        finisher, self._finisher = self._finisher, None
        if finisher is None:
            return
        finisher.join()
        error, self._error = self._error, None
        try:
            # Orbax raises a failed save once in each thread that waits for it: take it here too,
            # or the next save or close in this thread would raise it again.
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            error = error or ("save", e)
        if error and error[0] == "save":
            raise CheckpointError(self._failure(pending if pending is not None else -1, error[1])) from error[1]
        if error and error[0] == "upload":
            raise CheckpointError(
                f"uploading checkpoint {self.step_dir(pending)} from {self._local(pending)} failed: "
                f"{type(error[1]).__name__}: {error[1]}; the local copy is complete and the next save uploads it"
            ) from error[1]
        if error:
            raise CheckpointError(
                f"recording the integrity of checkpoint {self.step_dir(pending)} failed: "
                f"{type(error[1]).__name__}: {error[1]}; the checkpoint itself is complete but will not be verified"
            ) from error[1]

    def close(self) -> None:
        """Finish pending saves and release resources."""
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
