"""Experiment configs: load `experiments/*.py:get_config(arg)`, apply overrides, validate.

Every default lives in the experiment file. This module only parses and checks, and it
refuses bad input before anything compiles, naming the key and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import pathlib
from typing import Any, Sequence

import ml_collections

MESH_AXES = ("data", "fsdp", "tensor")


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


def _load_python(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass --config experiments/<name>.py[:arg]")
    module_spec = importlib.util.spec_from_file_location(f"bigmodel_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg); every experiment file needs one")
    config = module.get_config(arg) if arg else module.get_config()
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
        raise ConfigError(f"{where} is a group; set one of its keys, e.g. --{where}.{next(iter(current.keys()), 'KEY')}=...")
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


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolve the mesh sizes (one -1 fills the remaining devices)."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
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
            f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {product} "
            f"but there are {num_devices} devices; set one axis to -1 or make the product {num_devices}"
        )
    return sizes


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Refuse impossible combinations before compiling; returns the resolved mesh sizes."""
    for group in ("model", "data", "optim", "train", "eval", "checkpoint", "mesh", "sharding", "log"):
        if group not in config:
            raise ConfigError(f"config has no {group!r} group; every experiment needs config.{group}")
    sizes = mesh_shape(config.mesh, num_devices)
    batch_axes = sizes["data"] * sizes["fsdp"]
    train = config.train
    if train.batch_size <= 0 or train.grad_accum <= 0:
        raise ConfigError("config.train.batch_size and config.train.grad_accum must be positive")
    if train.batch_size % train.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={train.batch_size} is not divisible by config.train.grad_accum="
            f"{train.grad_accum}; choose a batch size that is a multiple of grad_accum"
        )
    micro = train.batch_size // train.grad_accum
    if micro % batch_axes:
        raise ConfigError(
            f"config.train.batch_size={train.batch_size} (microbatch {micro} with grad_accum={train.grad_accum}) "
            f"is not divisible by the data-parallel size data*fsdp={batch_axes}; use a multiple of {batch_axes}"
        )
    if config.eval.batch_size % batch_axes:
        raise ConfigError(
            f"config.eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size "
            f"data*fsdp={batch_axes}; use a multiple of {batch_axes}"
        )
    model = config.model
    if "num_heads" in model and model.num_heads % sizes["tensor"]:
        raise ConfigError(
            f"config.model.num_heads={model.num_heads} is not divisible by the tensor axis "
            f"config.mesh.tensor={sizes['tensor']}; pick a tensor size that divides the heads"
        )
    if "d_model" in model and "num_heads" in model and model.d_model % model.num_heads:
        raise ConfigError(
            f"config.model.d_model={model.d_model} is not divisible by config.model.num_heads={model.num_heads}"
        )
    if "seq_len" in config.data and "max_len" in model and config.data.seq_len > model.max_len:
        raise ConfigError(
            f"config.data.seq_len={config.data.seq_len} is longer than the model allows "
            f"(config.model.max_len={model.max_len}); shorten the sequence or raise max_len"
        )
    if "dtype" in model and model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype={model.dtype!r}; use 'float32' or 'bfloat16'")
    if config.log.every <= 0 or config.eval.every % config.log.every:
        raise ConfigError(
            f"config.eval.every={config.eval.every} must be a multiple of config.log.every={config.log.every} "
            "(evaluation results are logged on the same metrics row)"
        )
    choices = {"train.on_nonfinite": ("halt", "skip"), "checkpoint.on_error": ("stop", "continue")}
    for key, allowed in choices.items():
        group, leaf = key.split(".")
        if config[group][leaf] not in allowed:
            raise ConfigError(f"config.{key}={config[group][leaf]!r}; use one of {allowed}")
    if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
        raise ConfigError("config.checkpoint.every and config.checkpoint.keep must be positive")
    rules = dict(config.sharding.rules)
    for name, axes in rules.items():
        for axis in (axes,) if isinstance(axes, (str, type(None))) else axes:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(
                    f"config.sharding.rules maps {name!r} to unknown mesh axis {axis!r}; use one of {MESH_AXES} or None"
                )
    return sizes
