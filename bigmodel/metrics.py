"""metrics.jsonl, TensorBoard event files and the run header of a workdir."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from bigmodel import storage


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see the old or the new content, never a partial one (local or in a bucket)."""
    storage.write_text(path, text)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (crash mid-write) is ignored."""
    rows = []
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Jsonl:
    """metrics.jsonl: one JSON row per logged step; non-finite values become null (NaN is not JSON).

    In a bucket, where objects cannot be appended to, the file is rewritten whole at each row.
    """

    def __init__(self, workdir: epath.Path, resume_step: int, **_: Any) -> None:
        self.path = workdir / "metrics.jsonl"
        self._remote = storage.is_remote(self.path)
        # On resume from step S, rows after S (written before a crash, to be recomputed) are dropped
        # first, so the file never holds two rows for one step.
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self._text = "".join(json.dumps(r) + "\n" for r in rows)  # the whole file (rewritten in a bucket)
        atomic_write_text(self.path, self._text)
        if not self._remote:
            self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run; close() closes it

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Append {'step': step, **scalars}."""
        row = {"step": step, **{k: float(v) if math.isfinite(v) else None for k, v in scalars.items()}}
        if self._remote:
            self._text += json.dumps(row) + "\n"
            atomic_write_text(self.path, self._text)
        else:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self, summary: Mapping[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Close the file (summary.json is the trainer's)."""
        if not self._remote:
            self._file.close()


def tag(key: str) -> str:
    """A metric's chart name: 'eval/...' for evaluation, 'train/...' for the rest."""
    return key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"


class TensorBoard:
    """Event files in the workdir (`tensorboard --logdir WORKDIR`).

    In a bucket they are written to a local folder and uploaded at each row (storage.Staged).
    """

    def __init__(self, workdir: epath.Path, resume_step: int, **_: Any) -> None:
        from tensorboardX import SummaryWriter

        self._events = storage.Staged(str(workdir))
        # purge_step makes TensorBoard drop points after the resume step from older event files.
        self._tb = SummaryWriter(str(self._events.local), flush_secs=10,
                                 purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Add each finite scalar."""
        for key, value in scalars.items():
            if math.isfinite(value):
                self._tb.add_scalar(tag(key), float(value), step)
        if self._events.remote:
            self._tb.flush()
            self._events.sync()

    def close(self, summary: Mapping[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Flush and close the event file."""
        self._tb.close()
        self._events.close()


def tracker_ids(workdir: pathlib.Path) -> dict[str, str]:
    """The tracker run ids a workdir keeps (trackers.json), so a resumed run continues the same tracker run."""
    path = workdir / TRACKER_IDS
    return json.loads(path.read_text()) if path.exists() else {}


def save_tracker_id(workdir: pathlib.Path, name: str, run_id: str) -> None:
    """Record `name`'s run id in trackers.json."""
    atomic_write_text(workdir / TRACKER_IDS, json.dumps(tracker_ids(workdir) | {name: run_id}, indent=2) + "\n")


def _flat_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _missing(component: str) -> ImportError:
    return ImportError(f"config.log.trackers names {component!r}, but the {component} package is not installed; "
                       "pip install 'bigmodel[trackers]' or remove it from config.log.trackers")


class WandB:
    """A Weights & Biases run in WORKDIR/wandb: config (with run_info), the rows as history, the summary.

    The mode comes from W&B's own settings (WANDB_MODE=offline writes only the local run directory;
    `wandb sync` uploads it later). A resumed training run resumes the same W&B run (same id).
    """

    def __init__(self, workdir: pathlib.Path, resume_step: int, *, project: str, config: dict, run_info: dict,
                 **_: Any) -> None:
        try:
            import wandb
            from wandb.sdk.lib import runid
        except ImportError:
            raise _missing("wandb") from None
        run_id = tracker_ids(workdir).get("wandb") or runid.generate_id()
        save_tracker_id(workdir, "wandb", run_id)
        self._run = wandb.init(project=project, id=run_id, resume="allow", dir=str(workdir), name=workdir.name,
                               config={**config, "run_info": run_info}, reinit="create_new")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log the row at `step` (W&B keeps steps increasing: rows at or before a resumed step are ignored)."""
        self._run.log({tag(k): float(v) for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self, summary: Mapping[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Write the summary and finish the run (exit code 1 when it stopped on an error or preemption)."""
        if summary:
            self._run.summary.update(dict(summary))
        self._run.finish(exit_code=1 if error is not None else 0)


class MLflow:
    """An MLflow run: config as parameters, run_info as tags, rows as metrics, the summary as final metrics.

    The server is config.log.tracking_uri (else MLFLOW_TRACKING_URI, else ./mlruns); the
    experiment is config.log.project. A resumed training run resumes the same MLflow run.
    """

    def __init__(self, workdir: pathlib.Path, resume_step: int, *, project: str, tracking_uri: str, config: dict,
                 run_info: dict, **_: Any) -> None:
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow") from None
        self._client = mlflow.MlflowClient(tracking_uri or None)
        run_id = tracker_ids(workdir).get("mlflow")
        if run_id is None:
            experiment = self._client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(project)
            run = self._client.create_run(experiment_id, run_name=workdir.name,
                                          tags={f"run_info.{k}": str(v) for k, v in run_info.items()})
            run_id = run.info.run_id
            params = [mlflow.entities.Param(k, str(v)) for k, v in _flat_dict(config).items()]
            for start in range(0, len(params), 100):  # the server takes at most 100 parameters per call
                self._client.log_batch(run_id, params=params[start:start + 100])
            save_tracker_id(workdir, "mlflow", run_id)
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._run_id = run_id
        self._mlflow = mlflow

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log the row's finite values at `step`."""
        now = int(time.time() * 1000)
        rows = [self._mlflow.entities.Metric(k, float(v), now, step) for k, v in scalars.items() if math.isfinite(v)]
        self._client.log_batch(self._run_id, metrics=rows)

    def close(self, summary: Mapping[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Log the summary's numbers as 'summary.KEY' metrics (the rest as tags); end the run (KILLED on an error)."""
        if summary:
            now = int(time.time() * 1000)
            numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self._client.log_batch(
                self._run_id, metrics=[self._mlflow.entities.Metric(f"summary.{k}", float(v), now, 0)
                                       for k, v in numbers.items()],
                tags=[self._mlflow.entities.RunTag(f"summary.{k}", str(v)) for k, v in summary.items()
                      if k not in numbers])
        self._client.set_terminated(self._run_id, status="KILLED" if error is not None else "FINISHED")


TRACKERS = {"jsonl": Jsonl, "tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
TRACKER_IDS = "trackers.json"


class MetricsWriter:
    """Sends each logged row to the run's trackers (config.log.trackers): metrics.jsonl, TensorBoard, W&B, MLflow.

    The trackers see the resume step, the config and the run header when the run starts, each
    row as it is logged, and the summary at the end (`finish`); `exit` ends them early when the
    run stops on an error or a preemption (an ExitStack callback).
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int, enabled: bool = True, *,
                 trackers: tuple[str, ...] = ("jsonl", "tensorboard"), project: str = "bigmodel",
                 tracking_uri: str = "", config: dict | None = None, run_info: dict | None = None) -> None:
        self.enabled = enabled
        self.path = storage.as_path(workdir) / "metrics.jsonl"
        self._trackers: list[Any] = []
        self._error: BaseException | None = None
        if not enabled:
            return
        for name in trackers:
            self._trackers.append(TRACKERS[name](storage.as_path(workdir), resume_step, project=project,
                                                 tracking_uri=tracking_uri, config=config or {},
                                                 run_info=run_info or {}))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log one row: {'step': step, **scalars}."""
        for tracker in self._trackers:
            tracker.write(int(step), scalars)

    def finish(self, summary: Mapping[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Give the trackers the summary (or the error the run stopped on) and close them; once."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close(summary, error)

    def close(self) -> None:
        """Close every tracker without a summary (as failed after an error `exit` saw)."""
        self.finish(error=self._error)

    def exit(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        """ExitStack callback: on an error, end the trackers' runs as failed; else keep them for the summary."""
        if exc is not None:
            self._error = exc
            self.close()
        return False


def git_revision(directory: str | os.PathLike) -> str:
    """The git commit of the code in `directory` (with '+dirty' when modified), or 'unknown'."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header() -> dict[str, Any]:
    """What makes a run reproducible: code revision, library versions, devices."""
    import flax
    import optax
    import orbax.checkpoint

    devices = jax.devices()
    return {
        "git_revision": git_revision(pathlib.Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "host": platform.node(),
    }
