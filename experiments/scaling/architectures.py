r"""Which structural change buys how much loss per FLOP: GPT-2, Llama-style, mixture of experts, LSTM.

Command:   bigmodel sweep --config experiments/scaling/architectures.py --workdir runs/sweep_architectures
Hardware:  2 CPU cores, one run at a time.
Wall time: measured 16.5 minutes on 2 shared cores (load average about 2): 960 s of runs,
           the four approach-3 fits and the plots.
Expected:  measured (nats/token; alpha_C with its OLS standard error; lowest loss within
           1.78e12 FLOPs, the largest budget every family reaches):
             gpt    859k params           alpha_C 0.023 ± 0.007   3.07
             llama  902k params           alpha_C 0.035 ± 0.010   2.81
             moe    2.53M, 1.44M active   alpha_C 0.037 ± 0.011   2.78
             lstm   362k params           alpha_C 0.041 ± 0.014   3.04
           Llama-style and MoE decoders reach about 0.27 nats lower than GPT-2 at equal
           compute; the MoE's edge over the dense Llama block is within the noise of single
           runs. Fifty-step runs are dominated by the early plateau (gpt w128 at 50 steps
           ended at 3.29, above smaller models), which is why the GPT-2 exponent is the
           smallest; the per-family approach-3 fits over six runs are degenerate and should
           not be read.

Four families on one width ladder (widths 64, 96, 128; depth width/32; head dim 16) and two
token budgets (50 and 200 steps of 32 × 128 bytes), everything else gpt_stdlib's:
  gpt    GPT-2: learned positions, LayerNorm, GELU MLP of 4·D, biases, tied embeddings.
  llama  Llama-style: rotary positions, RMSNorm, SwiGLU MLP of 8/3·D, no biases, untied
         embeddings (multi-head: at these widths 3-8 heads leave little room for grouping).
  moe    the llama block with a Mixtral-style mixture of experts in every layer: 4 SwiGLU
         experts of 8/3·D, top-2 routing, capacity factor 1.25, balance loss 0.01, z-loss 1e-3.
         It holds about twice the MLP parameters a token uses; N in the fits and the
         compute axis is the active count (results.csv params_active).
  lstm   a 2-layer LSTM language model (as in transformer_vs_lstm.py).

Outputs: DIR/results.csv; DIR/fit/families.json and the table printed at the end (per family:
parameters total/active of the largest model, Kaplan exponent alpha_C of L(C) = (C_c/C)^alpha_C
fitted on the family's compute envelope with a 95% bootstrap interval over its runs, the lowest
loss within the largest compute budget every family reaches, and for every pair of families the
exponent difference with its bootstrap interval, significant when that interval excludes 0);
DIR/fit/families_loss_vs_compute.png overlays all four; DIR/fit/<family>/ holds each family's
approach-3 fit. Six runs per family span a factor of about 16 in compute: read the exponents as
local slopes with the intervals beside them (resamples of six runs whose envelope is too short
for the law count as failed in families.json).

Variants:  ':tiny' two one-layer widths × one budget of 8 steps per family (the tests).
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import gpt, rnn

base = config_lib.experiment_module(pathlib.Path(__file__).parents[1] / "base.py")
VARIANTS = ("", "tiny")


def _family(model: ml_collections.ConfigDict, **sweep: object) -> ml_collections.ConfigDict:
    overlay = ml_collections.ConfigDict()
    overlay.base = ml_collections.ConfigDict({"model": model})
    if sweep:
        overlay.sweep = ml_collections.ConfigDict(sweep)
    return overlay


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """GPT-2, Llama-style, MoE and LSTM families on one ladder."""
    base.check_variant(__file__, arg, VARIANTS)
    c = config_lib.sibling_config(__file__, "gpt_stdlib.py", arg)
    c.sweep.families = ("gpt", "llama", "moe", "lstm")
    if not arg:
        c.sweep.widths = (64, 96, 128)
        c.sweep.tokens = (204_800, 819_200)  # 50 and 200 steps of 4,096 tokens
        c.base.eval.num_batches = 8
    max_len = c.base.model.max_len

    llama = gpt.model_config("llama_tiny")  # width, depth and heads set by the ladder
    llama.num_kv_heads = 0
    llama.d_ff = 0  # 8/3·width rounded up to 16
    llama.max_len = max_len
    c.families.llama = _family(llama)

    mixture = gpt.model_config("llama_tiny")
    mixture.update(num_kv_heads=0, d_ff=0, max_len=max_len, num_experts=4, experts_per_token=2,
                   capacity_factor=1.25)
    c.families.moe = _family(mixture)

    lstm = rnn.model_config("tiny")
    lstm.cell = "lstm"
    lstm.head = "lm"
    lstm.max_len = max_len
    c.families.lstm = _family(lstm, num_layers=2 if not arg else 1)

    if arg == "tiny":
        c.sweep.widths = (16, 32)
        c.sweep.tokens = (4096,)  # 8 steps of 8 × 64 tokens
    return c
