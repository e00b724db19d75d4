"""Checkpoint integrity records: per-process sealing, verification, the older record, epath paths."""

import json
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from bigmodel import checkpoint


def state() -> dict:
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((256, 64), np.float32)), "b": jnp.zeros((64,))}


@pytest.fixture
def saved(tmp_path):
    """A workdir with one complete, sealed checkpoint at step 1."""
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    ckpt.save(1, state(), None, {"run": "test"})
    ckpt.close()
    return ckpt.step_dir(1)


def largest_file(step_dir) -> str:
    return max(checkpoint.checkpoint_files(step_dir), key=lambda name: (step_dir / name).stat().st_size)


def test_the_orbax_layout_is_sealed_by_its_writers():
    assert checkpoint.writer("state/ocdbt.process_3/d/0a1b") == 3
    assert checkpoint.writer("state/ocdbt.process_12/manifest.ocdbt") == 12
    assert checkpoint.writer("state/array_metadatas/process_1") == 1
    for primary in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "state/d/0a1b",
                    "config/metadata"):
        assert checkpoint.writer(primary) == 0


def test_a_saved_checkpoint_records_every_file_and_verifies(saved):
    record = json.loads((saved / checkpoint.record_name(0)).read_text())
    files = checkpoint.checkpoint_files(saved)
    assert sorted(record["files"]) == files and record["checksum"] == "crc32c"
    assert any(name.startswith("state/ocdbt.process_0/") for name in files)
    name = largest_file(saved)
    data = (saved / name).read_bytes()
    assert record["files"][name][0] == len(data) > 30_000  # the 256×64 float32 array is in there
    assert checkpoint.verify(saved) is None


@pytest.mark.parametrize("damage, message", [("garbled", "fails its checksum (garbled)"),
                                             ("truncated", "bytes, expected"), ("missing", "missing file")])
def test_damage_is_detected(saved, damage, message):
    name = largest_file(saved)
    path = saved / name
    data = bytearray(path.read_bytes())
    if damage == "garbled":
        data[len(data) // 2] ^= 0x01  # one bit
        path.write_bytes(data)
    elif damage == "truncated":
        path.write_bytes(data[:-1])
    else:
        path.unlink()
    problem = checkpoint.verify(saved)
    assert problem is not None and message in problem and name in problem


def test_an_unreadable_record_is_damage(saved):
    (saved / checkpoint.record_name(0)).write_text("{not json")
    assert "unreadable integrity record" in checkpoint.verify(saved)


def fake_two_process_checkpoint(step_dir):
    """The files two processes write in orbax's layout, with distinct contents."""
    names = ["_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "state/array_metadatas/process_0",
             "state/array_metadatas/process_1", "state/ocdbt.process_0/d/aa", "state/ocdbt.process_1/d/bb",
             "state/ocdbt.process_1/manifest.ocdbt"]
    for i, name in enumerate(names):
        (step_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / name).write_bytes(bytes([i]) * (1000 + i))
    return names


def test_each_process_seals_its_files_and_the_processes_share_verification(tmp_path):
    fake_two_process_checkpoint(tmp_path)
    assert checkpoint.seal(tmp_path, 1) == 1004 + 1006 + 1007
    assert checkpoint.seal(tmp_path, 0) == 1000 + 1001 + 1002 + 1003 + 1005
    record = json.loads((tmp_path / checkpoint.record_name(1)).read_text())["files"]
    assert sorted(record) == ["state/array_metadatas/process_1", "state/ocdbt.process_1/d/bb",
                              "state/ocdbt.process_1/manifest.ocdbt"]
    assert record["state/ocdbt.process_1/d/bb"] == [1006, f"{_crc32c(bytes([6]) * 1006):08x}"]
    (tmp_path / "state/ocdbt.process_1/d/bb").write_bytes(bytes([7]) * 1006)
    assert "state/ocdbt.process_1/d/bb fails its checksum" in checkpoint.verify(tmp_path)  # one process: all records
    assert checkpoint.verify(tmp_path, 0, 2) is None  # process 0 of 2 checks process 0's record
    assert "fails its checksum" in checkpoint.verify(tmp_path, 1, 2)


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def test_checksums_are_crc32c_of_the_whole_file(tmp_path):
    # Castagnoli CRC-32 check value (RFC 3720, "123456789") through a file, to pin the algorithm.
    (tmp_path / "f").write_bytes(b"123456789")
    assert checkpoint.crc32c(epath.Path(tmp_path / "f")) == (9, "e3069283")


def test_records_of_older_checkpoints_still_verify(tmp_path):
    # Before per-process records, process 0 wrote one record of {file: [size, zlib CRC32]}.
    names = fake_two_process_checkpoint(tmp_path)
    legacy = {n: [(tmp_path / n).stat().st_size, zlib.crc32((tmp_path / n).read_bytes())] for n in names}
    (tmp_path / checkpoint.LEGACY_RECORD).write_text(json.dumps(legacy))
    assert checkpoint.verify(tmp_path) is None
    (tmp_path / names[-1]).write_bytes(bytes([99]) * 1007)
    assert f"{names[-1]} fails its checksum" in checkpoint.verify(tmp_path)


def test_sealing_and_verifying_go_through_epath(tmp_path):
    # gs://bucket/... served from tmp_path by epath's own mock: only what epath offers is used.
    root = "gs://bucket"

    def local(path):
        return str(path).replace(root, str(tmp_path), 1)

    def remote(path):
        return str(path).replace(str(tmp_path), root, 1)

    def walk(fn, path, *args, **kwargs):
        return ((remote(d), dirs, files) for d, dirs, files in fn(local(path), *args, **kwargs))

    def glob(fn, pattern):
        return [remote(p) for p in fn(local(pattern))]

    passthrough = {name: (lambda fn, path, *a, **k: fn(local(path), *a, **k))
                   for name in ("exists", "isdir", "open", "stat", "listdir", "makedirs", "mkdir", "remove")}
    moved = lambda fn, src, dst, *a, **k: fn(local(src), local(dst), *a, **k)
    fake_two_process_checkpoint(tmp_path / "ckpt")
    with epath_testing.mock_epath(walk=walk, glob=glob, replace=moved, rename=moved, **passthrough):
        step_dir = epath.Path(f"{root}/ckpt")
        assert checkpoint.seal(step_dir, 0) > 0 and checkpoint.seal(step_dir, 1) > 0
        assert checkpoint.verify(step_dir) is None
        (tmp_path / "ckpt/state/ocdbt.process_0/d/aa").write_bytes(b"")
        assert "state/ocdbt.process_0/d/aa has 0 bytes" in checkpoint.verify(step_dir)
    assert (tmp_path / "ckpt" / checkpoint.record_name(1)).exists()


def test_sealing_runs_after_the_save_without_blocking_it(tmp_path, monkeypatch):
    release, sealing = threading.Event(), threading.Event()
    seal = checkpoint.seal

    def slow_seal(step_dir, process=0):
        sealing.set()
        release.wait(60)
        return seal(step_dir, process)

    monkeypatch.setattr(checkpoint, "seal", slow_seal)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    ckpt.save(1, state(), None, {})  # returns while the write and the sealing go on
    assert sealing.wait(60)  # the save completed (orbax renamed it) and sealing began
    assert ckpt.step_dir(1).is_dir() and not (ckpt.step_dir(1) / checkpoint.record_name(0)).exists()
    release.set()
    ckpt.wait()
    assert (ckpt.step_dir(1) / checkpoint.record_name(0)).exists()
    ckpt.close()


def test_a_failed_seal_is_reported_at_the_next_wait(tmp_path, monkeypatch):
    def failing_seal(step_dir, process=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "seal", failing_seal)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    ckpt.save(1, state(), None, {})
    with pytest.raises(checkpoint.CheckpointError, match="recording the integrity of checkpoint .*1 failed: "
                                                         "OSError: .*No space left.*the checkpoint itself is complete"):
        ckpt.wait()
    ckpt.close()


def test_restore_moves_a_damaged_checkpoint_aside_and_uses_the_previous(tmp_path, capsys):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3, async_save=False)
    first = state()
    ckpt.save(1, first, None, {})
    ckpt.save(2, jax.tree.map(lambda x: x + 1, first), None, {})
    step_dir = ckpt.step_dir(2)
    victim = step_dir / largest_file(step_dir)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(data)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first)
    step, restored = ckpt.restore_latest(abstract, None)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(restored["w"], first["w"])
    assert f"checkpoint {step_dir} is damaged" in capsys.readouterr().err
    assert [p.name.startswith("corrupt-2-") for p in tmp_path.joinpath("checkpoints").iterdir()].count(True) == 1
