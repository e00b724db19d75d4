"""Sharding on 8 fake CPU devices: equal losses across meshes, real splits, strict rules."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigmodel import config as config_lib, sharding, train
from bigmodel.models import layers

from conftest import GPT_TINY


def run_steps(mesh_sizes, steps=3, grad_accum=1):
    config = config_lib.load(GPT_TINY + ":tiny", [f"train.grad_accum={grad_accum}", "train.batch_size=16"])
    mesh, rules, module, task, tx, schedule = train.setup_model(config, mesh_sizes)
    dummy = task.dummy_batch(16 // grad_accum, 64)
    state, shardings, _ = train.sharded_init(train.init_fn(module, task, tx, dummy), jax.random.key(0), mesh, rules)
    rng = np.random.default_rng(0)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(train.make_train_step(module, task, tx, schedule, grad_accum),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        for _ in range(steps):
            tokens = rng.integers(0, 257, (16, 65)).astype(np.int32)
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((16, 64), np.float32),
                     "target_bytes": np.ones((16, 64), np.float32)}
            state, mets = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
            losses.append(float(mets["loss"][0] / mets["loss"][1]))
    return losses, state


MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (4, 1, 2)]


def test_losses_equal_across_meshes():
    results = {m: run_steps(dict(zip(("data", "fsdp", "tensor"), m)))[0] for m in MESHES}
    ref = results[(8, 1, 1)]
    assert ref[2] < ref[0]  # it trains
    for mesh, losses in results.items():
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=str(mesh))


def test_gradient_accumulation_matches_one_big_batch():
    full, _ = run_steps({"data": 2, "fsdp": 2, "tensor": 2}, grad_accum=1)
    accum, _ = run_steps({"data": 2, "fsdp": 2, "tensor": 2}, grad_accum=2)
    np.testing.assert_allclose(accum, full, rtol=1e-5)


@pytest.mark.parametrize("mesh, shard_shape", [
    ((8, 1, 1), (64, 256)),  # pure data parallel: replicated
    ((1, 8, 1), (8, 256)),  # fsdp splits the embed (input) dimension
    ((2, 2, 2), (32, 128)),  # fsdp on embed and Megatron column split on mlp
    ((1, 2, 4), (32, 64)),
])
def test_mlp_kernel_is_split(mesh, shard_shape):
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    config = config_lib.load(GPT_TINY + ":tiny")
    m, rules, module, task, tx, _ = train.setup_model(config, sizes)
    state, _, _ = train.sharded_init(train.init_fn(module, task, tx, task.dummy_batch(8, 64)), jax.random.key(0), m, rules)
    kernel = state.params["block_0"]["mlp"]["fc_in"]["kernel"]
    assert kernel.shape == (64, 256)
    assert {s.data.shape for s in kernel.addressable_shards} == {shard_shape}
    # Adam's moments follow the parameters' layout.
    mu = state.opt_state[1][0].mu["block_0"]["mlp"]["fc_in"]["kernel"]
    assert {s.data.shape for s in mu.addressable_shards} == {shard_shape}
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    if mesh == (1, 8, 1):
        assert sharding.per_device_bytes(state.params) < total / 4


def test_parameter_name_without_rule_fails():
    config = config_lib.load(GPT_TINY + ":tiny")
    rules = tuple(r for r in sharding.as_rules(config.sharding.rules) if r[0] != "mlp")
    mesh, _, module, task, tx, _ = train.setup_model(config, {"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match=r"parameter axis name\(s\) \['mlp'\] have no rule"):
        train.sharded_init(train.init_fn(module, task, tx, task.dummy_batch(8, 64)), jax.random.key(0), mesh, rules)


def test_activation_name_without_rule_fails():
    rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "act_mlp")
    with nn.logical_axis_rules(rules), pytest.raises(ValueError, match=r"\['act_mlp'\] have no rule"):
        layers.constrain(jax.numpy.ones((2, 2, 2)), ("act_batch", "act_seq", "act_mlp"))


def test_every_model_name_has_a_default_rule():
    config = config_lib.load(GPT_TINY + ":tiny")
    mesh, rules, module, task, tx, _ = train.setup_model(config, {"data": 8, "fsdp": 1, "tensor": 1})
    abstract = jax.eval_shape(train.init_fn(module, task, tx, task.dummy_batch(8, 64)), jax.random.key(0))
    assert sharding.logical_names(abstract) <= {name for name, _ in rules}
    # Tracing the forward pass under the rules checks every activation name too.
    with nn.logical_axis_rules(rules):
        jax.eval_shape(lambda p: module.apply({"params": p}, jax.numpy.zeros((8, 64), jax.numpy.int32)),
                       nn.meta.unbox(abstract.params))
