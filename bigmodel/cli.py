"""The `bigmodel` command: train, generate, scaling …"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from bigmodel.config import ConfigError

# Modules that add their own subcommands through `register(subparsers)`.
COMMAND_MODULES = ("bigmodel.scaling.cli",)


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
    from bigmodel import config as config_lib, train

    config = config_lib.load(args.config, args.overrides)
    train.train(config, args.workdir)
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
    p.set_defaults(func=cmd_train)

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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        args.overrides = overrides
        if overrides and args.command != "train":
            raise ConfigError(f"--config.* overrides only apply to 'train', not {args.command!r}")
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"bigmodel: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
