"""Mixture of experts: equivalence with the dense MLP, capacity dropping, dropless routing, losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import flops, models
from bigmodel.models import gpt, layers, moe


def x_of(shape=(2, 16, 32), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def apply_moe(module, x, params=None):
    params = params if params is not None else module.init(jax.random.key(1), x)["params"]
    y, aux = module.apply({"params": params}, x, mutable=[moe.AUX])
    return y, aux[moe.AUX], params


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0])  # capacity routing and dropless
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_one_expert_top1_equals_the_dense_mlp(capacity_factor, activation):
    x = x_of()
    m = moe.MoeMlp(num_experts=1, experts_per_token=1, d_ff=64, capacity_factor=capacity_factor,
                   activation=activation)
    y, aux, params = apply_moe(m, x)
    dense = layers.Mlp(64, activation=activation, use_bias=False)
    weights = {name: {"kernel": nn.meta.unbox(params[name])[0]} for name in params if name != "router"}
    np.testing.assert_allclose(dense.apply({"params": weights}, x), y, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped"][0]) == 0.0 and float(aux["balance"][0]) == pytest.approx(1.0)


def test_dropless_equals_capacity_routing_when_nothing_is_dropped():
    x = x_of()
    roomy = moe.MoeMlp(num_experts=4, experts_per_token=2, d_ff=48, capacity_factor=2.0)  # C = k·T: all fit
    y_cap, aux, params = apply_moe(roomy, x)
    assert float(aux["dropped"][0]) == 0.0
    y_ragged, aux_r, _ = apply_moe(moe.MoeMlp(4, 2, 48, capacity_factor=0.0), x, params)
    np.testing.assert_allclose(y_ragged, y_cap, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux_r["load"][0], aux["load"][0])


def test_capacity_drops_overflow_and_keeps_first_choices_first():
    x = x_of((1, 32, 16), seed=3)
    m = moe.MoeMlp(num_experts=2, experts_per_token=1, d_ff=16, capacity_factor=0.5)  # C = 8 of 32 tokens
    params = m.init(jax.random.key(1), x)["params"]
    # A router that sends every token to expert 0: only its first 8 tokens are served.
    router = jnp.zeros((16, 2)).at[:, 0].set(1.0)
    x = jnp.abs(x)  # positive inputs: expert 0 wins everywhere
    params = dict(params, router=nn.meta.replace_boxed(params["router"], router))
    y, aux, _ = apply_moe(m, x, params)
    assert float(aux["dropped"][0]) == pytest.approx(24 / 32)
    norms = np.linalg.norm(np.asarray(y[0]), axis=-1)
    assert (norms[:8] > 0).all() and (norms[8:] == 0).all()
    np.testing.assert_allclose(aux["load"][0], [1.0, 0.0])
    assert float(aux["balance"][0]) > 1.0  # imbalanced: above the balanced value 1


def test_top2_gates_are_renormalised():
    x = x_of((1, 8, 16))
    m = moe.MoeMlp(num_experts=4, experts_per_token=2, d_ff=16, capacity_factor=0.0)
    params = m.init(jax.random.key(1), x)["params"]
    # Scaling every expert's output layer by 3 scales the MoE output by 3 only if the gates sum to 1
    # (and do not depend on the experts).
    y, _, _ = apply_moe(m, x, params)
    scaled = dict(params, fc_out=nn.meta.replace_boxed(params["fc_out"], nn.meta.unbox(params["fc_out"]) * 3))
    y3, _, _ = apply_moe(m, x, scaled)
    np.testing.assert_allclose(y3, 3 * y, rtol=1e-5, atol=1e-6)


def moe_gpt(**kw):
    cfg = gpt.model_config("nano")
    cfg.num_experts, cfg.experts_per_token = 4, 2
    cfg.update(kw)
    return cfg


def test_gpt_moe_counts_total_and_active_parameters():
    cfg = moe_gpt(moe_every=2)  # block_1 is MoE, block_0 dense
    abstract = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    dense = jax.eval_shape(lambda: models.build(gpt.model_config("nano")).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    d, f, e = 64, 256, 4
    mlp = d * f + f + f * d + d  # the dense MLP block_1 no longer has
    experts = e * (d * f + f * d)
    assert flops.param_count(abstract) == flops.param_count(dense) - mlp + experts + d * e
    assert flops.inactive_param_count(abstract["params"], cfg) == experts // 2  # 2 of 4 experts per token
    assert "moe" in abstract["params"]["block_1"] and "mlp" in abstract["params"]["block_0"]


def test_aux_losses_reach_the_training_loss():
    from bigmodel import tasks, train
    cfg = moe_gpt(moe_balance_weight=0.5, moe_z_weight=0.1)
    module = models.build(cfg)
    task = tasks.get("lm")
    batch = task.dummy_batch(2, 16)
    batch["inputs"] = jax.random.randint(jax.random.key(2), (2, 16), 0, 257)
    params = nn.meta.unbox(module.init(jax.random.key(0), batch["inputs"]))["params"]
    loss, (mets, _) = train._apply(module, task, params, {}, batch, jax.random.key(0), train=True)
    task_loss = mets["loss"][0] / mets["loss"][1]
    per_layer = 0.5 * mets["moe_balance"][0] + 0.1 * mets["moe_router_z"][0]
    np.testing.assert_allclose(loss, task_loss + cfg.num_layers * per_layer, rtol=1e-5)
    loads = [float(mets[f"moe_load/{i}"][0]) for i in range(4)]
    assert sum(loads) == pytest.approx(1.0) and float(mets["moe_load_max"][0]) == pytest.approx(4 * max(loads))
    # Evaluation sows nothing and adds nothing.
    eval_loss, (eval_mets, _) = train._apply(module, task, params, {}, batch, jax.random.key(0), train=False)
    assert "moe_balance" not in eval_mets and float(eval_loss) == pytest.approx(float(task_loss), rel=1e-6)


def test_scanned_moe_matches_unrolled():
    cfg = moe_gpt()
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 257)
    unrolled = models.build(cfg)
    variables = unrolled.init(jax.random.key(0), tokens)
    scanned_cfg = moe_gpt(scan_layers=True)
    stacked = {"params": dict(variables["params"])}
    blocks = [stacked["params"].pop(f"block_{i}") for i in range(cfg.num_layers)]
    stacked["params"]["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *nn.meta.unbox(blocks))
    a, aux_a = unrolled.apply(nn.meta.unbox(variables), tokens, mutable=[moe.AUX])
    b, aux_b = models.build(scanned_cfg).apply(nn.meta.unbox(stacked), tokens, mutable=[moe.AUX])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    la, ma = moe.aux_loss_and_metrics(aux_a[moe.AUX])
    lb, mb = moe.aux_loss_and_metrics(aux_b[moe.AUX])
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    np.testing.assert_allclose(ma["moe_load/0"][0], mb["moe_load/0"][0], rtol=1e-5)
