r"""Scaling sweep whose law is checked out of sample: isoFLOP profiles of two-layer byte GPTs on the CPython stdlib.

Command:   bigmodel prepare --source text_files --format tfds --tokenizer byte --out stores/stdlib_bytes \
               --validation-fraction 0.05
           bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py --workdir runs/law --parallel 2
           bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py:holdout --workdir runs/law_holdout
           bigmodel scaling fit runs/law/results.csv runs/law_holdout/results.csv --holdout largest:1 \
               --out runs/law_check --params-column params_nonembed
           bigmodel scaling predict runs/law_check/fit.json --params N --tokens D
Hardware:  2 CPU cores, otherwise idle (load average about 2: the sweep's own two runs).
Wall time: measured 2026-12-06 (benchmarks/scaling-law-2026-12-06/, "eighth run"): the store,
           about 3 s; the sweep, 35 runs two at a time, 40 min 37 s including its fit and plots;
           the held-out run 9 min 20 s; each `scaling fit` about 40 s (4,500 starts, 100 bootstrap resamples, the
           backtest's three refits).
Expected:  validation loss in nats/byte (48 batches of 128 x 32 bytes of the store's held-out
           files), the lowest of each budget's profile, and the law of the 35 runs with N
           counted without embeddings (95% bootstrap intervals, 100 resamples):
             budget (6ND)  2.5e11  5.5e11  1.21e12  2.66e12  5.86e12  1.29e13
             best loss     1.886   1.743   1.604    1.497    1.423    1.358
             best width    24      40      48       56       64       80
           E 1.146 [1.115, 1.173], A 60.0 [42.7, 123.7], B 4902 [2637, 7152],
           alpha 0.521 [0.480, 0.597], beta 0.666 [0.618, 0.694]: every interval excludes 0;
           the runs scatter 0.40% (rms) about the law.
           Backtest (the law refitted on the budgets below each of the last three, predicting
           the best run of each budget above): always too high, +0.57 to +1.78% per decade of
           compute beyond the fitted runs.
           Held-out run (':holdout', width 112 on 24.5M tokens, 5.16e13 FLOPs, 4.0001x the
           largest run; the compute-optimal allocation the sweep's own fit gives at that
           budget, N_opt 3.8e5, to the nearest width of the ladder): measured 1.2712,
           predicted 1.2889, +1.39% of the measurement: within 2%. Its run interval from the
           bootstrap, [1.2754, 1.3040], misses it by 0.33%; widened by the backtest's rate over
           the 0.60 decades beyond the sweep, [1.2619, 1.3040], it holds it. Interval and
           rates were committed before the run ended. A second seed, 3 steps shorter: 1.2747
           (+1.12%, inside the widened interval). With N counted with embeddings: E 1.169
           [1.137, 1.182], alpha 0.681 [0.626, 0.739], beta 0.673 [0.622, 0.692], predicted
           1.2905 (+1.52%, [1.2759, 1.3019], widened [1.2618, 1.3019]): N without embeddings
           predicts a little better here.
           Kaplan et al.'s L(N, D), which has no floor, predicts 1.192 / 1.178 (-6.3% / -7.3%).
           What made the difference to the seventh run (the same plan, held-out run 2.14% off
           and outside): weight decay. optax's AdamW shrinks the matrices by lr x weight decay a
           step, so with one weight decay (0.1) and a rate falling as width^-1.1 the narrow
           models were shrunk ten times faster than the wide ones, and the more so the longer
           they trained: an N x D interaction the additive law cannot express. Holding lr x
           weight decay at 2.4e-4 for every run (`sweep.independent_weight_decay`, weight decay
           0.1 at width 128 as before, 0.01 at width 16) lowered the long runs of small models
           by up to 2.2% and the residuals from 0.70% to 0.40% rms.

Why 32 bytes of context: the loss averages every position of a sequence, so its floor E is the
           entropy of the next byte given at most 31 bytes before it, which models of 10k-600k
           parameters approach; the fit sees the curve bend and pins E (1.1-1.2 nats/byte).
           With 128 bytes (the earlier runs, in benchmarks/ "third" and "fourth run") the
           floor is far below these models, every run lies on what looks like a pure power law,
           E's bootstrap interval reaches 0, and the additive law missed its held-out run by
           8.6-10.5% while Kaplan's form, which has no floor, came within 0.25-1.1%.
           IsoFLOP profiles kept to 6-300 tokens a parameter (`sweep.tokens_per_param`) stay
           near each budget's optimum, where the law's additive terms hold best.

Plan:      isoFLOP budgets 2.5e11 to 1.29e13 (x2.2 apart, 52x in all; 6ND with N counting
           embeddings); widths 16-144 in steps of 8-16 at two layers (head dim 8), each budget
           keeping the widths whose D / N lies in 6-300: 35 runs, 6.6k to 502k non-embedding
           parameters (76x; 13k to 562k with the tied 384-byte table and 32 positions), 540k
           to 21M tokens. Batch 32 x 32 bytes (1,024 tokens a step), read from the byte-level
           token store of the standard library (29.1M training bytes; windows in a new random
           order each epoch, so a batch mixes files from the whole split; no run reaches a
           second epoch). Learning rate 2.4e-2 (16 / width)^1.1: the vertices of rate scans at
           widths 16 and 128 on 2M tokens (':lr'; on the store, width 16: 1.2e-2, 2.4e-2,
           4.8e-2 gave 2.067, 2.040, 2.063; width 128: 1.2e-3, 2.4e-3, 4.9e-3 gave 1.563,
           1.520, 1.533; close to the 1 / width of muP for Adam; scanned with weight decay 0.1
           at every width, i.e. before the rule below). Weight decay 2.4e-4 / lr (lr x weight
           decay the same for every run). Warmup 5% of each run, cosine to 10% at each run's end.

Variants:  ':lr' the rate scan (widths 16 and 128 on 2M tokens at the rule's rates scaled by
           --config.base.optim.learning_rate, the rate at width 16); ':holdout' the held-out
           run; ':tiny' a few seconds a run (gpt_stdlib's ':tiny' ladder, on the packed text
           pipeline, no store needed) and ':tiny,holdout' its held-out run at 4x its largest
           run's compute, which the tests run end to end.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib

base = config_lib.experiment_module(pathlib.Path(__file__).parents[1] / "base.py")

VARIANTS = ("", "tiny", "lr", "holdout", "tiny,holdout")

SEQ_LEN = 32  # bytes of context: the floor E of this task is within reach of 10k-600k parameters
BATCH = 32  # sequences a step: 1,024 tokens
WIDTHS = (16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144)  # two layers, head dim 8
FLOPS = (2.5e11, 5.5e11, 1.21e12, 2.66e12, 5.86e12, 1.29e13)  # isoFLOP budgets (6ND, N with embeddings), x2.2
TOKENS_PER_PARAM = (6, 300)  # each budget keeps the sizes with D / N in this band: near its optimum (~40-50)
LR = 2.4e-2  # at width 16: vertex of the 2M-token scan (docstring)
LR_EXPONENT = 1.1  # 2.4e-3 at width 128 (its scan's vertex): lr = LR * (16 / width) ** LR_EXPONENT
DECAY_PER_STEP = 2.4e-4  # lr x weight decay of every run: weight decay 0.1 at width 128, 0.01 at width 16
STORE = "stores/stdlib_bytes"  # the stdlib as a byte-level token store (docstring): windows read in a random order
LR_SCAN_TOKENS = 2_097_152  # ':lr' trains widths 16 and the largest scanned on this budget
LR_SCAN_WIDTHS = (16, 128)
HOLDOUT = (112, 24_519_680)  # width, tokens: the sweep fit's N_opt 3.8e5 (ladder width nearest), 4x its largest run
TINY_HOLDOUT = (64, 98_304)  # 4x the compute of ':tiny''s largest run (width 64, 24,576 tokens)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The sweep config: gpt_stdlib's training config and rules with this ladder, budgets and rates."""
    base.check_variant(__file__, arg, VARIANTS)
    parts = arg.split(",")
    c = config_lib.sibling_config(__file__, "gpt_stdlib.py", "tiny" if "tiny" in parts else "")
    s = c.sweep
    if "tiny" not in parts:
        c.base.data.seq_len = c.base.model.max_len = SEQ_LEN
        c.base.train.batch_size = BATCH
        c.base.data.sources = (STORE,)
        c.base.optim.learning_rate = LR  # at base_width
        c.base.eval.every = 4000  # and at each run's last step
        c.base.eval.batch_size = 128
        c.base.eval.num_batches = 48  # of 128 x 32 bytes: 197k validation tokens
        c.base.checkpoint.every = 8000
        s.mode = "isoflop"
        s.widths = WIDTHS
        s.num_layers = 2
        s.head_dim = 8
        s.flops = FLOPS
        s.tokens_per_param = TOKENS_PER_PARAM
        s.base_width = 16
        s.lr_exponent = LR_EXPONENT
        s.warmup_fraction = 0.05
        s.independent_weight_decay = DECAY_PER_STEP
    if arg == "lr":
        s.mode, s.widths, s.tokens, s.tokens_per_param = "grid", LR_SCAN_WIDTHS, (LR_SCAN_TOKENS,), ()
        s.fit_bootstrap = 0
    if "holdout" in parts:
        width, tokens = TINY_HOLDOUT if "tiny" in parts else HOLDOUT
        s.mode, s.widths, s.tokens, s.tokens_per_param, s.max_flops = "grid", (width,), (tokens,), (), 0.0
    return c
