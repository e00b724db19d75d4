"""lm-evaluation-harness adapter: a bigmodel checkpoint as an `lm_eval` model named 'bigmodel'.

    bigmodel eval --workdir runs/gpt_tiny --harness hellaswag arc_easy [--harness_include my_tasks/]

or from Python, with any task definition lm_eval knows:

    import lm_eval
    from bigmodel.eval import harness
    lm_eval.simple_evaluate(model=harness.BigmodelLM(workdir="runs/gpt_tiny"), tasks=["piqa"])

Needs `pip install 'bigmodel[eval]'`. Log-likelihoods come from bigmodel.eval.scoring (batched,
sharded over the run's mesh); generation decodes greedily from the run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra is not installed
    raise ImportError("the lm-evaluation-harness adapter needs lm_eval: pip install 'bigmodel[eval]'") from e

from bigmodel.eval import scoring


@register_model("bigmodel")
class BigmodelLM(LM):
    """A trained bigmodel language model (its latest or a given checkpoint) for lm_eval."""

    def __init__(self, workdir: str = "", step: int | str | None = None, batch_size: int | str = 0,
                 max_gen_toks: int | str = 256, model: scoring.Model | None = None, **_: Any) -> None:
        super().__init__()
        if model is None:
            if not workdir:
                raise ValueError("pass model_args='workdir=RUN_DIR' (a bigmodel training run)")
            model = scoring.load(workdir, step=int(step) if step not in (None, "") else None,
                                 batch_size=int(batch_size or 0))
        self.model, self.max_gen_toks = model, int(max_gen_toks)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields it) per request."""
        pairs = [scoring.encode_pair(self.model.tokenizer, *r.args[:2]) for r in requests]
        scores = self.model.scorer.loglikelihood(self.model.variables, pairs, "loglikelihood")
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """log P(text) of each whole text, every token predicted once with the fullest context the window allows."""
        docs = [self.model.tokenizer.encode(r.args[0]).tolist() for r in requests]
        scores = self.model.scorer.rolling(self.model.variables, docs, "loglikelihood_rolling")
        return [s.logprob for s in scores]

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuations, cut before the first of each request's `until` strings."""
        from bigmodel import generate

        config, tokenizer = self.model.config, self.model.tokenizer
        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = generate.sample(self.model.module, self.model.variables,
                                  [tokenizer.eod_id] + tokenizer.encode(context).tolist(),
                                  max_len=scoring.window(config), max_tokens=int(kwargs.get("max_gen_toks",
                                                                                            self.max_gen_toks)),
                                  temperature=0.0, top_k=0, vocab_limit=tokenizer.vocab_size,
                                  stop_id=tokenizer.eod_id, seed=0)
            text = tokenizer.decode(ids)
            cut = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
            out.append(text[:cut])
        return out


def evaluate(model: scoring.Model, tasks: Sequence[str], *, include_path: str | None = None,
             limit: int | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate over `tasks` (extra task YAML under include_path)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bigmodel.config import ConfigError

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-evaluation-harness knows no task {unknown[0]!r}; check the name (lm_eval --tasks list) "
                          "or pass --harness_include DIR holding its YAML")
    results = lm_eval.simple_evaluate(model=BigmodelLM(model=model), tasks=list(tasks), task_manager=manager,
                                      limit=limit, log_samples=False)
    return {name: {k.replace(",none", ""): v for k, v in mets.items() if isinstance(v, (int, float))}
            for name, mets in results["results"].items()}
