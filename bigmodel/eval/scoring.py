"""Log-likelihoods of token sequences under a trained causal language model, sharded over the mesh.

Every request becomes rows of one fixed shape [batch, seq_len] (one compilation): a context
and a continuation are packed right-aligned into the window, the context cut from the left
when it does not fit; a whole document is cut into consecutive windows, each predicting
seq_len new tokens from the tokens before it. Rows are split over the mesh's batch axes like
training batches, the parameters keep the run's sharding.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from bigmodel import checkpoint, config as config_lib, sharding, tasks as tasks_lib, train
from bigmodel.data import pipeline, tokenizers


@dataclasses.dataclass
class Row:
    """One window: the model reads `inputs`, is scored on `targets` where `scored` is set."""

    request: int  # index of the request the row belongs to
    inputs: np.ndarray  # [n <= seq_len] int
    targets: np.ndarray  # [n] int
    scored: np.ndarray  # [n] bool


@dataclasses.dataclass
class Score:
    """The summed log-likelihood of a request's scored tokens."""

    logprob: float  # natural log
    greedy: bool  # every scored token is the model's argmax
    tokens: int  # scored tokens


class Scorer:
    """Scores token sequences with `module` on `mesh` (variables passed per call, so training can reuse it)."""

    def __init__(self, module: nn.Module, mesh: jax.sharding.Mesh, rules: Any, *, seq_len: int, batch_size: int,
                 eod_id: int, progress: bool = False) -> None:
        self.mesh, self.rules, self.seq_len, self.eod_id, self.progress = mesh, rules, seq_len, eod_id, progress
        parallel = self.data_parallel
        self.batch_size = -(-batch_size // parallel) * parallel  # rows split evenly over the batch axes

        def forward(variables: Any, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = module.apply(variables, inputs, train=False).astype(jnp.float32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
            return logp, tasks_lib.is_argmax(logits, targets)

        self._forward = jax.jit(forward, out_shardings=sharding.replicated(mesh))

    @property
    def data_parallel(self) -> int:
        """Devices the rows of a batch are split over."""
        return int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))

    def pair_rows(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Row]:
        """One row per (context, continuation): the continuation scored after the end-of-document id and context."""
        rows = []
        for i, (context, continuation) in enumerate(requests):
            if not 0 < len(continuation) <= self.seq_len:
                raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens; it must hold 1 to "
                                 f"{self.seq_len} (the model's window)")
            seq = np.asarray([self.eod_id, *context, *continuation], np.int32)[-(self.seq_len + 1):]
            scored = np.zeros(len(seq) - 1, bool)
            scored[-len(continuation):] = True
            rows.append(Row(i, seq[:-1], seq[1:], scored))
        return rows

    def rolling_rows(self, documents: Sequence[Sequence[int]]) -> list[Row]:
        """Rows scoring every token of each document (after the end-of-document id), seq_len new tokens a row."""
        rows = []
        for i, doc in enumerate(documents):
            seq = np.asarray([self.eod_id, *doc], np.int32)
            for start in range(1, len(seq), self.seq_len):  # `start` is the first target of the window
                end = min(start + self.seq_len, len(seq))
                first = max(end - 1 - self.seq_len, 0)  # a short last window reads back into the tokens before
                scored = np.arange(first + 1, end) >= start
                rows.append(Row(i, seq[first:end - 1], seq[first + 1:end], scored))
        return rows

    def score(self, variables: Any, rows: Sequence[Row], count: int, desc: str = "") -> list[Score]:
        """Sum the rows' scored log-likelihoods into `count` requests."""
        logprob, greedy, tokens = np.zeros(count), np.ones(count, bool), np.zeros(count, np.int64)
        index, processes = sharding.process_batch_shard(self.mesh)
        local = slice(index * self.batch_size // processes, (index + 1) * self.batch_size // processes)
        starts = range(0, len(rows), self.batch_size)
        lead = jax.process_index() == 0
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for start in tqdm.tqdm(starts, desc=desc, unit="batch", disable=not (self.progress and lead),
                                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0):
                chunk = rows[start:start + self.batch_size]
                inputs = np.zeros((self.batch_size, self.seq_len), np.int32)
                targets = np.zeros_like(inputs)
                for r, row in enumerate(chunk):
                    inputs[r, :len(row.inputs)], targets[r, :len(row.targets)] = row.inputs, row.targets
                batch = sharding.global_batch({"inputs": inputs[local], "targets": targets[local]}, self.mesh)
                logp, top = jax.device_get(self._forward(variables, batch["inputs"], batch["targets"]))
                for r, row in enumerate(chunk):
                    n = len(row.targets)
                    logprob[row.request] += float(logp[r, :n][row.scored].sum())
                    greedy[row.request] &= bool(top[r, :n][row.scored].all())
                    tokens[row.request] += int(row.scored.sum())
        return [Score(float(lp), bool(g), int(t)) for lp, g, t in zip(logprob, greedy, tokens)]

    def loglikelihood(self, variables: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      desc: str = "") -> list[Score]:
        """Log-likelihood of each continuation given its context."""
        return self.score(variables, self.pair_rows(requests), len(requests), desc)

    def rolling(self, variables: Any, documents: Sequence[Sequence[int]], desc: str = "") -> list[Score]:
        """Log-likelihood of each whole document."""
        return self.score(variables, self.rolling_rows(documents), len(documents), desc)


def encode_pair(tokenizer: tokenizers.Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split where the context's own encoding ends.

    The pair is encoded as one text (as the model saw text in training); spaces ending the
    context move to the continuation first, where a word-level vocabulary keeps them.
    """
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    head = tokenizer.encode(context).tolist() if context else []
    whole = tokenizer.encode(context + continuation).tolist()
    if whole[:len(head)] != head or len(whole) == len(head):  # the encodings disagree at the seam
        return head, tokenizer.encode(continuation).tolist()
    return head, whole[len(head):]


@dataclasses.dataclass
class Model:
    """A trained run ready to score: its config, step, variables on the mesh, tokenizer and scorer."""

    config: ml_collections.ConfigDict
    step: int
    checkpoint_dir: str
    module: nn.Module
    variables: Any
    tokenizer: tokenizers.Tokenizer
    scorer: Scorer
    run: train.Prepared
    state: train.TrainState


def window(config: ml_collections.ConfigDict) -> int:
    """Tokens the model reads at once: the training sequence length (within the position table)."""
    max_len = config.model.max_len if "max_len" in config.model else config.data.seq_len
    return min(int(config.data.seq_len), int(max_len))


def run_config(workdir: str) -> pathlib.Path:
    """WORKDIR/config.json, refused with a one-line error when the workdir is not a training run's."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise config_lib.ConfigError(f"{workdir} has no config.json; pass the --workdir of a bigmodel training run")
    return path


def load(workdir: str, *, overrides: Sequence[str] = (), step: int | None = None, batch_size: int = 0,
         progress: bool = True) -> Model:
    """A language model's checkpoint (latest by default) restored onto the run's mesh over this machine's devices.

    `overrides` ('mesh.tensor=2' ...) change the saved config first, as for training.
    """
    config = config_lib.load(str(run_config(workdir)), overrides)
    if config.task != "lm":
        raise config_lib.ConfigError(f"bigmodel eval scores language models; {workdir} trained task "
                                     f"{config.task!r}")
    mesh = train.run_mesh(config)
    run = train.prepare(config, mesh, steps=False)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise config_lib.ConfigError(f"{workdir}/checkpoints holds no checkpoint yet; train the run first")
        state = ckpt.restore(step, run.abstract_state(), None)
        where = str(ckpt.step_dir(step))
    finally:
        ckpt.close()
    tokenizer = tokenizers.load(workdir)
    if tokenizer is None:  # a workdir written before runs kept their tokenizer
        tokenizer = pipeline.make_tokenizer(config.data, pipeline.text_source(config.data))
    scorer = Scorer(run.module, mesh, run.rules, seq_len=window(config),
                    batch_size=batch_size or config.eval.batch_size, eod_id=tokenizer.eod_id, progress=progress)
    variables = {"params": state.params, **state.model_state}
    return Model(config, step, where, run.module, variables, tokenizer, scorer, run, state)


def write_results(workdir: str | pathlib.Path, step: int, results: dict[str, Any], extra: dict | None = None
                  ) -> pathlib.Path:
    """WORKDIR/eval/step_STEP.json (written atomically): {'step', 'tasks': {name: metrics}, ...extra}."""
    from bigmodel import metrics

    out = pathlib.Path(workdir) / "eval" / f"step_{step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"step": step, "tasks": results, **(extra or {})}
    metrics.atomic_write_text(out, json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    return out
