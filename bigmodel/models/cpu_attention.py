"""Fused float32 attention for XLA:CPU (`cpu_attention.cc`), built for the host on first use.

XLA:CPU has no fused attention: an einsum attention writes the [T, S] logits and
probabilities of every head to memory, differentiates the softmax elementwise and transposes
the heads in and out. This kernel takes q [.., T, N, H] and k, v [.., S, K, H] in the
projections' own layout and computes each block of 64 query rows against the keys it can
see, softmax included, in one pass over cache-resident tiles; the backward recomputes the
probabilities from the saved log-sum-exp (FlashAttention's scheme). Causal and full
attention, grouped-query heads, no mask; `packed_attention` takes self-attention's stacked
[.., T, N, 3, H] projection as it is.

The C++ source is compiled once per host CPU, compiler and jaxlib (`g++ -O3 -march=native`,
or $CXX) into $BIGMODEL_KERNEL_CACHE (default ~/.cache/bigmodel/kernels) and registered as
two XLA FFI targets. Where no compiler is found or the build fails, `available()` is False
and `unsupported` says why; `layers.Attention` then uses the einsum attention.
"""

from __future__ import annotations

import ctypes
import functools
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
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# XLA FFI target name -> the library's handler symbol
TARGETS = {
    "bigmodel_cpu_attention_forward": "BigmodelAttentionForward",
    "bigmodel_cpu_attention_backward": "BigmodelAttentionBackward",
    "bigmodel_cpu_packed_attention_forward": "BigmodelPackedAttentionForward",
    "bigmodel_cpu_packed_attention_backward": "BigmodelPackedAttentionBackward",
}
FORWARD, BACKWARD, PACKED_FORWARD, PACKED_BACKWARD = TARGETS

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
    """Compile the kernel for this host (or reuse the cached build); returns the library path.

    Raises RuntimeError naming the problem when there is no compiler or the build fails. The
    library is written under a temporary name and renamed, so a build cut short leaves nothing
    that a later run would load.
    """
    compiler = compiler or os.environ.get("CXX", "g++")
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++ or set CXX) to build {SOURCE.name}")
    include = jax.ffi.include_dir()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), version, " ".join(CXX_FLAGS), jax.__version__, platform.machine(), _cpu_signature()]
    ).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([exe, *CXX_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"building {SOURCE.name} with {compiler} failed:\n{done.stderr[-2000:]}")
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
                _log.warning("fused CPU attention unavailable, using the einsum attention: %s", err)
        return _state.get("library")


def available() -> bool:
    """True once the kernel is built for this host and registered with XLA:CPU."""
    return _load() is not None


def unsupported(dtype: Any, t: int, s: int, mask: Any, causal: bool) -> str | None:
    """Why the kernel cannot run attention of T queries over S keys in `dtype` (None if it can)."""
    if jax.default_backend() != "cpu":
        return f"it runs on CPU only (the default backend is {jax.default_backend()})"
    if mask is not None:
        return "it takes no mask (only causal or full attention)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes in float32, not {jnp.dtype(dtype).name}"
    if causal and s < t:
        return f"causal attention needs at least as many keys as queries (got {s} < {t})"
    if not available():
        return _state["error"]
    return None


def _call(target: str, shapes: Any, *args: jax.Array, causal: bool, scale: float) -> Any:
    if not available():
        raise RuntimeError(f"the fused CPU attention kernel is not available: {_state['error']}")
    return jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")(
        *args, causal=bool(causal), scale=np.float32(scale))


def _like(*arrays: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


def _outputs(q_shape: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The output [.., T, N, H] and the log-sum-exp [.., N, T] for queries of shape q_shape."""
    *lead, t, n, h = q_shape
    return jax.ShapeDtypeStruct((*lead, t, n, h), jnp.float32), jax.ShapeDtypeStruct((*lead, n, t), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float) -> jax.Array:
    """softmax(scale·q kᵀ [+ causal mask]) v for q [.., T, N, H], k and v [.., S, K, H] -> [.., T, N, H].

    Query head n attends with key/value head n // (N / K). Leading dimensions are batch.
    Check `unsupported` first: this assumes the kernel is built and the inputs are float32.
    """
    return _call(FORWARD, _outputs(q.shape), q, k, v, causal=causal, scale=scale)[0]


def _attention_fwd(q, k, v, causal, scale):
    out, lse = _call(FORWARD, _outputs(q.shape), q, k, v, causal=causal, scale=scale)
    return out, (q, k, v, out, lse)


def _attention_bwd(causal, scale, residuals, dout):
    q, k, v, out, lse = residuals
    return tuple(_call(BACKWARD, _like(q, k, v), q, k, v, out, lse, dout, causal=causal, scale=scale))


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def packed_attention(qkv: jax.Array, causal: bool, scale: float) -> jax.Array:
    """`attention` of queries, keys and values stacked as qkv [.., T, N, 3, H] -> [.., T, N, H].

    Reads and differentiates the stacked projection in place: no slices on the way in and no
    concatenation of the three gradients on the way back.
    """
    return _call(PACKED_FORWARD, _outputs(_query_shape(qkv)), qkv, causal=causal, scale=scale)[0]


def _query_shape(qkv: jax.Array) -> tuple[int, ...]:
    *lead, t, n, _, h = qkv.shape
    return (*lead, t, n, h)


def _packed_fwd(qkv, causal, scale):
    out, lse = _call(PACKED_FORWARD, _outputs(_query_shape(qkv)), qkv, causal=causal, scale=scale)
    return out, (qkv, out, lse)


def _packed_bwd(causal, scale, residuals, dout):
    qkv, out, lse = residuals
    return (_call(PACKED_BACKWARD, _like(qkv), qkv, out, lse, dout, causal=causal, scale=scale)[0],)


packed_attention.defvjp(_packed_fwd, _packed_bwd)
