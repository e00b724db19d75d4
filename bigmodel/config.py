"""Experiment configs: load `experiments/*.py:get_config(arg)`, apply overrides, validate.

Every default lives in the experiment file. This module only parses and checks, and it
refuses bad input before anything compiles, naming the key and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import importlib.util
import json
import math
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

# Mesh axes, outermost (slowest links: the DCN between slices usually carries 'data') to innermost
# ('tensor' talks every layer, so it gets the fastest links). 'expert' is data parallelism
# outside mixture-of-experts layers; 'sequence' splits activations along the sequence.
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch dimension is split over these
# config.mesh holds one size per axis plus the multi-slice layout (see sharding.make_mesh).
MESH_KEYS = {**{axis: 1 for axis in MESH_AXES}, "slices": 1, "dcn_axis": "data"}
SEQUENCE_KEYS = ("seq_len", "source_len", "target_len")  # config.data lengths split by 'sequence'


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load 'path/to/exp.py[:arg]' or a workdir's resolved 'config.json', apply 'a.b=value' overrides, lock."""
    if spec.endswith(".json"):
        config = _load_json(spec)
    else:
        config = _load_python(spec)
    config.lock()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} has no value; write --config.{key}=VALUE")
        apply_override(config, key, value)
    return config


def _load_json(path: str) -> ml_collections.ConfigDict:
    """A resolved config as written to WORKDIR/config.json (e.g. by `bigmodel import-hf`)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass a workdir's config.json or experiments/<name>.py")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not a config object")
    return ml_collections.ConfigDict(data)


def experiment_module(path: str | pathlib.Path) -> Any:
    """Import an experiment file by path (experiment files are not a package)."""
    file = pathlib.Path(path)
    module_spec = importlib.util.spec_from_file_location(f"bigmodel_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def sibling_config(this_file: str, name: str, arg: str = "") -> ml_collections.ConfigDict:
    """get_config(arg) of the experiment file `name` next to `this_file`: how one experiment builds on another."""
    return experiment_module(pathlib.Path(this_file).with_name(name)).get_config(arg)


def _load_python(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass --config experiments/<name>.py[:arg]")
    module = experiment_module(file)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg); every experiment file needs one")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError) as e:
        if not arg:
            raise
        message = str(e.args[0]) if e.args else type(e).__name__
        hint = "" if "':" in message else f"; {path}'s docstring lists its variants"
        raise ConfigError(f"{path}:{arg}: {message}{hint}") from None
    return ml_collections.ConfigDict(config)


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _node(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding the last part of a dotted key, with unknown parts refused."""
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "config"
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config.{'.'.join(parts[:depth])} is a value, not a group; cannot set {dotted!r}")
        if part not in node:
            raise ConfigError(
                f"unknown config key 'config.{dotted}': {where} has no key {part!r}" + _suggest(part, list(node.keys()))
            )
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def parse_value(raw: str, current: Any, key: str) -> Any:
    """Convert the command-line string `raw` to the type of the value it replaces."""
    where = f"config.{key}"
    if isinstance(current, ml_collections.ConfigDict):
        example = next(iter(current.keys()), "KEY")
        raise ConfigError(f"{where} is a group; set one of its keys, e.g. --{where}.{example}=...")
    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where} expects a bool (true/false), got {raw!r}")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = None
            if value is not None and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} expects an int, got {raw!r}") from None
    if isinstance(current, float):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{where} expects a float, got {raw!r}") from None
        return value
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{where} expects a Python list/tuple literal, got {raw!r}") from None
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{where} expects a list/tuple, got {raw!r}")
        return type(current)(value)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Set config[key] (dotted) from a string, keeping the declared type."""
    node, leaf = _node(config, key)
    value = parse_value(raw, node[leaf], key)
    with node.unlocked():
        node[leaf] = value


# --------------------------------------------------------------------------- value ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config key may take: an interval (optionally integers only) plus special values.

    One type serves the rule table below and the model fields' declarations (bigmodel.models.fields).
    """

    text: str = ""  # the rule as error messages state it; '' = said from the bounds ("in [0, 1)", ">= 1")
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # the interval excludes `low`
    high_open: bool = False  # the interval excludes `high`
    integer: bool = False
    special: tuple[int, ...] = ()  # values allowed outside the interval

    def allows(self, value: float) -> bool:
        """Whether value satisfies the rule."""
        if value in self.special:
            return True
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    __contains__ = allows

    def __str__(self) -> str:
        if self.text:
            return self.text
        low = f"{'>' if self.low_open else '>='} {self.low:g}" if math.isfinite(self.low) else ""
        high = f"{'<' if self.high_open else '<='} {self.high:g}" if math.isfinite(self.high) else ""
        if low and high:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return low or high or "finite"


POSITIVE_INT = Range("a positive integer", low=1, integer=True)
COUNT = Range("an integer >= 0", low=0, integer=True)
MESH_SIZE = Range("a positive integer, or -1 for the devices left", low=1, integer=True, special=(-1,))
POSITIVE = Range("a number > 0", low=0, low_open=True)
NON_NEGATIVE = Range("a number >= 0", low=0)
FINITE = Range("a finite number")
SHARE = Range("a number in (0, 1)", low=0, high=1, low_open=True, high_open=True)
UNIT = Range("a number in [0, 1]", low=0, high=1)
DECAY = Range("a number in [0, 1)", low=0, high=1, high_open=True)  # Adam's betas, warmup shares

# Every numeric config key outside `model` (whose fields the model families check) has a rule here. A
# pattern (fnmatch; '*' spans dots) applies to a key when it matches the key's dotted path or a tail of it,
# so 'train.steps' also covers a sweep's 'base.train.steps'; the first matching pattern wins.
VALUE_RULES: dict[str, Range] = {
    "seed": COUNT,
    "train.steps": POSITIVE_INT,
    "train.grad_accum": POSITIVE_INT,
    "*.batch_size": POSITIVE_INT,  # train and eval
    "*.every": POSITIVE_INT,  # eval, checkpoint and log intervals in steps
    "checkpoint.keep": POSITIVE_INT,
    "eval.num_batches": COUNT,  # 0: the whole split (classification)
    "optim.learning_rate": POSITIVE,
    "optim.warmup_steps": COUNT,
    "optim.decay_steps": COUNT,  # 0: train.steps
    "optim.end_lr_ratio": UNIT,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.b1": DECAY,
    "optim.b2": DECAY,
    "optim.eps": POSITIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0: no clipping
    "mesh.slices": POSITIVE_INT,
    "mesh.*": MESH_SIZE,
    "data.*_len": POSITIVE_INT,  # seq_len, source_len, target_len
    "data.validation_fraction": SHARE,  # both splits must hold files
    "data.test_fraction": SHARE,
    "data.mask_rate": Range("a number in (0, 1]", low=0, high=1, low_open=True),
    "data.*_fraction": UNIT,  # mask_token_fraction, random_token_fraction
    "data.*_id": COUNT,  # bos_id, eos_id
    "data.prefetch": COUNT,
    "data.shuffle_window": COUNT,
    "data.threads": COUNT,
    "data.crop_padding": COUNT,
    "data.spm_vocab_size": POSITIVE_INT,
    "data.max_digits": POSITIVE_INT,
    "data.*snippets_per_class": POSITIVE_INT,
    "sweep.base_width": POSITIVE_INT,
    "sweep.head_dim": POSITIVE_INT,
    "sweep.num_layers": COUNT,  # 0: width / aspect_ratio
    "sweep.aspect_ratio": POSITIVE,
    "sweep.lr_exponent": FINITE,
    "sweep.lr_tokens_exponent": FINITE,
    "sweep.base_tokens": POSITIVE,
    "sweep.independent_weight_decay": NON_NEGATIVE,  # 0: base.optim.weight_decay for every run
    "sweep.warmup_fraction": DECAY,  # 0: the base config's warmup_steps
    "sweep.min_steps": POSITIVE_INT,
    "sweep.max_flops": NON_NEGATIVE,  # 0: no compute cap
    "sweep.fit_bootstrap": COUNT,
}


def numeric_keys(config: ml_collections.ConfigDict, skip: Sequence[str] = ("model",),
                 prefix: str = "") -> Iterator[tuple[str, int | float]]:
    """(dotted key, value) of every int or float leaf (bools excluded), outside groups named in `skip`."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            if key not in skip:
                yield from numeric_keys(value, skip, f"{path}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, value


def value_rule(key: str) -> Range | None:
    """The VALUE_RULES entry for a dotted key, or None if none matches."""
    parts = key.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))]
    return next((rule for pattern, rule in VALUE_RULES.items() if any(fnmatch.fnmatchcase(t, pattern) for t in tails)),
                None)


def check_values(config: ml_collections.ConfigDict) -> None:
    """Refuse a numeric value outside its VALUE_RULES range, naming the key and what it must be."""
    for key, value in numeric_keys(config):
        rule = value_rule(key)
        if rule is not None and not rule.allows(value):
            raise ConfigError(f"config.{key}={value!r} is out of range: it must be {rule}; "
                              f"set --config.{key} to such a value")


def _check_attention_heads(model: ml_collections.ConfigDict, tensor: int, rules: dict) -> None:
    """Grouped-query heads sharded over the tensor axis must split evenly over it."""
    if "num_kv_heads" not in model or not model.num_kv_heads:  # only decoder families have the field
        return
    kv = model.num_kv_heads  # that it divides num_heads is checked with the model's other fields
    axes = rules.get("kv_heads")
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    if kv < model.num_heads and "tensor" in axes and kv % tensor:
        raise ConfigError(
            f"config.model.num_kv_heads={kv} is not divisible by config.mesh.tensor={tensor}; pick a tensor size "
            "that divides it, or replicate the key/value heads with ('kv_heads', None) and ('act_kv_heads', None) "
            "in config.sharding.rules"
        )


def mesh_request(mesh_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """The axis sizes as written (a -1 left unresolved); a missing or unknown key is refused."""
    for key, default in MESH_KEYS.items():
        if key not in mesh_cfg:
            raise ConfigError(
                f"config.mesh has no {key!r}: every config names every mesh axis ({', '.join(MESH_AXES)}) "
                f"and the slice layout (slices, dcn_axis); add `c.mesh.{key} = {default!r}` to the experiment's "
                "get_config (that value leaves it unused)"
            )
    unknown = sorted(set(mesh_cfg) - set(MESH_KEYS))
    if unknown:
        raise ConfigError(
            f"config.mesh.{unknown[0]} is not a mesh key; the mesh axes are {', '.join(MESH_AXES)} (plus slices, "
            "dcn_axis)" + _suggest(unknown[0], list(MESH_KEYS))
        )
    return {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolve the mesh sizes (one -1 fills the remaining devices) and check the slice layout."""
    sizes = mesh_request(mesh_cfg)
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {fill}; give explicit sizes to the others")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"config.mesh.{bad[0]}={sizes[bad[0]]} is invalid; use a positive size or -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh: {num_devices} devices cannot be split with fixed axes of product {known}; "
                f"make the product of the fixed axes divide {num_devices}"
            )
        sizes[fill[0]] = num_devices // known
    product = math.prod(sizes.values())
    if product != num_devices:
        raise ConfigError(
            f"config.mesh: {'*'.join(MESH_AXES)} = {'*'.join(str(s) for s in sizes.values())} = {product} "
            f"but there are {num_devices} devices; set one axis to -1 or make the product {num_devices}"
        )
    slices, dcn_axis = mesh_cfg.slices, mesh_cfg.dcn_axis
    if dcn_axis not in MESH_AXES:
        raise ConfigError(f"config.mesh.dcn_axis={dcn_axis!r}; use one of {MESH_AXES} (the axis split across slices)")
    if not isinstance(slices, int) or slices < 1 or sizes[dcn_axis] % slices:
        raise ConfigError(
            f"config.mesh.slices={slices} must be a positive divisor of the axis it spans, "
            f"config.mesh.{dcn_axis}={sizes[dcn_axis]} (config.mesh.dcn_axis={dcn_axis!r}); make "
            f"config.mesh.{dcn_axis} a multiple of the slice count, or choose another dcn_axis"
        )
    return sizes


def _check_sequence_axis(data: ml_collections.ConfigDict, sequence: int) -> None:
    """Every sequence length the model sees must split evenly over the 'sequence' axis."""
    lengths = [k for k in SEQUENCE_KEYS if k in data]
    if sequence > 1 and not lengths:
        raise ConfigError(
            f"config.mesh.sequence={sequence} splits the sequence dimension, but this config has no "
            f"config.data.{SEQUENCE_KEYS[0]} (not a sequence model); set config.mesh.sequence=1"
        )
    for key in lengths:
        if data[key] % sequence:
            raise ConfigError(
                f"config.data.{key}={data[key]} is not divisible by the sequence axis config.mesh.sequence="
                f"{sequence}; make config.data.{key} a multiple of {sequence} or lower config.mesh.sequence"
            )


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")


def profile_window(text: str) -> tuple[int, int] | None:
    """(first step, steps) of a 'START:COUNT' train.profile_steps value; None for ''."""
    if not text:
        return None
    start, sep, count = text.partition(":")
    if not (sep and start.isdigit() and count.isdigit() and int(start) >= 1 and int(count) >= 1):
        raise ConfigError(f"config.train.profile_steps={text!r}; write START:COUNT with START, COUNT >= 1 (e.g. "
                          "'10:5' traces steps 10 to 14), or '' for no trace")
    return int(start), int(count)


def _check_run_options(config: ml_collections.ConfigDict) -> None:
    """Refuse a malformed profile window, an unknown tracker, and evaluation tasks on a task they cannot score."""
    if "profile_steps" in config.train:  # configs saved before the key existed lack it
        profile_window(config.train.profile_steps)
    for name in config.log.trackers if "trackers" in config.log else ():
        if name not in TRACKERS:
            raise ConfigError(f"config.log.trackers names {name!r}; use any of {', '.join(TRACKERS)}")
    if "tasks" in config.eval and config.eval.tasks and config.task != "lm":
        raise ConfigError(f"config.eval.tasks score language models, but config.task={config.task!r}; "
                          "set --config.eval.tasks='()'")


def _check_data_source(data: ml_collections.ConfigDict) -> None:
    """A text_files source must name existing files ('' is this Python's standard library)."""
    if "source" not in data or not data.source or "name" not in data or data.name != "text_files":
        return
    from bigmodel.data import text_files  # imports TFDS: only for a source the user named

    try:
        text_files.resolve_files(data.source)
    except FileNotFoundError as e:
        raise ConfigError(f"{e} of text files (quote a glob in the shell), or '' for the standard library") from None


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Refuse impossible combinations before compiling; returns the resolved mesh sizes."""
    for group in ("model", "data", "optim", "train", "eval", "checkpoint", "mesh", "sharding", "log"):
        if group not in config:
            raise ConfigError(f"config has no {group!r} group; every experiment needs config.{group}")
    from bigmodel import models  # here, not at the top: bigmodel.models imports this module

    models.check(config.model)
    check_values(config)
    _check_data_source(config.data)
    _check_run_options(config)
    sizes = mesh_shape(config.mesh, num_devices)
    batch_axes = math.prod(sizes[a] for a in BATCH_AXES)
    batch_name = "*".join(BATCH_AXES)
    train = config.train
    if train.batch_size % train.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={train.batch_size} is not divisible by config.train.grad_accum="
            f"{train.grad_accum}; choose a batch size that is a multiple of grad_accum"
        )
    micro = train.batch_size // train.grad_accum
    if micro % batch_axes:
        raise ConfigError(
            f"config.train.batch_size={train.batch_size} (microbatch {micro} with grad_accum={train.grad_accum}) "
            f"is not divisible by the data-parallel size {batch_name}={batch_axes}; use a multiple of {batch_axes}"
        )
    if config.eval.batch_size % batch_axes:
        raise ConfigError(
            f"config.eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size "
            f"{batch_name}={batch_axes}; use a multiple of {batch_axes}"
        )
    _check_sequence_axis(config.data, sizes["sequence"])
    experts = config.model.num_experts if "num_experts" in config.model else 0
    if experts and experts % sizes["expert"]:
        raise ConfigError(
            f"config.model.num_experts={experts} is not divisible by the expert axis config.mesh.expert="
            f"{sizes['expert']}; pick an expert axis size that divides the experts"
        )
    model = config.model
    if "num_heads" in model and model.num_heads % sizes["tensor"]:
        raise ConfigError(
            f"config.model.num_heads={model.num_heads} is not divisible by the tensor axis "
            f"config.mesh.tensor={sizes['tensor']}; pick a tensor size that divides the heads"
        )
    _check_attention_heads(model, sizes["tensor"], dict(config.sharding.rules))
    if "seq_len" in config.data and "max_len" in model and config.data.seq_len > model.max_len:
        raise ConfigError(
            f"config.data.seq_len={config.data.seq_len} is longer than the model allows "
            f"(config.model.max_len={model.max_len}); shorten the sequence or raise max_len"
        )
    if config.eval.every % config.log.every:
        raise ConfigError(
            f"config.eval.every={config.eval.every} must be a multiple of config.log.every={config.log.every} "
            "(evaluation results are logged on the same metrics row)"
        )
    choices = {"train.on_nonfinite": ("halt", "skip"), "checkpoint.on_error": ("stop", "continue")}
    for key, allowed in choices.items():
        group, leaf = key.split(".")
        if config[group][leaf] not in allowed:
            raise ConfigError(f"config.{key}={config[group][leaf]!r}; use one of {allowed}")
    if "zero1" not in config.sharding or not isinstance(config.sharding.zero1, bool):
        raise ConfigError(
            "config.sharding.zero1 must be true or false (shard Adam's moments over the 'data' axis); add "
            "`c.sharding.zero1 = False` to the experiment's get_config"
        )
    for name, axes in config.sharding.rules:  # a logical name may have several rules (first free one wins)
        for axis in (axes,) if isinstance(axes, (str, type(None))) else axes:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(
                    f"config.sharding.rules maps {name!r} to unknown mesh axis {axis!r}; use one of {MESH_AXES} or None"
                )
    return sizes
