"""Every experiment file: its declared variants load, validate on 8 devices and keep experiments/base.py's groups;
an undeclared variant is refused with the list; a copy of experiments/ loads on its own."""

import collections
import inspect
import json
import re
import shutil

import pytest

from bigmodel import config as config_lib
from bigmodel.config import ConfigError
from bigmodel.scaling import plan as scaling_plan

from conftest import REPO

EXPERIMENTS = REPO / "experiments"
BASE = EXPERIMENTS / "base.py"
FILES = sorted(p for p in EXPERIMENTS.rglob("*.py") if p != BASE)
MODULES = {p: config_lib.experiment_module(p) for p in FILES}
CASES = [(p, v) for p, module in MODULES.items() for v in getattr(module, "VARIANTS", ())]
SHARED = config_lib.experiment_module(BASE).config().to_dict()


def name(path) -> str:
    """'scaling/gpt_stdlib' for experiments/scaling/gpt_stdlib.py."""
    return str(path.relative_to(EXPERIMENTS).with_suffix(""))


def spec(path, arg: str) -> str:
    """What `--config` takes: 'path' for the default run, 'path:arg' for a variant."""
    return f"{path}:{arg}" if arg else str(path)


def is_sweep(config) -> bool:
    """Sweep configs hold a training config in `base` (bigmodel/scaling/sweep.py)."""
    return "sweep" in config


def leaves(d: dict, prefix: str = "") -> dict[str, type]:
    """Dotted leaf keys of a nested dict, with their value types."""
    out = {}
    for k, v in d.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: type(v)}
    return out


def test_files_are_found():  # the parametrized tests below would pass vacuously on an empty list
    assert {"gpt_tiny", "bert_stdlib", "transformer_seq2seq", "resnet_digits", "scaling/gpt_stdlib"} <= set(
        map(name, FILES))


@pytest.mark.parametrize("path", FILES, ids=name)
def test_every_experiment_declares_its_variants_and_documents_them(path):
    module = MODULES[path]
    variants = module.VARIANTS
    assert isinstance(variants, tuple) and all(isinstance(v, str) for v in variants)
    assert len(set(variants)) == len(variants)
    assert "" in variants and "tiny" in variants  # the default run, and a tiny one for CPUs and tests
    doc = module.__doc__
    for label in ("Command:", "Hardware:", "Wall time:", "Expected:", "Variants:"):
        assert f"\n{label}" in doc, f"{name(path)}'s docstring has no {label!r} line"
    for variant in filter(None, variants):
        assert f"':{variant.split(',')[0]}'" in doc, f"{name(path)}'s docstring does not name ':{variant}'"


@pytest.mark.parametrize("path", FILES, ids=name)
def test_every_declared_variant_is_its_own_config(path):
    """A variant listed in VARIANTS but not handled by get_config would silently be the default run."""
    module = MODULES[path]
    default = inspect.signature(module.get_config).parameters["arg"].default  # what a bare `:` means
    names = collections.defaultdict(set)
    for arg in module.VARIANTS:
        config = config_lib.load(spec(path, arg))
        names[json.dumps(config.to_dict(), sort_keys=True, default=repr)].add(arg or default)
    assert [sorted(n) for n in names.values() if len(n) > 1] == []


@pytest.mark.parametrize("path", FILES, ids=name)
@pytest.mark.parametrize("arg", ["nope", "TINY", "tiny,2048", " "])
def test_undeclared_variants_are_refused_with_the_list(path, arg):
    with pytest.raises(ConfigError, match=re.escape(f"unknown variant {arg!r} for {path.stem}; use ")) as refused:
        config_lib.load(f"{path}:{arg}")
    message = str(refused.value)
    assert all(f"':{v}'" in message for v in MODULES[path].VARIANTS if v)
    assert message.endswith(" or nothing")


@pytest.mark.parametrize("path, arg", CASES, ids=[f"{name(p)}:{v}" for p, v in CASES])
def test_every_variant_loads_validates_on_8_devices_and_keeps_the_shared_groups(path, arg):
    config = config_lib.load(spec(path, arg))
    if is_sweep(config):  # every planned run of every family, as the sweep will train it
        runs = scaling_plan.load(spec(path, arg), [], "unused", num_devices=8).runs
        assert runs and [r.error for r in runs if r.error] == []
        trained = [r.config for r in runs]
    else:
        assert config_lib.validate(config, 8)["data"] >= 1
        trained = [config]
    for c in trained:
        have = leaves(c.to_dict())
        missing = {k: t for k, t in leaves(SHARED).items() if have.get(k) is not t}
        assert missing == {}, "keys of experiments/base.py that are absent or of another type"


@pytest.mark.parametrize("path", [p for p in FILES if not is_sweep(MODULES[p].get_config())], ids=name)
def test_tiny_runs_a_few_small_steps_and_evaluates_and_saves_in_them(path):
    c, full = config_lib.load(f"{path}:tiny"), config_lib.load(str(path))
    assert c.train.steps <= 30 and c.train.batch_size <= 16 and c.train.steps < full.train.steps
    assert c.eval.every <= c.train.steps and c.checkpoint.every <= c.train.steps and 2 * c.log.every <= c.train.steps


def test_a_copy_of_the_experiments_loads_its_own_base(tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(EXPERIMENTS, copy)
    for experiment in ("gpt_tiny.py:tiny", "scaling/gpt_stdlib.py:tiny"):
        assert config_lib.load(str(copy / experiment)).to_dict() == config_lib.load(
            str(EXPERIMENTS / experiment)).to_dict()
    base = copy / "base.py"
    base.write_text(base.read_text().replace("c.seed = 0", "c.seed = 7", 1))
    assert config_lib.load(str(copy / "gpt_tiny.py")).seed == 7
    assert config_lib.load(str(copy / "scaling" / "gpt_stdlib.py")).base.seed == 7
    assert config_lib.load(str(EXPERIMENTS / "gpt_tiny.py")).seed == 0
