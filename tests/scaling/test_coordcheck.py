"""muP: activation sizes stay flat across widths after training steps; standard ones grow."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigmodel import config as config_lib, sharding, train
from bigmodel.scaling import coordcheck

from conftest import GPT_TINY


@pytest.fixture
def base(tiny_overrides):
    return config_lib.load(GPT_TINY + ":tiny", tiny_overrides + [
        "optim.learning_rate=3e-2", "optim.warmup_steps=0", "model.mup_base_width=32", "data.seq_len=32"])


@pytest.mark.slow  # trains every width twice
def test_mup_is_flat_and_standard_grows(base):
    widths = [32, 128]
    sp = coordcheck.run(base, widths, steps=3, head_dim=8, mup=False)
    mup = coordcheck.run(base, widths, steps=3, head_dim=8, mup=True)
    # At initialisation the two agree at the base width except for muP's zero query/readout.
    assert sp[32][0]["embedding"] == pytest.approx(mup[32][0]["embedding"])
    # After 3 Adam steps at a learning rate tuned for width 32, the standard
    # parameterisation's hidden activations grow several-fold with 4x the width ...
    assert max(coordcheck.spread(sp, layer) for layer in ("block_0", "block_1")) > 4.0
    # ... while muP's stay within 1.6x (justification: the embedding lookup alone already
    # varies by ~1.05x across widths from sampling, and 3 steps of Adam move every
    # coordinate by O(lr) independent of width under muP).
    for layer in ("block_0", "block_1", "logits"):
        assert coordcheck.spread(mup, layer) < 1.6, layer


def test_mup_learning_rates_per_group(base):
    config = coordcheck.width_config(base, 128, 8, mup=True)
    assert config.model.num_heads == 16 and config.optim.grad_clip == 0.0
    _mesh, _rules, module, task, tx, _ = train.setup_model(config, sharding.axis_sizes(data=8))
    abstract = jax.eval_shape(train.init_fn(module, task, tx, task.dummy_batch(8, 32)), jax.random.key(0))
    labels = train.mup_labels(abstract.params)
    assert labels["block_0"]["mlp"]["fc_in"]["kernel"].value == "hidden"
    assert labels["block_0"]["attn"]["query_kernel"].value == "hidden"
    assert labels["wte"]["embedding"].value == "other" and labels["lm_head"]["kernel"].value == "other"
    assert labels["block_0"]["mlp"]["fc_in"]["bias"].value == "other"
    # One Adam step from zero moments moves hidden weights by lr/width_mult, others by lr.
    shapes = nn.meta.unbox(abstract.params)
    grads = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), shapes)
    params = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), shapes)
    tx2, _ = train.make_optimizer(config.optim, 10, width_mult=128 / 32)
    updates, _ = tx2.update(grads, tx2.init(params), params)
    lr = 3e-2  # no warmup: step 0 runs at the peak learning rate
    np.testing.assert_allclose(np.abs(updates["block_0"]["mlp"]["fc_in"]["kernel"]).max(), lr / 4, rtol=1e-3)
    np.testing.assert_allclose(np.abs(updates["wte"]["embedding"]).max(), lr, rtol=1e-3)


def test_mup_refuses_tied_embeddings(base):
    config = coordcheck.width_config(base, 64, 8, mup=True)
    config.model.tie_embeddings = True
    with pytest.raises(config_lib.ConfigError, match="config.model.mup needs config.model.tie_embeddings=False"):
        train.setup_model(config, sharding.axis_sizes(data=8))
