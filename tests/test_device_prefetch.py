"""The trainer's one-step-ahead device prefetch: same batches, resumable state."""

import grain
import jax
import numpy as np
import pytest

from bigmodel.train import DevicePrefetch


def _iter():
    return iter(grain.MapDataset.range(10).map(lambda i: {"x": np.full((2,), i)}).to_iter_dataset())


def test_prefetch_hands_out_the_same_batches_on_device():
    put_calls = []

    def put(b):
        put_calls.append(int(b["x"][0]))
        return jax.device_put(b)

    got = DevicePrefetch(_iter(), put)
    first = next(got)
    assert isinstance(first["x"], jax.Array) and int(first["x"][0]) == 0
    assert put_calls == [0, 1]  # batch 1 is on the device before step 0's batch is used
    rest = [int(b["x"][0]) for b in got]
    assert rest == list(range(1, 10))  # every batch once, in order, then StopIteration


@pytest.mark.parametrize("taken", [0, 1, 3, 9])
def test_state_is_after_the_batches_handed_out_not_the_one_read_ahead(taken):
    pre = DevicePrefetch(_iter(), jax.device_put)
    for _ in range(taken):
        next(pre)
    resumed = _iter()
    resumed.set_state(pre.get_state())
    assert int(next(resumed)["x"][0]) == taken
