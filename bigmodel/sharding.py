"""Device mesh, logical axis rules and the shardings of state and batches.

Models name their axes logically (see bigmodel/models/layers.py); `config.sharding.rules`
maps those names onto the mesh axes ('data', 'fsdp', 'expert', 'sequence', 'tensor'),
outermost to innermost. Changing the parallelism is changing the rules and the mesh sizes,
never the model.

  data      batch split; parameters replicated (Adam's moments split with sharding.zero1)
  fsdp      batch split; parameters and moments split along their 'embed' dimension
  expert    batch split (data parallel) outside mixture-of-experts layers; experts split inside
  sequence  activations split along the sequence; keys/values gathered by the compiler
  tensor    Megatron split of heads, MLP hidden and vocabulary

With config.mesh.slices > 1 the devices are laid out as `slices` ICI meshes joined over the
DCN along config.mesh.dcn_axis (make_mesh).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigmodel.config import BATCH_AXES, MESH_AXES, ConfigError

# Logical name -> mesh axis (or axes, or None for replicated). Weights are sharded over
# 'fsdp' along their model dimension and split Megatron-style over 'tensor'. Rules apply in
# order and a mesh axis is used once per array (flax): 'act_expert' comes first so that in
# an MoE layer it takes 'expert', and the batch falls back to its second rule.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_expert", "expert"),
    ("act_batch", BATCH_AXES),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "sequence"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),  # grouped-query key/value heads; map to None for K < tensor (MQA)
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("expert", "expert"),
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


def axis_sizes(**sizes: int) -> dict[str, int]:
    """{axis: size} for every mesh axis, 1 where not named: axis_sizes(fsdp=8)."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; the axes are {MESH_AXES}")
    return {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}


def make_mesh(sizes: Mapping[str, int], *, slices: int = 1, dcn_axis: str = "data",
              devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES over `devices` (default all; a smaller mesh takes the first ones).

    slices > 1 (config.mesh.slices): the devices form that many slices (TPU slices, or groups
    of processes such as nodes) joined by the data-centre network (DCN) along `dcn_axis`;
    each slice holds an ICI mesh of the other sizes and sizes[dcn_axis] / slices.
    """
    if set(sizes) != set(MESH_AXES):
        raise ValueError(f"mesh sizes {dict(sizes)} must name exactly the axes {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: the compiler propagates shardings from our annotations (GSPMD style).
    types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    if dcn_axis not in MESH_AXES or sizes[dcn_axis] % slices:
        raise ConfigError(f"config.mesh.slices={slices} does not divide config.mesh.{dcn_axis}; see config.validate")
    dcn = tuple(slices if a == dcn_axis else 1 for a in MESH_AXES)
    ici = tuple(size // d for size, d in zip(shape, dcn))
    if math.prod(ici) * math.prod(dcn) != len(devices):
        raise ConfigError(
            f"config.mesh: {slices} slices along {dcn_axis!r} of an ICI mesh "
            f"{'x'.join(map(str, ici))} ({'*'.join(MESH_AXES)}) make {math.prod(ici) * slices} devices, but the "
            f"run has {len(devices)}; make the product of the mesh sizes {len(devices)}"
        )
    return Mesh(hybrid_devices(ici, dcn, devices), MESH_AXES, axis_types=types)


class _InSlice:
    """A device seen as part of slice `slice_index` (a group of processes, such as a node)."""

    def __init__(self, device: Any, slice_index: int) -> None:
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device, name)


def hybrid_devices(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """The device array of a multi-slice mesh: ICI meshes inside slices, tiled over the DCN mesh.

    Multi-slice TPU devices know their slice (`slice_index`). Where every device reports the
    same slice or none (GPU, CPU), a slice is a process (`process_is_granule`), or, with
    several processes per node, a run of consecutive process indices (launchers number a
    node's processes consecutively).
    """
    slices = math.prod(dcn)
    found = len({getattr(d, "slice_index", 0) for d in devices})
    if found > 1:
        if found != slices:
            raise ConfigError(f"config.mesh.slices={slices}, but the devices belong to {found} slices; "
                              f"set config.mesh.slices={found}")
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    processes = sorted({d.process_index for d in devices})
    if len(processes) == slices:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
    if len(processes) % slices:
        raise ConfigError(
            f"config.mesh.slices={slices}: these {devices[0].platform} devices carry no slice index, so a slice is "
            f"a group of processes, and {len(processes)} processes do not split into {slices} equal groups; set "
            "config.mesh.slices to the node count (it must divide the process count)"
        )
    per_slice = len(processes) // slices
    rank = {p: i for i, p in enumerate(processes)}
    views = [_InSlice(d, rank[d.process_index] // per_slice) for d in devices]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, views)
    return np.vectorize(lambda view: view.device, otypes=[object])(grid)


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


def zero1_spec(shape: Sequence[int], spec: P, sizes: Mapping[str, int], axis: str = "data") -> P:
    """ZeRO-1: `spec` with `axis` added to the dimension it leaves the largest pieces of.

    Unchanged where `axis` has size 1 or is used already, and for leaves no dimension of which
    divides evenly (scalar step counts, small vectors): those stay as they were.
    """
    entries = [tuple(e) if isinstance(e, (tuple, list)) else ((e,) if e else ()) for e in tuple(spec)]
    entries += [()] * (len(shape) - len(entries))
    if sizes[axis] == 1 or any(axis in e for e in entries):
        return spec
    best, piece = None, 0
    for dim, (size, axes) in enumerate(zip(shape, entries)):
        split = math.prod(sizes[a] for a in axes)
        if size % (split * sizes[axis]) == 0 and size // split > piece:
            best, piece = dim, size // split
    if best is None:
        return spec
    entries[best] = (axis, *entries[best])
    return P(*[e[0] if len(e) == 1 else (e or None) for e in entries])


def state_specs(abstract_state: Any, rules: Sequence[tuple[str, Any]], sizes: Mapping[str, int],
                zero1: bool = False) -> Any:
    """Mesh PartitionSpecs of every leaf of a boxed abstract TrainState (unboxed structure).

    zero1 (config.sharding.zero1) splits the optimizer state over 'data' as well (zero1_spec):
    the parameters stay replicated over 'data', so the compiler reduce-scatters gradients
    into the moments' layout and all-gathers the updated parameters.
    """
    check_rules(abstract_state, rules)
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_state), rules)
    if zero1:
        shapes = nn.meta.unbox(abstract_state.opt_state)
        specs = specs.replace(opt_state=jax.tree.map(lambda x, s: zero1_spec(x.shape, s, sizes), shapes,
                                                     specs.opt_state))
    return specs


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]], zero1: bool = False) -> Any:
    """NamedShardings for every leaf of a boxed abstract state (unboxed structure); see state_specs."""
    specs = state_specs(abstract_state, rules, dict(mesh.shape), zero1)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over BATCH_AXES; replicated over 'sequence' and 'tensor'.

    The model's first activation constraint then splits the sequence. Replicas of a batch row
    may live on several processes (a 'sequence' or 'tensor' axis spanning hosts): those
    processes load the same rows (process_batch_shard).
    """
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_groups(devices: np.ndarray, axis_names: Sequence[str]) -> list[tuple[int, ...]]:
    """Processes grouped by the batch rows their devices hold, in order of their first process."""
    axis_names = list(axis_names)
    batch = [axis_names.index(a) for a in BATCH_AXES]
    rest = [i for i in range(devices.ndim) if i not in batch]
    blocks = np.transpose(devices, batch + rest).reshape(math.prod(devices.shape[i] for i in batch), -1)
    held: dict[int, set[int]] = {}
    for block, row in enumerate(blocks):
        for device in row:
            held.setdefault(device.process_index, set()).add(block)
    groups: dict[frozenset[int], list[int]] = {}
    for process, rows in held.items():
        groups.setdefault(frozenset(rows), []).append(process)
    row_sets = list(groups)
    for i, rows in enumerate(row_sets):
        if len(rows) != len(row_sets[0]) or any(rows & other for other in row_sets[i + 1:]):
            raise ConfigError(
                "the mesh gives processes overlapping or unequal parts of the batch; order the mesh axes so "
                "each process holds whole batch shards (keep the axes spanning processes outermost)"
            )
    return sorted(tuple(sorted(ps)) for ps in groups.values())


@functools.cache
def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count) of this process's part of every global batch, for the data pipeline.

    count is the number of distinct row sets the processes hold; processes holding the
    same rows get the same index, so they load identical host batches, as
    jax.make_array_from_process_local_data requires of replicas.
    """
    groups = batch_groups(mesh.devices, mesh.axis_names)
    index = next(i for i, group in enumerate(groups) if jax.process_index() in group)
    return index, len(groups)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's host-local batch into one globally sharded batch."""
    sharding = batch_sharding(mesh)
    _, count = process_batch_shard(mesh)
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(sharding, value, (value.shape[0] * count, *value.shape[1:]))
    return out


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
