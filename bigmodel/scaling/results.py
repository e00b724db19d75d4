"""Results tables: the sweep's results.csv (columns, atomic writes, rows) and the fitter's readers.

The fitter reads any CSV with columns ``params`` (N, parameters), ``tokens`` (D, training
tokens) and ``loss`` (final validation loss); ``flops`` (C) is optional and defaults to
6·N·D. Other layouts come in through an adapter such as `read_chinchilla_reference`. Every
reader returns `ScalingData` after refusing NaN, infinite, empty and non-positive values
with the row and column named.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = "results.csv"
# The sweep's table. `flops` is 6·N·D with N the active parameters counting embeddings
# (params_active = params except for a mixture of experts); `flops_with_attention` is the trainer's count.
COLUMNS = ("run", "model", "width", "depth", "params", "params_nonembed", "params_active", "tokens", "steps", "flops",
           "flops_with_attention", "learning_rate", "weight_decay", "budget_tokens", "budget_flops", "loss",
           "bits_per_byte", "wall_s", "status", "error")
REQUIRED_COLUMNS = ("params", "tokens", "loss")
OPTIONAL_COLUMNS = ("flops",)


class ScalingDataError(ValueError):
    """The results table cannot be fitted; the message names the problem and the fix."""


class NotSupported(Exception):
    """The data does not support an optional fit; the message says why."""


# --------------------------------------------------------------------------------------------
# The sweep's results.csv
# --------------------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temporary file and os.replace: readers see the old or the new text, never a part."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as CSV atomically (write_text_atomic): readers never see a partial table."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)  # formatting errors surface here, before the file is touched
    write_text_atomic(path, buffer.getvalue())


def read_rows(workdir: str | Path) -> list[dict[str, str]]:
    """The rows of DIR/results.csv as written by `bigmodel sweep`."""
    path = Path(workdir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {workdir} a sweep directory (bigmodel sweep --workdir)?")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# ScalingData: what the fits read
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScalingData:
    """One row per training run: parameters N, tokens D, compute C and final loss L."""

    params: np.ndarray  # N, float64
    tokens: np.ndarray  # D
    flops: np.ndarray  # C; 6·N·D where the table had no flops column
    loss: np.ndarray  # L
    flops_source: str = "6ND"  # 'column' or '6ND'
    source: str = "<arrays>"

    def __len__(self) -> int:
        """Number of runs."""
        return int(self.loss.shape[0])

    def subset(self, index: np.ndarray | Sequence[int]) -> ScalingData:
        """Rows selected by an index array or boolean mask."""
        index = np.asarray(index)
        return dataclasses.replace(
            self,
            params=self.params[index],
            tokens=self.tokens[index],
            flops=self.flops[index],
            loss=self.loss[index],
        )


def n_distinct(values: np.ndarray, rtol: float = 1e-6) -> int:
    """Number of distinct values up to a relative tolerance."""
    v = np.sort(np.asarray(values, float))
    if len(v) == 0:
        return 0
    return 1 + int(np.sum(np.diff(v) > rtol * np.abs(v[1:])))


def _as_float(text: str) -> float:
    """Parse one CSV cell; empty cells become NaN."""
    text = text.strip()
    if not text:
        return math.nan
    return float(text)


def _check_values(
    columns: Mapping[str, np.ndarray], source: str, row_numbers: np.ndarray | None = None
) -> None:
    """Refuse NaN, infinite and non-positive values, naming row and column."""
    problems = []
    for name, values in columns.items():
        for i in np.flatnonzero(~(np.isfinite(values) & (values > 0))):
            where = f"row {i + 1}" if row_numbers is None else (
                f"row {i + 1} (line {row_numbers[i]})")
            problems.append(f"{where}, column '{name}' = {float(values[i])!r}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ScalingDataError(
            f"{source}: every value of {', '.join(columns)} must be a finite positive number, "
            f"but found NaN, infinite, empty or non-positive values at {shown}{more}. "
            "Fix or remove those runs (a failed or unfinished run has no final loss).")


def _read_table(path: str | Path, wanted: Sequence[str], optional: Sequence[str] = (),
                hint: str = "") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read named numeric columns of a CSV; returns the columns and each row's file line."""
    path = Path(path)
    if not path.is_file():
        raise ScalingDataError(f"{path}: no such file. Pass the results CSV written by a sweep.")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ScalingDataError(
                f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; found "
                f"{', '.join(repr(h) for h in header) or 'no header'}. The fitter needs "
                f"{', '.join(wanted)}{' (' + ', '.join(optional) + ' optional)' if optional else ''}"
                f". {hint}".rstrip())
        reader.fieldnames = header
        present = [c for c in optional if c in header]
        values: dict[str, list[float]] = {c: [] for c in (*wanted, *present)}
        lines = []
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            lines.append(reader.line_num)
            row_index = len(lines)
            for c, column in values.items():
                cell = row.get(c)
                try:
                    column.append(_as_float(cell or ""))
                except ValueError:
                    raise ScalingDataError(
                        f"{path}: row {row_index} (line {reader.line_num}), column '{c}': "
                        f"{cell!r} is not a number. Write plain numbers such as 1.2e9."
                    ) from None
    if not lines:
        raise ScalingDataError(f"{path}: the table has a header but no runs.")
    columns = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    return columns, np.asarray(lines)


def from_arrays(params: Iterable[float], tokens: Iterable[float], loss: Iterable[float],
                flops: Iterable[float] | None = None, source: str = "<arrays>") -> ScalingData:
    """Validated ScalingData from arrays; flops default to 6·N·D."""
    columns = {"params": np.asarray(params, dtype=np.float64),
               "tokens": np.asarray(tokens, dtype=np.float64),
               "loss": np.asarray(loss, dtype=np.float64)}
    if flops is not None:
        columns["flops"] = np.asarray(flops, dtype=np.float64)
    return _make_data(columns, source)


def _make_data(columns: dict[str, np.ndarray], source: str,
               row_numbers: np.ndarray | None = None) -> ScalingData:
    """Check values and assemble ScalingData."""
    shapes = {c: v.shape for c, v in columns.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ScalingDataError(f"{source}: columns must be 1-D and of equal length, got {shapes}.")
    _check_values(columns, source, row_numbers)
    has_flops = "flops" in columns
    return ScalingData(
        params=columns["params"], tokens=columns["tokens"], loss=columns["loss"],
        flops=columns["flops"] if has_flops else 6.0 * columns["params"] * columns["tokens"],
        flops_source="column" if has_flops else "6ND", source=source)


def read_results(path: str | Path, params_column: str = "") -> ScalingData:
    """Read a results CSV with columns params, tokens, loss (flops optional).

    With a params_active column (mixtures of experts: the parameters one token uses) N is
    that column rather than params; `params_column` names another column to take N from
    (say params_nonembed, to count parameters without the embedding tables).
    """
    extra = (params_column,) if params_column and params_column not in REQUIRED_COLUMNS else ()
    columns, lines = _read_table(
        path, (*REQUIRED_COLUMNS, *extra), (*OPTIONAL_COLUMNS, "params_active"),
        hint="Rename the columns, or read other layouts with an adapter such as "
             "read_chinchilla_reference.")
    if params_column:
        columns["params"] = columns.pop(params_column)
        columns.pop("params_active", None)
    elif "params_active" in columns:
        columns["params"] = columns.pop("params_active")
    return _make_data(columns, str(path), lines)


def read_many(paths: Sequence[str | Path], params_column: str = "") -> ScalingData:
    """The runs of several results CSVs (say a sweep's and its held-out runs'), each read by read_results."""
    parts = [read_results(p, params_column) for p in paths]
    if len(parts) == 1:
        return parts[0]
    sources = {d.flops_source for d in parts}
    return ScalingData(
        params=np.concatenate([d.params for d in parts]), tokens=np.concatenate([d.tokens for d in parts]),
        flops=np.concatenate([d.flops for d in parts]), loss=np.concatenate([d.loss for d in parts]),
        flops_source=sources.pop() if len(sources) == 1 else "mixed", source=" + ".join(d.source for d in parts))


def read_chinchilla_reference(path: str | Path) -> ScalingData:
    """Adapter for the digitised Chinchilla Figure 4 runs ('Model Size', 'Training FLOP', 'loss')."""
    columns, lines = _read_table(path, ("Model Size", "Training FLOP", "loss"))
    _check_values(columns, str(path), lines)
    n, c = columns["Model Size"], columns["Training FLOP"]
    return _make_data({"params": n, "tokens": c / (6.0 * n), "loss": columns["loss"], "flops": c},
                      str(path), lines)


def drop_highest_loss(data: ScalingData, k: int) -> ScalingData:
    """Data without its k highest-loss runs (Hoffmann et al. drop early-divergence outliers)."""
    if k <= 0:
        return data
    keep = np.sort(np.argsort(data.loss, kind="stable")[: max(len(data) - k, 0)])
    return data.subset(keep)
