"""A scaling sweep whose workdir is a bucket, on moto's S3 server (fixtures: tests/test_storage.py)."""

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from bigmodel import storage

from conftest import REPO, SMALL_CORPUS
from test_storage import bucket, gcs_server, s3_server, train_env  # noqa: F401 - fixtures used by name

GPT_STDLIB = str(REPO / "experiments" / "scaling" / "gpt_stdlib.py")


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one protocol: the runs are the train test's
def test_sweep_in_a_bucket_runs_there_and_a_rerun_skips_finished_runs(bucket, data_dir, tmp_path):  # noqa: F811
    url, env = bucket
    workdir = f"{url}/sweep"
    sweep = [sys.executable, "-m", "bigmodel.cli", "sweep", "--config", f"{GPT_STDLIB}:tiny", "--workdir", workdir,
             "--devices", "1", "--parallel", "2", "--config.sweep.widths=(16, 32)", "--config.sweep.tokens=(8192,)",
             f"--config.base.data.source={SMALL_CORPUS}", "--config.base.data.validation_fraction=0.2",
             f"--config.base.data.data_dir={data_dir}"]
    env = dict(train_env(env), XLA_FLAGS="")
    first = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert f"table: {workdir}/results.csv" in first.stdout
    table = list(csv.DictReader(io.StringIO(storage.read_text(f"{workdir}/results.csv"))))
    assert [r["run"] for r in table] == ["gpt_w16_l1_t8.2k", "gpt_w32_l1_t8.2k"]
    assert all(r["status"] == "finished" and 0 < float(r["loss"]) < 10 for r in table), table
    fs = storage.filesystem(url)
    fs.invalidate_cache()
    for row in table:
        run = f"{workdir}/runs/{row['run']}"
        summary = json.loads(storage.read_text(f"{run}/summary.json"))
        assert summary["eval_loss"] == pytest.approx(float(row["loss"]))
        assert fs.exists(f"{run}/run_config.py") and fs.exists(f"{run}/stdout.log")
        assert fs.glob(f"{run}/checkpoints/*/bigmodel_integrity.process_0.json")
    assert fs.exists(f"{workdir}/sweep_config.json")

    shutil.rmtree(tmp_path / "cache")  # another machine: it knows the sweep from the bucket alone
    again = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 finished before, 0 to run" in again.stdout
