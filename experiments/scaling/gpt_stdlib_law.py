r"""Scaling sweep whose law holds out of sample: two-layer byte GPTs on the CPython standard library.

Command:   bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py --workdir runs/law
           bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py:holdout --workdir runs/law_holdout
           python benchmarks/scaling_holdout.py runs/law runs/law_holdout --out runs/law_holdout/check.json
Hardware:  2 CPU cores (the first run: 3-5 runs at a time, nice -n 5, on a loaded machine).
Wall time: not measured on a quiet machine. Its first run (2026-12-06, nice -n 5 on 2 cores
           shared with load averages of 30-40) spent 10-15 minutes of wall time per run on
           start-up and compilation alone (about 20 CPU seconds each) and did not finish the
           plan plus the held-out run in the hour it had; the held-out run was stopped
           before it trained. By 6ND the plan is 3.0e12 FLOPs and the held-out run 2.6e12:
           on a quiet machine (about 5e10 FLOP/s for these sizes, 10-20 s start-up per run)
           that is about 5 minutes for the sweep and 1 for the held-out run, untested.
Expected:  measured (benchmarks/scaling-law-2026-12-06/): 10 of the 11 runs finished.
           Validation loss in nats/byte at 512k tokens (125 steps), widths 16/24/32/48/64:
           2.790, 2.879, 2.965, 2.882, 2.896; at 1.28M: 2.665, 2.626, 2.822, 2.745 (16-48);
           width 16 at 3.2M: 2.474. Loss falls with D at every width but not with N: these
           budgets are limited by optimisation, not capacity, so the approach-3 law is not
           identified: the best fit has alpha -0.071, beta 0.086 (N with embeddings) or
           alpha -0.059, beta 0.086 (without), and `bigmodel scaling fit` refuses both.
           With batch 8 (4x the steps per token) width 64 beats width 16 at 2M tokens (2.165
           against 2.425) but not at 512k (2.753 against 2.686): next, batch 8 and budgets
           from 2M tokens up (benchmarks/scaling-law-2026-12-06/batch8.csv).

Plan:      widths 16, 24, 32, 48, 64 at two layers (head dim 8): 6.6k to 100k non-embedding
           parameters (15.2x; 15k to 133k with the tied 384-byte table and 128 positions, which
           are more than half of the smallest model). Token budgets 512k, 1.28M and 3.2M (125,
           313 and 782 steps of 32 x 128 bytes), each run's 6ND capped at 6.3e11
           (sweep.max_flops), so the small widths get all three budgets and the large ones the
           short ones: 11 runs. Learning rate from the ':lr' sweep (6e-3, 1.5e-2, 4e-2 on 512k
           tokens): 1.5e-2 was best at width 16 (validation loss 2.790 against 2.896 and
           2.890) and 6e-3 at width 64 (2.903 against 3.005 and 3.053), so lr = 1.5e-2 *
           (16 / width)^0.661 goes through both; warmup 5% of each run, cosine to 10% at each
           run's own end.
           Held-out run (':holdout'): width 64 on 3.2M tokens, 2.55e12 FLOPs, 4.08x the sweep's
           largest run (width 48 on 1.28M tokens, 6.25e11), never seen by the fit.

Variants:  ':lr' the learning-rate sweep: widths 16 and 64 on 512k tokens at the rate given by
           --config.base.optim.learning_rate; ':holdout' the held-out run; ':tiny' a few
           seconds a run (gpt_stdlib's ':tiny' ladder) and ':tiny,holdout' its held-out run at
           4x its largest run's compute, which the tests run end to end.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib

base = config_lib.experiment_module(pathlib.Path(__file__).parents[1] / "base.py")

VARIANTS = ("", "tiny", "lr", "holdout", "tiny,holdout")

WIDTHS = (16, 24, 32, 48, 64)
TOKENS = (512_000, 1_282_048, 3_203_072)  # 125, 313 and 782 steps of 4,096 tokens
MAX_FLOPS = 6.3e11  # 6ND cap: the largest sweep run is width 48 on 1.3M tokens (6.25e11)
HOLDOUT = (64, 3_203_072)  # width, tokens (782 steps): 4.08x the compute of the largest run
TINY_HOLDOUT = (64, 98_304)  # 4x the compute of ':tiny''s largest run (width 64, 24,576 tokens)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The sweep config: gpt_stdlib's training config and rules with this ladder, budgets and rates."""
    base.check_variant(__file__, arg, VARIANTS)
    parts = arg.split(",")
    c = config_lib.sibling_config(__file__, "gpt_stdlib.py", "tiny" if "tiny" in parts else "")
    s = c.sweep
    if "tiny" not in parts:
        s.widths = WIDTHS
        s.num_layers = 2
        s.head_dim = 8
        s.tokens = TOKENS
        s.max_flops = MAX_FLOPS
        c.base.optim.learning_rate = 1.5e-2  # at base_width (the best of 6e-3, 1.5e-2, 4e-2 at width 16)
        s.base_width = 16
        s.lr_exponent = 0.661  # 6e-3 at width 64, the best of the three rates there
        s.warmup_fraction = 0.05
    if arg == "lr":
        s.widths = (WIDTHS[0], WIDTHS[-1])
        s.tokens = (512_000,)
        s.lr_exponent = 0.0  # the rate on the command line, at both widths
        s.max_flops = 0.0
        s.fit_bootstrap = 0
    if "holdout" in parts:
        width, tokens = TINY_HOLDOUT if "tiny" in parts else HOLDOUT
        s.widths, s.tokens, s.max_flops = (width,), (tokens,), 0.0
    return c
