"""`bigmodel scaling ...` commands.

    bigmodel scaling fit RESULTS.csv --out OUTDIR [--budgets 1e18,1e20] [--bootstrap N] [--seed S]

writes OUTDIR/fit.json and PNG plots and prints a summary table.

    bigmodel scaling fit RESULTS.csv --out OUTDIR --holdout largest:3

fits on the runs the rule leaves in and reports, for each held-out run, the predicted loss with its
bootstrap interval against the measured one (holdout.py).

    bigmodel scaling predict FIT.json --params N --tokens D | --flops C [--json]

predicts from a saved fit (predict.py).

    bigmodel scaling report SWEEP_DIR [--no-fit]

prints the runs of a sweep (finished, running with progress, failed with the error, planned)
and its current fit, and writes SWEEP_DIR/report.html, the same on one self-contained page with the
fits' intervals, the hold-out check and the plots (page.py); it works while the sweep is still
running. Further subcommands hang off the same `scaling` parser: add a function like `_add_fit`
and call it from `register`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from bigmodel.scaling import fit as fitlib, holdout, output, powerlaws, results


def parse_budgets(text: str) -> list[float]:
    """Comma-separated positive FLOP budgets, e.g. '1e20,1e21'."""
    budgets = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"budget {item!r} is not a number; write budgets like 1e20,3e21") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"budget {item!r} must be a positive FLOP count")
        budgets.append(value)
    if not budgets:
        raise argparse.ArgumentTypeError("no budgets given; write budgets like 1e20,3e21")
    return budgets


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `scaling` command (with its subcommands) to a `bigmodel` sub-parser set."""
    scaling = subparsers.add_parser(
        "scaling", help="fit and read scaling laws",
        description="Scaling-law tools: fit laws to a sweep's results.csv, draw the plots.")
    commands = scaling.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND",
                                      required=True)
    _add_fit(commands)
    _add_report(commands)
    _add_predict(commands)
    _add_coordcheck(commands)
    return scaling


def _run_coordcheck(args: argparse.Namespace) -> int:
    from bigmodel.scaling import coordcheck  # imports JAX: only when this command runs

    return coordcheck.cmd_coordcheck(args)


def _add_coordcheck(commands: argparse._SubParsersAction) -> None:
    """`bigmodel scaling coordcheck`: muP activation sizes against width."""
    p = commands.add_parser("coordcheck", help="muP coordinate check: activation size against width")
    p.add_argument("--config", required=True, help="a GPT experiment, e.g. experiments/gpt_tiny.py:tiny")
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--head_dim", "--head-dim", type=int, default=16)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_run_coordcheck, takes_overrides=True)


def _add_fit(commands: argparse._SubParsersAction) -> None:
    """The `scaling fit` subcommand."""
    p = commands.add_parser(
        "fit", help="fit Chinchilla/Kaplan laws to a results CSV",
        description="Fit Chinchilla approaches 1-3 and Kaplan power laws to a results CSV with "
                    "columns params, tokens, loss (flops optional, else 6*N*D). Writes "
                    "OUTDIR/fit.json and PNG plots, and prints a summary.")
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS.csv",
                   help="one row per training run; the rows of several files are fitted together "
                        "(say a sweep's results.csv and its held-out runs', with --holdout largest:K)")
    p.add_argument("--out", type=Path, required=True, metavar="OUTDIR",
                   help="directory for fit.json and the plots (created if missing)")
    p.add_argument("--params-column", default="", metavar="COLUMN",
                   help="take N from this column, e.g. params_nonembed to count parameters without the "
                        "embedding tables [default: params_active where present, else params]")
    p.add_argument("--budgets", type=parse_budgets, default=None, metavar="C1,C2,...",
                   help="FLOP budgets (6*N*D) for compute-optimal predictions "
                        "[default: 1x, 10x, 100x, 1000x the largest run, rounded to a power of 10]")
    p.add_argument("--bootstrap", type=_non_negative_int, default=100, metavar="N",
                   help="bootstrap resamples for approach-3 intervals; 0 for none [default: %(default)s]")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed [default: %(default)s]")
    p.add_argument("--starts", choices=sorted(fitlib.STARTS), default="hoffmann",
                   help="approach-3 initialisations: Hoffmann et al.'s 4,500-point grid, or 32 "
                        "corners of it for a quick look [default: %(default)s]")
    p.add_argument("--flops-rtol", type=_positive_float, default=powerlaws.DEFAULT_FLOPS_RTOL,
                   metavar="R", help="runs whose flops differ by at most this fraction share an "
                                     "isoFLOP budget [default: %(default)s]")
    p.add_argument("--no-plots", action="store_true", help="write fit.json only")
    p.add_argument("--holdout", type=_holdout_rule, default=None, metavar="RULE", help=holdout.RULE_HELP)
    p.set_defaults(func=run_fit)


def _holdout_rule(text: str) -> holdout.HoldoutRule:
    """argparse type: a hold-out rule."""
    try:
        return holdout.parse_rule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_predict(commands: argparse._SubParsersAction) -> None:
    """The `scaling predict` subcommand."""
    p = commands.add_parser(
        "predict", help="loss of a model, or the compute-optimal model of a budget, from a fit.json",
        description="Predict from the approach-3 law of a fit.json: the loss of N parameters trained on D tokens "
                    "(--params and --tokens), or the compute-optimal N, D and loss of a 6ND FLOP budget "
                    "(--flops), with 95%% bootstrap intervals. Refuses a degenerate or failed fit.")
    p.add_argument("fit", type=Path, metavar="FIT.json", help="written by `bigmodel scaling fit` or a sweep")
    p.add_argument("--params", type=_positive_float, metavar="N", help="parameters (with --tokens)")
    p.add_argument("--tokens", type=_positive_float, metavar="D", help="training tokens (with --params)")
    p.add_argument("--flops", type=_positive_float, metavar="C", help="a 6ND FLOP budget to allocate")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Run `bigmodel scaling predict`."""
    import json

    from bigmodel.scaling import predict

    fit = predict.load_fit(args.fit)  # first: a wrong path is the first thing to hear about
    point = args.params is not None or args.tokens is not None
    if point == (args.flops is not None) or (point and (args.params is None or args.tokens is None)):
        raise SystemExit("bigmodel scaling predict: error: give either --params N --tokens D, or --flops C")
    result = (predict.predict_point(fit, args.params, args.tokens) if point
              else predict.predict_budget(fit, args.flops))
    print(json.dumps(output._jsonable(result), indent=2) if args.json else predict.format_prediction(result))
    return 0


def _add_report(commands: argparse._SubParsersAction) -> None:
    """The `scaling report` subcommand."""
    p = commands.add_parser(
        "report", help="table of a sweep's runs and its current fit (also while it runs)",
        description="Print every run of a sweep directory (finished, running with its step and ETA, "
                    "failed with its error, planned) from results.csv and the runs' metrics.jsonl, "
                    "then the scaling fit of the finished runs.")
    p.add_argument("workdir", type=Path, metavar="SWEEP_DIR", help="the --workdir of `bigmodel sweep`")
    p.add_argument("--no-fit", action="store_true", help="the table only")
    p.add_argument("--no-html", action="store_true",
                   help="do not write SWEEP_DIR/report.html (one self-contained page: runs, fits with intervals, "
                        "hold-out check, families, the plots embedded)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Run `bigmodel scaling report`."""
    from bigmodel.scaling import report

    try:
        print(report.format_report(args.workdir, fit=not args.no_fit, html=not args.no_html))
    except FileNotFoundError as e:
        raise SystemExit(f"bigmodel scaling report: error: {e}") from None
    return 0


def run_fit(args: argparse.Namespace) -> int:
    """Run `bigmodel scaling fit`; bad input exits with a one-line error."""
    t0 = time.perf_counter()
    try:
        data = results.read_many(args.results, args.params_column)
        held = None
        if args.holdout is not None:
            data, held = holdout.split(data, args.holdout)
            print(f"holding out {len(held)} runs ({args.holdout})", file=sys.stderr)
        print(f"fitting {len(data)} runs from {data.source} ...", file=sys.stderr)
        report = fitlib.fit_all(
            data, budgets=args.budgets, n_bootstrap=args.bootstrap, seed=args.seed,
            starts=fitlib.STARTS[args.starts](), flops_rtol=args.flops_rtol, progress=True)
        if held is not None:
            report.holdout = holdout.check(report, held, args.holdout)
    except results.ScalingDataError as e:
        raise SystemExit(f"bigmodel scaling fit: error: {e}") from None
    result = output.write_fit(report, args.out, plots=not args.no_plots, started=t0)
    print(output.format_report(report))
    print(f"\nwrote {args.out / output.FIT_JSON} ({result['wall_time_s']:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: python -m bigmodel.scaling.cli fit RESULTS.csv --out OUTDIR."""
    parser = argparse.ArgumentParser(prog="bigmodel")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["scaling", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
