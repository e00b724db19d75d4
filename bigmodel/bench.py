"""Benchmarks that print figures (one JSON object per benchmark on stdout).

  bigmodel bench train   --config … [--steps N] [--profile DIR]
                                                  the jitted train step alone (and where
                                                  its time goes, per part of the model)
  bigmodel bench data    --config … [--batches N] the input pipeline alone
  bigmodel bench compare --config … [--steps N]   bigmodel vs a PyTorch eager GPT of the
                                                  same shapes in one process, their steps
                                                  timed in alternating rounds (the ratio of
                                                  medians, and the quartiles of the
                                                  per-round ratios)
  bigmodel bench generate --config … [--tokens 256,1024] [--prompt_len 8]
                                                  new tokens/s of greedy decoding with the
                                                  key/value cache against the recompute
                                                  path, random weights, one prompt; the
                                                  model's max_len grows to fit if needed
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from bigmodel import config as config_lib, runtime

# JAX and the trainer are imported inside the benchmarks so that registering the
# `bench` command costs nothing for the other commands.


def _peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else this process's peak RSS."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _round_times(runners: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each runner's call in each of `steps` alternating rounds, after warm-up.

    Alternating keeps a noisy machine's slow spells from landing on one side of a comparison.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _median_times(runners: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each runner over alternating rounds (`_round_times`)."""
    return {name: statistics.median(t) for name, t in _round_times(runners, steps, warmup).items()}


def round_ratio_quartiles(ours_s: list[float], theirs_s: list[float]) -> list[float]:
    """Quartiles [Q1, median, Q3] of the per-round speed ratios theirs/ours (step seconds of the
    same alternating rounds): how far the noise of the machine moves the comparison."""
    ratios = [t / o for o, t in zip(ours_s, theirs_s)]
    if len(ratios) < 2:
        return ratios * 3
    return statistics.quantiles(ratios, n=4, method="inclusive")


def prepare_train(config: ml_collections.ConfigDict) -> tuple[Callable[[], None], Callable[[float], dict]]:
    """The trainer's compiled step (train.prepare) on four real batches: (run one step, report)."""
    import jax

    from bigmodel import flops, sharding, train

    run = train.prepare(config, train.run_mesh(config), data=True)
    it = iter(run.data.train)
    batches = [sharding.global_batch(next(it), run.mesh) for _ in range(4)]
    holder = {"state": run.init_state(), "i": 0}
    rng = run.step_rng

    def run_step() -> None:
        batch = batches[holder["i"] % len(batches)]
        holder["state"], mets = run.train_step(holder["state"], batch, rng)
        jax.block_until_ready(mets["loss"])
        holder["i"] += 1

    run_step.hlo_text = run.train_step.as_text()  # for `profile`: op names -> model parts
    params = flops.param_count(run.abstract.params)
    units = run.units_per_step
    per_unit = run.flops_per_step / units

    def report(step_s: float) -> dict[str, Any]:
        peak, source = flops.peak_flops()
        return {
            "name": f"train/{config.model.name}:{config.model.size}",
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
            f"{run.task.units}_per_s": units / step_s,
            "step_s": step_s,
            "compile_s": run.compile_s,
            f"flops_per_{run.task.units[:-1]}": per_unit,
            "achieved_flops": per_unit * units / step_s,
            "mfu": per_unit * units / step_s / peak,
            "peak_flops": peak,
            "peak_flops_source": source,
            "peak_memory_bytes": _peak_memory_bytes(),
            "params": params,
        }

    return run_step, report


def bench_train(config: ml_collections.ConfigDict, steps: int, warmup: int = 2,
                profile_dir: str = "") -> dict[str, Any]:
    """Time the compiled train step on real batches (data loading excluded); optionally profile it."""
    run_step, report = prepare_train(config)
    result = report(_median_times({"train": run_step}, steps, warmup)["train"])
    if profile_dir:
        result["profile"] = profile(run_step, steps, profile_dir, run_step.hlo_text)
    return result


# XLA:CPU records its per-operation times in a profile only with this flag (GPUs always do).
CPU_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme"
_SEGMENT = re.compile(r"^[A-Za-z_][\w.]*$")
_MODEL = re.compile(r"^(transpose\()?jvp\([A-Z]\w*\)\)?$")  # the model's forward or its transpose


def part_of(op_name: str) -> str:
    """Which pass and which part of the model an HLO op_name belongs to.

    'jit(step)/transpose(jvp(GPT))/block_3/mlp/fc_in/dot_general' -> 'backward block_*/mlp/fc_in',
    '.../block_0/attn/zgts,zsh->zgth/transpose' -> 'backward block_*/attn/zgts,zsh->zgth';
    ops outside the model (loss, optimizer update) -> 'outside the model'.
    """
    segments = op_name.split(";")[0].split("/")[1:]  # drop 'jit(step)'
    if len(segments) < 2 or not _MODEL.match(segments[0]):  # not under jvp(<Module>)
        return "outside the model"
    direction = "backward" if segments[0].startswith("transpose(") else "forward"
    modules = []
    for seg in segments[1:-1]:
        if "->" in seg:  # an einsum inside a module: its spec names the product
            modules.append(seg)
            continue
        if not _SEGMENT.match(seg):
            break
        modules.append(re.sub(r"_\d+$", "_*", seg))
    return f"{direction} {'/'.join(modules[:3])}" if modules else f"{direction} (model, top level)"


def profile(run_step: Callable[[], None], steps: int, directory: str, hlo_text: str) -> dict[str, Any]:
    """Trace `steps` steps into `directory` (TensorBoard's profile plugin or Perfetto reads it) and
    sum the device operations' times per part of the model.

    On a multi-core CPU operations overlap, so the sum can exceed the step time.
    """
    import gzip
    import pathlib

    import jax

    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            run_step()
    traces = sorted(pathlib.Path(directory).glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"] if traces else []
    where = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.MULTILINE))
    ops: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in where:
            ops[e["name"]] = ops.get(e["name"], 0.0) + e.get("dur", 0) / 1e3 / steps
    part = {name: part_of(where[name]) for name in ops}
    parts: dict[str, float] = {}
    for name, ms in ops.items():
        parts[part[name]] = parts.get(part[name], 0.0) + ms
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:20]
    if not ops:
        print(f"bigmodel: the trace in {directory} has no per-operation events; on a CPU JAX must start with "
              f"{CPU_TRACE_FLAG}=true in XLA_FLAGS (`bigmodel bench train --profile` sets it)", file=sys.stderr)
    return {
        "dir": directory,
        "trace": str(traces[-1]) if traces else "",
        "ops_ms_per_step": sum(ops.values()),
        "by_part_ms_per_step": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": n, "ms_per_step": ms, "part": part[n], "op_name": where[n]} for n, ms in top],
    }


def bench_data(config: ml_collections.ConfigDict, batches: int) -> dict[str, Any]:
    """Examples or tokens per second delivered by the input pipeline alone."""
    from bigmodel import data as data_lib

    data = data_lib.build(config, shard=(0, 1))
    it = iter(data.train)
    next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    units = batches * config.train.batch_size * data.units_per_example
    kind = "tokens" if data.units_per_example > 1 else "examples"
    source = ",".join(config.data.sources) if "sources" in config.data and config.data.sources else config.data.name
    return {"name": f"data/{source}", f"{kind}_per_s": units / seconds, "batches": batches,
            "batch_size": config.train.batch_size, "seconds": seconds,
            f"{kind}_per_cpu_s": units / max(cpu_s, 1e-9)}  # this process's CPU time: what other jobs don't change


def _torch_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of PyTorch's float32 n x n matmul, best of `repeats` (its BLAS, for reference)."""
    import torch

    a = torch.ones(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def prepare_torch_gpt(config: ml_collections.ConfigDict) -> tuple[Callable[[], None], Callable[[float], dict]]:
    """A plain PyTorch eager GPT with the same shapes, AdamW and FLOP count: (run one step, report)."""
    import torch

    from bigmodel import flops, torch_gpt

    m = config.model
    model = torch_gpt.GPT(vocab_size=m.vocab_size, max_len=m.max_len, num_layers=m.num_layers,
                          d_model=m.d_model, num_heads=m.num_heads, d_ff=m.d_ff or 4 * m.d_model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.optim.learning_rate, betas=(config.optim.b1, config.optim.b2),
                            weight_decay=config.optim.weight_decay)
    batch, seq = config.train.batch_size, config.data.seq_len
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 257, (batch, seq + 1), generator=gen)

    def run_step() -> None:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        opt.step()

    params = sum(p.numel() for p in model.parameters())
    embed = model.wte.weight.numel() + model.wpe.weight.numel()
    per_token = flops.gpt_flops_per_token(m, params - embed, seq)

    def report(step_s: float) -> dict[str, Any]:
        return {"name": "train/torch-eager-gpt", "device_kind": "cpu", "threads": torch.get_num_threads(),
                "torch_version": torch.__version__, "tokens_per_s": batch * seq / step_s, "step_s": step_s,
                "flops_per_token": per_token, "achieved_flops": per_token * batch * seq / step_s, "params": params,
                "torch_matmul_peak_flops": _torch_matmul_peak()}

    return run_step, report


def bench_generate(config: ml_collections.ConfigDict, new_tokens: int, prompt_len: int) -> dict[str, Any]:
    """Seconds and tokens/s of `new_tokens` greedy tokens after a `prompt_len` prompt, cache (median
    of three runs) against recompute (one run), each compiled first, outside the timing, and
    whether their tokens agree."""
    import jax
    import jax.numpy as jnp

    from bigmodel import generate, models

    window = prompt_len + new_tokens  # the recompute path's window holds the whole run: identical tokens
    with config.unlocked():
        config.model.max_len = max(config.model.max_len, window)
    module = models.build(config.model)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    prompt = jax.random.randint(jax.random.key(1), (prompt_len,), 0, config.model.vocab_size).tolist()
    settings = dict(max_len=window, temperature=0.0, top_k=0, vocab_limit=config.model.vocab_size, seed=0)

    def timed(run: Callable[[], list[int]]) -> tuple[float, list[int]]:
        start = time.perf_counter()
        ids = run()
        return time.perf_counter() - start, ids

    cache_compile_s, _ = timed(lambda: generate.decode(module, variables, [prompt], max_tokens=new_tokens,
                                                       **settings))
    runs = [timed(lambda: generate.decode(module, variables, [prompt], max_tokens=new_tokens, **settings)[0])
            for _ in range(3)]
    cache_s, cached = statistics.median(t for t, _ in runs), runs[0][1]  # median of three: the cores are shared
    generate.sample(module, variables, prompt, max_tokens=1, stop_id=None, **settings)  # compiles the window
    recompute_s, recomputed = timed(lambda: generate.sample(module, variables, prompt, max_tokens=new_tokens,
                                                            stop_id=None, **settings))
    shape = {key: config.model[key] for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "position")}
    return {"name": "generate", "model": config.model.name, **shape, "params": sum(a.size for a in
            jax.tree.leaves(variables)), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "cache_s": cache_s, "recompute_s": recompute_s, "cache_tokens_per_s": new_tokens / cache_s,
            "recompute_tokens_per_s": new_tokens / recompute_s, "speedup": recompute_s / cache_s,
            "cache_first_call_s": cache_compile_s, "identical_tokens": cached == recomputed,
            "device": jax.devices()[0].device_kind}


def _emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark kind and print JSON lines."""
    if args.profile:
        if args.kind != "train":
            raise config_lib.ConfigError(f"--profile applies to 'bench train', not 'bench {args.kind}'")
        runtime.add_xla_flag(CPU_TRACE_FLAG, "true")
    config = config_lib.load(args.config, args.overrides)
    if args.kind == "data":
        _emit(bench_data(config, args.batches))
        return 0
    if args.kind == "train":
        _emit(bench_train(config, args.steps, profile_dir=args.profile))
        return 0
    if args.kind == "generate":
        if config.model.name != "gpt":
            raise config_lib.ConfigError(f"bench generate needs a GPT config; config.model.name is "
                                         f"{config.model.name!r}")
        if args.prompt_len < 1:
            raise config_lib.ConfigError("--prompt_len must be at least 1 (a prompt needs a token to start from)")
        for new_tokens in _token_counts(args.tokens):
            _emit(bench_generate(config, new_tokens, args.prompt_len))
        return 0
    if config.model.name != "gpt":
        print("bigmodel: bench compare needs a GPT config", file=sys.stderr)
        return 2
    # Both steps in one process, timed in alternating rounds.
    (ours_step, ours_report), (theirs_step, theirs_report) = prepare_train(config), prepare_torch_gpt(config)
    times = _round_times({"bigmodel": ours_step, "torch": theirs_step}, args.steps, warmup=2)
    ours = ours_report(statistics.median(times["bigmodel"]))
    theirs = theirs_report(statistics.median(times["torch"]))
    _emit(ours)
    _emit(theirs)
    _emit({"name": "compare", "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
           "round_ratio_quartiles": round_ratio_quartiles(times["bigmodel"], times["torch"]),
           "measured_peak_flops": ours["peak_flops"], "bigmodel_mfu": ours["mfu"],
           "torch_mfu": theirs["achieved_flops"] / ours["peak_flops"]})
    return 0


def _token_counts(text: str) -> list[int]:
    """'256,1024' -> [256, 1024]; a one-line error for anything else."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise config_lib.ConfigError(f"--tokens {text!r} must be positive integers separated by commas, e.g. 256,1024")
    return counts


def register(sub: Any) -> None:
    """Add `bigmodel bench {train,data,compare,generate}`."""
    p = sub.add_parser("bench", help="benchmarks that print JSON figures")
    p.add_argument("kind", choices=("train", "data", "compare", "generate"))
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (median reported)")
    p.add_argument("--batches", type=int, default=200, help="batches for 'data'")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="'train': also trace --steps steps into DIR and add where the time goes to the JSON")
    p.add_argument("--tokens", default="256,1024", help="'generate': new tokens per run, comma-separated")
    p.add_argument("--prompt_len", "--prompt-len", type=int, default=8, help="'generate': prompt tokens")
    p.set_defaults(func=cmd_bench, takes_overrides=True)
