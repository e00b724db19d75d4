"""Ahead-of-time compiles for GPU nodes and TPU slices on a host that has neither.

`bigmodel plan --target h100x8` (or tpu-v5p-32, ...) compiles the real train step
(`train.prepare` on a mesh of the target's devices) with the target's own compiler: the CUDA
compiler of the jax[cuda12] plugin for a GPU described by a target file in
bigmodel/gpu_specs/, or libtpu for a named TPU topology. No accelerator is needed, and
nothing runs: the compiled executable gives memory figures, its HLO, and (TPU) XLA's cost
analysis.

Target names:
  h100xN, h200xN, a100-80gbxN   N GPUs, 8 per node (N <= 8, or a multiple of 8: N/8 nodes)
  tpu-v5p-N                     a v5p slice of N TensorCores (N/2 chips), as Cloud TPU names them
  tpu-v5e-N, tpu-v6e-N          a v5e / v6e slice of N chips
  tpu-...xS                     S such slices joined by the data-centre network (multi-slice)
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import traceback
from typing import Any

from bigmodel.config import ConfigError
from bigmodel.flops import PEAK_FLOPS

GPUS_PER_NODE = 8
SPECS = pathlib.Path(__file__).with_name("gpu_specs")
# Extras that bring each compiler (pyproject.toml).
EXTRA = {"cuda": "gpu-compile", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device kind: its target file (GPU), memory (plan.TARGETS key) and roofline figures."""

    memory_key: str  # key of plan.TARGETS (GiB per device)
    peak_flops: float  # dense bf16 FLOP/s per device (bigmodel/flops.py's vendor figures)
    bandwidth: float  # HBM bytes/s per device (vendor figures)
    spec: str = ""  # GPU target description in bigmodel/gpu_specs/


_PEAK = dict(PEAK_FLOPS)
# HBM bandwidth per device: NVIDIA data sheets (as in gpu_specs/) and Cloud TPU system architecture pages.
GPUS = {
    "h100": Chip("h100-80gb", _PEAK["H100"], 3.35e12, "h100_sxm_80gb.txtpb"),
    "h200": Chip("h200", _PEAK["H200"], 4.8e12, "h200_sxm.txtpb"),
    "a100-80gb": Chip("a100-80gb", _PEAK["A100"], 2.039e12, "a100_sxm_80gb.txtpb"),
}
TPUS = {
    "v5p": Chip("tpu-v5p", _PEAK["TPU v5p"], 2.765e12),
    "v5e": Chip("tpu-v5e", _PEAK["TPU v5e"], 0.819e12),
    "v6e": Chip("tpu-v6e", _PEAK["TPU v6e"], 1.64e12),
}
# Slice names -> libtpu topology names (chips x, y[, z]); v5p counts 2 TensorCores per chip.
TPU_TOPOLOGIES = {
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    **{f"{kind}-{n}": f"{kind}:{shape}" for kind in ("v5e", "v6e")
       for n, shape in ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"),
                        (256, "16x16"))},
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: a platform, a topology of devices, and the chip's figures."""

    name: str
    platform: str  # 'cuda' or 'tpu'
    chip: Chip
    devices: int
    topology: str  # '1xNODESxGPUS' (cuda) or a libtpu topology name
    slices: int = 1

    @property
    def backend(self) -> str:
        """jax.default_backend()'s name on such a device ('gpu' or 'tpu')."""
        return "gpu" if self.platform == "cuda" else "tpu"


def names() -> list[str]:
    """Examples of target names, for help and error messages."""
    return ["h100x1", "h100x8", "h100x16", "h200x8", "a100-80gbx8", "tpu-v5p-32", "tpu-v5e-16", "tpu-v6e-64",
            "tpu-v5p-32x2"]


def parse(name: str) -> Target | None:
    """The target a --target name describes, or None when it names no ahead-of-time target."""
    gpu = re.fullmatch(r"(h100|h200|a100-80gb)x(\d+)", name)
    if gpu:
        n = int(gpu.group(2))
        if n < 1 or (n > GPUS_PER_NODE and n % GPUS_PER_NODE):
            raise ConfigError(f"--target {name}: {n} GPUs; give 1 to {GPUS_PER_NODE} or a multiple of "
                              f"{GPUS_PER_NODE} (whole nodes of {GPUS_PER_NODE})")
        nodes, per_node = max(1, n // GPUS_PER_NODE), min(n, GPUS_PER_NODE)
        return Target(name, "cuda", GPUS[gpu.group(1)], n, f"1x{nodes}x{per_node}")
    tpu = re.fullmatch(r"tpu-(v5p|v5e|v6e)-(\d+)(?:x(\d+))?", name)
    if tpu:
        kind, size, slices = tpu.group(1), tpu.group(2), int(tpu.group(3) or 1)
        topology = TPU_TOPOLOGIES.get(f"{kind}-{size}")
        if topology is None or slices < 1:
            known = ", ".join(k for k in TPU_TOPOLOGIES if k.startswith(kind))
            raise ConfigError(f"--target {name}: unknown {kind} slice; the known sizes are {known} "
                              f"(append xS for S slices)")
        chips = math.prod(int(d) for d in topology.partition(":")[2].split("x"))
        return Target(name, "tpu", TPUS[kind], chips * slices, topology, slices)
    return None


def missing_compiler(target: Target) -> str | None:
    """Why this host cannot compile for `target` (the package to install), or None."""
    if target.platform == "cuda":
        present = importlib.util.find_spec("jax_cuda12_plugin") is not None
        package = "the CUDA plugin of the pinned JAX (jax[cuda12])"
    else:
        present = importlib.util.find_spec("libtpu") is not None
        package = "libtpu (jax[tpu])"
    if present:
        return None
    return f"--target {target.name} compiles with {package}: pip install -e '.[{EXTRA[target.platform]}]'"


def environment(target: Target, env: dict[str, str]) -> dict[str, str]:
    """The process environment for compiling for `target` on this host (JAX starts on the CPU)."""
    env = dict(env, JAX_PLATFORMS="cpu")
    if target.platform == "cuda":
        # Autotuning sharded GEMMs would run kernels on devices this host does not have.
        flags = env.get("XLA_FLAGS", "")
        if "--xla_gpu_shard_autotuning" not in flags:
            env["XLA_FLAGS"] = f"{flags} --xla_gpu_shard_autotuning=false".strip()
    return env


def devices(target: Target) -> list[Any]:
    """The target's devices, described for compiling (no hardware behind them)."""
    from jax.experimental import topologies

    missing = missing_compiler(target)
    if missing:
        raise ConfigError(missing)
    if target.platform == "cuda":
        topology = topologies.get_topology_desc(
            target.name, "cuda", target_config=(SPECS / target.chip.spec).read_text(), topology=target.topology)
    else:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        slices = {"num_slices": target.slices} if target.slices > 1 else {}
        topology = topologies.get_topology_desc(target.topology, "tpu", **slices)
    return list(topology.devices)


# --------------------------------------------------------------------------- reading the compiled HLO


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(")
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64,
         "u64": 64, "f8e4m3fn": 8, "f8e5m2": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128}


def _shape_bytes(text: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _BITS[kind] // 8
               for kind, dims in _SHAPE.findall(text))


def _loop_bound(condition: list[str]) -> int:
    """Iterations of a counted loop from its condition (counter < constant N, as scans lower); 1 if unknown."""
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        if "direction=LT" in line and " compare(" in line:
            operands = re.findall(r"%([\w.\-]+)", line.split(" compare(", 1)[1])
            bound = next((constants[o] for o in operands if o in constants), None)
            if bound is not None:
                return int(bound)
    return 1


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Per collective kind: how many run in one step and the bytes they produce per device.

    Read from the compiled (per-device) HLO text: each collective's result shape gives its
    bytes (an asynchronous pair counts once, at its `-done`, whose result is the output); a
    collective inside a loop body (scanned layers) counts once per iteration: XLA's known trip
    count (GPU), or the constant bound of the loop's `counter < N` condition (TPU); else once.
    """
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line[:1].isspace():  # headers start in column 0, instructions are indented
            current = match.group(1)
            bodies[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and line.strip() != "}":
            bodies[current].append(line)
    totals = {kind: collections.Counter() for kind in COLLECTIVES}

    def walk(name: str, times: int, seen: tuple[str, ...]) -> None:
        for line in bodies.get(name, ()):
            inst = _INSTRUCTION.match(line)
            if not inst:
                continue
            shape, op = inst.groups()
            kind = op.removesuffix("-done")
            if kind in totals and not op.endswith("-start"):
                totals[kind]["count"] += times
                totals[kind]["bytes"] += times * _shape_bytes(shape)
            trip = _TRIP.search(line)
            trips = int(trip.group(1)) if trip else 1
            if op == "while" and not trip:
                condition = re.search(r"condition=%?([\w.\-]+)", line)
                trips = _loop_bound(bodies.get(condition.group(1), ()) if condition else ())
            for key, called in _CALLS.findall(line):
                if key == "to_apply" and kind in totals:
                    continue  # the reduction a collective applies
                for callee in (c.strip().lstrip("%") for c in called.strip("{}").split(",")):
                    if callee in bodies and callee not in seen:
                        walk(callee, times * (trips if key == "body" else 1), (*seen, callee))

    if entry is not None:
        walk(entry, 1, (entry,))
    return {kind: {"count": c["count"], "bytes": c["bytes"]} for kind, c in totals.items()}


_MATMUL_CALLS = ("__cublas", "__cudnn$conv", "__triton_gemm")


def matmul_dtypes(hlo: str) -> dict[str, int]:
    """How many matrix products of the compiled HLO produce each element type (dots, GEMM calls, convolutions)."""
    counts: collections.Counter = collections.Counter()
    for line in hlo.splitlines():
        inst = _INSTRUCTION.match(line)
        if inst and (inst.group(2) in ("dot", "convolution") or any(c in line for c in _MATMUL_CALLS)):
            first = _SHAPE.search(inst.group(1))
            if first:
                counts[first.group(1)] += 1
    return dict(counts)


def cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis per device ('flops', 'bytes accessed'), or {} where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - the GPU compiler of an abstract device has none
        return {}
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return {k: float(analysis[k]) for k in ("flops", "bytes accessed") if analysis and k in analysis}


def roofline(target: Target, model_flops: float, hlo_cost: dict[str, float]) -> dict[str, Any]:
    """A lower bound on the step time per device, and the model FLOPs utilisation it implies.

    The larger of the FLOPs over the peak and the bytes accessed over the HBM bandwidth. FLOPs:
    XLA's cost analysis (TPU) or the analytic model FLOPs, whichever is larger: XLA counts a loop
    body (scanned layers) once, and the model's FLOPs run at least once. Bytes: XLA's (TPU; a
    loop body again once, so the bound stays a lower bound), none without a cost analysis
    (GPU: then the bound is the model FLOPs at peak, 100% MFU). Communication is not counted.
    """
    per_device = model_flops / target.devices
    compute = max(hlo_cost.get("flops", 0.0), per_device) / target.chip.peak_flops
    memory = hlo_cost.get("bytes accessed", 0.0) / target.chip.bandwidth
    bound = max(compute, memory)
    return {
        "model_flops_per_device": per_device,
        "hlo_flops_per_device": hlo_cost.get("flops"),
        "hlo_bytes_per_device": hlo_cost.get("bytes accessed"),
        "step_s_lower_bound": bound,
        "bound_by": "memory" if memory > compute else "compute",
        "mfu_at_bound": per_device / target.chip.peak_flops / bound if bound else math.nan,
        "source": "XLA cost analysis" if hlo_cost else "analytic model FLOPs (no cost analysis on this backend)",
    }


# --------------------------------------------------------------------------- the compiled plan


ATTENTION_CALLS = (("__cudnn$fmha", "cudnn (cuDNN fused attention)"),
                   ('custom_call_target="tpu_custom_call"', "splash (Pallas TPU kernel)"))
SUGGESTION = ("shard the parameters and optimizer state (--mesh fsdp=N, config.mesh.fsdp), recompute activations "
              "(config.model.remat='full'), or split the batch (config.train.grad_accum)")


def attention_in(hlo: str) -> str:
    """The fused attention kernel the compiled HLO calls, or 'xla' (plain HLO ops)."""
    return next((name for call, name in ATTENTION_CALLS if call in hlo), "xla")


def largest_arrays(config, sizes, count: int = 5) -> list[tuple[str, int]]:
    """The state's biggest per-device arrays (parameters and optimizer state), as (path, bytes)."""
    import flax.linen as nn
    import jax

    from bigmodel import plan as plan_lib, sharding

    abstract = plan_lib.abstract_state(config)
    specs = sharding.state_specs(abstract, sharding.as_rules(config.sharding.rules), sizes, config.sharding.zero1)
    shapes = nn.meta.unbox(abstract)
    rows = []
    for part in ("params", "opt_state"):
        flat = jax.tree_util.tree_flatten_with_path(getattr(shapes, part))[0]
        spec_leaves = jax.tree.leaves(getattr(specs, part), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
        for (path, leaf), spec in zip(flat, spec_leaves):
            rows.append((f"{part}/" + jax.tree_util.keystr(path, simple=True, separator="/"),
                         plan_lib.sharded_bytes(leaf, spec, sizes)))
    return sorted(rows, key=lambda r: -r[1])[:count]


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def compile_error(error: Exception, target: Target) -> ConfigError:
    """A compile failure as a one-line error naming the config key to change."""
    text = " ".join(str(error).split())[:400]
    frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if "_attend" in frames or "cudnn" in text.lower() or "pallas" in text.lower():
        key = ("config.model.attention_impl: '' picks the backend's fused kernel where it takes the shapes (else "
               "XLA's attention), 'xla' never fuses")
    else:
        key = "the config (rerun with --debug for the traceback)"
    return ConfigError(f"the train step does not compile for {target.name}: {text}; change {key}")


def plan_target(config, sizes, target: Target) -> tuple[Any, dict[str, Any]]:
    """Compile the train step for `target`; returns (plan.Plan judged on the compiled peak, the extra figures)."""
    from bigmodel import plan as plan_lib, sharding, train
    from bigmodel.models import layers

    mesh = sharding.make_mesh(dict(sizes), slices=config.mesh.slices, dcn_axis=config.mesh.dcn_axis,
                              devices=devices(target))
    extra: dict[str, Any] = {"target": target.name, "platform": target.platform, "topology": target.topology,
                             "slices": target.slices, "devices": target.devices}
    try:
        with layers.compiling_for(target.backend):
            plan = plan_lib.analytic(config, sizes, target.chip.memory_key)
            plan.exact = True
            run = train.prepare(config, mesh)
    except Exception as e:
        if not _is_oom(e):
            raise compile_error(e, target) from e
        plan.compiled = None  # with plan.exact: the target's compiler found no room, so the plan does not fit
        extra.update(out_of_memory=" ".join(str(e).split())[:600], largest_arrays=largest_arrays(config, sizes),
                     fits=False, suggestion=SUGGESTION)
        plan.note = f"the {target.platform} compiler ran out of device memory: does not fit"
        return plan, extra
    plan.compiled = plan_lib.memory_figures(run)
    hlo = run.train_step.as_text()
    extra.update(
        compile_s=run.compile_s,
        attention=attention_in(hlo),
        matmul_dtypes=matmul_dtypes(hlo),
        collectives=collectives(hlo),
        flops_per_step=run.flops_per_step,
        roofline=roofline(target, run.flops_per_step, cost(run.train_step)),
        fits=plan.fits,
    )
    if not plan.fits:
        extra.update(largest_arrays=largest_arrays(config, sizes), suggestion=SUGGESTION)
    return plan, extra


def format_extra(extra: dict[str, Any]) -> str:
    """The compile-time, attention, collective and roofline lines under the memory table."""
    from bigmodel.plan import _bytes

    lines = [f"compiled for {extra['target']} ({extra['devices']} {extra['platform']} devices, topology "
             f"{extra['topology']}" + (f", {extra['slices']} slices" if extra["slices"] > 1 else "") + ")"]
    if "out_of_memory" in extra:
        lines.append(f"compiler: {extra['out_of_memory']}")
    else:
        lines.append(f"compile time: {extra['compile_s']:.1f} s; attention: {extra['attention']}")
        lines.append("collectives per step (count, bytes per device):")
        for kind, c in extra["collectives"].items():
            lines.append(f"  {kind:<20}{c['count']:>8,}{_bytes(c['bytes']):>14}")
        r = extra["roofline"]
        lines.append(f"FLOPs per step: {extra['flops_per_step']:.3e} (model, all devices); per device "
                     f"{r['model_flops_per_device']:.3e}" + (f", XLA {r['hlo_flops_per_device']:.3e}"
                                                            if r["hlo_flops_per_device"] else ""))
        lines.append(f"roofline: step >= {r['step_s_lower_bound'] * 1e3:.2f} ms ({r['bound_by']}-bound, "
                     f"{r['source']}), MFU <= {r['mfu_at_bound']:.0%}")
    if "largest_arrays" in extra:
        lines.append("largest arrays per device: " + ", ".join(f"{n} {_bytes(b)}" for n, b in extra["largest_arrays"]))
        lines.append(f"to fit: {extra['suggestion']}")
    return "\n".join(lines)
