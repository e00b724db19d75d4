"""Every error a user can cause at the `bigmodel` command line is one line on stderr, never a traceback.

(a) Every subcommand (found by walking the parser, so new ones are covered) with missing arguments,
    nonexistent paths and negative numbers; a few real `bigmodel` processes for the end-to-end check.
(b) Every experiment file and variant: each numeric config value is refused, naming its key, when it has
    the wrong type or is out of its range (config.VALUE_RULES; a model field's declared range).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from bigmodel import cli, config as config_lib, exit_codes, models
from bigmodel.config import ConfigError
from bigmodel.models import fields
from bigmodel.scaling import plan as scaling_plan

from conftest import GPT_TINY, REPO, SMALL_CORPUS

# config.model's numeric fields have their ranges declared by the model families (bigmodel.models.fields),
# which config.validate checks; a sweep's base.model is set per run by its ladder and checked when planned.
SWEEP_UNCHECKED = ("model",)
DEVICES = 1  # validate() as on one device: the batch of every variant divides it


# --------------------------------------------------------------------------- (a) the command line


Command = tuple[tuple[str, ...], argparse.ArgumentParser]  # ('scaling', 'fit') and its parser


def subcommands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[Command]:
    """(words, parser) of every runnable subcommand, e.g. (('scaling', 'fit'), its parser)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [(words, parser)]
    return [leaf for name, sub in groups[0].choices.items() for leaf in subcommands(sub, (*words, name))]


def is_numeric(action: argparse.Action) -> bool:
    """Whether an option converts its value to an int or a float."""
    try:
        value = action.type("1") if action.option_strings and action.type else None
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


COMMANDS = subcommands(cli.build_parser())
NUMERIC_OPTIONS = [(words, a.option_strings[-1]) for words, p in COMMANDS for a in p._actions if is_numeric(a)]


def one_line_error(argv: list[str], capsys) -> str:
    """Run `bigmodel ARGV` in this process; assert it failed with one line on stderr and return that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code != 0, f"bigmodel {' '.join(argv)} succeeded"
    assert len(lines) == 1 and lines[0].startswith("bigmodel") and "Traceback" not in err, err
    return lines[0]


def test_the_walk_finds_every_subcommand():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"train", "generate", "scaling fit", "scaling report", "launch slurm", "sweep", "plan", "bench",
            "import-hf", "evaluate-seq2seq"} <= names
    assert len(NUMERIC_OPTIONS) > 20 and (("generate",), "--top-k") in NUMERIC_OPTIONS


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
def test_missing_arguments(words, capsys):
    line = one_line_error(list(words), capsys)
    assert "required" in line and line.endswith(f"see bigmodel {' '.join(words)} --help"), line


def required_values(parser: argparse.ArgumentParser, missing: pathlib.Path) -> list[str]:
    """Arguments for every required option/positional: a choice, 1 for numbers, else a path under `missing`."""
    argv = []
    for action in parser._actions:
        if not action.required:
            continue
        value = action.choices[0] if action.choices else "1" if is_numeric(action) else str(missing / action.dest)
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


@pytest.mark.parametrize("words, parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_nonexistent_paths(words, parser, tmp_path, capsys):
    missing = tmp_path / "missing"
    line = one_line_error([*words, *required_values(parser, missing)], capsys)
    assert str(missing) in line, line  # the error is about the path, and names it
    assert not missing.exists()  # and nothing was created on the way


@pytest.mark.parametrize("words, option", NUMERIC_OPTIONS, ids=[f"{' '.join(w)} {o}" for w, o in NUMERIC_OPTIONS])
def test_negative_numbers(words, option, capsys):
    line = one_line_error([*words, option, "-1"], capsys)
    assert option in line and "'-1'" in line, line


def test_unknown_subcommand_and_stray_overrides(capsys):
    assert "invalid choice: 'trian'" in one_line_error(["trian"], capsys)
    line = one_line_error(["generate", "--workdir", "w", "--config.train.steps=3"], capsys)
    assert "overrides do not apply to 'generate'" in line


def test_workdir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    line = one_line_error(["train", "--config", GPT_TINY + ":tiny", "--workdir", str(file)], capsys)
    assert f"workdir {str(file)!r} is a file" in line
    assert file.read_text() == "keep me"


def test_unexpected_errors_are_one_line_with_the_debug_hint(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("the disk\nmelted")

    monkeypatch.setattr(cli, "cmd_generate", broken)
    line = one_line_error(["generate", "--workdir", "w"], capsys)
    assert line == ("bigmodel: unexpected RuntimeError: the disk melted; rerun with --debug (or BIGMODEL_DEBUG=1) "
                    "for the traceback")
    assert cli.main(["generate", "--workdir", "w"]) == exit_codes.ERROR
    with pytest.raises(RuntimeError, match="melted"):
        cli.main(["generate", "--workdir", "w", "--debug"])
    monkeypatch.setenv("BIGMODEL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="melted"):
        cli.main(["generate", "--workdir", "w"])


def bigmodel(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `bigmodel` command in a fresh process, as a user runs it."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "BIGMODEL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "bigmodel.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300, check=False)


@pytest.mark.parametrize("overrides, variant, message", [
    ([], "bogus", r"config error: experiments/gpt_tiny.py:bogus: unknown variant 'bogus' for gpt_tiny; use ':tiny'"),
    (["--config.data.source=/nonexistent/*.txt"], "tiny", r"config.data.source='/nonexistent/\*.txt' matches no files"),
    (["--config.train.steps=-5"], "tiny", r"config.train.steps=-5 is out of range: it must be a positive integer"),
])
def test_bigmodel_train_refuses_in_one_line(overrides, variant, message, tmp_path):
    workdir = tmp_path / "run"
    done = bigmodel("train", "--config", f"experiments/gpt_tiny.py:{variant}", "--workdir", str(workdir),
                    *overrides)
    assert done.returncode == exit_codes.USAGE
    assert len(done.stderr.splitlines()) == 1 and re.search(message, done.stderr), done.stderr
    assert not workdir.exists()


def test_debug_shows_the_traceback(tmp_path):
    done = bigmodel("--debug", "train", "--config", "experiments/gpt_tiny.py:bogus", "--workdir", str(tmp_path))
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ConfigError: experiments/gpt_tiny.py:bogus" in done.stderr


# --------------------------------------------------------------------------- (b) every config value


def experiment_variants() -> list[str]:
    """'FILE' and 'FILE:VARIANT' for every experiment file, the variants read from its unknown-variant error."""
    specs = []
    for file in sorted((REPO / "experiments").rglob("*.py")):
        module = config_lib.experiment_module(file)
        if not hasattr(module, "get_config"):  # experiments/base.py: the groups the others share
            continue
        name = str(file.relative_to(REPO))
        specs += [name, *(f"{name}:{v}" for v in module.VARIANTS if v)]
    return specs


def new_keys_per_spec(specs: list[str]) -> list[tuple[str, list[str]]]:
    """(spec, the numeric keys no earlier variant of the same file has): each key is tested once per file."""
    seen, cases = set(), []
    for spec in specs:
        file = spec.partition(":")[0]
        skip = SWEEP_UNCHECKED if "experiments/scaling/" in spec else ()
        keys = [k for k, _ in config_lib.numeric_keys(config_lib.load(str(REPO / spec)), skip=skip)
                if (file, k) not in seen]
        seen |= {(file, k) for k in keys}
        cases.append((spec, keys))
    return cases


SPECS = experiment_variants()
CASES = new_keys_per_spec(SPECS)


def test_unknown_variant_names_the_file_and_the_valid_ones():
    assert len(SPECS) > 2 * len(list((REPO / "experiments").rglob("*.py")))  # most files have variants
    with pytest.raises(ConfigError, match=r"experiments/bert_classify.py:sst3: unknown variant 'sst3' for "
                                          r"bert_classify; use ':tiny', ':sst2', ':imdb' or nothing"):
        config_lib.load(str(REPO / "experiments" / "bert_classify.py") + ":sst3")


def out_of_range(rule: config_lib.Range) -> list[str]:
    """Values just outside a rule (integers where possible, so int keys take them)."""
    values = []
    if rule.low > -math.inf:
        values.append(rule.low if rule.low_open else rule.low - 1)
    if rule.high < math.inf:
        values.append(rule.high if rule.high_open else rule.high + 1)
    values = [v for v in values if v not in rule.special] or ["nan"]
    return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values]


def model_field_range(spec: str, key: str) -> config_lib.Range | None:
    """The range a model family declares for the field `key` ('model.NAME') of the spec's model."""
    family = models.FAMILIES[config_lib.load(str(REPO / spec)).model.name].config
    field = next((f for f, _ in fields.declared(family) if f.name == key.split(".")[1]), None)
    return field.metadata.get("range") if field else None


def load_checked(spec: str, overrides: list[str]):
    """What `bigmodel train` (or `bigmodel sweep` for a sweep config) checks before starting."""
    path = str(REPO / spec)
    if "experiments/scaling/" in spec:
        return scaling_plan.load_sweep_config(path, overrides)
    config = config_lib.load(path, overrides)
    config_lib.validate(config, DEVICES)
    return config


@pytest.mark.parametrize("spec, keys", CASES, ids=[spec for spec, _ in CASES])
def test_every_numeric_value_is_checked(spec, keys):
    load_checked(spec, [])  # the variant itself is valid
    for key in keys:
        rule = model_field_range(spec, key) if key.startswith("model.") else config_lib.value_rule(key)
        assert rule, f"config.{key} has no range: add one to config.VALUE_RULES or to the model field's declaration"
        bad_values = [(v, str(rule)) for v in out_of_range(rule)]
        for bad, says in [("abc", "expects a"), *bad_values]:
            with pytest.raises(ConfigError) as e:
                load_checked(spec, [f"{key}={bad}"])
            message = str(e.value)
            assert f"config.{key}" in message and says in message and "\n" not in message, (key, bad, message)


def test_every_group_is_covered():
    keys = {k for _, keys in CASES for k in keys}
    assert {"train.steps", "optim.b2", "data.seq_len", "mesh.data", "sweep.min_steps", "base.train.steps",
            "families.lstm.sweep.num_layers", "model.d_model", "model.dropout", "model.num_classes"} <= keys
    assert not any(k.startswith(("base.model", "families.")) and ".model." in k for k in keys)  # SWEEP_UNCHECKED


def test_data_source_must_exist(tmp_path):
    config = config_lib.load(GPT_TINY + ":tiny", [f"data.source={tmp_path}/*.txt"])
    with pytest.raises(ConfigError, match=r"config.data.source='.*/\*.txt' matches no files"):
        config_lib.validate(config, DEVICES)
    config = config_lib.load(GPT_TINY + ":tiny", [f"data.source={SMALL_CORPUS}"])
    config_lib.validate(config, DEVICES)
