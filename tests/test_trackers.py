"""Trackers behind config.log.trackers: W&B (offline run directory) and MLflow (a real server on localhost),
each carrying config, run_info, rows and summary, and resuming the same tracker run after a preemption."""

import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from bigmodel import cli, exit_codes, metrics, train

from conftest import GPT_TINY

STEPS = 8


def run_with_preemption(workdir, overrides, monkeypatch):
    """Train STEPS steps, preempted after step 4 and resumed: (first exit code, second exit code)."""
    args = ["train", "--config", GPT_TINY + ":tiny", "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in overrides + [f"train.steps={STEPS}", "log.every=2", "eval.every=4",
                                                     "checkpoint.every=4"]]
    with monkeypatch.context() as m:
        m.setattr(train.PreemptionWatch, "requested", lambda self, step: step == 4)
        first = cli.main(args)
    return first, cli.main(args)


def wandb_records(path: pathlib.Path) -> list:
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def items(update) -> dict:
    """{key: value} of W&B history/summary/config items."""
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_summary_and_resumes(tmp_path, tiny_overrides, monkeypatch):
    pytest.importorskip("wandb", reason="Weights & Biases (wandb) is not installed: pip install 'bigmodel[trackers]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first, second = run_with_preemption(tmp_path, tiny_overrides + ["log.trackers=('jsonl','wandb')"], monkeypatch)
    assert (first, second) == (exit_codes.PREEMPTED, exit_codes.OK)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]  # the resumed run continues the same one
    rows = {r["step"]: r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")}
    history, exits = {}, []
    for run in runs:
        records = wandb_records(run / f"run-{run_id}.wandb")
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = items(record.run.config.update)
                assert config["train"]["steps"] == STEPS and config["run_info"]["device_count"] == 8
            elif kind == "history":
                got = items(record.history.item)
                history[got["_step"]] = got
            elif kind == "exit":
                exits.append(record.exit.exit_code)
        summary = {k: v for r in records if r.WhichOneof("record_type") == "summary"
                   for k, v in items(r.summary.update).items()}
    assert sorted(history) == sorted(rows) == [2, 4, 6, 8]
    for step, row in rows.items():
        assert history[step]["train/loss"] == pytest.approx(row["loss"])
    assert history[8]["eval/loss"] == pytest.approx(rows[8]["eval_loss"])
    assert exits == [1, 0]  # the preempted part ends as failed, the resumed one as finished
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert summary["params"] == saved["params"] and summary["step"] == STEPS  # from the last part's records
    assert not (tmp_path / "events.out.tfevents").exists() and not list(tmp_path.glob("events.out.tfevents*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite store on a free localhost port; its URI."""
    pytest.importorskip("mlflow", reason="MLflow (mlflow) is not installed: pip install 'bigmodel[trackers]'")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(pathlib.Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # migrating a fresh SQLite store takes a minute on a busy machine
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can outlast that on a busy machine
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_mlflow_run_holds_config_metrics_summary_and_resumes(tmp_path, tiny_overrides, monkeypatch, mlflow_server):
    import mlflow

    overrides = tiny_overrides + ["log.trackers=('jsonl','tensorboard','mlflow')", f"log.tracking_uri={mlflow_server}",
                                  "log.project=bigmodel-test"]
    first, second = run_with_preemption(tmp_path, overrides, monkeypatch)
    assert (first, second) == (exit_codes.PREEMPTED, exit_codes.OK)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("bigmodel-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, resumed
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["model.size"] == "nano"
    assert run.data.tags["run_info.device_count"] == "8"
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    evals = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss"))
    assert evals == [(r["step"], pytest.approx(r["eval_loss"])) for r in rows if "eval_loss" in r]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert run.data.metrics["summary.eval_loss"] == pytest.approx(saved["eval_loss"])
    assert run.data.metrics["summary.params"] == saved["params"]
    assert run.data.tags["summary.dataset"] == saved["dataset"]
    assert list(tmp_path.glob("events.out.tfevents*"))  # TensorBoard still written beside it
