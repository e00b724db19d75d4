"""bigmodel's XLA:CPU kernels: one C++ library, built for the host on first use.

The sources (`attention.cc`: fused attention; `norm.cc`: LayerNorm and RMSNorm; `gelu.cc`:
bias add and GELU; with their shared `kernels.h`) are compiled together once per host CPU,
compiler and jaxlib (`g++ -O3 -march=native`, or $CXX) into $BIGMODEL_KERNEL_CACHE (default
~/.cache/bigmodel/kernels), and each XLA FFI handler is registered as a custom-call target.
Where no compiler is found or the build fails, `available()` is False and `error()` says why;
the models then use their plain JAX paths (`attention.unsupported`, `unsupported`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import jax
import numpy as np

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "attention.cc", HERE / "norm.cc", HERE / "gelu.cc")  # compiled
HEADERS = (HERE / "kernels.h",)  # included; part of the cache key
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# XLA FFI target name -> the library's handler symbol
TARGETS = {
    "bigmodel_cpu_attention_forward": "BigmodelAttentionForward",
    "bigmodel_cpu_attention_backward": "BigmodelAttentionBackward",
    "bigmodel_cpu_packed_attention_forward": "BigmodelPackedAttentionForward",
    "bigmodel_cpu_packed_attention_backward": "BigmodelPackedAttentionBackward",
    "bigmodel_cpu_norm_forward": "BigmodelNormForward",
    "bigmodel_cpu_norm_backward": "BigmodelNormBackward",
    "bigmodel_cpu_bias_gelu_forward": "BigmodelBiasGeluForward",
    "bigmodel_cpu_bias_gelu_backward": "BigmodelBiasGeluBackward",
}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, Any] = {}  # 'library' once built and registered, or 'error'


def cache_dir() -> pathlib.Path:
    """Where built kernels are kept: $BIGMODEL_KERNEL_CACHE, else bigmodel/kernels in the user's cache."""
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "bigmodel" / "kernels"
    return pathlib.Path(os.environ.get("BIGMODEL_KERNEL_CACHE", default))


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def build(compiler: str | None = None) -> pathlib.Path:
    """Compile the kernels for this host (or reuse the cached build); returns the library path.

    Raises RuntimeError naming the problem when there is no compiler or the build fails. The
    library is written under a temporary name and renamed, so a build cut short leaves nothing
    that a later run would load.
    """
    compiler = compiler or os.environ.get("CXX", "g++")
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++ or set CXX) to build the CPU kernels")
    include = jax.ffi.include_dir()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    texts = [f.read_text() for f in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join(
        [*texts, version, " ".join(CXX_FLAGS), jax.__version__, platform.machine(), _cpu_signature()]
    ).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([exe, *CXX_FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"building the CPU kernels with {compiler} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    with _lock:
        if "library" not in _state and "error" not in _state:
            try:
                library = ctypes.cdll.LoadLibrary(str(build()))
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
                _state["library"] = library
            except (RuntimeError, OSError, AttributeError) as err:
                _state["error"] = str(err)
                _log.warning("the CPU kernels are unavailable, the models use their plain JAX paths: %s", err)
        return _state.get("library")


def available() -> bool:
    """True once the kernels are built for this host and registered with XLA:CPU."""
    return _load() is not None


def error() -> str | None:
    """Why the kernels are unavailable (None when they are, or have not been asked for yet)."""
    return _state.get("error")


def unsupported(dtype: Any) -> str | None:
    """Why no kernel can run here in `dtype`: another backend, not float32, or no build (None if they can)."""
    if jax.default_backend() != "cpu":
        return f"it runs on CPU only (the default backend is {jax.default_backend()})"
    if np.dtype(dtype) != np.float32:
        return f"it computes in float32, not {np.dtype(dtype).name}"
    if not available():
        return error()
    return None


def call(target: str, shapes: Any, *args: jax.Array, **attributes: Any) -> Any:
    """jax.ffi.ffi_call of a registered kernel; vmap runs it once over the broadcast batch."""
    if not available():
        raise RuntimeError(f"the CPU kernels are not available: {error()}")
    return jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")(*args, **attributes)


def like(*arrays: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Result shapes equal to the given arrays'."""
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)
