"""muP coordinate check: activation size per layer against width, after a few steps.

Under the maximal-update parameterisation the typical size of every activation after
training steps is independent of width; under the standard parameterisation, with a
learning rate tuned at small width, it grows with width (Yang et al. 2022, Fig. 5). We
train GPTs of several widths for a few steps on the same batches and record mean |x|
of the token embedding, every block's output and the logits on a fixed batch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigmodel import config as config_lib, data as data_lib, sharding, train


def width_config(base: ml_collections.ConfigDict, width: int, head_dim: int, mup: bool) -> ml_collections.ConfigDict:
    """`base` at another width: heads grow with width, head size fixed; untied readout."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.model.d_model = width
    c.model.num_heads = max(1, width // head_dim)
    c.model.mup = mup
    c.model.tie_embeddings = False
    # Clipping by the global gradient norm ties every layer's step to the total width,
    # which is exactly the width dependence this check is meant to expose or rule out.
    c.optim.grad_clip = 0.0
    return c


def activation_sizes(module: nn.Module, params: Any, batch: dict) -> dict[str, float]:
    """Mean |x| of the embedding, each block's output and the logits on one batch."""
    logits, state = module.apply({"params": params}, batch["inputs"], capture_intermediates=True,
                                 mutable=["intermediates"])
    inter = state["intermediates"]
    sizes = {"embedding": float(jnp.abs(inter["wte"]["__call__"][0]).mean())}
    blocks = sorted((k for k in inter if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    for name in blocks:
        sizes[name] = float(jnp.abs(inter[name]["__call__"][0][0]).mean())
    sizes["logits"] = float(jnp.abs(logits).mean())
    return sizes


def run(base: ml_collections.ConfigDict, widths: Sequence[int], steps: int, head_dim: int = 16,
        mup: bool = True) -> dict[int, list[dict[str, float]]]:
    """{width: [sizes after step 0..steps]} training every width on the same batches."""
    if base.model.name != "gpt":
        raise config_lib.ConfigError("coordcheck works on GPT configs (config.model.name='gpt')")
    data = data_lib.build(base, shard=(0, 1))
    it = iter(data.train)
    batches = [next(it) for _ in range(steps)]
    probe = next(data.eval_batches())
    results: dict[int, list[dict[str, float]]] = {}
    for width in widths:
        config = width_config(base, width, head_dim, mup)
        mesh, rules, module, task, tx, schedule = train.setup_model(config, sharding.axis_sizes())
        dummy = {k: np.zeros_like(v) for k, v in probe.items()}
        state, _shardings, _ = train.sharded_init(train.init_fn(module, task, tx, dummy), jax.random.key(config.seed),
                                                 mesh, rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step = jax.jit(train.make_train_step(module, task, tx, schedule, 1), donate_argnums=0)
            trace = [activation_sizes(module, state.params, probe)]
            for batch in batches:
                state, _ = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
                trace.append(activation_sizes(module, state.params, probe))
        results[width] = trace
    return results


def spread(results: dict[int, list[dict[str, float]]], layer: str, step: int = -1) -> float:
    """max/min over widths of one layer's activation size at a step."""
    values = [trace[step][layer] for trace in results.values()]
    return max(values) / max(min(values), 1e-30)


def plot(all_results: dict[str, dict[int, list[dict[str, float]]]], path: str | os.PathLike) -> None:
    """One panel per parameterisation: activation size against width, a line per layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(all_results), 4.5))
    FigureCanvasAgg(fig)
    for i, (name, results) in enumerate(all_results.items()):
        ax = fig.add_subplot(1, len(all_results), i + 1)
        widths = sorted(results)
        layers = list(results[widths[0]][-1])
        for layer in layers:
            ax.plot(widths, [results[w][-1][layer] for w in widths], marker="o", label=layer)
        steps = len(results[widths[0]]) - 1
        ax.set(xscale="log", yscale="log", xlabel="width (d_model)", ylabel="mean |activation|",
               title=f"{name}: after {steps} steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_coordcheck(args: argparse.Namespace) -> int:
    """Run the check for the standard parameterisation and muP; write JSON and a PNG."""
    base = config_lib.load(args.config, args.overrides)
    widths = [int(w) for w in args.widths.split(",")]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_results = {}
    for name, mup in (("standard", False), ("muP", True)):
        print(f"coordcheck: {name} at widths {widths}, {args.steps} steps", flush=True)
        all_results[name] = run(base, widths, args.steps, args.head_dim, mup)
    report = {
        name: {"widths": widths, "sizes": {str(w): trace for w, trace in results.items()},
               "spread_after_last_step": {layer: spread(results, layer) for layer in results[widths[0]][-1]}}
        for name, results in all_results.items()
    }
    (out / "coordcheck.json").write_text(json.dumps(report, indent=2))
    plot(all_results, out / "coordcheck.png")
    for name in report:
        worst = max(report[name]["spread_after_last_step"].items(), key=lambda kv: kv[1])
        print(f"{name}: largest max/min over widths: {worst[1]:.2f} ({worst[0]})")
    print(f"wrote {out / 'coordcheck.json'} and {out / 'coordcheck.png'}")
    return 0
