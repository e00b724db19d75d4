"""The trainer: one code path for every model, task and mesh. Reads top to bottom.

  1. state and optimizer      4. data
  2. sharded initialisation   5. the loop: log, evaluate, checkpoint
  3. the jitted steps         6. the summary
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from bigmodel import checkpoint, config as config_lib, flops, metrics, models, sharding, tasks
from bigmodel.data import pipeline


# --------------------------------------------------------------------------- 1. state


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any  # mutable collections such as batch_stats; {} for most models


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""
    decay_steps = cfg.decay_steps or total_steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )
    # Decay matrices only: biases, norms and other vectors are left alone.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def init_fn(module: nn.Module, task: Any, tx: optax.GradientTransformation, dummy: dict) -> Callable:
    """rng -> boxed TrainState (parameters carry their logical axis names)."""

    def init(rng: jax.Array) -> TrainState:
        variables = module.init({"params": rng, "dropout": rng}, *task.model_inputs(dummy), train=False)
        variables = dict(variables)
        params = variables.pop("params")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=variables)

    return init


# --------------------------------------------------------------------------- 2. sharding


def sharded_init(init: Callable, rng: jax.Array, mesh: jax.sharding.Mesh, rules: Any) -> tuple[TrainState, Any, Any]:
    """Initialise directly into the sharded layout: eval_shape -> specs -> jit(out_shardings)."""
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.state_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings, abstract


# --------------------------------------------------------------------------- 3. steps


def _apply(module: nn.Module, task: Any, params: Any, model_state: Any, batch: dict, rng: jax.Array, train: bool):
    mutable = list(model_state) if train and model_state else False
    out = module.apply(
        {"params": params, **model_state}, *task.model_inputs(batch), train=train, rngs={"dropout": rng},
        mutable=mutable,
    )
    outputs, new_state = out if mutable else (out, model_state)
    loss, mets = task.loss_and_metrics(outputs, batch)
    return loss, (mets, new_state)


def make_train_step(module: nn.Module, task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int) -> Callable:
    """(state, batch, rng) -> (state, metrics); gradients accumulated over microbatches."""
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
        mets = dict(mets)
        mets["grad_norm"] = (optax.tree.norm(grads), jnp.ones(()))
        mets["learning_rate"] = (schedule(state.step), jnp.ones(()))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        return new_state, mets

    return step


def make_eval_step(module: nn.Module, task: Any) -> Callable:
    """(state, batch) -> summed metrics, deterministic (no dropout, running statistics)."""

    def step(state: TrainState, batch: dict) -> dict:
        _, (mets, _) = _apply(module, task, state.params, state.model_state, batch, jax.random.key(0), train=False)
        return mets

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


# --------------------------------------------------------------------------- helpers


def _scalars(mets: dict) -> dict[str, float]:
    return tasks.reduce_metrics(jax.device_get(mets))


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    metrics.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def setup_model(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]):
    """Everything static a run needs: mesh, rules, module, task, optimizer, step functions."""
    mesh = sharding.make_mesh(mesh_sizes)
    rules = sharding.as_rules(config.sharding.rules)
    module = models.build(config.model)
    task = tasks.get(config.task)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    return mesh, rules, module, task, tx, schedule


# --------------------------------------------------------------------------- 4-6. the run


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) the run described by `config` in `workdir`; returns final metrics."""
    wall_start = time.time()
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    mesh_sizes = config_lib.validate(config, jax.device_count())
    header = metrics.run_header() | {"mesh": mesh_sizes}
    if lead:
        write_json(workdir_path / "config.json", config.to_dict())
        write_json(workdir_path / "run_info.json", header)
        print(f"bigmodel run in {workdir}: {json.dumps(header)}", flush=True)

    mesh, rules, module, task, tx, schedule = setup_model(config, mesh_sizes)

    # Data: each process keeps its own rows of every global batch.
    data = pipeline.lm_data(
        config.data, seed=config.seed, batch_size=config.train.batch_size, eval_batch_size=config.eval.batch_size,
        num_eval_batches=config.eval.num_batches, shard=(jax.process_index(), jax.process_count()),
    )
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise config_lib.ConfigError(
            f"the tokenizer has {data.tokenizer.vocab_size} ids but config.model.vocab_size="
            f"{config.model.vocab_size}; raise the model vocabulary to at least {data.tokenizer.vocab_size}"
        )
    train_iter = iter(data.train)

    # State: sharded init, then restore the newest checkpoint if the workdir has one.
    root = jax.random.key(config.seed)
    dummy = task.dummy_batch(config.train.batch_size // config.train.grad_accum, config.data.seq_len)
    state, shardings, abstract = sharded_init(init_fn(module, task, tx, dummy), jax.random.fold_in(root, 0), mesh, rules)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    start_step = ckpt.latest_step() or 0
    if start_step:
        state = ckpt.restore(start_step, checkpoint.abstract_with_shardings(state, shardings), train_iter)
        if lead:
            print(f"resumed from {ckpt.directory}/{start_step}", flush=True)
    params_total = flops.param_count(abstract.params)
    params_embed = flops.embedding_param_count(abstract.params)

    # Steps: compiled ahead of time so compile time is measured apart from step time.
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compile_start = time.time()
        first_local = next(train_iter)
        first = sharding.global_batch(first_local, mesh)
        train_step = jax.jit(
            make_train_step(module, task, tx, schedule, config.train.grad_accum),
            in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl), donate_argnums=0,
        ).lower(state, first, jax.random.fold_in(root, 1)).compile()
        compile_s = time.time() - compile_start
        eval_step = jax.jit(make_eval_step(module, task), in_shardings=(shardings, batch_sh), out_shardings=repl)

        tokens_per_step = config.train.batch_size * config.data.seq_len
        if config.model.name == "gpt":
            flops_per_step = tokens_per_step * flops.gpt_flops_per_token(
                config.model, params_total - params_embed, config.data.seq_len)
        else:
            flops_per_step = float(train_step.cost_analysis().get("flops", float("nan")))
        peak, peak_source = flops.peak_flops()
        if lead:
            print(f"params {params_total:,} (non-embedding {params_total - params_embed:,}); "
                  f"{flops_per_step / tokens_per_step / 1e6:.2f} MFLOP/token; compile {compile_s:.1f}s; "
                  f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source})", flush=True)

        # The loop.
        writer = metrics.MetricsWriter(workdir, start_step, enabled=lead)
        bar = tqdm.tqdm(total=config.train.steps, initial=start_step, disable=not (lead and config.log.progress),
                        unit="step", dynamic_ncols=True, mininterval=1.0)
        step, pending, window_start, window_steps = start_step, first, time.time(), 0
        last_eval: dict[str, float] = {}
        while step < config.train.steps:
            batch = pending if pending is not None else sharding.global_batch(next(train_iter), mesh)
            pending = None
            state, mets = train_step(state, batch, jax.random.fold_in(root, 1))
            step += 1
            window_steps += 1
            bar.update(1)
            if step % config.log.every == 0 or step == config.train.steps:
                row = _scalars(mets)
                elapsed = max(time.time() - window_start, 1e-9)
                row["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                row["mfu"] = window_steps * flops_per_step / elapsed / peak
                if step % config.eval.every == 0 or step == config.train.steps:
                    last_eval = evaluate(eval_step, state, data.eval_batches(), mesh)
                    row.update({f"eval_{k}": v for k, v in last_eval.items()})
                writer.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", **({"eval_bpb": f"{last_eval['bits_per_byte']:.3f}"} if last_eval else {}))
                if not np.isfinite(row["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss {row['loss']} at step {step}; last checkpoint: {ckpt.latest_step()}")
            if step % config.checkpoint.every == 0 or step == config.train.steps:
                ckpt.save(step, state, train_iter, config.to_dict())
            if window_steps == 0 or step % config.log.every == 0:
                # Throughput windows exclude evaluation and the (synchronous part of) saving.
                window_start, window_steps = time.time(), 0
        bar.close()
        ckpt.close()
        writer.close()

    if not last_eval:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            last_eval = evaluate(eval_step, state, data.eval_batches(), mesh)
    summary = {
        "step": step,
        "eval_loss": last_eval["loss"],
        "eval_bits_per_byte": last_eval.get("bits_per_byte", float("nan")),
        "unigram_bits_per_byte": data.unigram_bpb,
        "params": params_total,
        "params_nonembed": params_total - params_embed,
        "tokens": step * tokens_per_step,
        "flops": step * flops_per_step,
        "wall_s": time.time() - wall_start,
        "compile_s": compile_s,
    }
    if lead:
        write_json(workdir_path / "summary.json", summary)
        print(
            f"done: step {step}, eval loss {summary['eval_loss']:.4f}, "
            f"eval {summary['eval_bits_per_byte']:.3f} bits/byte vs unigram entropy "
            f"{summary['unigram_bits_per_byte']:.3f} bits/byte, {summary['wall_s']:.0f}s wall",
            flush=True,
        )
    return summary
