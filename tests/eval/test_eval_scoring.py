"""bigmodel.eval: log-likelihood scoring on the mesh, task files, multiple-choice accuracy."""

import json

import jax
import numpy as np
import pytest

from bigmodel import models, sharding
from bigmodel.config import ConfigError
from bigmodel.eval import scoring, tasks
from bigmodel.models import gpt

EOD = 383


@pytest.fixture(scope="module")
def nano():
    cfg = gpt.model_config("nano")
    module = models.build(cfg)
    variables = module.init(jax.random.key(0), np.zeros((1, 16), np.int32))
    return module, variables


def make_scorer(module, data=1, batch_size=4, seq_len=16):
    mesh = sharding.make_mesh(sharding.axis_sizes(data=data))
    return scoring.Scorer(module, mesh, sharding.as_rules(sharding.DEFAULT_RULES), seq_len=seq_len,
                          batch_size=batch_size, eod_id=EOD)


def test_a_document_scores_as_the_chain_of_its_tokens(nano):
    module, variables = nano
    scorer = make_scorer(module)
    doc = [5, 17, 200, 3, 3, 90, 41, 7, 300, 12]
    whole = scorer.rolling(variables, [doc])[0]
    as_pair = scorer.loglikelihood(variables, [([], doc)])[0]
    singles = scorer.loglikelihood(variables, [(doc[:i], [doc[i]]) for i in range(len(doc))])
    assert whole.tokens == as_pair.tokens == len(doc)
    assert whole.logprob == pytest.approx(as_pair.logprob, abs=1e-4)
    assert whole.logprob == pytest.approx(sum(s.logprob for s in singles), abs=1e-4)
    assert whole.greedy == all(s.greedy for s in singles)
    assert -whole.logprob / len(doc) == pytest.approx(np.log(384), rel=0.2)  # an untrained model is near uniform


def test_long_documents_are_cut_into_windows_that_score_each_token_once(nano):
    scorer = make_scorer(nano[0], seq_len=16)
    doc = list(range(1, 41))
    rows = scorer.rolling_rows([doc])
    seq = [EOD, *doc]
    assert [int(t) for r in rows for t in r.targets[r.scored]] == doc
    for row in rows:
        assert len(row.inputs) == len(row.targets) <= 16
        start = seq.index(int(row.inputs[0])) if row.inputs[0] != EOD else 0
        assert list(row.inputs) == seq[start:start + len(row.inputs)]
        assert list(row.targets) == seq[start + 1:start + 1 + len(row.targets)]
    assert len(rows[-1].inputs) == 16  # the short last window reads back to a full one
    pairs = scorer.pair_rows([(list(range(1, 30)), [7, 8])])
    assert list(pairs[0].targets[-3:]) == [29, 7, 8] and pairs[0].scored.sum() == 2 and len(pairs[0].inputs) == 16


def test_sharded_scores_equal_a_single_device(nano):
    module, variables = nano
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 256, rng.integers(0, 30)).tolist(), rng.integers(0, 256, rng.integers(1, 6)).tolist())
                for _ in range(11)]
    one = make_scorer(module, data=1, batch_size=3).loglikelihood(variables, requests)
    eight = make_scorer(module, data=8, batch_size=8).loglikelihood(variables, requests)
    np.testing.assert_allclose([s.logprob for s in eight], [s.logprob for s in one], rtol=1e-5, atol=1e-5)
    assert [s.tokens for s in eight] == [len(c) for _, c in requests]


def test_multiple_choice_layouts(tmp_path):
    rows = [
        {"ctx": "A man sits", "endings": ["down.", "up.", "x", "y"], "label": "1"},  # HellaSwag
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0},  # PIQA
        {"question": "Sky colour?", "choices": {"text": ["red", "blue"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question": {"stem": "2+2?", "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": "2"}]},
         "answerKey": "2"},  # ARC, original layout
        {"context": "Pick", "choices": ["a", "b", "c"], "label": 2},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = tasks.read_choices(str(path))
    assert [q.label for q in got] == [1, 0, 1, 1, 2]
    assert got[0].context == "A man sits" and got[0].choices[1] == "up."
    assert got[1].context == "Question: Open a jar\nAnswer:" and got[1].choices == ["twist the lid", "eat it"]
    assert got[2].choices == ["red", "blue"] and got[3].context == "Question: 2+2?\nAnswer:"
    path.write_text(json.dumps(rows[0]) + "\n" + '{"ctx": "no endings"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        tasks.read_choices(str(path))
    path.write_text(json.dumps({"context": "c", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(ConfigError, match="label 3"):
        tasks.read_choices(str(path))


class FixedScores:
    """A scorer handing back given log-likelihoods, in request order."""

    def __init__(self, logprobs):
        self.logprobs = logprobs

    def loglikelihood(self, variables, requests, desc=""):
        assert len(requests) == len(self.logprobs)
        return [scoring.Score(lp, False, len(c)) for lp, (_, c) in zip(self.logprobs, requests)]


def test_accuracy_and_length_normalised_accuracy():
    from bigmodel.data import tokenizers

    questions = [tasks.Choice("q", ["a", "bbbbbbbbb"], 1), tasks.Choice("q", ["cc", "d"], 0)]
    # Question 1: the long right ending has the lower total (-5 < -2) but the higher per byte (-0.5 > -1).
    out = tasks.multiple_choice(tokenizers.ByteTokenizer(), FixedScores([-2.0, -5.0, -1.0, -3.0]), None, questions)
    assert out["acc"] == 0.5 and out["acc_norm"] == 1.0 and out["questions"] == 2


def test_unknown_task_and_missing_file_are_refused(nano, tmp_path):
    scorer = make_scorer(nano[0])
    from bigmodel.data import tokenizers

    for spec, match in [("hellaswag", "unknown evaluation task"), (f"mc:{tmp_path}/none.jsonl", "no such file"),
                        (f"text:{tmp_path}/none*.txt", "matches no files"), ("validation", "needs the run's data")]:
        with pytest.raises(ConfigError, match=match):
            tasks.build([spec], tokenizer=tokenizers.ByteTokenizer(), scorer=scorer)


def test_perplexity_of_text_files(nano, tmp_path):
    from bigmodel.data import tokenizers

    module, variables = nano
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n")  # 27 bytes
    (tmp_path / "b.txt").write_text("héllo")  # 6 bytes, 6 byte tokens
    built = tasks.build([f"text:{tmp_path}"], tokenizer=tokenizers.ByteTokenizer(), scorer=make_scorer(module))
    assert built[0].name == tmp_path.name
    out = tasks.run_all(built, variables)[tmp_path.name]
    assert out["documents"] == 2 and out["bytes"] == out["tokens"] == 27 + 6
    assert out["perplexity"] == pytest.approx(np.exp(out["loss"]))
    assert out["bits_per_byte"] == pytest.approx(out["loss"] / np.log(2))  # one token per byte
