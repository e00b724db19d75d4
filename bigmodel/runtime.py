"""Process-wide settings for the CPU backend, made before JAX starts (`configure`).

1. Host memory: glibc's malloc keeps and reuses what XLA:CPU frees. XLA:CPU allocates an
executable's buffers afresh at every call. glibc serves blocks of more than a few MiB with
mmap and returns them to the kernel on free, so every train step page-faults and
zero-fills all of its activations again: about 180,000 page faults per step for a GPT with
d_model 256, 4 layers and 4,096 tokens per batch, a fifth of the step time on a 2-core
CPU. One malloc arena, no mmap and no trimming make the same memory come back from the heap
each step (0 faults); the process keeps its peak resident size instead. Set
BIGMODEL_MALLOC=system to keep glibc's defaults.

2. XLA:CPU's matmul library: YNNPACK only for dots with fused elementwise work and for
reductions, Eigen for plain dots (`--xla_cpu_experimental_ynn_fusion_type`), 5-7% faster
GPT train steps on a 2-core AVX-512 CPU than JAX's default. A user's own setting of that
flag in XLA_FLAGS wins.

Both are for XLA:CPU, so `configure` applies them only where JAX's default backend will be
the CPU. It runs before JAX starts a backend and decides without starting one
(`backend_is_cpu`):

  - JAX_PLATFORMS (or jax_platforms in JAX's config, when JAX is already imported) names
    the platforms and the first is the default: 'cpu' first means the CPU, anything else not.
  - Otherwise the CPU, unless an accelerator plugin is installed that will find a device:
      CUDA  a `jax_plugins` entry point or module naming cuda (jax[cuda12]) and one of
            /dev/nvidia0, /dev/nvidiactl, /dev/dxg (the nodes JAX looks for), unless
            CUDA_VISIBLE_DEVICES is set empty or to -1
      ROCm  a plugin naming rocm and /dev/kfd
      TPU   libtpu (or a plugin naming tpu) and /dev/accel* or /dev/vfio/<N>
    Any other plugin counts as an accelerator: there is no telling whether it finds a device.

The `bigmodel` command calls `configure` first; a script or notebook that uses bigmodel's
trainer directly calls it before its first JAX computation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"

# A fragment of a plugin's name -> device nodes (glob patterns), any of which means it finds a device.
ACCELERATOR_NODES = {
    "cuda": ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"),
    "rocm": ("/dev/kfd",),
    "tpu": ("/dev/accel*", "/dev/vfio/[0-9]*"),
}


def configure() -> bool:
    """Apply both settings where the backend will be the CPU (see above); True if it will.

    Where plugins are installed but none finds a device (the compile-only CUDA and TPU
    plugins of `bigmodel plan --target` on a CPU host), JAX_PLATFORMS=cpu is set before JAX
    starts, so that JAX does not try to start them and print their failure (a traceback from
    the CUDA plugin, libtpu's own warnings) on every command.
    """
    if not backend_is_cpu():
        return False
    if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS") and accelerator_plugins():
        os.environ["JAX_PLATFORMS"] = "cpu"
    tune_malloc()
    set_xla_cpu_flags()
    return True


def backend_is_cpu() -> bool:
    """Whether JAX's default backend in this process will be the CPU, decided without starting JAX."""
    jax = sys.modules.get("jax")
    platforms = jax.config.jax_platforms if jax is not None else os.environ.get("JAX_PLATFORMS")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(finds_device(plugin) for plugin in accelerator_plugins())


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator plugins: `jax_plugins` entry points and modules, and libtpu."""
    found = [f"{e.name}={e.value}" for e in importlib.metadata.entry_points(group="jax_plugins")]
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        found += [m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def finds_device(plugin: str) -> bool:
    """Whether the accelerator plugin named `plugin` will find a device on this host."""
    for fragment, nodes in ACCELERATOR_NODES.items():
        if fragment in plugin.lower():
            if fragment == "cuda" and os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
                return False
            return any(glob.glob(node) for node in nodes)
    return True


def set_xla_cpu_flags() -> None:
    """Add bigmodel's XLA:CPU defaults to XLA_FLAGS unless the user set them there."""
    add_xla_flag(YNN_FLAG, YNN_FUSIONS)


def add_xla_flag(name: str, value: str) -> None:
    """Append `name=value` to XLA_FLAGS unless that flag is there already (the user's setting wins).

    XLA reads XLA_FLAGS when JAX starts a backend, so call this before the first computation.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {name}={value}".strip()


def tune_malloc() -> bool:
    """Keep freed memory in the process (Linux with glibc); True if the settings were applied."""
    if os.environ.get("BIGMODEL_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 disables trimming; each call returns 1 on success.
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
