"""Scaling sweeps: plan model sizes × data, run each point as an ordinary training run, fit.

    bigmodel sweep --config experiments/scaling/gpt_stdlib.py[:tiny] --workdir DIR
                   [--parallel P] [--emit slurm|k8s] [--only INDEX|RUN] [--dry-run]
                   [--config.KEY=VALUE ...]

A sweep config is a `get_config(arg)` file with three groups:

* ``base``: a complete training config (the groups of experiments/gpt_tiny.py). Every run
  starts from it.
* ``sweep``: the plan. ``mode='grid'`` crosses the width ladder with the token budgets
  ``tokens``; ``mode='isoflop'`` takes compute budgets ``flops`` and, for each budget C and
  each size N, trains on D = C / (6 N) tokens, rounded to whole steps. N counts every
  parameter, embeddings included (Hoffmann et al. 2022), so results.csv's ``flops`` column
  is exactly 6·N·D. For a mixture of experts N is the active count ``params_active`` (the
  parameters one token uses: k of the E experts), in the budgets, the flops and the fits.
* ``families``: optional overlays that put more model families on the same ladder, e.g.
  ``families.lstm.base.model = rnn.model_config('tiny')`` and
  ``families.lstm.sweep.num_layers = 2``. ``base.model`` is replaced whole; every other key
  is merged into ``base`` / ``sweep`` and must already exist there.

Size rules (all in ``sweep``):

* width ladder ``widths``; depth ``num_layers``, or when that is 0,
  ``max(1, round(width / aspect_ratio))``; GPT heads ``width // head_dim``; an RNN's
  embedding and recurrent widths both equal the width.
* learning rate ``base.optim.learning_rate * (base_width / width) ** lr_exponent``
  (lr ∝ 1/width for Adam, as in μP, with ``lr_exponent = 1``; 0 keeps one rate, which is
  what a GPT with ``model.mup=True`` needs: the trainer then scales the hidden rates itself).
* warmup ``round(warmup_fraction * steps)`` (at least 1), or ``base.optim.warmup_steps``
  when the fraction is 0. The batch size is the base's for every run, so a run's tokens
  are ``steps * batch_size * seq_len``, and the cosine schedule of every run ends at its
  own last step.
* ``run_overrides``: ``'PATTERN:key=value'`` strings applied to runs whose id matches the
  shell pattern, e.g. ``'gpt_w512_*:train.grad_accum=2'``.

Each run lives in ``DIR/runs/<id>/`` with ``run_config.py`` (its resolved config, so
``bigmodel train --config DIR/runs/<id>/run_config.py --workdir DIR/runs/<id>`` repeats it
exactly), the trainer's usual outputs and ``stdout.log`` / ``stderr.log``. Rerunning the
sweep skips finished runs, resumes interrupted ones from their checkpoints and retries
failed ones. ``DIR/results.csv`` (one row per planned run, replaced atomically on every
state change) is the table the fitter reads; at the end ``DIR/fit/`` gets fit.json and the
plots. ``--emit slurm|k8s`` writes a job array / indexed Job that runs ``--only INDEX``
per task instead of running anything here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import fnmatch
import json
import math
import os
import pprint
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from bigmodel import config as config_lib, exit_codes
from bigmodel.config import ConfigError
from bigmodel.scaling import report

POLL_S = 0.5  # how often the local runner looks at its child processes
ERROR_LINES = 3  # stderr lines kept as a failed run's error
STOP_TIMEOUT_S = 300  # how long a stopped run may take to write its checkpoint
PREEMPTED_EXIT_CODE = exit_codes.PREEMPTED  # `bigmodel train` after saving on SIGTERM; the sweep uses it alike
LADDER_FIELDS = {  # model family -> the fields a (width, depth) point sets
    "gpt": ("d_model", "num_heads", "num_layers"),
    "rnn": ("d_model", "hidden", "num_layers"),
}


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass(eq=False)  # runs compare by identity
class Run:
    """One planned training run."""

    index: int  # position in the plan; what `--only` and array task ids refer to
    id: str
    family: str  # label in sweep.families (the `model` column)
    width: int
    depth: int
    steps: int
    tokens: int  # steps * batch_size * seq_len
    params: int  # N with embeddings
    params_nonembed: int
    params_active: int  # N a token uses: params unless a mixture of experts (then k of E experts)
    learning_rate: float
    budget_tokens: float | None  # grid: the requested token budget
    budget_flops: float | None  # isoflop: the requested compute budget C
    config: ml_collections.ConfigDict | None = dataclasses.field(repr=False, default=None)
    error: str = ""  # why the run's config is invalid ('' when it is fine)

    @property
    def flops(self) -> int:
        """Training compute 6·N·D with N the active parameters including embeddings."""
        return 6 * self.params_active * self.tokens


@dataclasses.dataclass
class Sweep:
    """A loaded sweep config, its plan and where it runs."""

    spec: str  # 'path.py[:arg]' as given
    overrides: list[str]
    workdir: Path
    config: ml_collections.ConfigDict
    runs: list[Run]

    def run_dir(self, run: Run) -> Path:
        """The workdir of one run."""
        return self.workdir / "runs" / run.id


def load_sweep_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a sweep config file and check it has base, sweep and families groups."""
    config = config_lib.load(spec, overrides)
    for group in ("base", "sweep", "families"):
        if group not in config:
            raise ConfigError(f"{spec} has no {group!r} group; a sweep config needs base, sweep and families")
    if config.sweep.mode not in ("grid", "isoflop"):
        raise ConfigError(f"config.sweep.mode={config.sweep.mode!r}; use 'grid' or 'isoflop'")
    config_lib.check_values(config)
    return config


def _copy(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy."""
    return ml_collections.ConfigDict(cfg.to_dict())


def _merge(target: ml_collections.ConfigDict, overlay: ml_collections.ConfigDict, where: str) -> None:
    """Merge overlay into target key by key; `model` groups are replaced whole."""
    for key, value in overlay.items():
        if key not in target:
            raise ConfigError(f"config.{where}.{key} does not exist in the config it overlays; "
                              f"valid keys: {', '.join(sorted(target.keys()))}")
        if isinstance(value, ml_collections.ConfigDict) and key != "model":
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = _copy(value) if isinstance(value, ml_collections.ConfigDict) else value


def resolve_family(config: ml_collections.ConfigDict, label: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(base, sweep) for one family: the config's groups with that family's overlay merged in."""
    base, sweep = _copy(config.base), _copy(config.sweep)
    if label in config.families:
        overlay = config.families[label]
        unknown = set(overlay.keys()) - {"base", "sweep"}
        if unknown:
            raise ConfigError(f"config.families.{label} may only hold 'base' and 'sweep', not {sorted(unknown)}")
        if "base" in overlay:
            _merge(base, overlay.base, f"families.{label}.base")
        if "sweep" in overlay:
            _merge(sweep, overlay.sweep, f"families.{label}.sweep")
    return base, sweep


def depth_for(sweep: ml_collections.ConfigDict, width: int) -> int:
    """Layers at a width: sweep.num_layers, or width / aspect_ratio rounded when that is 0."""
    if sweep.num_layers > 0:
        return int(sweep.num_layers)
    return max(1, round(width / sweep.aspect_ratio))


def sized_model(model: ml_collections.ConfigDict, width: int, depth: int, head_dim: int) -> ml_collections.ConfigDict:
    """The model group at one point of the width/depth ladder."""
    if model.name not in LADDER_FIELDS:
        raise ConfigError(f"config.base.model.name={model.name!r} has no width ladder; sweeps support "
                          f"{sorted(LADDER_FIELDS)}")
    model = _copy(model)
    model.num_layers = depth
    model.d_model = width
    if model.name == "gpt":
        if width % head_dim:
            raise ConfigError(f"width {width} is not a multiple of config.sweep.head_dim={head_dim}; "
                              "choose widths that are multiples of the head dimension")
        model.num_heads = width // head_dim
    else:
        model.hidden = width
    model.size = f"w{width}_l{depth}"
    return model


_PARAM_CACHE: dict[str, tuple[int, int, int]] = {}


def count_params(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(all, embedding, inactive expert) parameters of config.model, counted as the trainer does."""
    key = json.dumps([config.model.to_dict(), config.data.seq_len], sort_keys=True, default=str)
    if key not in _PARAM_CACHE:
        import jax
        import jax.numpy as jnp

        from bigmodel import flops, models

        module = models.build(config.model)
        tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)  # every ladder family is a token LM
        # eval_shape traces the init without allocating, so any size is counted for free.
        variables = jax.eval_shape(
            lambda rng: module.init({"params": rng, "dropout": rng}, tokens, train=False), jax.random.key(0))
        params = variables["params"]
        _PARAM_CACHE[key] = (flops.param_count(params), flops.embedding_param_count(params),
                             flops.inactive_param_count(params, config.model))
    return _PARAM_CACHE[key]


def steps_for(tokens: float, tokens_per_step: int) -> int:
    """Whole optimizer steps closest to a token budget (at least one)."""
    return max(1, round(tokens / tokens_per_step))


def learning_rate_for(base_lr: float, sweep: ml_collections.ConfigDict, width: int) -> float:
    """base_lr * (base_width / width) ** lr_exponent."""
    return float(base_lr * (sweep.base_width / width) ** sweep.lr_exponent)


def warmup_for(base_warmup: int, sweep: ml_collections.ConfigDict, steps: int) -> int:
    """round(warmup_fraction * steps), at least 1; the base warmup when the fraction is 0."""
    if sweep.warmup_fraction > 0:
        return max(1, round(sweep.warmup_fraction * steps))
    return int(base_warmup)


def human(n: float, digits: int = 2) -> str:
    """2.6M, 410k, 1.2G: a count rounded to `digits` significant digits with an SI suffix."""
    if n <= 0:
        return str(n)
    n = round(n, digits - 1 - math.floor(math.log10(n)))
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
        if n >= scale or not suffix:
            return f"{n / scale:.{digits + 3}g}{suffix}"
    raise AssertionError("unreachable")


def _assign_ids(runs: list[Run]) -> None:
    """Readable unique ids, family_wWIDTH_lDEPTH_tTOKENS, with more digits if two would clash."""
    for digits in range(2, 8):
        ids = [f"{r.family}_w{r.width}_l{r.depth}_t{human(r.tokens, digits)}" for r in runs]
        if len(set(ids)) == len(ids):
            break
    else:
        ids = [f"{r.family}_w{r.width}_l{r.depth}_t{r.tokens}_{i}" for i, r in enumerate(runs)]
    for run, run_id in zip(runs, ids):
        run.id = run_id


def _apply_run_overrides(cfg: ml_collections.ConfigDict, run_id: str, overrides: Sequence[str]) -> None:
    """Apply the sweep.run_overrides entries whose pattern matches run_id."""
    for item in overrides:
        pattern, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not (sep and eq):
            raise ConfigError(f"config.sweep.run_overrides entry {item!r}; write 'PATTERN:key.path=value'")
        if fnmatch.fnmatchcase(run_id, pattern):
            config_lib.apply_override(cfg, key, value)


def _family_points(base: ml_collections.ConfigDict, sweep: ml_collections.ConfigDict, label: str) -> Iterator[Run]:
    """Runs of one family before ids, overrides and validation; a bad size yields runs with an error."""
    if "mup" in base.model and base.model.mup and sweep.lr_exponent != 0:
        raise ConfigError(f"config.sweep.lr_exponent={sweep.lr_exponent} with model.mup=True would scale the "
                          "learning rate with width twice (muP already divides the hidden-matrix rates); "
                          "set --config.sweep.lr_exponent=0")
    tokens_per_step = base.train.batch_size * base.data.seq_len
    budgets = sweep.tokens if sweep.mode == "grid" else sweep.flops
    if not budgets:
        raise ConfigError(f"config.sweep.{'tokens' if sweep.mode == 'grid' else 'flops'} is empty; "
                          f"mode {sweep.mode!r} needs at least one budget")
    for budget in budgets:
        for width in sweep.widths:
            depth = depth_for(sweep, width)
            cfg, error, params, embed, inactive = _copy(base), "", 0, 0, 0
            try:
                cfg.model = sized_model(base.model, width, depth, sweep.head_dim)
                params, embed, inactive = count_params(cfg)
            except (ConfigError, ValueError, TypeError) as e:
                error = f"config error: {e}"
            if sweep.mode == "grid":
                steps = steps_for(budget, tokens_per_step)
            else:
                steps = steps_for(budget / (6.0 * (params - inactive)), tokens_per_step) if params else 0
            if not error and steps < sweep.min_steps:
                continue  # too short to mean anything (isoFLOP budgets spanning many sizes)
            yield Run(
                index=-1, id="", family=label, width=int(width), depth=depth, steps=steps,
                tokens=steps * tokens_per_step, params=params, params_nonembed=params - embed,
                params_active=params - inactive,
                learning_rate=learning_rate_for(base.optim.learning_rate, sweep, width),
                budget_tokens=budget if sweep.mode == "grid" else None,
                budget_flops=budget if sweep.mode == "isoflop" else None,
                config=cfg, error=error,
            )


def _finish_config(run: Run, sweep: ml_collections.ConfigDict, num_devices: int) -> None:
    """Set the run's planned values on its config, apply run_overrides, validate; errors go to run.error."""
    cfg = run.config
    cfg.train.steps = run.steps
    cfg.optim.learning_rate = run.learning_rate
    cfg.optim.warmup_steps = warmup_for(cfg.optim.warmup_steps, sweep, run.steps)
    # Each run's cosine ends at its own last step: a schedule longer than the run
    # overstates its loss (Hoffmann et al. 2022, fig. A1).
    cfg.optim.decay_steps = 0
    cfg.log.progress = False  # the sweep prints its own progress lines
    try:
        _apply_run_overrides(cfg, run.id, sweep.run_overrides)
        cfg.lock()
        config_lib.validate(cfg, num_devices)
    except ConfigError as e:
        run.error = f"config error: {e}"
    # run_overrides may change what the plan set; the table reports what will run.
    run.steps, run.learning_rate = cfg.train.steps, cfg.optim.learning_rate
    run.tokens = run.steps * cfg.train.batch_size * cfg.data.seq_len


def plan(config: ml_collections.ConfigDict, num_devices: int) -> list[Run]:
    """Every run of a sweep config, in a fixed order, each with its validated training config."""
    runs: list[Run] = []
    for label in config.sweep.families:
        base, sweep = resolve_family(config, label)
        family_runs = list(_family_points(base, sweep, label))
        _assign_ids(family_runs)
        for run in family_runs:
            if not run.error:
                _finish_config(run, sweep, num_devices)
        runs += family_runs
    if not runs:
        raise ConfigError("the sweep plans no runs; check config.sweep.widths, the budgets and min_steps")
    for i, run in enumerate(runs):
        run.index = i
    if len({r.id for r in runs}) != len(runs):
        raise ConfigError("two families share a label; give every entry of config.sweep.families its own name")
    return runs


# --------------------------------------------------------------------------- run files


def run_config_text(run: Run, sweep_spec: str) -> str:
    """A get_config file that returns exactly this run's config."""
    literal = pprint.pformat(run.config.to_dict(), indent=1, width=100, sort_dicts=True)
    return (
        f'"""Run {run.id} of the sweep {sweep_spec} (written by `bigmodel sweep`; edit the sweep config instead).\n\n'
        f"Command: bigmodel train --config runs/{run.id}/run_config.py --workdir runs/{run.id}  (from the sweep dir)\n"
        f'"""\n\nimport ml_collections\n\nCONFIG = {literal}\n\n\n'
        "def get_config(arg: str = \"\") -> ml_collections.ConfigDict:\n"
        '    """This run\'s resolved training config."""\n'
        "    return ml_collections.ConfigDict(CONFIG)\n"
    )


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The trainer's summary.json of a run, or None."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(sweep: Sweep, run: Run) -> bool:
    """Whether the run's summary says it reached its planned steps."""
    summary = read_summary(sweep.run_dir(run))
    return summary is not None and summary.get("step") == run.steps


def read_status(run_dir: Path) -> dict[str, Any]:
    """The sweep's bookkeeping for one run ({} when it never started)."""
    try:
        return json.loads((run_dir / "sweep_status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(run_dir: Path, **fields: Any) -> None:
    """Update (atomically) the sweep's bookkeeping for one run."""
    from bigmodel.metrics import atomic_write_text

    status = read_status(run_dir) | fields | {"updated": time.time()}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "sweep_status.json", json.dumps(status, indent=1, sort_keys=True) + "\n")


def write_run_files(sweep: Sweep) -> None:
    """Write run_config.py for every valid run that has not finished (finished runs keep theirs)."""
    from bigmodel.metrics import atomic_write_text

    for run in sweep.runs:
        if run.error or is_finished(sweep, run):
            continue
        run_dir = sweep.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run_config.py", run_config_text(run, sweep.spec))


# --------------------------------------------------------------------------- results.csv


def result_row(sweep: Sweep, run: Run) -> dict[str, Any]:
    """One results.csv row: the plan, the sweep's status and the trainer's summary."""
    run_dir = sweep.run_dir(run)
    summary, status = read_summary(run_dir), read_status(run_dir)
    row: dict[str, Any] = {
        "run": run.id, "model": run.family, "width": run.width, "depth": run.depth,
        "params": run.params or "", "params_nonembed": run.params_nonembed if run.params else "",
        "params_active": run.params_active if run.params else "",
        "tokens": run.tokens, "steps": run.steps, "flops": run.flops or "",
        "learning_rate": run.learning_rate,
        "budget_tokens": run.budget_tokens or "", "budget_flops": run.budget_flops or "",
        "flops_with_attention": "", "loss": "", "bits_per_byte": "",
        "wall_s": status.get("wall_s", ""), "status": status.get("status", "planned"),
        "error": status.get("error", ""),
    }
    if run.error:
        row.update(status="failed", error=run.error)
    elif summary is not None and summary.get("step") == run.steps:
        row.update(status="finished", error="", loss=summary["eval_loss"],
                   bits_per_byte=summary.get("eval_bits_per_byte", ""),
                   flops_with_attention=summary.get("flops", ""))
        if row["wall_s"] == "":
            row["wall_s"] = summary.get("wall_s", "")  # trained outside the sweep
    return row


@contextlib.contextmanager
def _results_lock(workdir: Path) -> Iterator[None]:
    """Serialise results.csv writers (array tasks of one sweep share the directory)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".results.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_results(sweep: Sweep) -> list[dict[str, Any]]:
    """Rebuild DIR/results.csv from the plan and the run directories; returns the rows."""
    with _results_lock(sweep.workdir):
        rows = [result_row(sweep, run) for run in sweep.runs]
        report.write_csv_atomic(sweep.workdir / report.RESULTS, rows)
    return rows


# --------------------------------------------------------------------------- running


def train_command(run_config: Path, run_dir: Path) -> list[str]:
    """`bigmodel train` for one run (through this interpreter, so no PATH lookup)."""
    return [sys.executable, "-m", "bigmodel.cli", "train", "--config", str(run_config), "--workdir", str(run_dir)]


def error_tail(path: Path, lines: int = ERROR_LINES) -> str:
    """The last non-empty lines of a log, joined on one line for the CSV."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # tqdm and absl write carriage returns and warnings; the exception is at the end.
    kept = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])[-1000:]


@dataclasses.dataclass
class _Active:
    """A run in flight."""

    run: Run
    proc: subprocess.Popen
    started: float
    files: list


class Progress:
    """Start/finish lines with an ETA from the runs finished so far (seconds ≈ overhead + 6ND / rate)."""

    def __init__(self, runs: Sequence[Run], parallel: int) -> None:
        self.total, self.parallel = len(runs), parallel
        self.left = {r.id: r.flops for r in runs}
        self.done: list[tuple[float, float]] = []  # (6ND FLOPs, seconds) of finished runs

    def predict(self, flops: float) -> float:
        """Seconds a run of this compute should take, from a line through the finished runs."""
        x = [f for f, _ in self.done]
        y = [s for _, s in self.done]
        if len(set(x)) < 2:
            return flops * sum(y) / max(sum(x), 1.0)
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
        slope = max(slope, 0.0)
        overhead = max(my - slope * mx, 0.0)  # start-up and compilation, paid by every run
        return overhead + slope * flops

    def eta(self) -> str:
        """Remaining wall time of the runs not finished yet."""
        if not self.left:
            return "done"
        if not self.done:
            return "ETA after the first run"
        seconds = sum(self.predict(f) for f in self.left.values()) / min(self.parallel, len(self.left))
        return f"ETA {report.duration(seconds)}"

    def start(self, run: Run, n: int) -> None:
        """Print a run's start line."""
        print(f"[sweep] start {n}/{self.total} {run.id}: {human(run.params)} params, {human(run.tokens)} tokens, "
              f"{run.steps} steps, lr {run.learning_rate:.3g}", flush=True)

    def finish(self, run: Run, row: dict[str, Any], seconds: float) -> None:
        """Print a run's finish line and update the estimate."""
        self.left.pop(run.id, None)
        if row["status"] == "finished":
            self.done.append((float(run.flops), seconds))
            what = f"loss {float(row['loss']):.4f}"
        else:
            what = f"{row['status'].upper()}: {row['error']}"
        print(f"[sweep] {row['status']} {run.id} in {report.duration(seconds)}: {what}; "
              f"{len(self.left)} left, {self.eta()}", flush=True)


def _launch(sweep: Sweep, run: Run) -> _Active:
    """Start `bigmodel train` for one run, logging to its directory."""
    run_dir = sweep.run_dir(run)
    # The logs stay open while the child writes to them; _settle closes them.
    out = open(run_dir / "stdout.log", "w")  # noqa: SIM115
    err = open(run_dir / "stderr.log", "w")  # noqa: SIM115
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(train_command(run_dir / "run_config.py", run_dir), stdout=out, stderr=err, env=env)
    write_status(run_dir, status="running", error="", pid=proc.pid, host=os.uname().nodename)
    return _Active(run, proc, time.time(), [out, err])


def _settle(sweep: Sweep, active: _Active) -> float:
    """Record a finished process's outcome in its status file; returns its wall seconds."""
    for f in active.files:
        f.close()
    run, run_dir, rc = active.run, sweep.run_dir(active.run), active.proc.returncode
    seconds = time.time() - active.started
    wall = round(float(read_status(run_dir).get("wall_s") or 0.0) + seconds, 2)  # all attempts together
    summary = read_summary(run_dir)
    if rc == 0 and summary is not None and summary.get("step") == run.steps:
        write_status(run_dir, status="finished", error="", wall_s=wall)
    elif rc == PREEMPTED_EXIT_CODE:  # the trainer saved a checkpoint on SIGTERM/SIGINT
        write_status(run_dir, status="planned", error="preempted; a rerun resumes it", wall_s=wall)
    else:
        error = error_tail(run_dir / "stderr.log") or f"exit status {rc}"
        if rc == 0:
            error = f"stopped at step {summary and summary.get('step')} of {run.steps}; {error}"
        write_status(run_dir, status="failed", error=error, wall_s=wall)
    return seconds


class Interrupted(Exception):
    """The sweep itself got SIGTERM or SIGINT."""


def _interrupt(signum: int, frame: Any) -> None:
    """Signal handler: unwind the runner so it can stop its children cleanly."""
    raise Interrupted(signal.Signals(signum).name)


def _stop(sweep: Sweep, active: Sequence[_Active]) -> None:
    """SIGTERM the runs in flight (the trainer checkpoints and exits), wait, and mark them resumable."""
    for item in active:
        item.proc.terminate()
    for item in active:
        try:
            item.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            item.proc.kill()
            item.proc.wait()
        _settle(sweep, item)
    write_results(sweep)


def run_local(sweep: Sweep, todo: Sequence[Run], parallel: int) -> None:
    """Run `todo` as up to `parallel` local processes; failures are recorded, not raised."""
    progress = Progress(todo, parallel)
    queue, active, started = collections.deque(todo), [], 0
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or active:
            while queue and len(active) < parallel:
                run = queue.popleft()
                started += 1
                progress.start(run, started)
                active.append(_launch(sweep, run))
                write_results(sweep)
            time.sleep(POLL_S)
            for item in [a for a in active if a.proc.poll() is not None]:
                active.remove(item)
                seconds = _settle(sweep, item)
                rows = write_results(sweep)
                progress.finish(item.run, rows[item.run.index], seconds)
    except Interrupted:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # a second signal now kills the sweep at once
        _stop(sweep, active)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the fit


def finalize(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Fit every family with enough finished runs into DIR/fit[/family], and draw the sweep plots."""
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished:
        return
    outdir = sweep.workdir / "fit"
    families = list(dict.fromkeys(r["model"] for r in rows))
    s = sweep.config.sweep
    for family in families:
        family_rows = [r for r in finished if r["model"] == family]
        target = outdir if len(families) == 1 else outdir / family
        message = report.fit_rows(family_rows, target, starts=s.fit_starts, n_bootstrap=s.fit_bootstrap)
        print(f"[sweep] fit {family}: {message}", flush=True)
    for path in report.plot_sweep(finished, outdir):
        print(f"[sweep] plot {path}", flush=True)


# --------------------------------------------------------------------------- cluster emitters


def _task_command(sweep: Sweep, index_expr: str) -> str:
    """The shell command of one array task; index_expr is the scheduler's task-index variable."""
    head = ["bigmodel", "sweep", "--config", sweep.spec, "--workdir", str(sweep.workdir.resolve()), "--only"]
    return " ".join([shlex.join(head), index_expr, shlex.join(f"--config.{o}" for o in sweep.overrides)]).rstrip()


def emit_slurm(sweep: Sweep, parallel: int | None) -> Path:
    """Write DIR/sweep.slurm: a job array with one task per planned run."""
    n = len(sweep.runs)
    array = f"0-{n - 1}" + (f"%{parallel}" if parallel else "")
    name = Path(sweep.spec.partition(":")[0]).stem
    text = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=sweep-{name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={sweep.workdir.resolve()}/slurm/%A_%a.out",
        f"#SBATCH --chdir={Path.cwd()}",
        "#SBATCH --ntasks=1",
        "#SBATCH --signal=TERM@120",
        "# Add the resources of one run here, e.g. #SBATCH --gres=gpu:1 --time=04:00:00",
        "",
        f"# {n} runs; task i trains run i of the plan (results.csv lists them in order). A task whose run",
        "# has finished exits at once, so resubmitting the array finishes what is missing.",
        "set -uo pipefail",
        _task_command(sweep, '"$SLURM_ARRAY_TASK_ID"'),
        "rc=$?",
        f"# {PREEMPTED_EXIT_CODE}: stopped by TERM (time limit, preemption) after a checkpoint; requeue to resume.",
        f'if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"; fi',
        'exit "$rc"',
        "",
    ])
    (sweep.workdir / "slurm").mkdir(parents=True, exist_ok=True)
    path = sweep.workdir / "sweep.slurm"
    path.write_text(text)
    return path


def emit_k8s(sweep: Sweep, parallel: int | None, image: str) -> Path:
    """Write DIR/sweep_k8s.yaml: an indexed Job with one completion per planned run."""
    n = len(sweep.runs)
    name = "sweep-" + Path(sweep.spec.partition(":")[0]).stem.replace("_", "-").lower()
    command = _task_command(sweep, '"$JOB_COMPLETION_INDEX"')
    q = json.dumps  # JSON strings are valid YAML scalars
    text = "\n".join([
        f"# {n} runs; completion index i trains run i of the plan. The sweep directory must be on a",
        "# volume every pod mounts at the same path (add it under volumes/volumeMounts).",
        "apiVersion: batch/v1",
        "kind: Job",
        "metadata:",
        f"  name: {q(name)}",
        "spec:",
        "  completionMode: Indexed",
        f"  completions: {n}",
        f"  parallelism: {parallel or n}",
        f"  backoffLimit: {2 * n}",
        "  template:",
        "    spec:",
        "      restartPolicy: Never",
        "      containers:",
        "        - name: run",
        f"          image: {q(image)}",
        f"          workingDir: {q(str(Path.cwd()))}",
        f"          command: [\"sh\", \"-c\", {q('exec ' + command)}]",
        "",
    ])
    path = sweep.workdir / "sweep_k8s.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the command


def select(runs: Sequence[Run], only: str) -> Run:
    """The run named by --only: a plan index or a run id."""
    if only.isdigit() and int(only) < len(runs):
        return runs[int(only)]
    for run in runs:
        if run.id == only:
            return run
    raise ConfigError(f"--only {only!r} names no run; use 0..{len(runs) - 1} or a run id from results.csv")


def print_plan(runs: Sequence[Run]) -> None:
    """The planned runs as a table."""
    print(f"{'#':>3}  {'run':<28}{'params':>9}{'tokens':>9}{'steps':>7}{'6ND':>10}{'lr':>9}  problem")
    for r in runs:
        print(f"{r.index:>3}  {r.id:<28}{human(r.params) if r.params else '?':>9}{human(r.tokens):>9}"
              f"{r.steps:>7}{r.flops:>10.3g}{r.learning_rate:>9.3g}  {r.error}")
    total = sum(r.flops for r in runs)
    print(f"{len(runs)} runs, {human(sum(r.tokens for r in runs))} tokens, {total:.3g} FLOPs (6ND) in all")


def load(spec: str, overrides: Sequence[str], workdir: str | Path, num_devices: int | None = None) -> Sweep:
    """Load and plan a sweep (num_devices: what each run will see; default this machine's)."""
    config = load_sweep_config(spec, overrides)
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    return Sweep(spec, list(overrides), Path(workdir), config, plan(config, num_devices))


def execute(sweep: Sweep, parallel: int = 1, only: str | None = None) -> int:
    """Run the sweep's unfinished runs here (or just one with `only`); 0 when every selected run finished."""
    sweep.workdir.mkdir(parents=True, exist_ok=True)
    from bigmodel.metrics import atomic_write_text

    atomic_write_text(sweep.workdir / "sweep_config.json",
                      json.dumps({"spec": sweep.spec, "overrides": sweep.overrides,
                                  "config": sweep.config.to_dict()}, indent=1, default=str) + "\n")
    write_run_files(sweep)
    selected = [select(sweep.runs, only)] if only is not None else sweep.runs
    for run in selected:
        if run.error:
            print(f"[sweep] failed {run.id}: {run.error}", flush=True)
    todo = [r for r in selected if not r.error and not is_finished(sweep, r)]
    skipped = sum(1 for r in selected if not r.error and r not in todo)
    print(f"[sweep] {sweep.workdir}: {len(sweep.runs)} runs planned, {skipped} finished before, "
          f"{len(todo)} to run" + (f" ({parallel} at a time)" if len(todo) > 1 else ""), flush=True)
    write_results(sweep)
    run_local(sweep, todo, parallel)
    rows = write_results(sweep)
    # Fit after new results: at the end of a local sweep, or when an array task completes the table.
    complete = all(r["status"] == "finished" for r in rows)
    if (todo or not (sweep.workdir / "fit").exists()) and (complete or only is None):
        finalize(sweep, rows)
    failed = [r for r, run in zip(rows, sweep.runs) if run in selected and r["status"] != "finished"]
    print(f"[sweep] {sum(r['status'] == 'finished' for r in rows)}/{len(rows)} runs finished"
          + (f"; {len(failed)} failed (rerun the same command to retry them)" if failed else "")
          + f"; table: {sweep.workdir / report.RESULTS}", flush=True)
    return 1 if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`bigmodel sweep`: plan, then run here, one run (--only), or emit cluster jobs."""
    sweep = load(args.config, args.overrides, args.workdir, args.devices)
    if args.dry_run:
        print_plan(sweep.runs)
        return 0
    if args.emit:
        sweep.workdir.mkdir(parents=True, exist_ok=True)
        write_run_files(sweep)
        write_results(sweep)
        print_plan(sweep.runs)
        if args.emit == "slurm":
            path = emit_slurm(sweep, args.parallel)
            print(f"wrote {path}; submit it with: sbatch {path}")
        else:
            path = emit_k8s(sweep, args.parallel, args.image)
            print(f"wrote {path}; submit it with: kubectl apply -f {path}")
        return 0
    try:
        return execute(sweep, args.parallel or 1, args.only)
    except Interrupted as e:
        print(f"[sweep] stopped by {e}; the runs in flight saved checkpoints: rerun the same command to go on",
              flush=True)
        return PREEMPTED_EXIT_CODE


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bigmodel sweep` to the top-level sub-parsers."""
    p = subparsers.add_parser(
        "sweep", help="plan and run a scaling sweep (model sizes x data); --config.KEY=VALUE overrides",
        description="Plan a sweep from a sweep config (grid of sizes x token budgets, or isoFLOP budgets), "
                    "train every run as `bigmodel train` in DIR/runs/<id>, keep DIR/results.csv up to date "
                    "and fit scaling laws into DIR/fit at the end. Rerunning skips finished runs.")
    p.add_argument("--config", required=True, help="experiments/scaling/NAME.py[:VARIANT]")
    p.add_argument("--workdir", required=True, help="sweep directory (results.csv, runs/, fit/)")
    p.add_argument("--parallel", type=_positive_int, default=None, metavar="P",
                   help="runs at a time: local processes, or the array's concurrency with --emit [default: 1 / all]")
    p.add_argument("--emit", choices=("slurm", "k8s"), default=None,
                   help="write a Slurm job array or a Kubernetes indexed Job instead of running here")
    p.add_argument("--image", default="bigmodel:latest", help="container image for --emit k8s [default: %(default)s]")
    p.add_argument("--only", default=None, metavar="INDEX|RUN", help="run one run of the plan (what array tasks call)")
    p.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="devices each run sees, for validating the configs [default: this machine's]")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the plan and exit")
    p.set_defaults(func=cmd_sweep, takes_overrides=True)
    return p
