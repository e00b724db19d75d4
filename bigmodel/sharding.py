"""Device mesh, logical axis rules and the shardings of state and batches.

Models name their axes logically (see bigmodel/models/layers.py); `config.sharding.rules`
maps those names onto the mesh axes ('data', 'fsdp', 'tensor'). Changing the parallelism
is changing the rules and the mesh sizes, never the model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigmodel.config import MESH_AXES

BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes, or None for replicated). Weights are sharded over
# 'fsdp' along their model dimension and split Megatron-style over 'tensor'.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("pos", None),
    ("norm", None),
    ("layers", None),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)


def as_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Normalise rules read from a ConfigDict/JSON (lists) into hashable tuples."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def make_mesh(sizes: Mapping[str, int]) -> Mesh:
    """A Mesh over all devices with axes ('data', 'fsdp', 'tensor')."""
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: the compiler propagates shardings from our annotations (GSPMD style).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=jax.devices())


def logical_names(tree: Any) -> set[str]:
    """All logical axis names carried by boxed (LogicallyPartitioned) leaves of a tree."""
    names: set[str] = set()
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(leaf, nn.Partitioned):
            names.update(n for n in leaf.names if n is not None)
    return names


def check_rules(abstract_state: Any, rules: Sequence[tuple[str, Any]]) -> None:
    """Refuse a parameter axis name that has no rule (it would silently replicate)."""
    missing = sorted(logical_names(abstract_state) - {name for name, _ in rules})
    if missing:
        raise ValueError(
            f"parameter axis name(s) {missing} have no rule in config.sharding.rules; "
            f"add e.g. ('{missing[0]}', None) or a mesh axis to the rules"
        )


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for every leaf of a boxed abstract state (unboxed structure)."""
    check_rules(abstract_state, rules)
    specs = nn.get_partition_spec(abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's host-local batch into one globally sharded batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on the mesh."""
    return NamedSharding(mesh, P())


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` held by the first local device (from its addressable shards)."""
    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total
