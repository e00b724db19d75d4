"""Test setup: 8 fake CPU devices (set before JAX is imported) and a small real corpus."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

from bigmodel import runtime  # noqa: E402

runtime.configure()  # as the `bigmodel` command does, before JAX starts

REPO = pathlib.Path(__file__).resolve().parents[1]
GPT_TINY = str(REPO / "experiments" / "gpt_tiny.py")
# A slice of the standard library: real Python source, ~30 files, present everywhere.
SMALL_CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir shared by the whole session (datasets are built once)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_overrides(data_dir) -> list[str]:
    """Overrides that point the ':tiny' GPT config at the small corpus."""
    return [
        f"data.source={SMALL_CORPUS}",
        "data.validation_fraction=0.2",
        f"data.data_dir={data_dir}",
        "log.progress=false",
    ]
