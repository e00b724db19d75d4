"""Config loading, overrides and validation: every refusal names the key and the fix."""

import pytest
from hypothesis import given, settings, strategies as st

from bigmodel import config as config_lib
from bigmodel.config import ConfigError

from conftest import GPT_TINY, REPO


def load(*overrides):
    return config_lib.load(GPT_TINY + ":tiny", overrides)


def test_overrides_keep_types():
    c = load("train.steps=7", "optim.learning_rate=1e-2", "model.tie_embeddings=false", "data.source=/x/*.txt",
             "optim.learning_rate=2")
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.optim.learning_rate == 2.0 and isinstance(c.optim.learning_rate, float)
    assert c.model.tie_embeddings is False
    assert c.data.source == "/x/*.txt"


def test_variant_changes_the_config():
    full, tiny = config_lib.load(GPT_TINY), load()
    assert full.model.size == "tiny" and tiny.model.size == "nano"
    assert tiny.train.steps < full.train.steps


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key.*'stepz'.*did you mean 'steps'"):
        load("train.stepz=3")
    with pytest.raises(ConfigError, match=r"unknown config key 'config.optimizer.learning_rate': config has no key "
                                          r"'optimizer'; did you mean 'optim'"):
        load("optimizer.learning_rate=3")


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"config.train.steps expects an int, got 'ten'"):
        load("train.steps=ten")
    with pytest.raises(ConfigError, match=r"config.train.steps expects an int, got '1.5'"):
        load("train.steps=1.5")
    with pytest.raises(ConfigError, match=r"config.model.tie_embeddings expects a bool"):
        load("model.tie_embeddings=maybe")
    with pytest.raises(ConfigError, match=r"config.model is a group"):
        load("model=gpt")


def test_missing_value_and_missing_file():
    with pytest.raises(ConfigError, match="has no value"):
        load("train.steps")
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load("experiments/nope.py")


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        (["mesh.data=3"], 8, r"data\*fsdp\*expert\*sequence\*tensor = 3\*1\*1\*1\*1 = 3 but there are 8 devices"),
        (["mesh.data=-1", "mesh.fsdp=-1"], 8, r"only one axis may be -1"),
        (["mesh.tensor=3"], 8, r"8 devices cannot be split"),
        (["train.batch_size=12"], 8, r"batch_size=12 .* not divisible by the data-parallel size data\*fsdp\*expert=8"),
        (["mesh.data=2", "mesh.expert=4", "train.batch_size=12"], 8,
         r"batch_size=12 .* not divisible by the data-parallel size data\*fsdp\*expert=8; use a multiple of 8"),
        (["mesh.data=2", "mesh.sequence=4", "data.seq_len=62"], 8,
         (r"config.data.seq_len=62 is not divisible by the sequence axis config.mesh.sequence=4; make "
          r"config.data.seq_len a multiple of 4 or lower config.mesh.sequence")),
        (["mesh.data=4", "mesh.fsdp=2", "mesh.slices=3"], 8,
         r"config.mesh.slices=3 must be a positive divisor of the axis it spans, config.mesh.data=4"),
        (["mesh.dcn_axis=pipeline"], 8, r"config.mesh.dcn_axis='pipeline'; use one of"),
        (["model.num_experts=4", "mesh.data=1", "mesh.expert=8"], 8,
         r"config.model.num_experts=4 is not divisible by the expert axis config.mesh.expert=8"),
        (["train.batch_size=8", "train.grad_accum=3"], 8, r"not divisible by config.train.grad_accum=3"),
        (["train.batch_size=16", "train.grad_accum=4"], 8, r"microbatch 4 .* data\*fsdp\*expert=8"),
        (["eval.batch_size=4"], 8, r"config.eval.batch_size=4 is not divisible"),
        (["mesh.data=1", "mesh.tensor=8"], 8, r"num_heads=4 is not divisible by the tensor axis"),
        (["data.seq_len=512"], 8, r"seq_len=512 is longer than the model allows \(config.model.max_len=128\)"),
        (["model.dtype=float8"], 8, r"config.model.dtype='float8'"),
        (["eval.every=7"], 8, r"eval.every=7 must be a multiple of config.log.every=5"),
    ],
)
def test_validation_errors(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(load(*overrides), devices)


def test_valid_config_resolves_the_mesh():
    sizes = config_lib.validate(load("mesh.fsdp=2"), 8)
    assert sizes == {"data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
    assert config_lib.validate(load("mesh.sequence=2", "mesh.slices=2", "mesh.dcn_axis=sequence"), 8)["data"] == 4
    # The batch is split over data*fsdp*expert only: 4 rows can run on 8 devices with sequence=8.
    c = load("mesh.data=1", "mesh.sequence=8", "train.batch_size=4", "eval.batch_size=4")
    assert config_lib.validate(c, 8)["sequence"] == 8


@pytest.mark.parametrize("key", ["sequence", "expert", "slices", "dcn_axis"])
def test_every_mesh_key_must_be_named(key):
    c = load()
    with c.unlocked():
        del c.mesh[key]
    default = repr(config_lib.MESH_KEYS[key])
    with pytest.raises(ConfigError, match=rf"config.mesh has no '{key}': every config names every mesh axis "
                                          rf"\(data, fsdp, expert, sequence, tensor\).* "
                                          rf"add `c.mesh.{key} = {default}`"):
        config_lib.validate(c, 8)
    with c.unlocked():
        c.mesh[key] = config_lib.MESH_KEYS[key]
        c.mesh.model = 2
    with pytest.raises(ConfigError, match=r"config.mesh.model is not a mesh key"):
        config_lib.validate(c, 8)


def test_sequence_axis_needs_a_sequence_model():
    c = config_lib.load(str(REPO / "experiments" / "resnet_digits.py") + ":tiny", ["mesh.data=4", "mesh.sequence=2"])
    with pytest.raises(ConfigError, match=r"config.mesh.sequence=2 splits the sequence dimension, but this config "
                                          r"has no config.data.seq_len .*; set config.mesh.sequence=1"):
        config_lib.validate(c, 8)


def test_zero1_must_be_set():
    c = load()
    with c.unlocked():
        del c.sharding["zero1"]
    with pytest.raises(ConfigError, match=r"config.sharding.zero1 must be true or false .* `c.sharding.zero1 = False`"):
        config_lib.validate(c, 8)


def test_rules_must_name_mesh_axes():
    c = load()
    with c.unlocked():
        c.sharding.rules = (("embed", "model"),)
    with pytest.raises(ConfigError, match=r"maps 'embed' to unknown mesh axis 'model'"):
        config_lib.validate(c, 8)


@settings(deadline=None)  # each example loads an experiment file: its time is not the property
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_int_override_roundtrip(value):
    assert load(f"train.steps={value}").train.steps == value


@settings(deadline=None)  # each example loads an experiment file: its time is not the property
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_override_roundtrip(value):
    assert load(f"optim.learning_rate={value!r}").optim.learning_rate == value


@settings(deadline=None)  # each example loads an experiment file: its time is not the property
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_string_override_is_verbatim(value):
    assert load(f"data.source={value}").data.source == value


def test_value_rules_apply_at_any_depth_and_keep_special_values():
    assert config_lib.value_rule("train.steps") is config_lib.value_rule("base.train.steps") is config_lib.POSITIVE_INT
    assert config_lib.value_rule("families.lstm.sweep.num_layers") is config_lib.COUNT
    assert config_lib.value_rule("eval.batch_size") is config_lib.POSITIVE_INT  # the '*.batch_size' pattern
    assert config_lib.value_rule("data.validation_fraction") is config_lib.SHARE  # before 'data.*_fraction'
    assert config_lib.value_rule("data.random_token_fraction") is config_lib.UNIT
    assert config_lib.value_rule("model.num_layers") is None and config_lib.value_rule("data.nonsense") is None
    mesh = config_lib.value_rule("mesh.data")
    assert mesh.allows(-1) and mesh.allows(4) and not mesh.allows(0) and not mesh.allows(-2)
    b2 = config_lib.value_rule("optim.b2")
    assert b2.allows(0.0) and b2.allows(0.999) and not b2.allows(1.0) and not b2.allows(float("nan"))
    assert not config_lib.POSITIVE_INT.allows(2.5) and not config_lib.POSITIVE.allows(0.0)


@pytest.mark.parametrize("override, message", [
    ("train.steps=-5", r"config.train.steps=-5 is out of range: it must be a positive integer; set --config.train"),
    ("optim.b2=1.0", r"config.optim.b2=1.0 is out of range: it must be a number in \[0, 1\)"),
    ("optim.learning_rate=inf", r"config.optim.learning_rate=inf is out of range: it must be a number > 0"),
    ("log.every=0", r"config.log.every=0 is out of range"),  # checked before eval.every % log.every divides by it
])
def test_values_out_of_range_are_refused_before_the_combinations(override, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(load(override), 8)
