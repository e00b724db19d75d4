"""Orbax checkpoints of the train state, the data iterator and the resolved config.

The data iterator's state is the same on every process (see bigmodel.data.pipeline), so
it is saved once as JSON and restores onto any number of processes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Asynchronous, keep-the-last-k checkpoints under WORKDIR/checkpoints/STEP."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool) -> None:
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: dict) -> None:
        """Start saving (returns before an asynchronous write finishes)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iter.get_state()),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
        """Restore the state onto the shardings in `abstract_state` (and the iterator in place)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None:
            data_iter.set_state(restored["data"])
        return restored["state"]

    def wait(self) -> None:
        """Block until any asynchronous save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
