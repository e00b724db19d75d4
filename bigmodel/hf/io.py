"""Hugging Face checkpoint directories: config.json and the weights (safetensors, sharded or not, or PyTorch)."""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any

import numpy as np

from bigmodel.hf.mapping import StateDict

# safetensors dtype codes; BF16 (which numpy lacks) comes from ml_dtypes, a JAX dependency.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
WEIGHTS = "model.safetensors"


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The HF config.json of a checkpoint directory."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return json.loads(file.read_text())


def _read_safetensors_raw(file: pathlib.Path) -> StateDict:
    """Parse a .safetensors file directly (for dtypes the numpy API cannot express)."""
    import ml_dtypes

    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        out[name] = np.asarray(data[start:end]).view(dtype).reshape(info["shape"])
    return out


def _read_safetensors(file: pathlib.Path) -> StateDict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except TypeError:  # bfloat16 checkpoints
        return _read_safetensors_raw(file)


def _read_torch(file: pathlib.Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {file} needs PyTorch (pip install torch); safetensors files do not") from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_state_dict(path: str | pathlib.Path) -> StateDict:
    """All tensors of a checkpoint directory as float32 numpy arrays (safetensors preferred)."""
    path = pathlib.Path(path)
    candidates = ((WEIGHTS, _read_safetensors), ("pytorch_model.bin", _read_torch))
    for name, reader in candidates:
        if (path / name).is_file():
            files = [path / name]
        elif (path / f"{name}.index.json").is_file():  # sharded checkpoints
            weight_map = json.loads((path / f"{name}.index.json").read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        else:
            continue
        state: StateDict = {}
        for file in files:
            state.update(reader(file))
        # Our parameters are float32 whatever the checkpoint stores (float16, bfloat16 …).
        return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else np.asarray(v)
                for k, v in state.items()}
    raise FileNotFoundError(f"{path} has neither {WEIGHTS} nor pytorch_model.bin (nor a sharded index)")


def write_checkpoint(path: str | pathlib.Path, state: StateDict, config: dict[str, Any]) -> None:
    """Write config.json and model.safetensors (float32), each through a temporary file and a rename."""
    from safetensors.numpy import save_file

    from bigmodel.metrics import atomic_write_text

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()}
    tmp = out / f".{WEIGHTS}.tmp.{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # transformers checks 'format'
        os.replace(tmp, out / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
