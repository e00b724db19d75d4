r"""Scaling sweep: byte-level GPTs on the CPython standard library, 4 sizes × 3 token budgets.

Command:   bigmodel sweep --config experiments/scaling/gpt_stdlib.py --workdir runs/sweep_gpt_stdlib
           (and `bigmodel scaling report runs/sweep_gpt_stdlib` at any time)
Hardware:  2 CPU cores, one run at a time (the default --parallel 1: each run uses every core).
Wall time: measured 12 minutes on 2 shared cores (load average 2-3): 702 s of training runs
           (15 s for the smallest to 155 s for the largest) plus start-up, the fit with
           100 bootstrap resamples and the plots.
Expected:  12 finished runs in results.csv (measured: 2.92-3.01 nats/token at 410k tokens,
           2.81-3.01 at 820k and 2.62-2.73 at 1.6M; the largest model at the largest budget
           2.62 nats, 3.78 bits/byte). Loss falls with D at every size. With N it falls at
           1.6M tokens but not at the two short budgets, where width 64 (lr 6e-3) sat at about
           3.01 nats, on the plateau a byte model crosses early (see fit/loss_vs_params.png):
           100-200 steps are too few for every size to leave it. Over one decade of N and a
           factor 4 in D the approach-3 fit is degenerate (E -> 0, alpha 0.038, beta 0.097;
           fit/fit.json): read it as a demonstration of the pipeline, and lengthen the budgets
           (--config.sweep.tokens) or use :isoflop for exponents worth quoting.

Plan:      widths 48, 64, 96, 128; depth = width / 32 rounded (2, 2, 3, 4 layers); head dim 16;
           81k, 130k, 380k and 860k parameters with embeddings. Token budgets 410k, 820k and
           1.6M (100, 200, 400 steps of 32 × 128 tokens). Learning rate 3e-3 at width 128,
           scaled by 128/width; warmup 5% of each run; cosine to 10% at each run's end.

Variants:  ':isoflop' three compute budgets (5e11, 1.5e12, 4.5e12 FLOPs = 6ND) over the same
           ladder for isoFLOP profiles (approach 2), 26M tokens, about 20-40 minutes; ':tiny'
           3 one-layer widths × 2 budgets of 16 and 48 steps, seconds per run (the tests run
           it end to end with --config.base.data.source pointing at a small corpus).
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import gpt

base = config_lib.experiment_module(pathlib.Path(__file__).parents[1] / "base.py")
VARIANTS = ("", "tiny", "isoflop")


def base_config() -> ml_collections.ConfigDict:
    """The training config every run starts from (experiments/base.py's groups, gpt_tiny's model and data)."""
    c = base.config()
    c.task = "lm"
    c.model = gpt.model_config("tiny")  # width, depth and heads are set per run by the ladder
    c.model.max_len = 128
    c.data = base.text_data()

    c.optim.learning_rate = 3e-3  # at sweep.base_width; other widths scale it
    c.optim.warmup_steps = 20  # replaced by sweep.warmup_fraction
    c.train.steps = 100  # set per run from its token budget (optim.decay_steps 0: each schedule ends there)
    c.eval.every = 200  # and always at a run's last step (the loss in results.csv)
    c.eval.num_batches = 16  # 65k validation tokens
    c.checkpoint.every = 200
    c.checkpoint.keep = 1
    c.log.progress = False
    return c


def sweep_config() -> ml_collections.ConfigDict:
    """The plan: ladder, budgets, size rules and fit settings (see bigmodel/scaling/sweep.py)."""
    s = ml_collections.ConfigDict()
    s.mode = "grid"  # 'grid': widths × tokens; 'isoflop': widths × flops with D = C / 6N
    s.families = ("gpt",)  # run-id prefixes; other families are overlays in config.families
    s.widths = (48, 64, 96, 128)
    s.num_layers = 0  # 0: depth = round(width / aspect_ratio), at least 1
    s.aspect_ratio = 32.0
    s.head_dim = 16
    s.tokens = (409_600, 819_200, 1_638_400)  # grid budgets: 100, 200, 400 steps of 4,096 tokens
    s.flops = (5e11, 1.5e12, 4.5e12)  # isoFLOP budgets (6·N·D, N with embeddings)
    s.min_steps = 20  # planned runs shorter than this are left out
    s.max_flops = 0.0  # planned runs above this 6ND are left out (0: no cap)
    s.tokens_per_param = ()  # (low, high): runs whose D / N lies outside are left out (() or 0: no bound)
    s.base_width = 128  # the width at which base.optim.learning_rate is tuned
    s.lr_exponent = 1.0  # lr = base lr * (base_width / width) ** lr_exponent
    s.lr_tokens_exponent = 0.0  # ... * (base_tokens / tokens) ** lr_tokens_exponent (0: every budget alike)
    s.base_tokens = 1_638_400  # the budget at which base.optim.learning_rate is tuned
    s.warmup_fraction = 0.05  # warmup = 5% of each run's steps (0: base.optim.warmup_steps)
    s.independent_weight_decay = 0.0  # > 0: weight decay = this / lr, one shrink a step for every run (0: base's)
    s.run_overrides = ()  # 'PATTERN:key=value', e.g. 'gpt_w128_*:train.grad_accum=2'
    s.fit_starts = "hoffmann"  # approach-3 starts: 'hoffmann' (4,500) or 'small' (32)
    s.fit_bootstrap = 100  # bootstrap resamples for the fit's intervals
    return s


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The sweep config: base training config, plan, and (no) extra families."""
    base.check_variant(__file__, arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.base = base_config()
    c.sweep = sweep_config()
    c.families = ml_collections.ConfigDict()  # e.g. experiments/scaling/transformer_vs_lstm.py
    if arg == "isoflop":
        c.sweep.mode = "isoflop"
    elif arg == "tiny":
        # Seconds per run, dominated by start-up and compilation; steps are nearly free.
        c.base.data.seq_len = 64
        c.base.optim.learning_rate = 1e-2
        base.tiny(c.base, batch_size=8, every=48, log_every=8, eval_batches=2)  # steps and warmup are per run
        c.base.checkpoint.async_save = False
        c.sweep.widths = (16, 32, 64)
        c.sweep.num_layers = 1
        c.sweep.head_dim = 16
        c.sweep.base_width = 32
        c.sweep.lr_exponent = 0.0  # one rate: at a few dozen steps the wider models need it
        c.sweep.tokens = (8192, 24576)  # 16 and 48 steps of 512 tokens
        c.sweep.flops = (2e9, 6e9)
        c.sweep.min_steps = 4
        c.sweep.warmup_fraction = 0.25
        c.sweep.fit_starts = "small"
        c.sweep.fit_bootstrap = 0
    return c
