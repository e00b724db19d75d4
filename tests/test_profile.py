"""train.profile_steps: a jax.profiler trace of a window of real training steps in the workdir."""

import gzip
import json

import pytest

from bigmodel import cli, config as config_lib

from conftest import GPT_TINY


@pytest.mark.parametrize("text", ["3", "0:2", "3:0", "a:b", "3:2:1"])
def test_a_malformed_window_is_refused(text):
    with pytest.raises(config_lib.ConfigError, match="START:COUNT"):
        config_lib.profile_window(text)


def test_windows():
    assert config_lib.profile_window("") is None
    assert config_lib.profile_window("10:5") == (10, 5)


def test_the_command_refuses_a_bad_window_in_one_line(tmp_path, capsys):
    args = ["train", "--config", GPT_TINY + ":tiny", "--workdir", str(tmp_path), "--config.train.profile_steps=5"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.train.profile_steps='5'" in err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_training_steps_are_traced(tmp_path, tiny_overrides, capsys):
    args = ["train", "--config", GPT_TINY + ":tiny", "--workdir", str(tmp_path)]
    args += [f"--config.{o}" for o in tiny_overrides + ["train.steps=6", "log.every=2", "eval.every=6",
                                                        "checkpoint.every=6", "train.profile_steps=3:2"]]
    assert cli.main(args) == 0
    assert "profile of steps 3-4 written to" in capsys.readouterr().out
    xplanes = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(xplanes) == 1 and xplanes[0].stat().st_size > 0  # TensorBoard's profile plugin reads it
    perfetto = list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
    assert len(perfetto) == 1
    events = json.loads(gzip.decompress(perfetto[0].read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e.get("name", "") for e in events}
    steps = [n for n in names if "step" in n and "jit" in n.lower()]
    assert steps, sorted(names)[:50]  # the compiled train step ran inside the window
