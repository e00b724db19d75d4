"""Cost of checkpoint integrity records on a GPT-2 124M train state (parameters + Adam moments, float32).

    python benchmarks/checkpoint_integrity.py [--dir DIR] [--repeats 3] > result.json

Saves the state with `checkpoint.Checkpointer` (asynchronous, as the trainer does) and times,
side by side on the same files: the save as the training loop sees it (until `save` returns)
and until it is complete; sealing and verifying the way it was done before (process 0
reads every file, zlib CRC32, at the next save) and now (CRC32C of the files this process
wrote, in a background thread after the asynchronous save); a restore, for scale. The files
are freshly written, so reads come from the page cache. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib

import flax.linen as nn
import google_crc32c
import jax
import numpy as np
from etils import epath

from bigmodel import checkpoint, models
from bigmodel.models import gpt


def state_124m() -> dict:
    """Random float32 parameters and Adam moments of GPT-2 124M (shapes from an abstract init)."""
    cfg = gpt.model_config("124m")
    module = models.build(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 8), np.int32)))["params"])
    rng = np.random.default_rng(0)
    leaf = lambda s: jax.device_put(rng.standard_normal(s.shape, np.float32))
    return {"params": jax.tree.map(leaf, shapes), "mu": jax.tree.map(leaf, shapes), "nu": jax.tree.map(leaf, shapes)}


def zlib_seal(step_dir: epath.Path) -> dict:
    """The previous record: size and zlib CRC32 of every file, read by one process."""
    out = {}
    for name in checkpoint.checkpoint_files(step_dir):
        crc, size = 0, 0
        with (step_dir / name).open("rb") as f:
            while chunk := f.read(checkpoint.CHUNK):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        out[name] = (size, crc)
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    """(best wall seconds over repeats, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def hash_rate(fn, data: bytes, repeats: int) -> float:
    """GB/s of a checksum over an in-memory buffer (no file reads)."""
    return len(data) / timed(lambda: fn(data), repeats)[0] / 1e9


def main() -> None:
    """Measure and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = state_124m()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        ckpt = checkpoint.Checkpointer(workdir, keep=args.repeats + 1, async_save=True)
        returned, complete = [], []
        for step in range(args.repeats):
            start = time.perf_counter()
            ckpt.save(step, state, None, {"benchmark": True})
            returned.append(time.perf_counter() - start)
            ckpt.wait()  # the write, then this process's sealing in the background thread
            complete.append(time.perf_counter() - start)
        step_dir = epath.Path(ckpt.step_dir(args.repeats - 1))
        files = checkpoint.checkpoint_files(step_dir)
        disk_bytes = sum((step_dir / f).stat().length for f in files)
        seal_before, _ = timed(lambda: zlib_seal(step_dir), args.repeats)
        seal_after, _ = timed(lambda: checkpoint.seal(step_dir, 0), args.repeats)
        verify_after, problem = timed(lambda: checkpoint.verify(step_dir), args.repeats)
        assert problem is None, problem
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restore_s, _ = timed(lambda: jax.block_until_ready(ckpt.restore(args.repeats - 1, abstract, None)), 1)
        ckpt.close()
    sample = np.random.default_rng(1).bytes(256 << 20)
    gb = disk_bytes / 1e9
    print(json.dumps({
        "name": "checkpoint_integrity/gpt2_124m_adam_float32",
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "state_bytes": state_bytes,
        "checkpoint_bytes": disk_bytes,
        "checkpoint_files": len(files),
        "save_returns_s": min(returned),  # what the training loop waits for
        "save_and_seal_complete_s": min(complete),  # write + background sealing (now)
        # Before, sealing and verifying each read and hashed every file with zlib CRC32 on every
        # process (verify) or on process 0 at the next save (seal): one figure for both.
        "seal_or_verify_before_s": seal_before,
        "seal_after_s": seal_after,  # CRC32C of this process's files, in the background
        "verify_after_s": verify_after,
        "seal_before_gb_per_s": gb / seal_before,
        "seal_after_gb_per_s": gb / seal_after,
        "restore_s": restore_s,
        "hash_only_gb_per_s": {
            "zlib.crc32": hash_rate(zlib.crc32, sample, args.repeats),
            f"google_crc32c ({google_crc32c.implementation})": hash_rate(google_crc32c.value, sample, args.repeats),
        },
    }))


if __name__ == "__main__":
    main()
