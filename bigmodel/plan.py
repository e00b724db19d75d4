"""`bigmodel plan`: will this config fit on that mesh and device? Answered before renting it.

    bigmodel plan --config experiments/gpt_tiny.py[:ARG] [--config.KEY=VALUE ...]
                  [--mesh fsdp=4,sequence=2 | DATA,FSDP,EXPERT,SEQUENCE,TENSOR | DATA,FSDP,TENSOR]
                  [--devices N] [--target h100-80gb | h100x8 | tpu-v5p-32 ...] [--no-compile] [--json]

1. The config and mesh are validated like `bigmodel train` does (same ConfigError messages).
2. Analytic, per device, from `jax.eval_shape` of the real train state: parameters and Adam
   moments as sharded by the config's rules (and config.sharding.zero1), gradients, and an activation estimate
   (stored forward values per layer, Korthikanti et al. 2022 without dropout masks).
3. Compiled, unless --no-compile: the real train step is lowered and compiled for the mesh
   (no training, no real arrays) and XLA's `memory_analysis()` gives argument, output and
   temporary bytes per device. On a CPU host the command re-runs itself with as many fake
   CPU devices as the mesh needs, so a 64-device plan compiles on a laptop (slowly for big
   models: use --no-compile there). XLA's CPU numbers are a cross-check, not the target's.
4. A verdict for the target device: the analytic total (or XLA's peak for a model family
   without an activation estimate) against the device's memory, less a reserve.

With a compile target (--target h100x8, h200x8, a100-80gbx8, tpu-v5p-32, tpu-v5p-32x2, ...:
bigmodel/aot.py) step 3 uses the target's own compiler instead (the CUDA plugin or libtpu,
no accelerator needed), the verdict is its peak, and the report adds the compile time, the
fused attention kernel in the HLO, the collectives per step, FLOPs and a roofline bound.
`--json` prints any plan as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from bigmodel import config as config_lib
from bigmodel.config import BATCH_AXES, MESH_AXES, ConfigError

GiB = 1024**3
# Memory per device (GiB, nominal HBM) of the targets `--target` knows.
TARGETS: dict[str, float] = {
    "h100-80gb": 80, "h200": 141, "a100-40gb": 40, "a100-80gb": 80,
    "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32,
}
# Left for the runtime, XLA workspace, fragmentation and what the estimate misses.
RESERVE = 0.10


@dataclasses.dataclass
class Plan:
    """Per-device memory figures (bytes) for one config on one mesh and target."""

    mesh: dict[str, int]
    target: str
    params: int  # parameters as sharded
    opt_state: int  # Adam moments (and step counts) as sharded
    grads: int  # gradients (same layout as the parameters), plus an accumulator with grad_accum > 1
    activations: int  # estimated stored activations of one microbatch
    param_count: int
    compiled: dict[str, int] | None = None  # from XLA's memory_analysis; None when not compiled
    zero1: bool = False  # optimizer state also split over 'data' (config.sharding.zero1)
    note: str = ""
    exact: bool = False  # compiled by the target's own compiler (--target h100x8, tpu-v5p-32, ...): its peak is judged

    @property
    def total(self) -> int:
        """Analytic per-device total."""
        return self.params + self.opt_state + self.grads + self.activations

    @property
    def judged(self) -> int:
        """Bytes the verdict uses: the analytic total, or XLA's peak where activations have no estimate."""
        if self.exact and self.compiled:
            return self.compiled["peak"]
        if not self.activations and self.compiled:
            return max(self.total, self.compiled["peak"])
        return self.total

    @property
    def budget(self) -> int:
        """Usable bytes per target device."""
        return int(TARGETS[self.target] * GiB * (1 - RESERVE))

    @property
    def fits(self) -> bool:
        """Whether the judged bytes stay inside the budget (and the target's compiler found room, where it ran)."""
        if self.exact and self.compiled is None:
            return False
        return self.judged <= self.budget


# --------------------------------------------------------------------------- config and mesh


SHORT_MESH = ("data", "fsdp", "tensor")  # the three-number --mesh form (expert = sequence = 1)


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,sequence=2' (others 1), all five sizes in MESH_AXES order, or 'DATA,FSDP,TENSOR'; one may be -1."""
    usage = (f"--mesh {text!r}: give axis=size pairs (e.g. --mesh fsdp=4,sequence=2; unnamed axes are 1), all "
             f"five sizes {','.join(a.upper() for a in MESH_AXES)}, or three sizes DATA,FSDP,TENSOR, e.g. --mesh 1,8,1")
    parts = [p.strip() for p in text.split(",")]
    try:
        named = {k.strip(): int(v) for k, _, v in (p.partition("=") for p in parts)} if "=" in text else None
        sizes = [int(p) for p in parts] if named is None else []
    except ValueError:
        raise ConfigError(usage) from None
    if named is not None:
        if set(named) - set(MESH_AXES) or len(named) != len(parts):
            raise ConfigError(f"--mesh {text!r}: unknown or repeated axis; the axes are {', '.join(MESH_AXES)}")
        return {axis: named.get(axis, 1) for axis in MESH_AXES}
    if len(sizes) == len(MESH_AXES):
        return dict(zip(MESH_AXES, sizes))
    if len(sizes) == len(SHORT_MESH):
        return {axis: dict(zip(SHORT_MESH, sizes)).get(axis, 1) for axis in MESH_AXES}
    raise ConfigError(usage)


def configure(spec: str, overrides: list[str], mesh: dict[str, int] | None, devices: int | None,
              available: int | None = None, model: str | None = None):
    """Load and validate the config on the mesh (and named model); returns (config, resolved mesh sizes)."""
    config = config_lib.load(spec, [] if model else overrides)
    if model:
        from bigmodel import models

        try:
            named = models.model_config(model)
        except ValueError as e:
            raise ConfigError(f"--model {model!r}: {e}") from None
        with config.unlocked():
            config.model = named
        config.lock()
        for item in overrides:
            key, _, value = item.partition("=")
            config_lib.apply_override(config, key, value)
    if mesh is not None:
        for axis, size in mesh.items():
            config_lib.apply_override(config, f"mesh.{axis}", str(size))
    if devices is None:
        sizes = config_lib.mesh_request(config.mesh)
        if -1 in sizes.values():
            if available is None:
                raise ConfigError("the mesh has a -1 axis: give --devices N (the job's device count) or full sizes")
            devices = available
        else:
            devices = math.prod(sizes.values())
    return config, config_lib.validate(config, devices)


def abstract_state(config) -> Any:
    """The boxed train state as shapes only (jax.eval_shape: no memory, no devices)."""
    from bigmodel import train

    return train.prepare(config).abstract


# --------------------------------------------------------------------------- analytic figures


def sharded_bytes(shapes: Any, specs: Any, sizes: Mapping[str, int]) -> int:
    """Bytes of one device's shard of every leaf of `shapes`, laid out by mesh PartitionSpecs `specs`."""
    import jax
    from jax.sharding import PartitionSpec as P

    def leaf(x, spec) -> int:
        shape = list(x.shape)
        for dim, axes in enumerate(tuple(spec)[: len(shape)]):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            # Uneven dimensions are padded to a multiple of the shard count.
            shape[dim] = -(-shape[dim] // math.prod(sizes[a] for a in axes))
        return math.prod(shape) * x.dtype.itemsize

    return sum(jax.tree.leaves(jax.tree.map(leaf, shapes, specs, is_leaf=lambda s: isinstance(s, P))))


def activation_bytes(config, sizes: Mapping[str, int]) -> int:
    """Stored forward activations of one microbatch per device, for a transformer config.

    Per token and layer the backward pass keeps (in the compute dtype): the two LayerNorm
    inputs and outputs (4·D), Q, K, V and the attention output (4·D/t), the MLP hidden
    before and after the nonlinearity (2·F/t) and the attention probabilities (N·T/t);
    the logits and their gradient add 2·V/t float32 values. remat='full' keeps only each
    layer's input plus one layer being recomputed. A device holds 1/(data·fsdp·expert) of
    the rows and 1/sequence of each row's tokens (the gathered keys and values of sequence
    parallelism are transient and not counted).
    """
    m = config.model
    if not all(k in m for k in ("num_layers", "d_model", "num_heads")) or "seq_len" not in config.data:
        return 0
    t = sizes["tensor"]
    rows = config.train.batch_size // config.train.grad_accum // math.prod(sizes[a] for a in BATCH_AXES)
    tokens = rows * config.data.seq_len // sizes["sequence"]
    d, heads, seq = m.d_model, m.num_heads, config.data.seq_len
    ff = m.get("d_ff", 0) or 4 * d
    size = 2 if m.get("dtype", "float32") in ("bfloat16", "float16") else 4
    per_layer = tokens * size * (4 * d + 4 * d / t + 2 * ff / t + heads * seq / t)
    layers = per_layer * m.num_layers
    if m.get("remat", "none") == "full":
        layers = tokens * size * d * m.num_layers + per_layer
    logits = tokens * 4 * 2 * m.get("vocab_size", 0) / t
    return int(layers + logits)


def analytic(config, sizes: Mapping[str, int], target: str) -> Plan:
    """The per-device memory plan from shapes and sharding rules alone."""
    import flax.linen as nn

    from bigmodel import flops, sharding

    abstract = abstract_state(config)
    rules = sharding.as_rules(config.sharding.rules)
    specs = sharding.state_specs(abstract, rules, sizes, config.sharding.zero1)
    shapes = nn.meta.unbox(abstract)
    params = sharded_bytes(shapes.params, specs.params, sizes)
    accumulators = params if config.train.grad_accum > 1 else 0
    return Plan(
        mesh=dict(sizes), target=target, params=params,
        opt_state=sharded_bytes(shapes.opt_state, specs.opt_state, sizes), zero1=config.sharding.zero1,
        grads=params + accumulators, activations=activation_bytes(config, sizes),
        param_count=flops.param_count(abstract.params),
    )


# --------------------------------------------------------------------------- compiled figures


def compiled_memory(config, sizes: Mapping[str, int]) -> dict[str, int]:
    """Compile the train step for the mesh (shapes only) and read XLA's per-device memory analysis."""
    from bigmodel import sharding, train

    return memory_figures(train.prepare(config, sharding.make_mesh(dict(sizes))))


def memory_figures(run) -> dict[str, int]:
    """Per-device bytes of a prepared run's compiled train step: the state's shards and XLA's memory analysis."""
    import jax

    state = run.abstract_state()
    ma = run.train_step.memory_analysis()

    def shard(tree) -> int:
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    figures = {
        "params": shard(state.params),
        "opt_state": shard(state.opt_state),
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
    }
    # Donated state buffers are reused for the outputs, so aliased bytes count once.
    figures["peak"] = figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
    return figures


def make_plan(config, sizes: Mapping[str, int], target: str, compile: bool = True) -> Plan:
    """Analytic figures, plus compiled ones when this host has exactly the mesh's devices."""
    import jax

    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} is unknown; choose one of {', '.join(TARGETS)}")
    plan = analytic(config, sizes, target)
    if not compile:
        plan.note = "not compiled (--no-compile): analytic figures only"
    else:
        needed = math.prod(sizes.values())
        if jax.device_count() == needed:
            plan.compiled = compiled_memory(config, sizes)
        else:
            plan.note = (f"not compiled: the mesh needs {needed} devices and this host has {jax.device_count()} "
                         f"{jax.devices()[0].platform} devices")
    return plan


# --------------------------------------------------------------------------- output


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n:,.0f} B"


def format_plan(plan: Plan, title: str) -> str:
    """A short table of per-device bytes and the verdict line."""
    mesh = " ".join(f"{a}={plan.mesh[a]}" for a in MESH_AXES)
    c = plan.compiled or {}
    rows = [
        ("parameters", plan.params, c.get("params")),
        ("optimizer state" + (" (ZeRO-1)" if plan.zero1 else ""), plan.opt_state, c.get("opt_state")),
        ("gradients", plan.grads, None),
        ("activations (estimate)", plan.activations or None, None),
        ("arguments (XLA)", None, c.get("arguments")),
        ("temporaries (XLA)", None, c.get("temporaries")),
        ("total / peak", plan.total, c.get("peak")),
    ]
    lines = [
        (f"plan: {title} on mesh {mesh} ({math.prod(plan.mesh.values())} devices), target {plan.target} "
        f"({TARGETS[plan.target]:g} GiB per device)"),
        f"model: {plan.param_count:,} parameters",
        f"{'per device':<26}{'analytic':>14}{'compiled' if plan.compiled else '':>14}".rstrip(),
    ]
    for name, a, b in rows:
        if a is None and b is None:
            continue
        cells = [_bytes(x) if x is not None else "" for x in (a, b)]
        lines.append(f"  {name:<24}{cells[0]:>14}{cells[1]:>14}".rstrip())
    if not plan.activations:
        lines.append("activations: no estimate for this model family; the compiled temporaries include them")
    if plan.note:
        lines.append(plan.note)
    margin = plan.budget - plan.judged
    verdict = "fits" if plan.fits else "does not fit"
    lines.append(
        f"verdict: {verdict} on {plan.target}: {_bytes(plan.judged)} per device of {_bytes(plan.budget)} usable "
        f"({1 - RESERVE:.0%} of {TARGETS[plan.target]:g} GiB), "
        f"margin {'+' if margin >= 0 else '-'}{_bytes(abs(margin))}"
    )
    return "\n".join(lines)


def _respawn_argv(args: argparse.Namespace) -> list[str]:
    argv = ["plan", "--config", args.config, "--target", args.target]
    argv += ["--mesh", args.mesh] if args.mesh else []
    argv += ["--devices", str(args.devices)] if args.devices else []
    argv += ["--model", args.model] if args.model else []
    argv += ["--json"] if getattr(args, "json", False) else []
    return argv + [f"--config.{o}" for o in args.overrides]


def as_json(plan: Plan, extra: Mapping[str, Any] | None = None) -> str:
    """The plan (and a target compile's figures) as one JSON object."""
    import json

    record = dict(dataclasses.asdict(plan), total=plan.total, judged=plan.judged, budget=plan.budget,
                  fits=plan.fits, memory_gib=TARGETS[plan.target])
    return json.dumps({**record, **(extra or {})}, indent=1, default=float)


def _plan_target(args: argparse.Namespace, target) -> int:
    """`plan --target h100x8` (and other ahead-of-time targets): compile with the target's compiler and report."""
    from bigmodel import aot

    missing = aot.missing_compiler(target)
    if missing:
        raise ConfigError(missing)
    env = aot.environment(target, dict(os.environ))
    if any(os.environ.get(k) != v for k, v in env.items()) and not os.environ.get("BIGMODEL_PLAN_CHILD"):
        # JAX reads the platform and XLA's flags when it starts: run again with them set.
        env["BIGMODEL_PLAN_CHILD"] = "1"
        return subprocess.run([sys.executable, "-m", "bigmodel.cli", *_respawn_argv(args)], env=env).returncode
    overrides = list(args.overrides)
    if target.slices > 1 and not any(o.startswith("mesh.slices=") for o in overrides):
        overrides.append(f"mesh.slices={target.slices}")
    mesh = parse_mesh(args.mesh) if args.mesh else None
    config, sizes = configure(args.config, overrides, mesh, args.devices or target.devices,
                              available=target.devices, model=args.model)
    if math.prod(sizes.values()) != target.devices:
        raise ConfigError(f"--target {target.name} has {target.devices} devices but the mesh "
                          f"{dict(sizes)} has {math.prod(sizes.values())}; give --mesh sizes whose product is "
                          f"{target.devices} (one may be -1)")
    plan, extra = aot.plan_target(config, sizes, target)
    title = args.config + (f" with {args.model}" if args.model else "")
    if args.json:
        print(as_json(plan, extra), flush=True)
    else:
        print(format_plan(plan, title) + "\n" + aot.format_extra(extra), flush=True)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Validate, estimate, compile and judge one plan."""
    import jax

    from bigmodel import aot
    from bigmodel.launch import local

    target = aot.parse(args.target)
    if target is not None:
        return _plan_target(args, target)
    mesh = parse_mesh(args.mesh) if args.mesh else None
    config, sizes = configure(args.config, args.overrides, mesh, args.devices, available=jax.device_count(),
                              model=args.model)
    needed = math.prod(sizes.values())
    if (args.compile and jax.devices()[0].platform == "cpu" and jax.device_count() != needed
            and not os.environ.get("BIGMODEL_PLAN_CHILD")):
        # Fake CPU devices are fixed when JAX starts: run again with the mesh's count.
        env = dict(os.environ, BIGMODEL_PLAN_CHILD="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=local.with_device_count(os.environ.get("XLA_FLAGS", ""), needed))
        return subprocess.run([sys.executable, "-m", "bigmodel.cli", *_respawn_argv(args)], env=env).returncode
    plan = make_plan(config, sizes, args.target, compile=args.compile)
    if args.json:
        print(as_json(plan), flush=True)
    else:
        print(format_plan(plan, args.config + (f" with {args.model}" if args.model else "")), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bigmodel plan` to the command's sub-parsers."""
    p = subparsers.add_parser(
        "plan", help="per-device memory of a config on a mesh and target device, compiled ahead of time",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiments/NAME.py[:VARIANT]")
    p.add_argument("--model", default=None, help="replace config.model by a named size, e.g. gpt:124m")
    p.add_argument("--mesh", default=None,
                   help="axis=size pairs such as fsdp=4,sequence=2 (others 1), all five sizes "
                        "DATA,FSDP,EXPERT,SEQUENCE,TENSOR, or DATA,FSDP,TENSOR (default: config.mesh)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices in the job (default: the mesh's product, or this host's count for a -1 axis)")
    p.add_argument("--target", default="h100-80gb",
                   help=f"device to judge against: {', '.join(TARGETS)}; or compile for it with its own compiler: "
                        "h100xN, h200xN, a100-80gbxN (8 GPUs a node), tpu-v5p-N, tpu-v5e-N, tpu-v6e-N[xSLICES], "
                        "e.g. h100x8, tpu-v5p-32, tpu-v5p-32x2 (needs the gpu-compile / tpu extra)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--no-compile", "--no_compile", dest="compile", action="store_false",
                   help="analytic figures only (compiling big models on a CPU is slow)")
    p.set_defaults(func=cmd_plan, takes_overrides=True)
    return p
