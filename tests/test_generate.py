"""Key/value-cache decoding against the recompute path, batches, sampling filters, stop sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import cli, exit_codes, generate, models
from bigmodel.models import gpt

VOCAB = 300  # ids the tokenizer could emit; the model's table has 384


def make(size: str, **fields):
    """A small GPT and random parameters whose logits are far from uniform (clear argmax gaps)."""
    cfg = gpt.model_config(size)
    for key, value in fields.items():
        cfg[key] = value
    module = models.build(cfg)
    params = module.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 4.0, params)  # sharper than the 0.02 initialisation
    return module, {"params": params}


FAMILIES = {
    "gpt": dict(size="nano"),  # learned positions, multi-head (stacked q/k/v projection)
    "llama_gqa": dict(size="llama_nano"),  # RoPE, RMSNorm, SwiGLU, 4 query heads over 2 kv heads
    "gpt_scan_mqa": dict(size="nano", scan_layers=True, num_kv_heads=1),  # nn.scan over layers, one kv head
}


@pytest.mark.slow  # compiles the model's prefill, decode loop and forward
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_match_the_full_forward(family):
    spec = dict(FAMILIES[family])
    module, variables = make(spec.pop("size"), **spec)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, VOCAB)
    full = module.apply(variables, tokens)
    cache = generate.init_cache(module, 2, 12)
    steps = []
    logits, mutated = module.apply({**variables, "cache": cache}, tokens[:, :5], decode=True, mutable=["cache"],
                                   positions=jnp.broadcast_to(jnp.arange(5), (2, 5)))
    steps.append(logits)
    for t in range(5, 12):
        logits, mutated = module.apply({**variables, **mutated}, tokens[:, t:t + 1], decode=True, mutable=["cache"],
                                       positions=jnp.full((2, 1), t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-4, rtol=1e-4)


@pytest.mark.slow  # compiles the model's prefill, decode loop and forward
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_equals_the_recompute_path(family):
    spec = dict(FAMILIES[family])
    module, variables = make(spec.pop("size"), **spec)
    prompt = [256, 10, 20, 30, 40, 50]
    settings = dict(max_len=64, max_tokens=40, temperature=0.0, top_k=0, vocab_limit=VOCAB, seed=0)
    reference = generate.sample(module, variables, prompt, stop_id=None, **settings)
    cached = generate.decode(module, variables, [prompt], **settings)[0]
    assert len(reference) == 40 and len(set(reference)) > 3  # a real continuation, not one repeated id
    assert cached == reference
    # Sampling draws token i with the same key on both paths, so it agrees as well.
    settings.update(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    sampled = generate.decode(module, variables, [prompt], **settings)[0]
    assert sampled == generate.sample(module, variables, prompt, stop_id=None, **settings)
    assert sampled != cached


@pytest.mark.slow  # compiles the model's prefill, decode loop and forward
@pytest.mark.parametrize("family", ["gpt", "llama_gqa"])
def test_a_batch_of_prompts_decodes_as_each_alone(family):
    spec = dict(FAMILIES[family])
    module, variables = make(spec.pop("size"), **spec)
    prompts = [[256, 5, 6, 7, 8, 9, 10, 11, 12], [256], [256, 100, 200, 33]]  # left-padded to 9 in the batch
    settings = dict(max_len=64, max_tokens=20, temperature=0.0, vocab_limit=VOCAB)
    batch = generate.decode(module, variables, prompts, **settings)
    alone = [generate.decode(module, variables, [p], **settings)[0] for p in prompts]
    assert batch == alone
    assert batch[0] == generate.sample(module, variables, prompts[0], top_k=0, stop_id=None, seed=0, **settings)
    assert len({tuple(row) for row in batch}) == 3


@pytest.mark.slow  # compiles the model's prefill, decode loop and forward
def test_stop_sequences_cut_before_their_first_occurrence():
    module, variables = make("nano")
    settings = dict(max_len=64, max_tokens=30, temperature=0.0, vocab_limit=VOCAB)
    prompts = [[256, 1, 2, 3], [256, 9]]
    free = generate.decode(module, variables, prompts, **settings)
    pair, single = free[0][6:8], [free[1][4]]
    cut = generate.decode(module, variables, prompts, stops=[pair, single], **settings)
    for row, ids in zip(cut, free):
        ends = [j for j in range(len(ids)) if ids[j:j + 2] == pair or ids[j:j + 1] == single]
        assert row == ids[:min(ends)]
    assert len(cut[0]) <= 6 and len(cut[1]) <= 4


@pytest.mark.slow  # compiles the model's prefill, decode loop and forward
def test_decoding_past_the_window_restarts_from_its_last_half():
    module, variables = make("nano")
    prompt = [256, 4, 5, 6]
    settings = dict(max_len=16, temperature=0.0, vocab_limit=VOCAB)
    long = generate.decode(module, variables, [prompt], max_tokens=40, **settings)[0]
    assert len(long) == 40
    # Within the window: the recompute path's tokens.
    assert long[:12] == generate.sample(module, variables, prompt, max_tokens=12, top_k=0, stop_id=None, seed=0,
                                        **settings)
    # The next segment starts a fresh cache from the last 8 tokens.
    again = generate.decode(module, variables, [(prompt + long)[8:16]], max_tokens=8, **settings)[0]
    assert long[12:20] == again


def probabilities(logits: jnp.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(logits))


P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


@pytest.mark.parametrize("options, expected", [
    (dict(), P),
    (dict(top_k=3), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
    (dict(top_p=0.6), [5 / 7, 2 / 7, 0, 0, 0]),  # 0.5 < 0.6, so the second id is needed too
    (dict(top_p=0.5), [1, 0, 0, 0, 0]),  # the first id already holds 0.5
    (dict(top_p=0.7, top_k=3), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),  # top-p of the top-k distribution
    (dict(temperature=2.0), np.sqrt(P) / np.sqrt(P).sum()),
    (dict(temperature=0.5), P**2 / (P**2).sum()),
    (dict(vocab_limit=4), [0.5 / 0.95, 0.2 / 0.95, 0.15 / 0.95, 0.1 / 0.95, 0]),
])
def test_filtered_distribution(options, expected):
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, vocab_limit=5) | options
    filtered = generate.filter_logits(jnp.log(jnp.asarray(P)), **settings)
    np.testing.assert_allclose(probabilities(filtered), expected, atol=1e-6)


def test_pick_draws_from_the_filtered_distribution():
    logits = jnp.log(jnp.asarray(P))[None]
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: generate.pick(logits, k, temperature=1.0, top_k=4, top_p=0.8, vocab_limit=5))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=5) / 20000
    # top-k 4 leaves [0.5, 0.2, 0.15, 0.1] / 0.95; top-p 0.8 then keeps the first three.
    expected = np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85
    np.testing.assert_allclose(freq, expected, atol=0.015)
    greedy = generate.pick(jnp.asarray([[0.0, 3.0, 9.0, 1.0]]), keys[0], temperature=0.0, top_k=0, top_p=1.0,
                           vocab_limit=2)
    assert greedy.tolist() == [1]  # ids at or past vocab_limit are never chosen


def test_left_pad_marks_padding_at_position_minus_one():
    tokens, positions = generate.left_pad([[7, 8, 9], [5], [1, 2, 3, 4, 6]], 4)
    assert tokens.tolist() == [[0, 7, 8, 9], [0, 0, 0, 5], [2, 3, 4, 6]]
    assert positions.tolist() == [[-1, 0, 1, 2], [-1, -1, -1, 0], [0, 1, 2, 3]]


def test_cli_refuses_top_p_outside_0_1(capsys):
    assert cli.main(["generate", "--workdir", "nowhere", "--top_p", "1.5"]) == exit_codes.USAGE
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--top_p 1.5 must be in (0, 1]" in err
