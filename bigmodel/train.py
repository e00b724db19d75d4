"""The trainer: one code path for every model, task and mesh. Reads top to bottom.

  1. state and optimizer       4. prepare(): pieces, shapes, shardings, compiled steps, FLOPs
  2. sharded initialisation    5. faults: preemption, non-finite values, resume checks
  3. the jitted steps          6. train(): restore, the loop (log, evaluate, checkpoint), summary

`prepare` serves `bigmodel bench` (the same compiled step, timed), `bigmodel plan` (shapes
only, or the step compiled for a mesh of any devices without real data) and `bigmodel
generate` (the restore target) as well as `train`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Self

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from etils import epath
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from bigmodel import (
    checkpoint,
    config as config_lib,
    data as data_lib,
    flops,
    metrics,
    models,
    sharding,
    storage,
    tasks,
)
from bigmodel.data import tokenizers
from bigmodel.models import moe

# --------------------------------------------------------------------------- 1. state


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any  # mutable collections such as batch_stats; {} for most models
    skipped_steps: jax.Array  # updates dropped for non-finite loss/gradients (train.on_nonfinite='skip')


MUP_HIDDEN = {"query_kernel", "key_kernel", "value_kernel", "out_kernel", "fc_in", "fc_out"}


def mup_labels(params: Any) -> Any:
    """'hidden' for matrices whose both dimensions grow with width, else 'other' (boxed or not)."""

    def label(path: tuple, _: Any) -> str:
        names = {getattr(k, "key", None) for k in path}
        return "hidden" if names & MUP_HIDDEN and "bias" not in names else "other"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   width_mult: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup, cosine decay and global-norm clipping.

    width_mult != 1 (muP) divides the learning rate of hidden matrices by it, through
    optax's per-group transforms.
    """
    decay_steps = cfg.decay_steps or total_steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )
    # Decay matrices only: biases, norms and other vectors are left alone.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = lambda lr: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   mask=decay_mask)
    if width_mult == 1.0:
        update = adamw(schedule)
    else:
        update = optax.multi_transform(
            {"hidden": adamw(lambda step: schedule(step) / width_mult), "other": adamw(schedule)}, mup_labels)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(), update)
    return tx, schedule


def init_fn(module: nn.Module, task: Any, tx: optax.GradientTransformation, dummy: dict) -> Callable:
    """rng -> boxed TrainState (parameters carry their logical axis names)."""

    def init(rng: jax.Array) -> TrainState:
        variables = module.init({"params": rng, "dropout": rng}, *task.model_inputs(dummy), train=False)
        variables = dict(variables)
        params = variables.pop("params")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=variables, skipped_steps=jnp.zeros((), jnp.int32))

    return init


# --------------------------------------------------------------------------- 2. sharding


def sharded_init(init: Callable, rng: jax.Array, mesh: jax.sharding.Mesh, rules: Any,
                 zero1: bool = False) -> tuple[TrainState, Any, Any]:
    """Initialise directly into the sharded layout: eval_shape -> specs -> jit(out_shardings).

    zero1 (config.sharding.zero1) also splits the optimizer state over 'data'; the returned
    shardings are the train step's in/out shardings, so the step keeps that layout.
    """
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.state_shardings(abstract, mesh, rules, zero1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings, abstract


# --------------------------------------------------------------------------- 3. steps


def _apply(module: nn.Module, task: Any, params: Any, model_state: Any, batch: dict, rng: jax.Array, train: bool):
    # Training also collects what layers sow into 'aux' (mixture-of-experts losses and router statistics).
    mutable = [*model_state, moe.AUX] if train else False
    out = module.apply(
        {"params": params, **model_state}, *task.model_inputs(batch), train=train, rngs={"dropout": rng},
        mutable=mutable,
    )
    outputs, new_vars = out if mutable else (out, model_state)
    new_state = {k: v for k, v in new_vars.items() if k != moe.AUX}
    loss, mets = task.loss_and_metrics(outputs, batch)
    if moe.AUX in new_vars:
        aux_loss, aux_mets = moe.aux_loss_and_metrics(new_vars[moe.AUX])
        loss = loss + aux_loss
        mets = {**mets, **aux_mets}
    return loss, (mets, new_state)


def make_train_step(module: nn.Module, task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int, skip_nonfinite: bool = False) -> Callable:
    """(state, batch, rng) -> (state, metrics); gradients accumulated over microbatches.

    With skip_nonfinite, an update whose loss or gradient norm is not finite is dropped
    (parameters and optimizer state kept) and counted in `skipped_steps`.
    """
    grad_fn = jax.value_and_grad(
        lambda p, ms, b, r: _apply(module, task, p, ms, b, r, train=True), has_aux=True
    )

    def step(state: TrainState, batch: dict, base_rng: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(base_rng, state.step)
        if grad_accum == 1:
            (_, (mets, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
        else:
            # Strided split keeps every microbatch spread evenly over the data-parallel devices.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch
            )
            micro = jax.lax.with_sharding_constraint(micro, P(None, sharding.BATCH_AXES))

            def body(carry, xs):
                grads_sum, mets_sum, model_state = carry
                mb, i = xs
                (_, (m, model_state)), g = grad_fn(state.params, model_state, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, grads_sum, g), tasks.add_metrics(mets_sum, m), model_state), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, state.model_state, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1][0]))
            (grads, mets, model_state), _ = jax.lax.scan(
                body, (zeros[0], zeros[1], state.model_state), (micro, jnp.arange(grad_accum))
            )
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(mets["loss"][0]) & jnp.isfinite(grad_norm)
        skipped = state.skipped_steps
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            model_state = keep(model_state, state.model_state)
            skipped = skipped + (~finite).astype(jnp.int32)
        mets = dict(mets)
        one = jnp.ones(())
        mets["grad_norm"] = (grad_norm, one)
        mets["learning_rate"] = (schedule(state.step), one)
        mets["nonfinite"] = ((~finite).astype(jnp.float32), one)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state,
                               skipped_steps=skipped)
        return new_state, mets

    return step


def make_eval_step(module: nn.Module, task: Any) -> Callable:
    """(state, batch) -> summed metrics, deterministic (no dropout, running statistics)."""

    def step(state: TrainState, batch: dict) -> dict:
        return task.eval_metrics(module, {"params": state.params, **state.model_state}, batch)

    return step


def evaluate(eval_step: Callable, state: TrainState, batches: Iterator[dict], mesh) -> dict[str, float]:
    """Mean metrics over a deterministic pass of evaluation batches."""
    total = None
    for batch in batches:
        mets = eval_step(state, sharding.global_batch(batch, mesh))
        total = mets if total is None else tasks.add_metrics(total, mets)
    if total is None:
        raise ValueError("the evaluation split yielded no full batch; lower config.eval.batch_size")
    return tasks.reduce_metrics(jax.device_get(total))


# --------------------------------------------------------------------------- 4. prepare


def components(config: ml_collections.ConfigDict) -> tuple[Any, nn.Module, Any, optax.GradientTransformation,
                                                          optax.Schedule]:
    """The static pieces of a run: (sharding rules, module, task, optimizer, learning-rate schedule)."""
    width_mult = 1.0
    if config.model.name == "gpt" and config.model.mup:
        width_mult = config.model.d_model / config.model.mup_base_width
    tx, schedule = make_optimizer(config.optim, config.train.steps, width_mult)
    return sharding.as_rules(config.sharding.rules), models.build(config.model), tasks.get(config), tx, schedule


def setup_model(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]):
    """(mesh, rules, module, task, tx, schedule) on a single-slice mesh, for code that builds its own steps."""
    return (sharding.make_mesh(mesh_sizes), *components(config))


def run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh over every device, over config.mesh.slices slices; a bad mesh is a ConfigError."""
    sizes = config_lib.validate(config, jax.device_count())
    return sharding.make_mesh(sizes, slices=config.mesh.slices, dcn_axis=config.mesh.dcn_axis)


def example_batch(config: ml_collections.ConfigDict, task: Any, data: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one global training batch: the task's dummy batch where it has one (language
    modelling, no data needed), else those of a first batch read from `data` (or from data
    built for one process)."""
    rows = config.train.batch_size
    if hasattr(task, "dummy_batch"):
        return jax.eval_shape(lambda: task.dummy_batch(rows, config.data.seq_len))
    it = iter((data or data_lib.build(config, shard=(0, 1))).train)
    try:
        local = next(it)
    finally:
        it.close()  # stops its prefetch threads; the run reads through its own iterator
    return {k: jax.ShapeDtypeStruct((rows, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in local.items()}


@dataclasses.dataclass
class Prepared:
    """A run made ready by `prepare`: its pieces, the state's shapes and shardings, the compiled steps."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh | None
    rules: Any
    module: nn.Module
    task: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable[[jax.Array], TrainState]  # rng -> boxed state (see init_fn)
    batch: dict[str, jax.ShapeDtypeStruct]  # one global training batch
    abstract: Any  # the boxed state as shapes; parameters carry their logical axis names
    shapes: TrainState  # the same unboxed, as the steps take it
    data: data_lib.Data | None = None  # this process's pipelines, when built
    shardings: Any = None  # of the unboxed state: the steps' in and out shardings
    lowered: jax.stages.Lowered | None = None  # the train step lowered for the mesh
    train_step: jax.stages.Compiled | None = None  # (state, batch, rng) -> (state, metrics); donates the state
    eval_step: Callable | None = None  # (state, batch) -> summed metrics
    compile_s: float = 0.0  # lowering and compiling the train step
    flops_per_step: float = math.nan

    @property
    def units_per_step(self) -> int:
        """Tokens (token tasks: target positions) or examples in one global batch."""
        per_example = self.batch["targets"].shape[1] if self.task.units == "tokens" else 1
        return self.config.train.batch_size * per_example

    @property
    def step_rng(self) -> jax.Array:
        """The train step's base key (the step folds in its own number)."""
        return jax.random.fold_in(jax.random.key(self.config.seed), 1)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical axis rules that tracing the model needs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def abstract_state(self) -> TrainState:
        """The unboxed state as ShapeDtypeStructs with their shardings (a restore target)."""
        return checkpoint.abstract_with_shardings(self.shapes, self.shardings)

    def init_state(self) -> TrainState:
        """A fresh state, initialised directly into its sharded layout."""
        with self.context():
            init = jax.jit(lambda r: nn.meta.unbox(self.init(r)), out_shardings=self.shardings)
            return init(jax.random.fold_in(jax.random.key(self.config.seed), 0))

    def compile_steps(self) -> None:
        """Lower and compile the train step against abstract inputs; jit the eval step; count FLOPs."""
        batch_sh, repl = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        step = make_train_step(self.module, self.task, self.tx, self.schedule, self.config.train.grad_accum,
                               self.config.train.on_nonfinite == "skip")
        with self.context():
            start = time.time()
            jitted = jax.jit(step, in_shardings=(self.shardings, batch_sh, repl),
                             out_shardings=(self.shardings, repl), donate_argnums=0)
            # The key's abstract value is taken from step_rng itself, so it follows the PRNG implementation in force
            # now (eval_shape of a fixed function may be served from a cache traced under another one).
            self.lowered = jitted.lower(self.abstract_state(), self.batch, jax.eval_shape(lambda: self.step_rng))
            self.train_step = self.lowered.compile()
            self.compile_s = time.time() - start
        self.eval_step = jax.jit(make_eval_step(self.module, self.task), in_shardings=(self.shardings, batch_sh),
                                 out_shardings=repl)
        self.flops_per_step = flops.train_flops_per_step(self.config.model, self.batch, self.abstract.params)


def prepare(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, *, data: bool = False,
            steps: bool = True, batch: dict[str, jax.ShapeDtypeStruct] | None = None) -> Prepared:
    """Everything a run needs before its first step, built one way for train, bench, plan and generate.

    Without a mesh: shapes only (the boxed abstract state; no device is touched). With a mesh,
    which may hold any devices (an ahead-of-time topology too): the state's shardings and,
    with `steps`, the compiled train step, the eval step and the FLOPs per step. Nothing is
    initialised here (Prepared.init_state) and no data is read unless the shapes need it:
    `data` builds this process's pipelines; `batch` gives the global training batch's shapes
    (default: example_batch).
    """
    rules, module, task, tx, schedule = components(config)
    built = data_lib.build(config, shard=sharding.process_batch_shard(mesh)) if data else None
    batch = batch or example_batch(config, task, built)
    micro = config.train.batch_size // config.train.grad_accum
    init = init_fn(module, task, tx, {k: np.zeros((micro, *s.shape[1:]), s.dtype) for k, s in batch.items()})
    abstract = jax.eval_shape(init, jax.random.key(0))
    run = Prepared(config, mesh, rules, module, task, tx, schedule, init, batch, abstract, nn.meta.unbox(abstract),
                   data=built)
    if mesh is not None:
        run.shardings = sharding.state_shardings(run.abstract, mesh, rules, config.sharding.zero1)
        if steps:
            run.compile_steps()
    return run


# --------------------------------------------------------------------------- 5. faults and resume


# Keys whose change makes a checkpoint meaningless for the new config.
INCOMPATIBLE_KEYS = ("task", "model", "data.name", "data.kind", "data.source", "data.tokenizer",
                     "data.spm_vocab_size", "data.seq_len", "data.text_key", "data.validation_fraction",
                     "data.max_digits", "data.source_len", "data.target_len", "data.source_lang", "data.target_lang",
                     "data.image_size")


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients stopped being finite."""


class IncompatibleResume(config_lib.ConfigError):
    """The workdir holds a run whose config cannot continue under the new one."""


class PreemptionWatch:
    """Turns SIGTERM/SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int) -> bool:
        """True once every process should stop at this step."""
        if jax.process_count() > 1:
            # All hosts agree on the step to stop at (JAX's preemption sync service).
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step) or self.signal is not None
        return self.signal is not None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def incompatible_keys(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved, new) for each key that may not change across a resume."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(new)))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in INCOMPATIBLE_KEYS) and a.get(key) != b.get(key):
            diffs.append((key, a.get(key), b.get(key)))
    return diffs


def start_over(workdir: epath.Path) -> epath.Path | None:
    """Move a previous run's checkpoints and logs into WORKDIR/previous-TIME/ (nothing is deleted)."""
    names = ["checkpoints", "metrics.jsonl", "summary.json", *[p.name for p in workdir.glob("events.out.tfevents.*")]]
    present = [n for n in names if (workdir / n).exists()]
    if not present or jax.process_index() != 0:
        return None
    target = workdir / time.strftime("previous-%Y%m%d-%H%M%S")
    target.mkdir()
    for name in present:
        (workdir / name).rename(target / name)  # in a bucket: copied, then deleted
    return target


def check_resumable(ckpt: checkpoint.Checkpointer, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse a workdir whose newest checkpoint comes from a config that cannot continue as this one."""
    latest = ckpt.latest_step()
    saved = ckpt.saved_config(latest) if latest is not None else None
    diffs = incompatible_keys(saved, config.to_dict()) if saved else []
    if diffs:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
        raise IncompatibleResume(
            f"{workdir} holds a run (step {latest}) whose config differs in keys that cannot change on "
            f"resume: {lines}. Use another --workdir, undo the change, or pass --restart to move the old "
            "run aside and start over"
        )


def guarded(action: Callable[[], None], on_error: str) -> None:
    """Run a checkpoint action; its CheckpointError stops the run (on_error='stop') or is reported."""
    try:
        action()
    except checkpoint.CheckpointError as e:
        if on_error == "stop":
            raise
        print(f"warning: {e}; training continues and the next save retries", file=sys.stderr, flush=True)


@contextlib.contextmanager
def opened_checkpointer(workdir: str, cfg: ml_collections.ConfigDict) -> Iterator[checkpoint.Checkpointer]:
    """A Checkpointer closed (its save in flight finished) however the run ends.

    A failed save found on closing after the last step follows config.checkpoint.on_error;
    after preemption it always raises, before the run claims its checkpoint; after any other
    error it is only reported, so that error is the one the run ends with.
    """
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.keep, async_save=cfg.async_save)
    try:
        yield ckpt
    except Preempted:
        ckpt.close()
        raise
    except BaseException:
        try:
            ckpt.close()
        except checkpoint.CheckpointError as e:
            print(f"warning: {e}", file=sys.stderr, flush=True)
        raise
    guarded(ckpt.close, cfg.on_error)


def restore_or_init(run: Prepared, ckpt: checkpoint.Checkpointer, train_iter: Any) -> tuple[int, TrainState]:
    """(step, state) of the newest intact checkpoint, with the data iterator restored in place;
    else step 0 and a fresh state (with config.init's pretrained parameters)."""
    restored = ckpt.restore_latest(run.abstract_state(), train_iter)
    if restored:
        if jax.process_index() == 0:
            print(f"resumed from {ckpt.step_dir(restored[0])}", flush=True)
        return restored
    state = run.init_state()
    if run.config.init.workdir:
        state = load_pretrained(state, run.shardings, run.config.init.workdir, tuple(run.config.init.params))
    return 0, state


def check_finite(flags: list[tuple[int, jax.Array]], ckpt: checkpoint.Checkpointer, skip: bool) -> None:
    """Raise NonFiniteError naming the first step flagged non-finite (unless skipping); clears `flags`."""
    bad = [s for (s, _), f in zip(flags, jax.device_get([f for _, f in flags])) if f > 0]
    flags.clear()
    if bad and not skip:
        good = ckpt.latest_step()
        where = f"the last good checkpoint is {ckpt.step_dir(good)}" if good is not None else "no checkpoint yet"
        raise NonFiniteError(
            f"non-finite loss or gradients in step {bad[0]}; halted without saving; {where}. Lower "
            "optim.learning_rate, or set train.on_nonfinite='skip' to drop such updates"
        )


def _flat(tree: Any) -> dict[str, Any]:
    """A parameter subtree as {'a/b/kernel': leaf}; a lone array as {'': array}."""
    return traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {"": tree}


def load_pretrained(state: TrainState, shardings: Any, workdir: str, names: tuple[str, ...]) -> TrainState:
    """Copy parameter subtrees `names` (all if empty) from another run's latest checkpoint.

    Within each subtree the arrays both models have are copied, and their shapes must agree.
    Arrays only this model has keep their fresh initialisation (a classifier's pooler when
    the encoder comes from MLM pre-training); arrays only the checkpoint has are ignored.
    Both lists are printed.
    """
    source = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
    step = source.latest_step()
    if step is None:
        source.close()
        raise config_lib.ConfigError(f"config.init.workdir={workdir!r} holds no checkpoint; train that run first")
    saved = source.restore_raw(step)["params"]
    source.close()
    params = dict(state.params)
    names = names or tuple(params)
    copied, fresh, unused = 0, [], []
    for name in names:
        if name not in saved or name not in params:
            raise config_lib.ConfigError(
                f"config.init.params names {name!r}, but it is not in both models "
                f"(pretrained: {sorted(saved)}, this model: {sorted(params)})")
        target, got, where = _flat(params[name]), _flat(saved[name]), _flat(shardings.params[name])
        common = [k for k in target if k in got]
        mismatched = [f"{name}/{k}: {tuple(got[k].shape)} vs {tuple(target[k].shape)}"
                      for k in common if tuple(got[k].shape) != tuple(target[k].shape)]
        if mismatched or not common:
            detail = "; ".join(mismatched[:5]) if mismatched else "no array in common"
            raise config_lib.ConfigError(
                f"parameters {name!r} of {workdir} do not match this model's shapes (pretrained vs this model: "
                f"{detail})")
        for k in common:
            target[k] = jax.device_put(np.asarray(got[k], dtype=target[k].dtype), where[k])
        params[name] = target[""] if "" in target else traverse_util.unflatten_dict(target, sep="/")
        copied += len(common)
        fresh += [f"{name}/{k}" for k in target if k not in got]
        unused += [f"{name}/{k}" for k in got if k not in target]
    print(f"initialised {', '.join(names)} from {source.step_dir(step)}: copied {copied} arrays; "
          f"left fresh: {', '.join(fresh) or 'none'}; not in this model: {', '.join(unused) or 'none'}", flush=True)
    return state.replace(params=params)


# --------------------------------------------------------------------------- 6. the run


class DevicePrefetch:
    """Training batches put on the devices one step ahead of the step that uses them.

    `next()` hands out batch s while batch s+1 is already on its devices: the host reads and
    transfers it while step s-1 still runs, since jitted steps are dispatched asynchronously.
    `get_state()` is the wrapped iterator's state after the batches handed out so far, not
    after the one read ahead, so a checkpoint resumes at the first batch no step has used.
    """

    def __init__(self, it: Any, put: Callable[[Any], Any], ahead: int = 1):
        self._it, self._put, self._ahead = it, put, ahead
        self._queue: collections.deque = collections.deque()  # (device batch, iterator state after it)
        self._state = copy.deepcopy(it.get_state())

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Any:
        while len(self._queue) <= self._ahead:
            try:
                host = next(self._it)
            except StopIteration:
                break
            self._queue.append((self._put(host), copy.deepcopy(self._it.get_state())))
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self) -> Any:
        """The wrapped iterator's state after the last batch handed out."""
        return self._state


def log_row(mets: dict, steps: int, seconds: float, run: Prepared, peak: float) -> dict[str, float]:
    """A metrics.jsonl row: the last step's metrics, and throughput and MFU over the last `steps` steps."""
    row = tasks.reduce_metrics(jax.device_get(mets))
    row.pop("nonfinite")
    seconds = max(seconds, 1e-9)
    row[f"{run.task.units}_per_s"] = steps * run.units_per_step / seconds
    row["mfu"] = steps * run.flops_per_step / seconds / peak
    return row


def evaluate_now(run: Prepared, state: TrainState, step: int) -> dict[str, float]:
    """`evaluate` over the run's evaluation batches, announced first (a whole split takes a while)."""
    if jax.process_index() == 0:
        n = run.config.eval.num_batches
        tqdm.tqdm.write(f"step {step}: evaluating on {f'{n} batches' if n > 0 else 'the whole split'}", file=sys.stdout)
    return evaluate_all(run, state)


def evaluate_all(run: Prepared, state: TrainState) -> dict[str, float]:
    """`evaluate` on the run's held-out split, then on each of config.eval.sets as '<set>/<metric>'."""
    result = evaluate(run.eval_step, state, run.data.eval_batches(), run.mesh)
    for name, batches in run.data.eval_sets.items():
        result.update({f"{name}/{k}": v for k, v in evaluate(run.eval_step, state, batches(), run.mesh).items()})
    return result


def task_evaluators(run: Prepared) -> list:
    """The config.eval.tasks evaluators (bigmodel.eval.tasks), their files read once; [] when there are none."""
    if not run.config.eval.tasks:
        return []
    from bigmodel.eval import scoring, tasks as eval_tasks

    scorer = scoring.Scorer(run.module, run.mesh, run.rules, seq_len=scoring.window(run.config),
                            batch_size=run.config.eval.batch_size, eod_id=run.data.tokenizer.eod_id)
    validation = lambda state: evaluate(run.eval_step, state, run.data.eval_batches(), run.mesh)
    return eval_tasks.build(run.config.eval.tasks, tokenizer=run.data.tokenizer, scorer=scorer, validation=validation)


def evaluate_tasks(evaluators: list, state: TrainState, step: int, workdir: pathlib.Path) -> dict[str, float]:
    """Run the config.eval.tasks evaluators; WORKDIR/eval/step_STEP.json gets the results, the row their means."""
    from bigmodel.eval import scoring, tasks as eval_tasks

    results = eval_tasks.run_all(evaluators, {"params": state.params, **state.model_state}, state)
    if jax.process_index() == 0:
        scoring.write_results(workdir, step, results)
    return {f"eval_{k}": v for k, v in eval_tasks.flat(results).items()}


class Profile:
    """A jax.profiler trace of training steps START..START+COUNT-1 (train.profile_steps) into WORKDIR/profile."""

    def __init__(self, window: tuple[int, int] | None, directory: pathlib.Path) -> None:
        self.first, self.last = (window[0], window[0] + window[1] - 1) if window else (0, -1)
        self.directory, self.active = directory, False

    def before(self, step: int) -> None:
        """Start tracing if `step` (about to run) opens the window."""
        if step == self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        """Stop once `step` (just dispatched) closes the window, after it finished on the devices."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        """End the trace (also when the run stops inside the window)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            print(f"profile of steps {self.first}-{self.last} written to {self.directory}", flush=True)


def write_json(path: epath.Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    metrics.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def train(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict[str, float]:
    """Train (or resume) the run described by `config` in `workdir`; returns final metrics.

    Raises Preempted (after checkpointing) on SIGTERM/SIGINT, NonFiniteError on a
    non-finite loss (unless train.on_nonfinite='skip'), checkpoint.CheckpointError when a
    save fails and checkpoint.on_error='stop', IncompatibleResume for a mismatched workdir.
    The metrics file, progress bar and checkpointer are closed on every way out.
    """
    wall_start = time.time()
    storage.check_bucket(workdir)  # a missing bucket or credentials: one line before any work
    workdir_path = storage.as_path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    mesh = run_mesh(config)
    if restart and (moved := start_over(workdir_path)):
        print(f"moved the previous run to {moved}", flush=True)
    header = metrics.run_header() | {"mesh": dict(mesh.shape)}

    # Data: each process keeps its own rows of every global batch (processes whose devices
    # hold the same rows, across a 'sequence' or 'tensor' axis, load the same ones).
    run = prepare(config, mesh, data=True, steps=False)
    evaluators = task_evaluators(run)  # a bad task file stops the run before anything compiles
    train_iter = iter(run.data.train)
    params_total = flops.param_count(run.abstract.params)
    params_embed = flops.embedding_param_count(run.abstract.params)
    params_inactive = flops.inactive_param_count(run.abstract.params, config.model)  # > 0 for mixtures of experts
    skip_nonfinite = config.train.on_nonfinite == "skip"
    # Outside the run's mesh: on a CPU the peak is measured on a mesh of jax.devices() order.
    peak, peak_source = flops.peak_flops()

    with contextlib.ExitStack() as stack:
        # State: refuse an incompatible workdir before compiling; then the newest intact
        # checkpoint, or a fresh sharded initialisation.
        ckpt = stack.enter_context(opened_checkpointer(workdir, config.checkpoint))
        check_resumable(ckpt, config, workdir)
        run.compile_steps()  # ahead of time, so compile time is measured apart from step time
        start_step, state = restore_or_init(run, ckpt, train_iter)
        if lead:
            write_json(workdir_path / "config.json", config.to_dict())
            write_json(workdir_path / "run_info.json", header)
            if run.data.tokenizer is not None:
                tokenizers.save(run.data.tokenizer, workdir_path)  # for generate, eval and export
            print(f"bigmodel run in {workdir}: {json.dumps(header)}", flush=True)
            active = f", active {params_total - params_inactive:,}" if params_inactive else ""
            print(f"params {params_total:,} (non-embedding {params_total - params_embed:,}{active}); "
                  f"{run.flops_per_step / run.units_per_step / 1e6:.2f} MFLOP per {run.task.units[:-1]}; "
                  f"compile {run.compile_s:.1f}s; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})", flush=True)

        # The loop. Checks that need the host (non-finite values, preemption) happen at log
        # and save boundaries so the device queue stays full in between.
        writer = metrics.MetricsWriter(workdir, start_step, enabled=lead, trackers=tuple(config.log.trackers),
                                       project=config.log.project, tracking_uri=config.log.tracking_uri,
                                       config=config.to_dict(), run_info=header)
        stack.push(writer.exit)  # on an error the trackers end their runs here; else after the summary
        bar = stack.enter_context(tqdm.tqdm(total=config.train.steps, initial=start_step, unit="step",
                                            disable=not (lead and config.log.progress), dynamic_ncols=True,
                                            mininterval=1.0))
        stack.enter_context(run.context())
        watch = stack.enter_context(PreemptionWatch())
        batches = DevicePrefetch(train_iter, lambda local: sharding.global_batch(local, mesh))
        rng, step, window_start, window_steps = run.step_rng, start_step, time.time(), 0
        profile = Profile(config_lib.profile_window(config.train.profile_steps), workdir_path / "profile")
        stack.callback(profile.stop)
        last_eval: dict[str, float] = {}
        flags: list[tuple[int, jax.Array]] = []  # (step, non-finite flag) since the last check
        while step < config.train.steps:
            profile.before(step + 1)
            state, mets = run.train_step(state, next(batches), rng)
            step += 1
            profile.after(step, state)
            window_steps += 1
            flags.append((step, mets["nonfinite"][0]))
            bar.update(1)
            is_last = step == config.train.steps
            if step % config.log.every == 0 or is_last:
                check_finite(flags, ckpt, skip_nonfinite)
                row = log_row(mets, window_steps, time.time() - window_start, run, peak)
                if skip_nonfinite:
                    row["skipped_steps"] = int(state.skipped_steps)
                if step % config.eval.every == 0 or is_last:
                    last_eval = evaluate_now(run, state, step)
                    row.update({f"eval_{k}": v for k, v in last_eval.items()})
                    if evaluators:
                        row.update(evaluate_tasks(evaluators, state, step, workdir_path))
                writer.write(step, row)
                shown = {"eval_bpb": f"{last_eval['bits_per_byte']:.3f}"} if "bits_per_byte" in last_eval else {}
                bar.set_postfix(loss=f"{row['loss']:.3f}", **shown)
            preempt = watch.requested(step)
            if step % config.checkpoint.every == 0 or is_last or preempt:
                check_finite(flags, ckpt, skip_nonfinite)
                save = functools.partial(ckpt.save, step, state, batches, config.to_dict())
                guarded(save, config.checkpoint.on_error)
            if preempt:
                raise Preempted(f"stopped by signal {watch.signal} after step {step}; checkpoint "
                                f"{ckpt.step_dir(step)} saved. Run the same command again to resume")
            if step % config.log.every == 0:
                # Throughput windows exclude evaluation and the (synchronous part of) saving.
                window_start, window_steps = time.time(), 0
        if not last_eval:  # nothing left to train: evaluate what the checkpoint holds
            last_eval = evaluate_all(run, state)

    # The summary.
    summary = {
        "step": step,
        **{f"eval_{k}": v for k, v in last_eval.items()},
        **run.data.info,
        "params": params_total,
        "params_nonembed": params_total - params_embed,
        "params_active": params_total - params_inactive,  # = params unless a mixture of experts
        run.task.units: step * run.units_per_step,
        "flops": step * run.flops_per_step,
        "skipped_steps": int(state.skipped_steps),
        "wall_s": time.time() - wall_start,
        "compile_s": run.compile_s,
    }
    writer.finish(summary)
    if lead:
        write_json(workdir_path / "summary.json", summary)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items())
        baseline = run.data.info.get("unigram_bits_per_byte")
        versus = f" (unigram entropy {baseline:.3f} bits/byte)" if baseline is not None else ""
        print(f"done: step {step}, eval {shown}{versus}, {summary['wall_s']:.0f}s wall", flush=True)
    return summary
