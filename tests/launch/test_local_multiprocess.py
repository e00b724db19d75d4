"""Two local processes × 2 fake CPU devices train like one process × 4, and checkpoints move between them."""

import json
import shutil
import sys
import time

import numpy as np
import pytest
from bigmodel.launch import local

from bigmodel import cli, metrics
from bigmodel.data import text_files

from conftest import GPT_TINY, SMALL_CORPUS

pytestmark = pytest.mark.slow  # every test here trains in several processes

STEPS = 6


def run_overrides(data_dir: str) -> list[str]:
    """The ':tiny' GPT on the small corpus: 6 steps, every step logged, checkpoints at 3 and 6."""
    return [f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2", f"data.data_dir={data_dir}",
            "log.progress=false", f"train.steps={STEPS}", f"optim.decay_steps={STEPS}", "log.every=1",
            f"eval.every={STEPS}", "checkpoint.every=3"]


def prepare_data(data_dir: str) -> None:
    """Build the dataset here once, so the launched processes only read it."""
    text_files.prepare(SMALL_CORPUS, data_dir, 0.2)


def launch_local(workdir, data_dir, processes: int, devices: int, *overrides: str) -> int:
    """`bigmodel launch local` as a user types it."""
    return cli.main(["launch", "local", "--processes", str(processes), "--devices_per_process", str(devices),
                     "--config", GPT_TINY + ":tiny", "--workdir", str(workdir),
                     *(f"--config.{o}" for o in [*run_overrides(data_dir), *overrides])])


def logged(workdir, key: str = "loss") -> dict[int, float]:
    """{step: value} of one metric from a workdir's metrics.jsonl."""
    return {r["step"]: r[key] for r in metrics.read_jsonl(workdir / "metrics.jsonl") if key in r}


_RUNS: dict[str, object] = {}  # one session's runs, shared with test_slurm (which imports this module)


def two_process_workdir(tmp_path_factory, data_dir):
    """An uninterrupted 6-step run on 2 processes × 2 devices, made once per session."""
    if "p2x2" not in _RUNS:
        prepare_data(data_dir)
        workdir = tmp_path_factory.mktemp("local") / "p2x2"
        assert launch_local(workdir, data_dir, 2, 2) == 0
        _RUNS["p2x2"] = workdir
    return _RUNS["p2x2"]


@pytest.fixture
def two_process_run(tmp_path_factory, data_dir):
    """See two_process_workdir."""
    return two_process_workdir(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_dir):
    """The same run on 1 process × 4 devices."""
    prepare_data(data_dir)
    workdir = tmp_path_factory.mktemp("local") / "p1x4"
    assert launch_local(workdir, data_dir, 1, 4) == 0
    return workdir


def test_two_processes_match_one(two_process_run, one_process_run):
    info2 = json.loads((two_process_run / "run_info.json").read_text())
    info1 = json.loads((one_process_run / "run_info.json").read_text())
    assert (info2["process_count"], info2["device_count"]) == (2, 4)
    assert (info1["process_count"], info1["device_count"]) == (1, 4)
    two, one = logged(two_process_run), logged(one_process_run)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
    assert one[STEPS] < one[1] - 0.5  # and it learns
    np.testing.assert_allclose(logged(two_process_run, "eval_loss")[STEPS], logged(one_process_run, "eval_loss")[STEPS],
                               rtol=1e-5)
    np.testing.assert_allclose(list(logged(two_process_run, "grad_norm").values()),
                               list(logged(one_process_run, "grad_norm").values()), rtol=1e-5)


def test_two_slices_joined_along_the_sequence_match_one_process(one_process_run, data_dir, tmp_path):
    # Each process is a slice (mesh_utils.create_hybrid_device_mesh, process_is_granule) holding
    # data=2 x sequence=1; the DCN joins them along 'sequence'. So both processes hold every row:
    # they must load the same batches, which process_batch_shard arranges. ZeRO-1 splits Adam over data.
    workdir = tmp_path / "slices"
    assert launch_local(workdir, data_dir, 2, 2, "mesh.sequence=2", "mesh.slices=2", "mesh.dcn_axis=sequence",
                        "sharding.zero1=true") == 0
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["mesh"] == {"data": 2, "fsdp": 1, "expert": 1, "sequence": 2, "tensor": 1}
    assert (info["process_count"], info["device_count"]) == (2, 4)
    slices, one = logged(workdir), logged(one_process_run)
    np.testing.assert_allclose([slices[s] for s in one], list(one.values()), rtol=1e-5)
    np.testing.assert_allclose(logged(workdir, "eval_loss")[STEPS], logged(one_process_run, "eval_loss")[STEPS],
                               rtol=1e-5)


def stopped_at_3(run, tmp_path, name):
    """A copy of `run`'s workdir as if it had stopped after step 3 (the checkpoint of step 6 removed)."""
    workdir = tmp_path / name
    shutil.copytree(run, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    return workdir


@pytest.mark.parametrize("written_by, resumed_on", [((2, 2), (1, 4)), ((1, 4), (2, 2))])
def test_resume_on_a_different_topology(written_by, resumed_on, two_process_run, one_process_run, data_dir, tmp_path,
                                        capfd):
    source = two_process_run if written_by == (2, 2) else one_process_run
    workdir = stopped_at_3(source, tmp_path, "resumed")
    assert launch_local(workdir, data_dir, *resumed_on) == 0
    assert "resumed from" in capfd.readouterr().out
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["process_count"] == resumed_on[0]
    # Steps 4-6 recomputed on the other topology equal the uninterrupted runs' steps 4-6.
    resumed, straight = logged(workdir), logged(one_process_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [straight[s] for s in (4, 5, 6)], rtol=1e-5)
    np.testing.assert_allclose(logged(workdir, "eval_loss")[STEPS], logged(one_process_run, "eval_loss")[STEPS],
                               rtol=1e-5)


def test_a_failing_process_stops_the_others(tmp_path, capsys):
    # Process 1 fails at once; process 0 would otherwise wait for it (here: sleep) much longer.
    script = ("import os, sys, time; i = os.environ['BIGMODEL_PROCESS_ID']; print('started', i, flush=True); "
              "sys.exit(3) if i == '1' else time.sleep(120)")
    start = time.time()
    code = local.run([], 2, program=[sys.executable, "-c", script])
    out = capsys.readouterr().out
    assert code == 3 and time.time() - start < 30
    assert "[p0] started 0" in out and "[p1] started 1" in out
    assert "process 1 exited with 3; stopped the others" in out


def test_process_environment():
    env = local.process_env(1, 2, "127.0.0.1:1234", 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
    assert (env["BIGMODEL_COORDINATOR"], env["BIGMODEL_NUM_PROCESSES"], env["BIGMODEL_PROCESS_ID"]) == (
        "127.0.0.1:1234", "2", "1")
    assert env["JAX_PLATFORMS"] == "cpu"
