"""Process settings: XLA's per-call buffers come back from the heap; XLA:CPU flags."""

import os
import subprocess
import sys

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
