"""`bigmodel eval`: score a trained language model on evaluation tasks; JSON written next to the run.

    bigmodel eval --workdir runs/gpt_tiny --tasks validation text:notes/ mc:hellaswag.jsonl

Perplexity and bits per byte of text, multiple-choice accuracy (see bigmodel.eval.tasks for the
formats); with --harness, lm-evaluation-harness tasks through the adapter in bigmodel.eval.harness.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any


def validation_fn(model: Any) -> Callable[[Any], dict[str, float]]:
    """The run's own evaluation over its held-out split (config.eval.num_batches batches)."""
    import jax

    from bigmodel import data as data_lib, sharding, train

    run = model.run
    data = data_lib.build(model.config, shard=sharding.process_batch_shard(run.mesh))
    step = jax.jit(train.make_eval_step(run.module, run.task), out_shardings=sharding.replicated(run.mesh))

    def evaluate(state: Any) -> dict[str, float]:
        with run.context():
            return train.evaluate(step, state, data.eval_batches(), run.mesh)

    return evaluate


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate the latest (or --step) checkpoint of a run on --tasks and --harness tasks."""
    from etils import epath

    from bigmodel import config as config_lib
    from bigmodel.eval import scoring, tasks

    if not epath.Path(args.workdir).is_dir():  # a wrong path is the first thing to hear about
        raise config_lib.ConfigError(f"workdir {args.workdir!r} does not exist; pass a training run's directory")
    scoring.run_config(args.workdir)  # then a directory that is not a training run's
    if not args.tasks and not args.harness:
        raise config_lib.ConfigError("name at least one task: --tasks validation text:PATH mc:PATH, or --harness "
                                     "NAME for lm-evaluation-harness tasks")
    start = time.time()
    model = scoring.load(args.workdir, overrides=args.overrides, step=args.step, batch_size=args.batch_size)
    validation = validation_fn(model) if "validation" in args.tasks else None
    built = tasks.build(args.tasks, tokenizer=model.tokenizer, scorer=model.scorer, validation=validation)
    results = tasks.run_all(built, model.variables, model.state)
    if args.harness:
        from bigmodel.eval import harness

        results.update(harness.evaluate(model, args.harness, include_path=args.harness_include, limit=args.limit))
    out = scoring.write_results(args.workdir, model.step, results, {
        "checkpoint": model.checkpoint_dir, "specs": list(args.tasks), "harness": list(args.harness),
        "wall_s": time.time() - start})
    import jax

    if jax.process_index() == 0:
        print(json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {out}", file=sys.stderr, flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand."""
    p = sub.add_parser("eval", help="evaluate a language model run: perplexity, bits/byte, multiple choice, "
                                    "lm-evaluation-harness tasks; --config.KEY=VALUE overrides the saved config")
    p.add_argument("--workdir", required=True, help="a training run's directory")
    p.add_argument("--tasks", nargs="*", default=[],
                   help="validation | text:FILE_DIR_OR_GLOB | mc:FILE.jsonl (HellaSwag, PIQA or ARC layout)")
    p.add_argument("--harness", nargs="*", default=[], help="lm-evaluation-harness task names (pip install "
                                                            "'bigmodel[eval]')")
    p.add_argument("--harness_include", "--harness-include", default=None,
                   help="a directory of extra lm-evaluation-harness task YAML files")
    p.add_argument("--limit", type=int, default=None, help="harness tasks: at most this many examples each")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=0,
                   help="rows per scoring batch (default: config.eval.batch_size)")
    p.set_defaults(func=cmd_eval, takes_overrides=True)
