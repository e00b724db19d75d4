"""Process settings: XLA's per-call buffers come back from the heap; XLA:CPU flags; applied only for the CPU."""

import fnmatch
import importlib
import os
import subprocess
import sys
import types

import pytest

from bigmodel import runtime

PROBE = r"""
import resource, sys
from bigmodel import runtime
applied = runtime.tune_malloc()
import jax, jax.numpy as jnp
# Like a train step: a large temporary (64 MiB, above glibc's largest mmap threshold) inside
# the executable, a small result.
f = jax.jit(lambda x, w: jnp.tanh(x * 2.0 + 1.0) @ w)
x, w = jnp.ones((4096, 4096)), jnp.ones((4096, 8))
def call():
    f(x, w).block_until_ready()
for _ in range(10):
    call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    call()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(malloc: str) -> tuple[bool, int]:
    env = {**os.environ, "BIGMODEL_MALLOC": malloc, "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_tuned_malloc_reuses_memory_across_calls():
    applied, tuned = _faults("")
    assert applied
    applied, system = _faults("system")
    assert not applied
    # glibc's defaults map and unmap the 64 MiB temporary at every call: 40 x 16,384 fresh pages.
    assert system >= 40 * 16384, system
    # Tuned, the heap hands freed memory back; it may still grow for the first few calls
    # (aligned requests that a just-freed block of the same size cannot hold), then stops.
    # (seen here: 0 to 4 calls' worth of 40).
    assert tuned <= 10 * 16384, tuned


def test_xla_cpu_flags_are_added_once_and_yield_to_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    runtime.set_xla_cpu_flags()
    runtime.set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2", f"{runtime.YNN_FLAG}={runtime.YNN_FUSIONS}"]
    monkeypatch.setenv("XLA_FLAGS", f"{runtime.YNN_FLAG}=")  # the user's choice: no YNNPACK at all
    runtime.set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == f"{runtime.YNN_FLAG}="


@pytest.fixture
def host(monkeypatch):
    """A host whose JAX platforms, plugins and device nodes the test sets (JAX not yet imported)."""
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # restored after the test
    for name in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    state = {"plugins": [], "nodes": set()}
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda: list(state["plugins"]))
    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: fnmatch.filter(state["nodes"], pattern))
    return state


@pytest.mark.parametrize("plugins, nodes, cpu", [
    ([], [], True),  # nothing but jaxlib
    (["xla_cuda12=jax_cuda12_plugin"], [], True),  # the CUDA plugin on a host without an NVIDIA GPU
    (["xla_cuda12=jax_cuda12_plugin"], ["/dev/nvidiactl", "/dev/nvidia0"], False),
    (["xla_cuda12=jax_cuda12_plugin"], ["/dev/kfd", "/dev/accel0"], True),  # other vendors' nodes
    (["xla_rocm7=jax_rocm7_plugin"], ["/dev/kfd"], False),
    (["libtpu"], ["/dev/nvidia0"], True),
    (["libtpu"], ["/dev/accel0"], False),  # TPU v4
    (["libtpu"], ["/dev/vfio/vfio"], True),  # the VFIO control node alone is no TPU
    (["libtpu"], ["/dev/vfio/vfio", "/dev/vfio/0"], False),  # TPU v5e, v5p, v6e
    (["xla_metal"], [], False),  # a plugin we cannot check is taken at its word
])
def test_backend_follows_the_plugins_that_find_a_device(host, plugins, nodes, cpu):
    host["plugins"], host["nodes"] = plugins, set(nodes)
    assert runtime.backend_is_cpu() is cpu


def test_hidden_gpus_leave_the_cpu(host, monkeypatch):
    host["plugins"], host["nodes"] = ["xla_cuda12=jax_cuda12_plugin"], {"/dev/nvidia0"}
    for value, cpu in (("", True), ("-1", True), ("0,1", False)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert runtime.backend_is_cpu() is cpu, value


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("cpu,cuda", True), ("cuda", False),
                                            ("tpu,cpu", False), ("", False)])
def test_jax_platforms_decides_first(host, monkeypatch, platforms, cpu):
    host["plugins"], host["nodes"] = ["libtpu"], {"/dev/accel0"}  # a TPU host: the default would be the TPU
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert runtime.backend_is_cpu() is cpu  # empty: unset, so the TPU


def test_jax_config_wins_once_jax_is_imported(host, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    config = types.SimpleNamespace(jax_platforms="tpu")  # as set by jax.config.update("jax_platforms", "tpu")
    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(config=config))
    assert not runtime.backend_is_cpu()


def test_configure_leaves_an_accelerator_host_alone(host, monkeypatch):
    applied = []
    monkeypatch.setattr(runtime, "tune_malloc", lambda: applied.append("malloc"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    host["plugins"], host["nodes"] = ["xla_cuda12=jax_cuda12_plugin"], {"/dev/nvidia0"}
    assert runtime.configure() is False
    assert applied == [] and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the same host told to use its CPU
    assert runtime.configure() is True
    assert applied == ["malloc"] and f"{runtime.YNN_FLAG}={runtime.YNN_FUSIONS}" in os.environ["XLA_FLAGS"]


def test_plugins_are_found_where_jax_looks(tmp_path, monkeypatch):
    # A plugin module in the `jax_plugins` namespace package and an entry point, as JAX discovers them.
    (tmp_path / "jax_plugins" / "xla_fake").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_fake" / "__init__.py").write_text("")
    dist = tmp_path / "fake_rocm_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-rocm-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[jax_plugins]\nxla_rocm9 = fake_rocm_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    found = runtime.accelerator_plugins()
    assert "xla_fake" in found and "xla_rocm9=fake_rocm_plugin" in found
