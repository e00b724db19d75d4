"""Sharding on 8 fake CPU devices: equal losses across meshes, real splits, ZeRO-1, strict rules, hybrid meshes."""

import functools
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bigmodel import aot, config as config_lib, sharding, train
from bigmodel.config import ConfigError
from bigmodel.models import layers

from conftest import GPT_TINY, REPO

BERT_STDLIB = str(REPO / "experiments" / "bert_stdlib.py")
axes = sharding.axis_sizes


def gpt_batch(rng, rows=16, length=64):
    tokens = rng.integers(0, 257, (rows, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, length), np.float32),
            "target_bytes": np.ones((rows, length), np.float32)}


def bert_batch(rng, rows=16, length=32):
    targets = rng.integers(1, 257, (rows, length)).astype(np.int32)
    targets[:, 0] = 258
    weights = (rng.random((rows, length)) < 0.15).astype(np.float32)
    weights[:, 0] = 0
    return {"inputs": np.where(weights > 0, 257, targets).astype(np.int32), "targets": targets, "weights": weights}


# A mixture of experts: GPT-nano with 4 experts, top-2, capacity factor 1 (some tokens dropped).
MOE = ["model.num_experts=4", "model.experts_per_token=2", "model.capacity_factor=1.0"]
MODELS = {"gpt": (GPT_TINY, gpt_batch, []), "bert": (BERT_STDLIB, bert_batch, []), "moe": (GPT_TINY, gpt_batch, MOE)}


@functools.cache
def start(model):
    """Config, abstract state, initial state (host arrays) and three batches of a ':tiny' model.

    One initialisation serves every mesh: placing it with device_put on each mesh's shardings
    is what sharded_init computes (test_sharded_init_splits_the_mlp_kernel), without
    compiling the initialiser once per mesh.
    """
    spec, make_batch, overrides = MODELS[model]
    config = config_lib.load(spec + ":tiny", ["train.batch_size=16", *overrides])
    rng = np.random.default_rng(0)
    batches = [make_batch(rng) for _ in range(3)]
    _, _rules, module, task, tx, _ = train.setup_model(config, axes())
    init = train.init_fn(module, task, tx, batches[0])
    host = jax.device_get(jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0)))
    return config, jax.eval_shape(init, jax.random.key(0)), host, batches


def run_steps(mesh_sizes, grad_accum=1, model="gpt", zero1=False):
    """Losses of three train steps on fixed random batches of 16 rows, and the final state."""
    config, abstract, host, batches = start(model)
    mesh, rules, module, task, tx, schedule = train.setup_model(config, mesh_sizes)
    shardings = sharding.state_shardings(abstract, mesh, rules, zero1)
    state = jax.device_put(host, shardings)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(train.make_train_step(module, task, tx, schedule, grad_accum),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        for batch in batches:
            state, mets = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
            losses.append(float(mets["loss"][0] / mets["loss"][1]))
    return losses, state


# (name, mesh sizes, zero1) against one device (make_mesh takes the first device). Pure tensor
# is 4-way (4 devices) for GPT-nano's 4 heads and 2-way for BERT-tiny's 2.
MESHES = {
    "gpt": [
        ("data", axes(data=8), False),
        ("fsdp", axes(fsdp=8), False),
        ("tensor", axes(tensor=4), False),
        ("sequence", axes(sequence=8), False),
        ("expert as data", axes(expert=8), False),
        ("zero1 data", axes(data=8), True),
        ("zero1 data2 fsdp2 sequence2", axes(data=2, fsdp=2, sequence=2), True),
        ("fsdp2 sequence2 tensor2", axes(fsdp=2, sequence=2, tensor=2), False),
    ],
    "bert": [
        ("data", axes(data=8), False),
        ("fsdp", axes(fsdp=8), False),
        ("tensor", axes(tensor=2), False),
        ("sequence", axes(sequence=8), False),
        ("expert as data", axes(expert=8), False),
        ("zero1 data2 fsdp2 sequence2", axes(data=2, fsdp=2, sequence=2), True),
        ("fsdp2 sequence2 tensor2", axes(fsdp=2, sequence=2, tensor=2), False),
    ],
}


@pytest.fixture(scope="module")
def gpt_runs():
    return {name: run_steps(sizes, zero1=zero1) for name, sizes, zero1 in [("single", axes(), False)] + MESHES["gpt"]}


@pytest.mark.slow
def test_gpt_losses_equal_across_meshes(gpt_runs):
    ref = gpt_runs["single"][0]
    assert ref[2] < ref[0]  # it trains
    for name, (losses, _) in gpt_runs.items():
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_bert_losses_equal_across_meshes():
    ref, _ = run_steps(axes(), model="bert")
    assert np.all(np.isfinite(ref)) and ref[2] != ref[0]  # it updates (3 warmup steps move the loss little)
    for name, sizes, zero1 in MESHES["bert"]:
        np.testing.assert_allclose(run_steps(sizes, model="bert", zero1=zero1)[0], ref, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_moe_losses_equal_with_experts_over_1_2_and_4_devices():
    """Expert parallelism: the experts split over 'expert' (the compiler moves the tokens)."""
    ref, _state = run_steps(axes(), model="moe")
    assert np.all(np.isfinite(ref)) and ref[2] < ref[0]
    for sizes in (axes(expert=2), axes(expert=4), axes(data=2, expert=4), axes(data=2, expert=2, tensor=2)):
        losses, sharded = run_steps(sizes, model="moe")
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=str(sizes))
        kernel = sharded.params["block_0"]["moe"]["fc_in"]  # [E=4, D, F]
        experts_per_device = 4 // sizes["expert"]
        assert {s.data.shape[0] for s in kernel.addressable_shards} == {experts_per_device}


@pytest.mark.slow
def test_moe_step_on_an_expert_axis_moves_tokens_with_all_to_all():
    """The compiled train step sends tokens to their experts and back by all-to-all, never gathering them."""
    config, abstract, host, batches = start("moe")
    mesh, rules, module, task, tx, schedule = train.setup_model(config, axes(expert=4))
    shardings = sharding.state_shardings(abstract, mesh, rules, False)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(train.make_train_step(module, task, tx, schedule, 1),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)))
        found = aot.collectives(step.lower(host, batches[0], jax.random.key(1)).compile().as_text())
    assert found["all-to-all"]["count"] >= 2 * config.model.num_layers, found
    # XLA:CPU gathers each layer's router probabilities [B, T, E] for top_k (libtpu does not); anything
    # more would be tokens or expert weights gathered instead of moved.
    rows, length = batches[0]["inputs"].shape
    router_probs = config.model.num_layers * rows * length * config.model.num_experts * 4
    assert found["all-gather"]["bytes"] <= router_probs, found


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(gpt_runs):
    accum, _ = run_steps(axes(data=2, fsdp=2, tensor=2), grad_accum=2)
    np.testing.assert_allclose(accum, gpt_runs["single"][0], rtol=1e-5)


def split_bytes(tree, ways):
    """(bytes per device if every split leaf is split `ways` ways, bytes of the replicated leaves, their paths)."""
    split, replicated, names = 0, 0, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if leaf.sharding.is_fully_replicated:
            replicated += leaf.nbytes
            names.append(jax.tree_util.keystr(path))
        else:
            assert leaf.nbytes % ways == 0
            split += leaf.nbytes // ways
    return split, replicated, names


@pytest.mark.slow
def test_fsdp_splits_parameters_8_ways(gpt_runs):
    params = gpt_runs["fsdp"][1].params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    split, replicated, names = split_bytes(params, 8)
    # Only LayerNorm scales and the biases without an 'embed' dimension stay whole on every device.
    assert names and all(n.endswith(("['scale']", "['bias']", "_bias']")) for n in names), names
    assert replicated < 0.05 * total
    assert sharding.per_device_bytes(params) == split + replicated <= total / 8 + replicated


@pytest.mark.slow
def test_zero1_splits_adam_over_data_and_keeps_parameters_whole(gpt_runs):
    plain, zero1 = gpt_runs["data"][1], gpt_runs["zero1 data"][1]
    params = sum(x.nbytes for x in jax.tree.leaves(zero1.params))
    assert sharding.per_device_bytes(zero1.params) == sharding.per_device_bytes(plain.params) == params
    opt_total = sum(x.nbytes for x in jax.tree.leaves(zero1.opt_state))
    assert sharding.per_device_bytes(plain.opt_state) == opt_total  # data parallel: every device holds all of Adam
    split, replicated, names = split_bytes(zero1.opt_state, 8)
    assert all(n.endswith(".count") for n in names), names  # only the scalar step counts (every moment divides by 8)
    assert sharding.per_device_bytes(zero1.opt_state) == split + replicated <= opt_total / 8 + replicated
    # The moments kept the layout through three steps (the jit's out_shardings), on the largest dimension.
    mu = zero1.opt_state[1][0].mu["block_0"]["mlp"]["fc_in"]["kernel"]
    assert mu.sharding.spec == P("fsdp", ("data", "tensor")) and mu.addressable_shards[0].data.shape == (64, 32)
    # On data2 x fsdp2 x sequence2, 'data' takes the larger (mlp) dimension; fsdp keeps splitting 'embed'.
    mixed = gpt_runs["zero1 data2 fsdp2 sequence2"][1].opt_state[1][0].mu["block_0"]["mlp"]["fc_in"]["kernel"]
    assert mixed.sharding.spec == P("fsdp", ("data", "tensor"))
    assert {s.data.shape for s in mixed.addressable_shards} == {(64 // 2, 256 // 2)}


def test_zero1_spec():
    sizes = axes(data=4, fsdp=2)
    assert sharding.zero1_spec((64, 256), P("fsdp", None), sizes) == P("fsdp", "data")
    assert sharding.zero1_spec((64, 6), P("fsdp", None), sizes) == P(("data", "fsdp"), None)
    assert sharding.zero1_spec((), P(), sizes) == P()  # scalars stay replicated
    assert sharding.zero1_spec((6,), P(), sizes) == P()  # so does what 4 does not divide
    assert sharding.zero1_spec((64, 256), P("data", None), sizes) == P("data", None)
    assert sharding.zero1_spec((8,), P(), axes(fsdp=8)) == P()  # no data axis


def test_sequence_parallel_forward_matches_one_device_and_stays_causal():
    config, abstract, host, _ = start("gpt")

    def forward(sizes):
        mesh, rules, module, *_ = train.setup_model(config, sizes)
        params = jax.device_put(host.params, sharding.state_shardings(abstract, mesh, rules).params)
        fn = jax.jit(lambda p, x: module.apply({"params": p}, x, capture_intermediates=True))

        def run(tokens):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(params, sharding.global_batch({"x": tokens}, mesh)["x"])

        return run

    tokens = np.random.default_rng(0).integers(0, 257, (8, 64)).astype(np.int32)
    sequence_parallel = forward(axes(sequence=8))
    ref_logits, ref_vars = forward(axes())(tokens)
    logits, variables = sequence_parallel(tokens)
    attn = variables["intermediates"]["block_0"]["attn"]["__call__"][0]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn, ref_vars["intermediates"]["block_0"]["attn"]["__call__"][0], rtol=1e-5, atol=1e-6)
    # The logits (constrained to ('act_batch', 'act_seq', 'act_vocab')) and the attention output are
    # split along the sequence: each device holds 8 of the 64 positions of all 8 rows.
    for x in (logits, attn):
        assert {s.data.shape[:2] for s in x.addressable_shards} == {(8, 8)}
        assert len({s.index[1].start for s in x.addressable_shards}) == 8
    # Causal across shards: changing position 40 changes no logit before it, and the ones after.
    changed = tokens.copy()
    changed[:, 40] = (changed[:, 40] + 1) % 257
    other, _ = sequence_parallel(changed)
    np.testing.assert_array_equal(np.asarray(other)[:, :40], np.asarray(logits)[:, :40])
    assert not np.allclose(np.asarray(other)[:, 40:], np.asarray(logits)[:, 40:])


@pytest.mark.slow
@pytest.mark.parametrize("mesh, shard_shape", [
    ((8, 1, 1), (64, 256)),  # pure data parallel: replicated
    ((1, 8, 1), (8, 256)),  # fsdp splits the embed (input) dimension
    ((2, 2, 2), (32, 128)),  # fsdp on embed and Megatron column split on mlp
    ((1, 2, 4), (32, 64)),
])
def test_sharded_init_splits_the_mlp_kernel(mesh, shard_shape):
    sizes = axes(**dict(zip(("data", "fsdp", "tensor"), mesh)))
    config = config_lib.load(GPT_TINY + ":tiny")
    m, rules, module, task, tx, _ = train.setup_model(config, sizes)
    init = train.init_fn(module, task, tx, task.dummy_batch(8, 64))
    state, _, _ = train.sharded_init(init, jax.random.key(0), m, rules)
    kernel = state.params["block_0"]["mlp"]["fc_in"]["kernel"]
    assert kernel.shape == (64, 256)
    assert {s.data.shape for s in kernel.addressable_shards} == {shard_shape}
    # Adam's moments follow the parameters' layout.
    mu = state.opt_state[1][0].mu["block_0"]["mlp"]["fc_in"]["kernel"]
    assert {s.data.shape for s in mu.addressable_shards} == {shard_shape}
    # The values do not depend on the mesh: they equal a one-device initialisation.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), start("gpt")[2].params)


def test_expert_rules_leave_the_batch_to_data_and_fsdp_inside_moe_layers():
    rules = sharding.DEFAULT_RULES
    assert nn.logical_to_mesh_axes(("act_batch", "act_seq", "act_embed"), rules) == \
        P(("data", "fsdp", "expert"), "sequence", None)
    # An MoE layer's tokens grouped by expert: 'expert' goes to the experts, the batch keeps data and fsdp.
    assert nn.logical_to_mesh_axes(("act_expert", "act_batch", "act_embed"), rules) == \
        P("expert", ("data", "fsdp"), None)
    assert nn.logical_to_mesh_axes(("expert", "embed", "mlp"), rules) == P("expert", "fsdp", "tensor")


def test_parameter_name_without_rule_fails():
    config = config_lib.load(GPT_TINY + ":tiny")
    rules = tuple(r for r in sharding.as_rules(config.sharding.rules) if r[0] != "mlp")
    mesh, _, module, task, tx, _ = train.setup_model(config, axes(data=8))
    with pytest.raises(ValueError, match=r"parameter axis name\(s\) \['mlp'\] have no rule"):
        train.sharded_init(train.init_fn(module, task, tx, task.dummy_batch(8, 64)), jax.random.key(0), mesh, rules)


def test_activation_name_without_rule_fails():
    rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "act_mlp")
    with nn.logical_axis_rules(rules), pytest.raises(ValueError, match=r"\['act_mlp'\] have no rule"):
        layers.constrain(jax.numpy.ones((2, 2, 2)), ("act_batch", "act_seq", "act_mlp"))


def test_every_model_name_has_a_default_rule():
    config = config_lib.load(GPT_TINY + ":tiny")
    _mesh, rules, module, task, tx, _ = train.setup_model(config, axes(data=8))
    abstract = jax.eval_shape(train.init_fn(module, task, tx, task.dummy_batch(8, 64)), jax.random.key(0))
    assert sharding.logical_names(abstract) <= {name for name, _ in rules}
    # Tracing the forward pass under the rules checks every activation name too.
    with nn.logical_axis_rules(rules):
        jax.eval_shape(lambda p: module.apply({"params": p}, jax.numpy.zeros((8, 64), jax.numpy.int32)),
                       nn.meta.unbox(abstract.params))


# --------------------------------------------------------------------------- multi-slice / multi-process layout


def fake_devices(processes, per_process, slice_of=None):
    """Stand-ins for the devices of a multi-process run (what mesh_utils reads of them)."""
    devices = []
    for i in range(processes * per_process):
        d = types.SimpleNamespace(id=i, process_index=i // per_process, platform="gpu", device_kind="fake")
        if slice_of is not None:
            d.slice_index = slice_of(d.process_index)
        devices.append(d)
    return devices


def mesh_array(sizes, slices, dcn_axis, devices):
    shape = tuple(sizes[a] for a in config_lib.MESH_AXES)
    dcn = tuple(slices if a == dcn_axis else 1 for a in config_lib.MESH_AXES)
    return sharding.hybrid_devices(tuple(s // d for s, d in zip(shape, dcn)), dcn, devices)


def processes_along(grid, axis):
    """The process indices of each index of one mesh axis (the others flattened)."""
    index = config_lib.MESH_AXES.index(axis)
    moved = np.moveaxis(grid, index, 0).reshape(grid.shape[index], -1)
    return [sorted({d.process_index for d in row}) for row in moved]


def test_hybrid_mesh_puts_slices_on_the_dcn_axis():
    # 2 nodes (one process each) x 4 GPUs, data=4 over DCN x ICI, tensor=2 inside a node.
    devices = fake_devices(2, 4)
    grid = mesh_array(axes(data=4, tensor=2), 2, "data", devices)
    assert grid.shape == (4, 1, 1, 1, 2)
    assert processes_along(grid, "data") == [[0], [0], [1], [1]]  # the outer half of 'data' crosses the DCN
    assert processes_along(grid, "tensor") == [[0, 1], [0, 1]]  # tensor stays inside each node
    assert sorted(d.id for d in grid.flat) == list(range(8)) and grid.flat[0] is devices[0]
    # One process per GPU (4 processes per node): a slice is a run of consecutive processes.
    devices = fake_devices(8, 1)
    grid = mesh_array(axes(data=2, fsdp=2, tensor=2), 2, "data", devices)
    assert processes_along(grid, "data") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(isinstance(d, types.SimpleNamespace) for d in grid.flat)  # real devices, not the wrappers
    # TPU-style devices that know their slice: slices can span 'fsdp' as well.
    devices = fake_devices(4, 2, slice_of=lambda p: p // 2)
    grid = mesh_array(axes(fsdp=8), 2, "fsdp", devices)
    assert processes_along(grid, "fsdp") == [[0], [0], [1], [1], [2], [2], [3], [3]]


def test_hybrid_mesh_refusals():
    with pytest.raises(ConfigError, match=r"3 processes do not split into 2 equal groups"):
        mesh_array(axes(data=6), 2, "data", fake_devices(3, 2))
    with pytest.raises(ConfigError, match=r"config.mesh.slices=2, but the devices belong to 4 slices"):
        mesh_array(axes(data=8), 2, "data", fake_devices(4, 2, slice_of=lambda p: p))
    # Devices that all report one slice (multi-process CPU, GPU) are grouped by process.
    grid = mesh_array(axes(data=4), 2, "data", fake_devices(2, 2, slice_of=lambda p: 0))
    assert processes_along(grid, "data") == [[0], [0], [1], [1]]
    # This process's 8 CPU devices are one process, so one slice.
    with pytest.raises(ConfigError, match=r"1 processes do not split into 2 equal groups"):
        sharding.make_mesh(axes(data=8), slices=2)
    with pytest.raises(ConfigError, match=r"make 4 devices, but the run has 8"):
        sharding.make_mesh(axes(data=4), slices=2, devices=jax.devices())
    assert sharding.make_mesh(axes(data=4, tensor=2), slices=1).devices.shape == (4, 1, 1, 1, 2)


def test_processes_sharing_batch_rows_load_the_same_ones():
    # 2 processes x 4 devices. 'data' across the processes: each loads its own half.
    grid = mesh_array(axes(data=2, sequence=4), 2, "data", fake_devices(2, 4))
    assert sharding.batch_groups(grid, config_lib.MESH_AXES) == [(0,), (1,)]
    # 'sequence' across the processes: both hold every row, so both load the same (whole) batch.
    grid = mesh_array(axes(data=2, sequence=4), 2, "sequence", fake_devices(2, 4))
    assert sharding.batch_groups(grid, config_lib.MESH_AXES) == [(0, 1)]
    # 4 processes: data 2 across pairs, tensor across the two processes of a pair.
    grid = mesh_array(axes(data=2, tensor=4), 2, "data", fake_devices(4, 2))
    assert sharding.batch_groups(grid, config_lib.MESH_AXES) == [(0, 1), (2, 3)]
    # On this single process: one part, the whole batch.
    assert sharding.process_batch_shard(sharding.make_mesh(axes(data=2, sequence=4))) == (0, 1)
