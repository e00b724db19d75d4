r"""Scaling sweep whose law holds out of sample: two-layer byte GPTs on the CPython standard library.

Command:   bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py --workdir runs/law
           bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py:holdout --workdir runs/law_holdout
           python benchmarks/scaling_holdout.py runs/law runs/law_holdout --out runs/law_holdout/check.json
Hardware:  2 CPU cores; --parallel 2 (two runs at a time, one core each).
Wall time: RESULTS_PENDING
Expected:  RESULTS_PENDING

Plan:      widths 32, 48, 64, 96, 128 at two layers (head dim 16): 25k to 397k non-embedding
           parameters (15.6x; 42k to 462k with the tied 384-byte table and 128 positions).
           Token budgets 410k, 1M, 2.6M and 6.4M (100 to 1,562 steps of 32 x 128 bytes),
           each run's 6ND capped at 3e12 (sweep.max_flops): the smallest width gets all four
           budgets, the two largest the first two, 14 runs in all. Learning rate from a short
           sweep at the smallest and largest widths (':lr'): LR_PENDING; warmup 5% of each run,
           cosine to 10% at each run's own end.
           Held-out run (':holdout'): width 128 on 4.1M tokens, 1.14e13 FLOPs, 4.0x the sweep's
           largest run (width 128 on 1M tokens, 2.84e12), never seen by the fit.

Variants:  ':lr' the learning-rate sweep: widths 32 and 128 on 1M tokens at the rate given by
           --config.base.optim.learning_rate; ':holdout' the held-out run; ':tiny' a few
           seconds a run (gpt_stdlib's ':tiny' ladder) and ':tiny,holdout' its held-out run at
           4x its largest run's compute, which the tests run end to end.
"""

import ml_collections

from bigmodel import config as config_lib

VARIANTS = ("", "tiny", "lr", "holdout", "tiny,holdout")

WIDTHS = (16, 24, 32, 48, 64)
TOKENS = (512_000, 1_282_048, 3_203_072, 8_003_584)  # 125, 313, 782 and 1,954 steps of 4,096 tokens
MAX_FLOPS = 1.03e12  # 6ND cap: the largest sweep run is width 64 on 1.3M tokens (1.02e12)
HOLDOUT = (64, 5_120_000)  # width, tokens (1,250 steps): 4x the compute of the largest run
TINY_HOLDOUT = (64, 98_304)  # 4x the compute of ':tiny''s largest run (width 64, 24,576 tokens)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The sweep config: gpt_stdlib's training config and rules with this ladder, budgets and rates."""
    config_lib.experiment_module(__file__.replace("gpt_stdlib_law.py", "../base.py")).check_variant(
        __file__, arg, VARIANTS)
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
