"""The `bigmodel` command: train, generate, scaling …"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from bigmodel import exit_codes, storage
from bigmodel.config import ConfigError

# Modules that add their own subcommands through `register(subparsers)`.
COMMAND_MODULES = ("bigmodel.scaling.cli", "bigmodel.launch", "bigmodel.plan", "bigmodel.scaling.sweep", "bigmodel.hf",
                   "bigmodel.seq2seq_eval", "bigmodel.bench", "bigmodel.prepare",
                   "bigmodel.eval.cli")
DEBUG_FLAG = "--debug"
DEBUG_ENV = "BIGMODEL_DEBUG"
# Errors a user causes with a wrong path, printed as one line like config errors.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(Exception):
    """A command line the parser refuses; the message names the subcommand."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, then printed by main) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        """Raise UsageError pointing at this (sub)command's --help."""
        raise UsageError(f"{self.prog}: {message}; see {self.prog} --help")


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

    config = config_lib.load(args.config, args.overrides)
    # Join the multi-process run (if any) before anything touches a JAX device.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from bigmodel import checkpoint, train

    config_lib.validate(config, jax.device_count())  # before the trainer creates the workdir
    try:
        train.train(config, args.workdir, restart=args.restart)
    except train.Preempted as e:
        print(f"bigmodel: preempted: {e}", file=sys.stderr, flush=True)
        return exit_codes.PREEMPTED
    except train.NonFiniteError as e:
        print(f"bigmodel: {e}", file=sys.stderr, flush=True)
        return exit_codes.NONFINITE
    except checkpoint.CheckpointError as e:
        print(f"bigmodel: checkpoint error: {e}", file=sys.stderr, flush=True)
        return exit_codes.CHECKPOINT
    return exit_codes.OK


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a workdir's latest checkpoint."""
    import json

    from bigmodel import generate

    if not 0 < args.top_p <= 1:
        raise UsageError(f"bigmodel generate: --top_p {args.top_p} must be in (0, 1] (1 keeps every id); "
                         "see bigmodel generate --help")
    prompts = args.prompt or [""]
    texts = generate.generate_texts(
        args.workdir, prompts, max_tokens=args.max_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, stop=args.stop or (), seed=args.seed, step=args.step,
        cache=not args.no_cache,
    )
    if len(texts) == 1:
        print(texts[0])
    else:  # one JSON object per prompt, in order
        for prompt, text in zip(prompts, texts):
            print(json.dumps({"prompt": prompt, "text": text}))
    return exit_codes.OK


def _at_least_zero(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type: `kind` (int or float) refusing negative and non-finite values."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {noun} >= 0, got {text!r}") from None
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"expects {noun} >= 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _refuse_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """No numeric option of the command takes a negative value: plain int/float options refuse one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _refuse_negative_numbers(sub)
        elif action.type in (int, float):
            action.type = _at_least_zero(action.type)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = Parser(prog="bigmodel", description=__doc__)
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of an error (anywhere on the line; or set {DEBUG_ENV}=1)")
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
    p.add_argument("--prompt", action="append", default=None,
                   help="repeat for a batch (decoded together; printed as one JSON line each)")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", "--top-k", type=int, default=40, help="0 samples from the whole vocabulary")
    p.add_argument("--top_p", "--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of ids holding this probability (1: all)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop before this text (repeatable); the end-of-document token always stops")
    p.add_argument("--no_cache", "--no-cache", action="store_true",
                   help="recompute the whole window for every token instead of using the key/value cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=cmd_generate)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _refuse_negative_numbers(parser)
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse a missing --config file and a --workdir that is a file, before any subcommand starts work."""
    config = getattr(args, "config", None)
    if isinstance(config, str):
        path = config.partition(":")[0] if not config.endswith(".json") else config
        if not pathlib.Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist; pass --config experiments/<name>.py[:VARIANT] "
                              "or a workdir's config.json")
    workdir = getattr(args, "workdir", None)
    if workdir is not None and storage.is_remote(workdir):
        storage.check_bucket(workdir)  # gs:// or s3://: the bucket exists and the credentials work
    elif workdir is not None and pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
        raise ConfigError(f"workdir {str(workdir)!r} is a file, not a directory; pass a directory (a new one is "
                          "created)")


def _one_line(text: str) -> str:
    """A message folded onto one line."""
    return " ".join(str(text).split())


def _run(argv: list[str]) -> int:
    """Parse and run one command; errors propagate to main."""
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    if overrides and not getattr(args, "takes_overrides", False):
        raise ConfigError(f"--config.* overrides do not apply to {args.command!r}; remove them")
    _check_paths(args)
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bigmodel` console script: every error a user can cause ends in one line on stderr."""
    from bigmodel import runtime

    runtime.configure()  # malloc and XLA:CPU settings, before JAX starts
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return _run(argv)
    except Exception as e:
        if debug:
            raise
        from bigmodel.scaling.results import ScalingDataError

        if isinstance(e, UsageError):
            message, code = str(e), exit_codes.USAGE
        elif isinstance(e, ConfigError):
            message, code = f"bigmodel: config error: {e}", exit_codes.USAGE
        elif isinstance(e, ScalingDataError):
            message, code = f"bigmodel: {e}", exit_codes.USAGE
        elif isinstance(e, PATH_ERRORS):
            what = f"{e.strerror}: {e.filename!r}" if e.filename else str(e)
            message, code = f"bigmodel: {what}; check the path", exit_codes.USAGE
        else:
            message, code = (f"bigmodel: unexpected {type(e).__name__}: {e}; rerun with {DEBUG_FLAG} (or "
                             f"{DEBUG_ENV}=1) for the traceback"), exit_codes.ERROR
        print(_one_line(message), file=sys.stderr, flush=True)
        return code
    except SystemExit as e:  # a subcommand's own one-line exit (raise SystemExit("message"))
        if isinstance(e.code, str) and not debug:
            print(_one_line(e.code), file=sys.stderr, flush=True)
            return exit_codes.ERROR
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print("bigmodel: interrupted", file=sys.stderr, flush=True)
        return exit_codes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
