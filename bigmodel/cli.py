"""The `bigmodel` command: train, generate, scaling …"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from bigmodel.config import ConfigError

# Exit codes besides 0 (done), 2 (config error) and 75 (preempted, checkpoint saved: rerun).
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 74  # EX_IOERR

# Modules that add their own subcommands through `register(subparsers)`.
COMMAND_MODULES = ("bigmodel.scaling.cli", "bigmodel.launch", "bigmodel.plan", "bigmodel.scaling.sweep", "bigmodel.hf",
                   "bigmodel.seq2seq_eval", "bigmodel.bench")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate '--config.KEY=VALUE' / '--config.KEY VALUE' overrides from other arguments."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
                body = f"{body}={value}"
            overrides.append(body)
        else:
            rest.append(arg)
    return rest, overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train or resume a run."""
    from bigmodel import config as config_lib, distributed

    # Join the multi-process run (if any) before anything touches a JAX device.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from bigmodel import checkpoint, train

    config = config_lib.load(args.config, args.overrides)
    try:
        train.train(config, args.workdir, restart=args.restart)
    except train.Preempted as e:
        print(f"bigmodel: preempted: {e}", file=sys.stderr, flush=True)
        return train.PREEMPTED_EXIT_CODE
    except train.NonFiniteError as e:
        print(f"bigmodel: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except checkpoint.CheckpointError as e:
        print(f"bigmodel: checkpoint error: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a workdir's latest checkpoint."""
    from bigmodel import generate

    text = generate.generate_from_workdir(
        args.workdir, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
        top_k=args.top_k, seed=args.seed, step=args.step,
    )
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="bigmodel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run; --config.KEY=VALUE overrides any config value")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:VARIANT]")
    p.add_argument("--workdir", required=True, help="run directory; an existing one is resumed")
    p.add_argument("--coordinator", default=None,
                   help="host:port of process 0 (default: from Slurm, Kubernetes, TPU or BIGMODEL_* variables)")
    p.add_argument("--num_processes", "--num-processes", type=int, default=None, help="processes in the run")
    p.add_argument("--process_id", "--process-id", type=int, default=None, help="this process's index")
    p.add_argument("--restart", action="store_true",
                   help="start over: move the workdir's checkpoints and logs to WORKDIR/previous-TIME/ first")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("generate", help="sample from the latest checkpoint of a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", "--top-k", type=int, default=40, help="0 samples from the whole vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=cmd_generate)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bigmodel` console script."""
    from bigmodel import runtime

    runtime.configure()  # malloc and XLA:CPU settings, before JAX starts
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        args.overrides = overrides
        if overrides and not getattr(args, "takes_overrides", False):
            raise ConfigError(f"--config.* overrides do not apply to {args.command!r}")
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"bigmodel: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
