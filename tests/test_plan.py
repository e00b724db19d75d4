"""`bigmodel plan`: per-device memory by mesh (8 fake CPU devices), refusals, and verdicts."""

import math
import re

import pytest

from bigmodel import cli, plan

from conftest import GPT_TINY

SEQ_1024_BATCH_64 = ["data.seq_len=1024", "train.batch_size=64"]


def tiny_plan(mesh, compile=True):
    config, sizes = plan.configure(GPT_TINY + ":tiny", [], plan.parse_mesh(mesh), None)
    return plan.make_plan(config, sizes, "h100-80gb", compile=compile)


@pytest.fixture(scope="module")
def tiny_plans():
    return {m: tiny_plan(m) for m in ("8,1,1", "1,8,1")}


@pytest.mark.slow
def test_fsdp_shards_parameters_and_adam_8_ways(tiny_plans):
    data, fsdp = tiny_plans["8,1,1"], tiny_plans["1,8,1"]
    assert data.param_count == 132_864
    assert data.params == 4 * 132_864  # data parallel: every device holds all float32 parameters
    # Adam's two moments follow the parameters (plus a few scalar step counters).
    assert 2 * data.params <= data.opt_state < 2 * data.params + 64
    ratio = data.params / fsdp.params
    assert 7.0 < ratio <= 8.0, ratio  # only the small vectors (norm scales, some biases) stay replicated
    assert 7.0 < data.opt_state / fsdp.opt_state <= 8.0
    # The compiled step agrees: its input shardings hold exactly those bytes, and XLA's argument
    # buffers (state + batch + rng) shrink the same way.
    for p in (data, fsdp):
        assert (p.compiled["params"], p.compiled["opt_state"]) == (p.params, p.opt_state)
        assert p.compiled["arguments"] >= p.params + p.opt_state
        assert p.compiled["temporaries"] > 0 and p.compiled["peak"] > p.compiled["arguments"]
    assert data.compiled["arguments"] / fsdp.compiled["arguments"] > 5


def test_cli_prints_the_table_and_a_verdict(capsys):
    assert cli.main(["plan", "--config", GPT_TINY + ":tiny", "--mesh", "2,2,2", "--target", "a100-40gb",
                     "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "on mesh data=2 fsdp=2 expert=1 sequence=1 tensor=2 (8 devices), target a100-40gb (40 GiB per device)" in out
    for row in ("parameters", "optimizer state", "gradients", r"activations \(estimate\)", "total / peak"):
        assert re.search(rf"^  {row} +[\d.]+ [KMG]iB$", out, re.MULTILINE), row
    assert re.search(r"^verdict: fits on a100-40gb: .* of 36\.00 GiB usable \(90% of 40 GiB\), margin \+", out,
                     re.MULTILINE)


@pytest.mark.parametrize("args, message", [
    (["--mesh", "2,2,2", "--devices", "16"],
     "data*fsdp*expert*sequence*tensor = 2*2*1*1*2 = 8 but there are 16 devices"),
    (["--mesh", "1,1,8"], "num_heads=4 is not divisible by the tensor axis config.mesh.tensor=8"),
    (["--mesh", "16,1,1"], "batch_size=8 (microbatch 8 with grad_accum=1) is not divisible by the data-parallel size"),
    (["--mesh", "2,2"], "give axis=size pairs (e.g. --mesh fsdp=4,sequence=2; unnamed axes are 1), all five sizes"),
    (["--mesh", "data=2,model=4"], "unknown or repeated axis; the axes are data, fsdp, expert, sequence, tensor"),
    (["--mesh", "sequence=3"], "config.data.seq_len=64 is not divisible by the sequence axis config.mesh.sequence=3"),
    (["--target", "h800"], "--target 'h800' is unknown"),
])
def test_impossible_plans_are_refused_before_compiling(args, message, capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(plan, "compiled_memory", lambda *a: compiled.append(a))
    assert cli.main(["plan", "--config", GPT_TINY + ":tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigmodel: config error:") and message in err, err
    assert compiled == []


def test_mesh_forms():
    assert plan.parse_mesh("fsdp=4,sequence=2") == {"data": 1, "fsdp": 4, "expert": 1, "sequence": 2, "tensor": 1}
    assert plan.parse_mesh("2,1,2,1,2") == {"data": 2, "fsdp": 1, "expert": 2, "sequence": 1, "tensor": 2}
    assert plan.parse_mesh("-1,2,1") == {"data": -1, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}


def test_sequence_expert_and_zero1_plans(capsys):
    def analytic(mesh, *overrides):
        config, sizes = plan.configure(GPT_TINY, ["train.batch_size=64", *overrides], plan.parse_mesh(mesh), None)
        return plan.make_plan(config, sizes, "h100-80gb", compile=False)

    data, sequence, expert = analytic("data=8"), analytic("sequence=8"), analytic("expert=8")
    zero1 = analytic("data=8", "sharding.zero1=true")
    # 'sequence' and 'expert' replicate the parameters (no MoE layer here) like 'data' ...
    assert data.params == sequence.params == expert.params == zero1.params == 4 * data.param_count
    # ... and each device holds an eighth of the tokens either way: 8 rows of 128, or 64 rows of 16.
    assert data.activations == sequence.activations == expert.activations > 0
    # ZeRO-1: Adam's moments (2 x params) split 8 ways; only the scalar step counts stay whole.
    assert data.opt_state == 2 * data.params + 8
    assert zero1.opt_state == 2 * data.params // 8 + 8
    assert cli.main(["plan", "--config", GPT_TINY, "--mesh", "data=8", "--config.sharding.zero1=true",
                     "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "on mesh data=8 fsdp=1 expert=1 sequence=1 tensor=1 (8 devices)" in out
    assert re.search(r"^  optimizer state \(ZeRO-1\) +[\d.]+ KiB$", out, re.MULTILINE), out


def test_gpt_124m_on_h100(capsys):
    assert cli.main(["plan", "--config", GPT_TINY, "--model", "gpt:124m", *(f"--config.{o}" for o in SEQ_1024_BATCH_64),
                     "--mesh", "8,1,1", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "model: 124,439,808 parameters" in out
    verdict = re.search(
        r"^verdict: fits on h100-80gb: ([\d.]+) GiB per device of 72\.00 GiB usable .* margin \+([\d.]+) GiB", out,
        re.MULTILINE)
    assert verdict, out
    config, sizes = plan.configure(GPT_TINY, SEQ_1024_BATCH_64, plan.parse_mesh("8,1,1"), None, model="gpt:124m")
    p = plan.make_plan(config, sizes, "h100-80gb", compile=False)
    assert p.params == 4 * 124_439_808 and p.grads == p.params
    # 8 sequences of 1024 tokens per device in float32: activations dominate (about 12 GiB).
    assert 10 * 2**30 < p.activations < 14 * 2**30
    assert float(verdict.group(1)) == pytest.approx(p.total / 2**30, abs=0.01)
    assert float(verdict.group(2)) == pytest.approx((p.budget - p.total) / 2**30, abs=0.01)


def test_gpt_1_5b_does_not_fit_on_a100_40gb_without_sharding(capsys):
    assert cli.main(["plan", "--config", GPT_TINY, "--model", "gpt:1.5b", *(f"--config.{o}" for o in SEQ_1024_BATCH_64),
                     "--mesh", "8,1,1", "--target", "a100-40gb", "--no-compile"]) == 0
    assert re.search(r"^verdict: does not fit on a100-40gb: .* margin -", capsys.readouterr().out, re.MULTILINE)
    # Sharding the state 8 ways and recomputing activations brings it inside 40 GiB.
    config, sizes = plan.configure(GPT_TINY, SEQ_1024_BATCH_64 + ["model.remat=full"], plan.parse_mesh("1,8,1"), None,
                                   model="gpt:1.5b")
    assert plan.make_plan(config, sizes, "a100-40gb", compile=False).fits


@pytest.mark.slow
def test_mesh_needing_other_device_count_compiles_in_a_child(capfd):
    # 4 devices while this process has 8: the command re-runs itself with 4 fake CPU devices.
    assert cli.main(["plan", "--config", GPT_TINY + ":tiny", "--mesh", "1,2,2"]) == 0
    out = capfd.readouterr().out
    assert "on mesh data=1 fsdp=2 expert=1 sequence=1 tensor=2 (4 devices)" in out
    config, sizes = plan.configure(GPT_TINY + ":tiny", [], plan.parse_mesh("1,2,2"), None)
    expected = plan.make_plan(config, sizes, "h100-80gb", compile=False)
    params = re.search(r"^  parameters +([\d.]+) KiB +([\d.]+) KiB$", out, re.MULTILINE)
    assert params, out  # analytic and compiled columns both filled, and equal
    assert float(params.group(1)) == float(params.group(2)) == round(expected.params / 1024, 1)
    assert re.search(r"^  temporaries \(XLA\) +[\d.]+ [KM]iB$", out, re.MULTILINE)


def test_prepare_compiles_for_a_mesh_of_other_devices_without_data(monkeypatch):
    # What an ahead-of-time target needs: the train step for devices this process does not
    # compute on, from shapes alone.
    import jax

    from bigmodel import config as config_lib, data as data_lib, flops, sharding, train

    monkeypatch.setattr(data_lib, "build", lambda *a, **k: pytest.fail("prepare read data it did not need"))
    config = config_lib.load(GPT_TINY + ":tiny", ["train.grad_accum=2"])
    devices = jax.devices()[4:]
    run = train.prepare(config, sharding.make_mesh(sharding.axis_sizes(fsdp=4), devices=devices))
    assert run.data is None and run.batch["inputs"].shape == (8, 64)
    state_in, batch_in, _ = run.train_step.input_shardings[0]
    assert {d for s in jax.tree.leaves(state_in) for d in s.device_set} == set(devices)
    assert batch_in["inputs"].device_set == set(devices)
    params = jax.tree.leaves(run.abstract_state().params)
    whole, shard = (sum(math.prod(f(x)) for x in params) for f in (lambda x: x.shape,
                                                                    lambda x: x.sharding.shard_shape(x.shape)))
    assert 3.5 < whole / shard <= 4  # fsdp splits all but the small vectors 4 ways
    assert run.train_step.memory_analysis().temp_size_in_bytes > 0 and run.compile_s > 0
    assert run.units_per_step == 8 * 64
    active = flops.param_count(run.abstract.params) - flops.embedding_param_count(run.abstract.params)
    assert run.flops_per_step == 8 * 64 * flops.gpt_flops_per_token(config.model, active, 64)
    # Without a mesh: the shapes alone, nothing compiled.
    shapes = train.prepare(config)
    assert shapes.shardings is None and shapes.train_step is None
    assert flops.param_count(shapes.abstract.params) == 132_864
