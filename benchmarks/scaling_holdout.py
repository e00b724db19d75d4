"""Does a sweep's approach-3 law predict a run it did not see? Both ways of counting parameters.

    python benchmarks/scaling_holdout.py SWEEP_DIR HOLDOUT_DIR [--bootstrap 200] [--out check.json]

SWEEP_DIR and HOLDOUT_DIR are `bigmodel sweep` workdirs (their results.csv); the held-out
runs are the finished rows of HOLDOUT_DIR. For N = all parameters (`params`, embeddings
included, what `bigmodel sweep` fits) and N = non-embedding parameters (`params_nonembed`,
Kaplan et al. 2020), the law L(N, D) = E + A/N^alpha + B/D^beta is fitted on the sweep's
finished runs (Hoffmann et al.'s 4,500 starts) with a bootstrap over runs, and each held-out
run gets its predicted loss, the 95% interval of the bootstrap replicates' predictions, the
relative error of the prediction and whether the measurement falls inside the interval.
A count whose best fit is not a law (alpha or beta <= 0) is reported as refused, with why.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.metrics import atomic_write_text
from bigmodel.scaling import laws, results

COUNTS = ("params", "params_nonembed")  # the two ways of counting N
STARTS = {"hoffmann": laws.hoffmann_grid, "small": laws.small_grid}  # approach-3 starting grids


def finished(workdir: str | Path) -> list[dict[str, str]]:
    """The finished rows of a sweep workdir's results.csv."""
    return [r for r in results.read_rows(workdir) if r["status"] == "finished"]


def data_for(rows: list[dict[str, str]], count: str) -> results.ScalingData:
    """ScalingData with N taken from the `count` column."""
    return results.from_arrays([float(r[count]) for r in rows], [float(r["tokens"]) for r in rows],
                               [float(r["loss"]) for r in rows], source=f"results.csv ({count})")


def check(sweep_rows: list[dict[str, str]], held_rows: list[dict[str, str]], count: str,
          n_bootstrap: int, starts: str = "hoffmann", seed: int = 0) -> dict[str, Any]:
    """Fit on the sweep with N = `count`, then predict every held-out run with a bootstrap interval.

    A sweep whose best fit is not a law (alpha or beta <= 0) gets {'refused': why} instead.
    """
    data = data_for(sweep_rows, count)
    try:
        fit = laws.fit_approach3(data, starts=STARTS[starts]())
    except results.ScalingDataError as e:
        return {"refused": str(e)}
    boot = laws.bootstrap_approach3(data, fit, n_bootstrap, seed)
    s = boot.samples
    residuals = laws.approach3_residuals(data, fit)
    out: dict[str, Any] = {
        "law": {k: getattr(fit, k) for k in laws.APPROACH3_PARAMS},
        "ci95": boot.ci95(),
        "bootstrap": {"n_resamples": n_bootstrap, "n_failed": boot.n_failed, "seed": seed},
        "rms_log_residual": float(np.sqrt(np.mean(residuals**2))),
        "held_out": [],
    }
    for r in held_rows:
        n, d, measured = float(r[count]), float(r["tokens"]), float(r["loss"])
        predicted = float(fit.predict(n, d))
        replicates = s["E"] + s["A"] / n ** s["alpha"] + s["B"] / d ** s["beta"]
        # No interval when no resample gave a law (too few runs): nothing is inside it.
        low, high = (float(q) for q in np.percentile(replicates, [2.5, 97.5])) if len(replicates) else (np.nan,) * 2
        out["held_out"].append({
            "run": r["run"], "N": n, "tokens": d, "flops": float(r["flops"]),
            "measured": measured, "predicted": predicted, "interval95": [low, high],
            "relative_error": (measured - predicted) / predicted, "inside": low <= measured <= high,
        })
    return out


def main() -> None:
    """Fit both ways, check the held-out runs, print (and write) the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("holdout_dir")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples [default: %(default)s]")
    p.add_argument("--starts", choices=sorted(STARTS), default="hoffmann",
                   help="approach-3 starts: Hoffmann et al.'s 4,500 or 32 corners of them [default: %(default)s]")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args()
    sweep_rows, held_rows = finished(args.sweep_dir), finished(args.holdout_dir)
    if not held_rows:
        raise SystemExit(f"{args.holdout_dir}/results.csv has no finished run; run the held-out sweep first")
    sweep_flops = max(float(r["flops"]) for r in sweep_rows)
    report = {"sweep_runs": len(sweep_rows), "sweep_max_flops": sweep_flops,
              "held_out_compute_ratio": [float(r["flops"]) / sweep_flops for r in held_rows],
              **{count: check(sweep_rows, held_rows, count, args.bootstrap, args.starts) for count in COUNTS}}
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text, end="")


if __name__ == "__main__":
    main()
