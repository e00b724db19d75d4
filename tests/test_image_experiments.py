"""Image experiments end to end, and their sharding on 8 fake CPU devices (BatchNorm included)."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigmodel import cli, config as config_lib, metrics, sharding, train

from conftest import REPO

EXPERIMENTS = {name: str(REPO / "experiments" / f"{name}_digits.py") for name in ("resnet", "vit", "cnn")}


@pytest.fixture
def fast_keys():
    """'rbg' as JAX's default PRNG: the trainer's init compiles ~3× faster on CPU than with threefry."""
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_default_prng_impl", previous)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_tiny_variant_trains_and_evaluates(tmp_path, name, fast_keys):
    args = ["train", "--config", EXPERIMENTS[name] + ":tiny", "--workdir", str(tmp_path),
            "--config.log.progress=false", "--config.checkpoint.every=6"]
    assert cli.main(args) == 0
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6]
    for row in rows:
        assert np.isfinite(row["loss"]) and 0 <= row["accuracy"] <= 1 and row["examples_per_s"] > 0
    assert 0 <= rows[-1]["eval_accuracy"] <= 1 and np.isfinite(rows[-1]["eval_loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_accuracy"] == pytest.approx(rows[-1]["eval_accuracy"])
    assert summary["examples"] == 6 * 16 and summary["eval_examples"] == 359
    # Accuracy over the whole padded test split is a multiple of 1/359: every image counted once.
    assert summary["eval_accuracy"] * 359 == pytest.approx(round(summary["eval_accuracy"] * 359), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]


def run_steps(name, mesh_shape, steps=3):
    """Losses of `steps` train steps on fixed random batches, and the state after the first."""
    config = config_lib.load(EXPERIMENTS[name] + ":tiny")
    mesh_sizes = sharding.axis_sizes(**dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    mesh, rules, module, task, tx, schedule = train.setup_model(config, mesh_sizes)
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                "labels": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(steps)]
    # 'rbg' keys initialise several times faster than threefry on CPU.
    state, shardings, _ = train.sharded_init(train.init_fn(module, task, tx, batches[0]),
                                             jax.random.key(0, impl="rbg"), mesh, rules)
    initial = jax.device_get((state.params, state.model_state))
    losses, after_first = [], None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(train.make_train_step(module, task, tx, schedule, 1),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        for i, batch in enumerate(batches):
            state, mets = step(state, sharding.global_batch(batch, mesh), jax.random.key(1, impl="rbg"))
            losses.append(float(mets["loss"][0] / mets["loss"][1]))
            if i == 0:
                after_first = jax.device_get(state.model_state)
    return {"losses": losses, "after_first": after_first, "initial": initial, "batches": batches,
            "module": module, "final": jax.device_get((state.params, state.model_state))}


@pytest.fixture(scope="module")
def resnet_runs():
    return {mesh: run_steps("resnet", mesh) for mesh in [(8, 1, 1), (2, 2, 2)]}


@pytest.mark.slow
def test_resnet_losses_equal_across_meshes(resnet_runs):
    ref = resnet_runs[(8, 1, 1)]["losses"]
    assert all(np.isfinite(ref))
    np.testing.assert_allclose(resnet_runs[(2, 2, 2)]["losses"], ref, rtol=1e-5)


@pytest.mark.slow
def test_vit_losses_equal_across_meshes():
    ref = run_steps("vit", (8, 1, 1))["losses"]
    assert all(np.isfinite(ref)) and ref[2] != ref[0]
    np.testing.assert_allclose(run_steps("vit", (2, 2, 2))["losses"], ref, rtol=1e-5)


@pytest.mark.slow
def test_batchnorm_statistics_are_global_and_used_in_eval(resnet_runs):
    run = resnet_runs[(8, 1, 1)]
    module, batch = run["module"], run["batches"][0]
    params, model_state = run["initial"]
    assert set(model_state) == {"batch_stats"}

    @jax.jit
    def stats_of(inputs):
        # One device, no mesh: BatchNorm over exactly the rows given.
        return module.apply({"params": params, **model_state}, inputs, train=True, mutable=["batch_stats"])[1]

    def leaves(tree):
        return jax.tree.leaves(tree["batch_stats"])

    whole, one_device = stats_of(batch["inputs"]), stats_of(batch["inputs"][:2])
    for mesh, sharded in resnet_runs.items():
        # After one step the running statistics are those of the whole global batch, on any mesh …
        for got, want in zip(leaves(sharded["after_first"]), leaves(whole)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(mesh))
    # … not those of one device's 2 rows (what unsynchronised per-device BatchNorm would keep).
    assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(leaves(whole), leaves(one_device)))
    # The statistics moved away from their initial values (mean 0, variance 1).
    stem = run["after_first"]["batch_stats"]["stem_bn"]["bn"]
    assert np.abs(stem["mean"]).max() > 1e-3 and np.abs(stem["var"] - 1).max() > 1e-3

    # Evaluation uses the running averages: an example's logits do not depend on the rest of the batch …
    variables = {"params": run["final"][0], **run["final"][1]}
    logits = jax.jit(lambda x: module.apply(variables, x, train=False))
    inputs, others = run["batches"][1]["inputs"], run["batches"][2]["inputs"]
    mixed = np.concatenate([inputs[:4], others[4:]])
    np.testing.assert_allclose(logits(mixed)[:4], logits(inputs)[:4], rtol=1e-5, atol=1e-5)
    # … whereas in train mode they do (batch statistics).
    train_mode = jax.jit(lambda x: module.apply(variables, x, train=True, mutable=["batch_stats"])[0])
    assert not np.allclose(train_mode(mixed)[:4], train_mode(inputs)[:4], atol=1e-4)
