"""Training FLOPs per step: hand counts per family, the matmuls JAX traces, XLA's cost analysis."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.extend import core as jax_core

from bigmodel import cli, config as config_lib, flops, models, sharding, tasks, train
from bigmodel.models import bert, gpt, resnet, rnn, transformer, vit

from conftest import GPT_TINY, REPO

B = 3  # examples per batch in the hand counts


def tokens(batch: int, length: int) -> jax.Array:
    return jnp.ones((batch, length), jnp.int32)


def images(batch: int, side: int, channels: int) -> jax.Array:
    return jnp.ones((batch, side, side, channels), jnp.float32)


def abstract_variables(cfg, inputs: tuple) -> dict:
    module = models.build(cfg)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, train=False))


def abstract_params(cfg, inputs: tuple) -> dict:
    return abstract_variables(cfg, inputs)["params"]


def gradient(cfg, inputs: tuple):
    """(d loss / d params, abstract params, the other variables) of a model's forward pass (BatchNorm statistics
    fixed: the same convolutions as in training)."""
    module, variables = models.build(cfg), dict(abstract_variables(cfg, inputs))
    params = variables.pop("params")

    def loss(p, rest):
        return jnp.mean(jax.nn.log_softmax(module.apply({"params": p, **rest}, *inputs, train=False))[..., 0])

    return jax.grad(loss), params, variables


def step_flops(cfg, batch: dict) -> float:
    inputs = (batch["inputs"], batch["decoder_inputs"]) if "decoder_inputs" in batch else (batch["inputs"],)
    return flops.train_flops_per_step(cfg, batch, abstract_params(cfg, inputs))


# --------------------------------------------------------------------------- configurations


def gpt_cfg(**changes):
    cfg = gpt.model_config("nano")
    cfg.update(dict(num_layers=2, d_model=16, num_heads=2, vocab_size=40, max_len=8, attention_impl="einsum",
                    norm_impl="flax", activation_impl="xla"))
    cfg.update(changes)
    return cfg


def bert_cfg(head="mlm"):
    cfg = bert.model_config("tiny")
    cfg.update(dict(num_layers=2, d_model=16, num_heads=2, d_ff=64, vocab_size=40, head=head, num_classes=5,
                    attention_impl="einsum"))
    return cfg


def transformer_cfg():
    cfg = transformer.model_config("tiny")
    cfg.update(dict(num_layers=2, d_model=16, num_heads=2, d_ff=64, vocab_size=40, max_len=16,
                    attention_impl="einsum"))
    return cfg


def vit_cfg(pool="token"):
    cfg = vit.model_config("tiny")
    cfg.update(dict(image_size=8, patch_size=4, num_channels=3, d_model=16, num_layers=2, num_heads=2, d_ff=64,
                    num_classes=5, pool=pool, attention_impl="einsum"))
    return cfg


def resnet_basic_cfg():
    cfg = resnet.model_config("tiny")  # basic blocks, stages (1, 1, 1), width 16, the 3×3 stem
    cfg.num_classes = 10
    return cfg


def resnet_bottleneck_cfg():
    cfg = resnet.model_config("50")  # the 7×7/2 stem and a 3×3/2 max-pool
    cfg.update(dict(stage_sizes=(1, 1), width=4, num_classes=10))
    return cfg


def rnn_cfg(cell="lstm", head="lm"):
    cfg = rnn.model_config("small")
    cfg.update(dict(cell=cell, head=head, num_layers=2, d_model=8, hidden=16, vocab_size=40, num_classes=5))
    return cfg


# --------------------------------------------------------------------------- hand counts


def test_gpt_keeps_its_published_count():
    cfg, t, d, v, L = gpt_cfg(), 8, 16, 40, 2
    # Non-embedding parameters: per layer q, k, v, out (4·D² + 4·D), MLP (8·D² + 5·D) and two
    # LayerNorms (4·D); the final LayerNorm (2·D). The tied head adds V·D.
    nonembed = L * (12 * d * d + 13 * d) + 2 * d
    per_token = 6 * (nonembed + v * d) + 12 * L * t * d
    assert step_flops(cfg, {"inputs": tokens(B, t)}) == B * t * per_token


def test_gpt_mixture_of_experts_counts_active_experts():
    cfg, t, d, v, L = gpt_cfg(num_experts=4, experts_per_token=2, d_ff=32), 8, 16, 40, 2
    # The dense MLP (8·D² + 5·D at F = 4·D) becomes a router (D·4) and 4 experts of 2·D·32
    # weights each, of which a token uses 2.
    active = L * (4 * d * d + 4 * d + 4 * d + d * 4 + 2 * (2 * d * 32)) + 2 * d
    assert step_flops(cfg, {"inputs": tokens(B, t)}) == B * t * (6 * (active + v * d) + 12 * L * t * d)


def test_gpt_count_inside_the_trainers_mesh_and_rules():
    # The trainer counts inside its mesh and logical axis rules, where unboxing the abstract
    # parameters would apply sharding constraints to them.
    cfg, batch = gpt_cfg(), {"inputs": tokens(B, 8)}
    params = abstract_params(cfg, (batch["inputs"],))
    rules = sharding.as_rules(config_lib.load(GPT_TINY + ":tiny").sharding.rules)
    with jax.set_mesh(sharding.make_mesh(sharding.axis_sizes(data=8))), nn.logical_axis_rules(rules):
        inside = flops.train_flops_per_step(cfg, batch, params)
    assert inside == flops.train_flops_per_step(cfg, batch, params) > 0


@pytest.mark.parametrize("head", ["mlm", "classify"])
def test_bert(head):
    t, d, f, v = 8, 16, 64, 40
    layer = 3 * 2 * d * d + 2 * d * d + 2 * 2 * d * f + 2 * 2 * t * d  # q k v, out, MLP, QK^T and AV
    if head == "mlm":
        forward = t * (2 * layer + 2 * d * d + 2 * d * v)  # transform and output layer at every position
    else:
        forward = t * 2 * layer + 2 * d * d + 2 * d * 5  # pooler and classifier on [CLS]
    assert step_flops(bert_cfg(head), {"inputs": tokens(B, t)}) == 3 * B * forward


def test_encoder_decoder_transformer():
    s, t, d, f, v = 12, 6, 16, 64, 40
    encoder = s * (4 * 2 * d * d + 2 * 2 * d * f + 2 * 2 * s * d)
    decoder = (t * (4 * 2 * d * d + 2 * 2 * t * d)  # causal self-attention over all t keys
               + t * 2 * 2 * d * d + s * 2 * 2 * d * d + t * 2 * 2 * s * d  # cross: q and out; k and v of the source
               + t * 2 * 2 * d * f)
    forward = 2 * encoder + 2 * decoder + t * 2 * d * v
    batch = {"inputs": tokens(B, s), "decoder_inputs": tokens(B, t), "targets": tokens(B, t)}
    assert step_flops(transformer_cfg(), batch) == 3 * B * forward


@pytest.mark.parametrize("pool", ["token", "map", "gap"])
def test_vit(pool):
    d, f = 16, 64
    patches = (8 // 4) ** 2
    t = patches + (pool == "token")
    forward = patches * 2 * 4 * 4 * 3 * d + 2 * t * (4 * 2 * d * d + 2 * 2 * d * f + 2 * 2 * t * d) + 2 * d * 5
    if pool == "map":
        forward += 2 * 2 * d * d + t * 2 * 2 * d * d + 2 * 2 * t * d + 2 * 2 * d * f  # one probe query
    assert step_flops(vit_cfg(pool), {"inputs": images(B, 8, 3)}) == 3 * B * forward


def test_resnet_basic_blocks():
    forward = (2 * 9 * 1 * 16 * 8 * 8  # stem 3×3, 1 -> 16 channels at 8×8
               + 2 * (2 * 9 * 16 * 16 * 8 * 8)  # stage 1: two 3×3 at 8×8
               + 2 * 9 * 16 * 32 * 4 * 4 + 2 * 9 * 32 * 32 * 4 * 4 + 2 * 16 * 32 * 4 * 4  # stage 2 at 4×4, projection
               + 2 * 9 * 32 * 64 * 2 * 2 + 2 * 9 * 64 * 64 * 2 * 2 + 2 * 32 * 64 * 2 * 2  # stage 3 at 2×2
               + 2 * 64 * 10)
    assert step_flops(resnet_basic_cfg(), {"inputs": images(B, 8, 1)}) == 3 * B * forward


def test_resnet_bottleneck_blocks_and_imagenet_stem():
    forward = (2 * 49 * 3 * 4 * 16 * 16  # 7×7/2 stem at 16×16, then the max-pool to 8×8
               + 2 * 4 * 4 * 64 + 2 * 9 * 4 * 4 * 64 + 2 * 4 * 16 * 64 + 2 * 4 * 16 * 64  # stage 1 at 8×8
               # stage 2: the first 1×1 at 8×8, the rest at 4×4
               + 2 * 16 * 8 * 64 + 2 * 9 * 8 * 8 * 16 + 2 * 8 * 32 * 16 + 2 * 16 * 32 * 16
               + 2 * 32 * 10)
    assert step_flops(resnet_bottleneck_cfg(), {"inputs": images(B, 32, 3)}) == 3 * B * forward


def test_small_cnn():
    cfg = resnet.cnn_model_config("mnist")  # 3×3 convs of 32 and 64 channels, each pooled 2×2; dense 256
    forward = 2 * 9 * 1 * 32 * 28 * 28 + 2 * 9 * 32 * 64 * 14 * 14 + 2 * (7 * 7 * 64) * 256 + 2 * 256 * 10
    assert step_flops(cfg, {"inputs": images(B, 28, 1)}) == 3 * B * forward


@pytest.mark.parametrize("cell, gates", [("lstm", 4), ("gru", 3)])
@pytest.mark.parametrize("head", ["lm", "classify"])
def test_rnn(cell, gates, head):
    t, d, h = 10, 8, 16
    recurrent = t * (2 * gates * h * (d + h) + 2 * gates * h * (h + h))  # two layers: input and state products
    forward = recurrent + (t * 2 * h * 40 if head == "lm" else 2 * h * 5)
    assert step_flops(rnn_cfg(cell, head), {"inputs": tokens(B, t)}) == 3 * B * forward


def test_unknown_family_is_refused():
    cfg = rnn_cfg()
    cfg.name = "mamba"
    with pytest.raises(ValueError, match="no FLOP count for model family 'mamba'"):
        flops.train_flops_per_step(cfg, {"inputs": tokens(1, 4)}, {})


def test_the_trainer_reports_the_count_for_the_whole_batch_under_accumulation(tmp_path):
    # cnn_digits:tiny: 8×8 digits, 3×3 convs of 32 and 64 channels each pooled 2×2, dense 256, 10 classes.
    forward = 2 * 9 * 1 * 32 * 8 * 8 + 2 * 9 * 32 * 64 * 4 * 4 + 2 * (2 * 2 * 64) * 256 + 2 * 256 * 10
    args = ["train", "--config", str(REPO / "experiments" / "cnn_digits.py") + ":tiny", "--workdir", str(tmp_path),
            "--config.log.progress=false", "--config.train.steps=2", "--config.train.grad_accum=2",
            "--config.eval.num_batches=1"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["flops"] == 2 * 16 * 3 * forward  # 2 steps of 16 images, in microbatches of 8


# --------------------------------------------------------------------------- the matmuls JAX traces


def traced_matmul_flops(jaxpr: jax_core.Jaxpr) -> float:
    """2 × the multiply-adds of every matmul and convolution in a jaxpr, a scan's body times its length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
        elif eqn.primitive.name == "conv_general_dilated":
            kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            taps = math.prod(kernel[i] for i in spec[2:]) * kernel[spec[1]]
            # An input gradient convolves a cotangent dilated by the stride: one tap in
            # prod(lhs_dilation) meets a value, the rest meet inserted zeros.
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * taps / math.prod(eqn.params["lhs_dilation"])
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += repeat * sum(traced_matmul_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
    return total


def gradient_matmul_flops(cfg, inputs: tuple) -> float:
    grad, params, rest = gradient(cfg, inputs)
    return traced_matmul_flops(jax.make_jaxpr(grad)(params, rest).jaxpr)


# What the gradient computes of the analytic count (scans included: the RNN's time loop).
# Images: the first layer's input gradient is counted by convention but not computed.
TRACED = {
    "bert mlm": (bert_cfg, (tokens(B, 8),), 0),
    "bert classify": (lambda: bert_cfg("classify"), (tokens(B, 8),), 0),
    "transformer": (transformer_cfg, (tokens(B, 12), tokens(B, 6)), 0),
    "vit map": (lambda: vit_cfg("map"), (images(B, 8, 3),), 4 * 2 * 4 * 4 * 3 * 16),
    "resnet basic": (resnet_basic_cfg, (images(B, 8, 1),), 2 * 9 * 1 * 16 * 8 * 8),
    "resnet bottleneck": (resnet_bottleneck_cfg, (images(B, 32, 3),), 2 * 49 * 3 * 4 * 16 * 16),
    "cnn": (lambda: resnet.cnn_model_config("mnist"), (images(B, 28, 1),), 2 * 9 * 1 * 32 * 28 * 28),
    "lstm lm": (rnn_cfg, (tokens(B, 10),), 0),
    "gru classify": (lambda: rnn_cfg("gru", "classify"), (tokens(B, 10),), 0),
}


@pytest.mark.parametrize("name", TRACED)
def test_count_equals_the_traced_matmuls(name):
    make_cfg, inputs, first_layer_forward = TRACED[name]
    cfg = make_cfg()
    batch = {"inputs": inputs[0], **({"decoder_inputs": inputs[1]} if len(inputs) > 1 else {})}
    expected = step_flops(cfg, batch) - B * first_layer_forward
    assert gradient_matmul_flops(cfg, inputs) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scan_layers, grad_accum", [(False, 1), (True, 1), (True, 2)])
def test_gpt_train_step_matmuls_do_not_depend_on_scan_or_accumulation(scan_layers, grad_accum):
    batch_size, t, d, L = 4, 8, 16, 2
    cfg = gpt_cfg(scan_layers=scan_layers)
    module, task, tx = models.build(cfg), tasks.get("lm"), optax.sgd(0.1)
    batch = task.dummy_batch(batch_size, t)
    micro = {k: v[: batch_size // grad_accum] for k, v in batch.items()}
    state = jax.eval_shape(train.init_fn(module, task, tx, micro), jax.random.key(0))
    step = train.make_train_step(module, task, tx, lambda _: 0.1, grad_accum)
    with jax.set_mesh(sharding.make_mesh(sharding.axis_sizes(data=1))):
        traced = traced_matmul_flops(jax.make_jaxpr(step)(nn.meta.unbox(state), batch, jax.random.key(1)).jaxpr)
    # 6·N counts biases and LayerNorm parameters (13·D per layer, 2·D final) as if they were
    # weights; the position table's gradient is one matvec over the batch (2·D per token).
    difference = batch_size * t * (6 * (L * 13 * d + 2 * d) - 2 * d)
    assert traced == flops.train_flops_per_step(cfg, batch, state.params) - difference


# --------------------------------------------------------------------------- XLA's cost analysis
#
# Trustworthy where nothing is a custom call or a scan (the RNN's time loop is one, so the
# RNN is checked against the traced matmuls only): XLA then counts every matmul, plus the
# element-wise work this count leaves out (norms, activations, softmax, residual adds, the
# loss): measured +1.3% to +2.2% for the configurations below. It cannot count fewer FLOPs
# than the matmuls, so the ratio must lie in [1, 1.05]; a missing or extra matmul of more
# than a few percent of the step falls outside.


def xla_gradient_flops(cfg, inputs: tuple) -> float:
    grad, params, rest = gradient(cfg, inputs)
    return jax.jit(grad).lower(params, rest).compile().cost_analysis()["flops"]


def wider(cfg, **changes):
    cfg.update(dict(d_model=128, num_heads=4))
    cfg.update(changes)
    return cfg


XLA_CASES = {
    "gpt": (lambda: wider(gpt_cfg(max_len=64, vocab_size=384)), (tokens(4, 64),)),  # one causal block: T <= 64
    # BERT's exact GELU costs XLA ~30 FLOPs per element (erf as a polynomial): +4.3% at D = 128.
    "bert mlm": (lambda: wider(bert_cfg(), d_model=256, d_ff=1024, vocab_size=384), (tokens(4, 64),)),
    "bert classify": (lambda: wider(bert_cfg("classify"), d_model=256, d_ff=1024), (tokens(4, 64),)),
    "transformer": (lambda: wider(transformer_cfg(), d_ff=512, max_len=64, vocab_size=384),
                    (tokens(4, 48), tokens(4, 40))),
    "vit token": (lambda: wider(vit_cfg(), d_ff=512, image_size=32), (images(4, 32, 3),)),
    "vit map": (lambda: wider(vit_cfg("map"), d_ff=512, image_size=32), (images(4, 32, 3),)),
}


@pytest.mark.parametrize("name", XLA_CASES)
def test_count_agrees_with_xla_cost_analysis(name):
    make_cfg, inputs = XLA_CASES[name]
    cfg = make_cfg()
    batch = {"inputs": inputs[0], **({"decoder_inputs": inputs[1]} if len(inputs) > 1 else {})}
    expected = step_flops(cfg, batch)
    if cfg.name == "vit":  # the patch embedding's input gradient (the images') is not computed
        expected -= 4 * (32 // 4) ** 2 * 2 * 4 * 4 * 3 * 128
    assert 1.0 <= xla_gradient_flops(cfg, inputs) / expected <= 1.05


def test_convolutions_agree_with_xla_cost_analysis():
    # XLA counts only the taps that fall on real pixels: a 3×3 'SAME' convolution over h×w has
    # (3h - 2)(3w - 2) of them per channel pair, not 9·h·w. The first layer's input gradient
    # is not computed. ReLU, pooling and the loss add well under 5%.
    cfg = resnet.cnn_model_config("mnist")
    first = 2 * 1 * 32 * (3 * 28 - 2) ** 2
    rest = 2 * 32 * 64 * (3 * 14 - 2) ** 2 + 2 * (7 * 7 * 64) * 256 + 2 * 256 * 10
    expected = 4 * (2 * first + 3 * rest)
    assert 1.0 <= xla_gradient_flops(cfg, (images(4, 28, 1),)) / expected <= 1.05
