"""Evaluation tasks named on the command line or in config.eval.tasks.

  validation    the run's own held-out split (the trainer's evaluation, over the whole split)
  text:PATH     perplexity and bits per byte of text files (a file, a directory or a glob), each
                file one document scored whole
  mc:PATH       multiple choice from a local jsonl file in the HellaSwag, PIQA or ARC layout (or
                {"context", "choices", "label"}): each ending scored by its log-likelihood after
                the context; acc picks the highest, acc_norm the highest per character of the ending
                (lm-evaluation-harness's definitions, so the figures compare with published ones)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bigmodel.config import ConfigError
from bigmodel.eval import scoring

KINDS = ("validation", "text:PATH", "mc:PATH")


@dataclasses.dataclass
class Choice:
    """One multiple-choice question."""

    context: str
    choices: list[str]  # each scored as the continuation " " + choice
    label: int


def _label(value: Any, labels: Sequence[str] | None = None) -> int:
    """A gold answer as an index: an int, a digit string, or one of `labels` ('A'..'D', '1'..'4')."""
    if labels is not None and str(value) in [str(x) for x in labels]:
        return [str(x) for x in labels].index(str(value))
    return int(value)


def parse_choice(row: dict) -> Choice:
    """One jsonl row in the HellaSwag, PIQA, ARC or plain layout."""
    if "endings" in row:  # HellaSwag
        context = row.get("ctx") or f"{row['ctx_a']} {row['ctx_b']}".strip()
        return Choice(context, list(row["endings"]), _label(row["label"]))
    if "goal" in row:  # PIQA
        return Choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], _label(row["label"]))
    if "answerKey" in row:  # ARC: the Hugging Face layout, or the original one with question.stem
        question = row["question"]
        if isinstance(question, dict):
            texts = [c["text"] for c in question["choices"]]
            labels = [c["label"] for c in question["choices"]]
            question = question["stem"]
        else:
            texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
        return Choice(f"Question: {question}\nAnswer:", texts, _label(row["answerKey"], labels))
    return Choice(row["context"], list(row["choices"]), _label(row["label"]))


def read_choices(path: str) -> list[Choice]:
    """Every question of a jsonl file; a malformed line is a ConfigError naming the line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse_choice(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{path} line {n} is not a multiple-choice question ({type(e).__name__}: {e}); "
                                  "each line needs HellaSwag (ctx, endings, label), PIQA (goal, sol1, sol2, label), "
                                  "ARC (question, choices, answerKey) or context, choices, label") from None
            if not 0 <= item.label < len(item.choices):
                raise ConfigError(f"{path} line {n}: label {item.label} is not one of the {len(item.choices)} "
                                  "choices; fix the label")
            out.append(item)
    if not out:
        raise ConfigError(f"{path} holds no questions; pass a jsonl file with one question per line")
    return out


def multiple_choice(tokenizer: Any, scorer: scoring.Scorer, variables: Any, questions: Sequence[Choice],
                    desc: str = "") -> dict[str, float]:
    """acc and acc_norm (per character of the ending) of log-likelihood choice; ties go to the first choice."""
    requests = [scoring.encode_pair(tokenizer, item.context, " " + choice) for item in questions
                for choice in item.choices]
    scores = scorer.loglikelihood(variables, requests, desc)
    correct = correct_norm = 0
    start = 0
    for item in questions:
        n = len(item.choices)
        logp = np.asarray([s.logprob for s in scores[start:start + n]])
        size = np.asarray([max(len(c), 1) for c in item.choices])
        correct += int(np.argmax(logp)) == item.label
        correct_norm += int(np.argmax(logp / size)) == item.label
        start += n
    count = len(questions)
    return {"acc": correct / count, "acc_norm": correct_norm / count, "questions": count,
            "acc_stderr": math.sqrt(correct / count * (1 - correct / count) / max(count - 1, 1))}


def text_documents(pattern: str) -> list[str]:
    """Files of a file path, directory (recursively) or glob, sorted."""
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise ConfigError(f"text:{pattern} matches no files; give a text file, a directory or a glob")
    return files


def perplexity(tokenizer: Any, scorer: scoring.Scorer, variables: Any, texts: Sequence[str],
               desc: str = "") -> dict[str, float]:
    """Per-token loss and perplexity, and bits per UTF-8 byte, of whole documents."""
    docs = [tokenizer.encode(t).tolist() for t in texts]
    kept = [d for d in docs if d]
    scores = scorer.rolling(variables, kept, desc)
    nats = -sum(s.logprob for s in scores)
    tokens = sum(s.tokens for s in scores)
    size = sum(len(t.encode("utf-8")) for t in texts)
    return {"loss": nats / max(tokens, 1), "perplexity": math.exp(nats / max(tokens, 1)),
            "bits_per_byte": nats / math.log(2) / max(size, 1), "tokens": tokens, "bytes": size,
            "documents": len(kept)}


@dataclasses.dataclass
class Task:
    """A named evaluation: run(model pieces, variables) -> metrics."""

    spec: str
    name: str
    run: Callable[[Any, Any], dict[str, float]]  # (variables, state or None) -> metrics


def build(specs: Sequence[str], *, tokenizer: Any, scorer: scoring.Scorer,
          validation: Callable[[Any], dict[str, float]] | None = None) -> list[Task]:
    """Tasks for `specs`, their files read once; `validation(state)` evaluates the run's own held-out split."""
    out, names = [], set()
    for spec in specs:
        kind, _, path = spec.partition(":")
        if kind == "validation" and not path:
            if validation is None:
                raise ConfigError("the 'validation' task needs the run's data; it is not available here")
            name, fn = "validation", lambda variables, state, v=validation: v(state)
        elif kind == "text" and path:
            files = text_documents(path)
            texts = [pathlib.Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
            name = pathlib.Path(path.split("*", 1)[0].rstrip("/") or path).stem or "text"
            fn = lambda variables, state, texts=texts, name=name: perplexity(tokenizer, scorer, variables, texts, name)
        elif kind == "mc" and path:
            if not os.path.isfile(path):
                raise ConfigError(f"mc:{path}: no such file; pass a jsonl file of multiple-choice questions")
            questions = read_choices(path)
            name = pathlib.Path(path).stem
            fn = lambda variables, state, q=questions, name=name: multiple_choice(tokenizer, scorer, variables, q,
                                                                                  name)
        else:
            raise ConfigError(f"unknown evaluation task {spec!r}; use {', '.join(KINDS)}")
        if name in names:
            raise ConfigError(f"two evaluation tasks are named {name!r}; rename one of the files")
        names.add(name)
        out.append(Task(spec, name, fn))
    return out


def run_all(tasks: Sequence[Task], variables: Any, state: Any = None) -> dict[str, dict[str, float]]:
    """{task name: metrics} for every task."""
    return {t.name: t.run(variables, state) for t in tasks}


def flat(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'NAME_METRIC': value} of a results dict (for metrics.jsonl rows)."""
    return {f"{name}_{k}": float(v) for name, mets in results.items() for k, v in mets.items()}
