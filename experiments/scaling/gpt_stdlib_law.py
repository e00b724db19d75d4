r"""Scaling sweep meant to give a law that holds out of sample: two-layer byte GPTs on the CPython standard library.

Command:   bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py --workdir runs/law --parallel 2
           bigmodel sweep --config experiments/scaling/gpt_stdlib_law.py:holdout --workdir runs/law_holdout
           bigmodel scaling fit runs/law/results.csv runs/law_holdout/results.csv --holdout largest:1 \
               --out runs/law_check [--params-column params_nonembed]
           bigmodel scaling predict runs/law_check/fit.json --params N --tokens D
Hardware:  2 CPU cores shared with other work (load average 5-14), every run at nice -n 5.
Wall time: measured 2026-12-06 (benchmarks/scaling-law-2026-12-06/, "second run"): 22 min 26 s
           for 13 runs 2 at a time (budgets 1M, 2M and 4M: the 8 of this plan plus the five
           1M runs since dropped, see below) with the held-out run alongside (785 s, 13.5 min
           for its sweep), and 12 min for the four 3M runs one at a time beside them; 67-305 s
           a run. Each fit below: about 3 minutes (4,500 starts, 100 resamples).
Expected:  validation loss in nats/byte (measured):
             width (non-embedding params)  2M      3M      4M
             16 (6,592)                    2.425   2.304   2.296
             24 (14,496)                   2.329   2.208   2.171
             32 (25,472)                   2.290   2.182   2.087
             48 (56,640)                   2.194   2.065   over the cap
             64 (100,096)                  2.165   over the cap
           Held-out run (width 64, 8.4M tokens, 4.10x the largest run's 6ND): 1.8109.
           Loss falls with N at every budget and with D at every width, yet the approach-3
           fit is degenerate, so the issue's criteria are NOT met: E = 1.73 [7e-10, 2.03]
           (95% bootstrap interval) with N counting embeddings, 1.60 [6e-10, 2.03] without;
           alpha 0.36 [0.064, 1.69] / 0.21 [0.051, 1.23]; beta 2.39 [0.12, 7.2] both ways.
           It predicts the held-out run at 1.962 / 1.960 (+8.3%; inside the wide 95% run
           interval [1.75, 2.09]), and `scaling predict` refuses it (E's interval reaches 0).
           Kaplan et al.'s L(N, D) without an irreducible term, fitted to the same 12 runs,
           predicts 1.794 (0.93% off) with embeddings and 1.812 (0.04%) without. With 2x of D
           the fit takes width 16's flattening between 3M and 4M for the approach to E.
           Adding widths 16 and 24 on 8.2M tokens (2.169 and 2.008: width 16 had not
           flattened; 4 min a run) and refitting the 14 runs: still degenerate (E 1.65
           [2e-10, 1.85] / 1.58 [3e-10, 1.82]; alpha 0.45 [0.082, 1.43] / 0.29 [0.062, 1.07];
           beta 1.04 [0.11, 2.75]), held-out predicted 1.888 / 1.886 (+4.3% / +4.2%, inside
           [1.76, 1.97]); Kaplan's L(N, D) then 2.9% / 2.1% off.
           At 1M tokens (1,000 steps) loss was flat in N (2.641-2.754, width 24 best): still
           optimisation-limited, like the first run's budgets (batch 32, 125-782 steps, below),
           so the plan starts at 2M. Next: more of D (8M-16M tokens for every width, more than
           an hour on 2 cores) and rates re-tuned at batch 8.
           First run (batch 32, 512k-3.2M tokens): loss did not fall with N, alpha < 0 and the
           fit refused (benchmarks/scaling-law-2026-12-06/README.md).

Plan:      widths 16, 24, 32, 48, 64 at two layers (head dim 8): 6.6k to 100k non-embedding
           parameters (15.2x; 15k to 133k with the tied 384-byte table and 128 positions).
           Batch 8 x 128 bytes. Token budgets 2M, 3M and 4M (2,000-4,000 steps), each run's
           6ND capped at 1.7e12 (sweep.max_flops): 12 runs, the largest width 64 on 2M
           (1.63e12). Learning rate from the first run's ':lr' sweep at batch 32 (6e-3,
           1.5e-2, 4e-2 on 512k tokens): 1.5e-2 was best at width 16 and 6e-3 at width 64, so
           lr = 1.5e-2 * (16 / width)^0.661; not re-tuned at batch 8. Warmup 5% of each run,
           cosine to 10% at each run's own end. Held-out run (':holdout'): width 64 on 8.4M
           tokens, 6.69e12 FLOPs, 4.10x the sweep's largest run, never seen by the fit.

Variants:  ':lr' the learning-rate sweep: widths 16 and 64 on 2M tokens at the rate given by
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
BATCH = 8  # sequences of 128 bytes a step: 1,024 tokens, 4x the steps per token of batch 32
TOKENS = (2_048_000, 3_072_000, 4_096_000)  # 2,000, 3,000 and 4,000 steps of 1,024 tokens
MAX_FLOPS = 1.7e12  # 6ND cap: leaves out width 64 on 3M and 4M, 48 on 4M; the largest run is width 64 on 2M (1.63e12)
HOLDOUT = (64, 8_396_800)  # width, tokens (8,200 steps): 4.10x the compute of the largest run
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
        c.base.train.batch_size = BATCH
        c.base.eval.every = 1000  # and at each run's last step; 16 batches of 32 x 128 bytes (65k tokens)
        c.base.checkpoint.every = 4000
    if arg == "lr":
        s.widths = (WIDTHS[0], WIDTHS[-1])
        s.tokens = (TOKENS[0],)  # the first run tuned at batch 32 on 512k tokens (see Plan)
        s.lr_exponent = 0.0  # the rate on the command line, at both widths
        s.max_flops = 0.0
        s.fit_bootstrap = 0
    if "holdout" in parts:
        width, tokens = TINY_HOLDOUT if "tiny" in parts else HOLDOUT
        s.widths, s.tokens, s.max_flops = (width,), (tokens,), 0.0
    return c
