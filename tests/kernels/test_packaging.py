"""A non-editable install ships every package and the CPU kernels' C++ sources (pyproject.toml's lists)."""

import pathlib
import tomllib
from fnmatch import fnmatch

from bigmodel.kernels.cpu import library

from conftest import REPO


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_listed():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "bigmodel").rglob("__init__.py")}
    assert found <= set(setuptools_table()["packages"]), sorted(found - set(setuptools_table()["packages"]))


def test_the_kernel_sources_are_package_data():
    table = setuptools_table()
    package = library.__name__.rpartition(".")[0]
    patterns = table["package-data"][package]
    sources = [pathlib.Path(p) for p in (*library.SOURCES, *library.HEADERS)]
    assert all(s.parent == REPO.joinpath(*package.split(".")) for s in sources)
    assert all(any(fnmatch(s.name, pattern) for pattern in patterns) for s in sources)
    # and nothing compiled is left beside the models (those are model families only)
    assert not [p.name for p in (REPO / "bigmodel" / "models").iterdir() if p.suffix in (".cc", ".h")]
