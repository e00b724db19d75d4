"""Test setup: 8 fake CPU devices (set before JAX is imported), a small real corpus, reference data."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib
import sysconfig

import pytest

from bigmodel import runtime

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


REFERENCE_DIR_ENV = "BIGMODEL_REFERENCE_DIR"
# Published data the tests compare against but the repository may not hold (no licence): where to get each file.
REFERENCE_SOURCES = {
    "chinchilla_fig4_epoch_extracted.csv": "data/svg_extracted_data.csv of Epoch AI's analyzing-chinchilla "
                                           "repository (the runs of Hoffmann et al. 2022, Fig. 4, digitised)",
}


@pytest.fixture
def reference_file():
    """reference_file(NAME): the path of $BIGMODEL_REFERENCE_DIR/NAME; the test is skipped if it is not there."""

    def find(name: str) -> pathlib.Path:
        directory = os.environ.get(REFERENCE_DIR_ENV, "")
        path = pathlib.Path(directory, name)
        if directory and path.is_file():
            return path
        missing = f"{path} does not exist" if directory else f"{REFERENCE_DIR_ENV} is not set"
        pytest.skip(f"reference data {name} not provided ({missing}); it is {REFERENCE_SOURCES[name]}, kept out of "
                    f"the repository for want of a licence: save it as {name} in a directory and set "
                    f"{REFERENCE_DIR_ENV} to that directory (.ci/run uses ../shared/reference)")

    return find
