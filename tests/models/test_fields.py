"""Model configs: one declaration per field, and every bad value refused by name before anything compiles.

The range, choice and type cases are generated from the declared field metadata, so a new
field is tested the moment it is declared.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from bigmodel import config as config_lib, models
from bigmodel.config import ConfigError
from bigmodel.models import bert, fields, gpt, resnet, rnn, transformer, vit

from conftest import GPT_TINY, REPO

SIZES = {"gpt": gpt.SIZES, "bert": bert.SIZES, "transformer": transformer.SIZES, "vit": vit.SIZES,
         "resnet": resnet.SIZES, "cnn": resnet.CNN_SIZES, "rnn": rnn.SIZES}
SMALLEST = {"gpt": "nano", "bert": "tiny", "transformer": "tiny", "vit": "tiny", "resnet": "tiny", "cnn": "small",
            "rnn": "tiny"}


def numeric(hint) -> bool:
    return hint in (int, float) or typing.get_origin(hint) is tuple


FIELDS = [(family, f, hint) for family, spec in models.FAMILIES.items() for f, hint in fields.declared(spec.config)]
NUMERIC = [pytest.param(fam, f, hint, id=f"{fam}.{f.name}") for fam, f, hint in FIELDS if numeric(hint)]
CHOICES = [pytest.param(fam, f, id=f"{fam}.{f.name}") for fam, f, hint in FIELDS if hint is str]
EVERY = [pytest.param(fam, f, hint, id=f"{fam}.{f.name}") for fam, f, hint in FIELDS]
# Scalar fields whose lower bound is a valid value on its own (d_model and image_size are tied to heads and patches).
INCLUSIVE = [pytest.param(fam, f, hint, id=f"{fam}.{f.name}") for fam, f, hint in FIELDS
             if hint in (int, float) and "range" in f.metadata and math.isfinite(f.metadata["range"].low)
             and not f.metadata["range"].low_open and f.name not in ("d_model", "image_size")]


def refused(family: str, key: str, value) -> str:
    """The one-line message with which `config.model.<key> = value` is refused."""
    cfg = models.model_config(f"{family}:{SMALLEST[family]}")
    plain = cfg.to_dict()  # a plain dict: ConfigDict would cast the value to the field's type itself
    plain[key] = value
    with pytest.raises(ConfigError) as err:
        models.check(plain)
    message = str(err.value)
    assert "\n" not in message
    return message


def outside(allowed, step: float) -> list[float]:
    """Values just outside a declared range."""
    values = []
    if math.isfinite(allowed.low):
        values.append(allowed.low if allowed.low_open else allowed.low - step)
    if math.isfinite(allowed.high):
        values.append(allowed.high if allowed.high_open else allowed.high + step)
    return values


@pytest.mark.parametrize("family, f, hint", NUMERIC)
def test_every_numeric_field_declares_a_range_and_refuses_values_outside_it(family, f, hint):
    allowed = f.metadata.get("range")
    assert allowed is not None, f"{family}.{f.name} declares no range"
    if hint is float:
        values = [*outside(allowed, 1e-3), math.nan, math.inf]
    elif hint is int:
        values = [int(v) for v in outside(allowed, 1)]
    else:  # a tuple of ints: the range holds for every entry
        values = [[int(v)] for v in outside(allowed, 1)]
    assert values
    for value in values:
        message = refused(family, f.name, value)
        assert message.startswith(f"config.model.{f.name}=") and "out of range" in message, message
        assert str(allowed) in message


@pytest.mark.parametrize("family, f, hint", EVERY)
def test_every_field_refuses_a_wrong_type(family, f, hint):
    wrong = {bool: [1, "true"], int: ["3", 1.5, True], float: ["0.5", False], str: [3, None]}
    for value in wrong.get(hint, ["1, 2", [1.5], (True,)]):
        message = refused(family, f.name, value)
        assert message.startswith(f"config.model.{f.name}={value!r} is not "), message


@pytest.mark.parametrize("family, f", CHOICES)
def test_every_name_field_declares_its_choices(family, f):
    choices = f.metadata.get("choices")
    assert choices and f.default in choices, f"{family}.{f.name} declares no choices"
    message = refused(family, f.name, "no-such-choice")
    assert message.startswith(f"config.model.{f.name}='no-such-choice' is not a choice; use one of ")
    assert all(repr(c) in message for c in choices)
    real = max(choices, key=len)  # a typo of a real choice is answered with it
    if len(real) >= 4:
        assert f"did you mean {real!r}?" in refused(family, f.name, real[:-1] + "x" + real[-1])


@pytest.mark.parametrize("family, f, hint", INCLUSIVE)
def test_a_declared_bound_itself_is_accepted(family, f, hint):
    cfg = models.model_config(f"{family}:{SMALLEST[family]}")
    with cfg.unlocked():
        cfg[f.name] = hint(f.metadata["range"].low)
    assert getattr(models.check(cfg), f.name) == f.metadata["range"].low


def test_unknown_keys_are_refused_with_the_closest_field():
    want = "config.model.dropuot is not a field of the gpt model; did you mean 'dropout'?"
    assert refused("gpt", "dropuot", 0.1) == want
    assert "did you mean 'num_kv_heads'" in refused("gpt", "num_kv_head", 2)
    message = refused("rnn", "zebra", 1)
    assert message.startswith("config.model.zebra is not a field of the rnn model; the fields are cell, d_model")
    # A GPT field is no field of BERT's.
    assert refused("bert", "num_kv_heads", 2).startswith("config.model.num_kv_heads is not a field of the bert model")


def test_family_name_is_checked():
    with pytest.raises(ConfigError, match=r"config.model.name='gtp' is not a model family; .*bert, cnn, gpt"):
        models.check({"name": "gtp"})
    with pytest.raises(ConfigError, match="config.model has no name"):
        models.check({"d_model": 4})
    with pytest.raises(ConfigError, match=r"unknown gpt size '7b'; choose one of"):
        gpt.model_config("7b")
    with pytest.raises(ConfigError, match=r"unknown model family 'llama'"):
        models.model_config("llama:7b")


@pytest.mark.parametrize("family, changes, message", [
    ("gpt", dict(num_heads=5), r"config.model.d_model=64 is not divisible by config.model.num_heads=5"),
    ("bert", dict(num_heads=3), r"config.model.d_model=128 is not divisible by config.model.num_heads=3"),
    ("vit", dict(num_heads=3), r"config.model.d_model=64 is not divisible by config.model.num_heads=3"),
    ("transformer", dict(num_heads=3), r"config.model.d_model=128 is not divisible by config.model.num_heads=3"),
    ("gpt", dict(position="rope", d_model=60, num_heads=4), r"position='rope' .* d_model/num_heads=15 is odd"),
    ("bert", dict(position="rope", d_model=96, num_heads=32), r"head size d_model/num_heads=3 is odd"),
    ("gpt", dict(num_kv_heads=3), r"config.model.num_kv_heads=3 must divide config.model.num_heads=4"),
    ("gpt", dict(num_experts=2, experts_per_token=3), r"experts_per_token=3 exceeds config.model.num_experts=2"),
    ("gpt", dict(num_experts=4, moe_every=2, scan_layers=True), r"moe_every=2 mixes MoE and dense blocks"),
    ("gpt", dict(mup=True), r"config.model.mup needs config.model.tie_embeddings=False"),
    ("vit", dict(patch_size=3), r"config.model.image_size=8 is not a multiple of config.model.patch_size=3"),
])
def test_impossible_combinations_are_refused(family, changes, message):
    cfg = models.model_config(f"{family}:{SMALLEST[family]}")
    cfg.update(changes)
    with pytest.raises(ConfigError, match=message):
        models.check(cfg)


def test_combinations_that_are_fine_pass():
    cfg = gpt.model_config("nano")
    cfg.update(num_experts=2, experts_per_token=2, moe_every=3, scan_layers=True)  # 2 layers: no MoE block at all
    models.check(cfg)
    cfg.update(mup=True, tie_embeddings=False, num_kv_heads=1, position="rope")
    models.check(cfg)


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_model_config_is_the_dataclass_fields_plus_name_and_size(family):
    cls = models.FAMILIES[family].config
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for size, values in SIZES[family].items():
        cfg = models.model_config(f"{family}:{size}")
        assert set(cfg) == {"name", "size", *defaults}
        assert (cfg.name, cfg.size) == (family, size)
        derived = {"scan_layers"} if family == "gpt" else set()
        for key, default in defaults.items():
            if key not in derived:
                assert cfg[key] == values.get(key, default), (size, key)
        built = cls.from_config(cfg)  # and back: the frozen config holds the same values
        assert all(getattr(built, k) == v for k, v in cfg.items() if k not in ("name", "size"))


def test_from_config_takes_json_lists_and_ints_for_floats():
    cfg = resnet.model_config("tiny").to_dict()
    cfg.update(stage_sizes=[1, 2], bn_epsilon=1)  # as read back from a workdir's config.json
    built = models.check(cfg)
    assert built.stage_sizes == (1, 2) and isinstance(built.bn_epsilon, float)


def test_validate_checks_the_model_before_the_mesh():
    config = config_lib.load(GPT_TINY + ":tiny", ["model.dropout=1.0", "mesh.data=3"])
    with pytest.raises(ConfigError, match=r"config.model.dropout=1.0 is out of range; use a value in \[0, 1\)"):
        config_lib.validate(config, 8)
    config = config_lib.load(GPT_TINY + ":tiny")
    with config.unlocked():
        config.model.num_layerz = 2
    with pytest.raises(ConfigError, match=r"config.model.num_layerz is not a field of the gpt model; did you mean"):
        config_lib.validate(config, 8)


def test_experiment_configs_pass():
    for name in ("gpt_tiny", "bert_classify", "lstm_stdlib", "vit_digits", "resnet_digits", "cnn_digits",
                 "transformer_seq2seq"):
        config = config_lib.load(str(REPO / "experiments" / f"{name}.py"))
        assert isinstance(models.check(config.model), models.FAMILIES[config.model.name].config)
