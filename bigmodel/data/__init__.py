"""Data: TFDS builders and data sources fed through grain pipelines.

`build(config, shard)` returns the pipelines a task needs. Every builder returns this
process's rows of identical global batches (see pipeline.py), so runs resume on any
number of processes.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections

# task (classify: task/data.kind) -> "module:function" building its Data; imported lazily
# so a task's extra dependencies are only needed when it runs.
BUILDERS = {
    "lm": "bigmodel.data.pipeline:build",
    "mlm": "bigmodel.data.mlm:build",
    "seq2seq": "bigmodel.data.seq2seq:build",
    "classify/image": "bigmodel.data.images:build",
    "classify/text": "bigmodel.data.text_classify:build",
}


@dataclasses.dataclass
class Data:
    """The train and evaluation pipelines of a run."""

    train: grain.IterDataset  # this process's rows of each global batch, endless
    eval_batches: Callable[[], Iterator[dict]]  # a fresh, identical pass each call
    units_per_example: int = 1  # tokens per example for token tasks (throughput, FLOPs)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # baselines etc., copied to summary.json
    tokenizer: Any = None
    # config.eval.sets: more held-out sets by name, each a fresh pass per call (loss, bits/byte per set)
    eval_sets: dict[str, Callable[[], Iterator[dict]]] = dataclasses.field(default_factory=dict)


def build(config: ml_collections.ConfigDict, shard: tuple[int, int]) -> Data:
    """The Data for `config.task` (raises ConfigError for unusable data settings)."""
    key = f"classify/{config.data.kind}" if config.task == "classify" else config.task
    if key not in BUILDERS:
        raise ValueError(f"no data builder for {key!r} (config.task / config.data.kind); known: {sorted(BUILDERS)}")
    module, _, fn = BUILDERS[key].partition(":")
    return getattr(importlib.import_module(module), fn)(config, shard)
