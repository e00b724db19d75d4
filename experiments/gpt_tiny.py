r"""A small byte-level GPT on the CPython standard library sources (offline default).

Command:   bigmodel train --config experiments/gpt_tiny.py --workdir runs/gpt_tiny
Hardware:  2 CPU cores (any JAX backend works; the mesh fills all devices with 'data').
Wall time: under 3 minutes measured on 2 quiet cores for the README's first command on a
           fresh machine (2 min 45 s: install, dataset build, CPU kernel build and 126 s of
           training at about 27k tokens/s); more when other jobs share the cores.
Expected:  validation about 3.4 bits/byte (3.421 measured), against a unigram entropy of 4.69.

Variants:  ':tiny' runs in seconds (used by the tests). ':llama' trains the Llama-style
           decoder of the same width and depth (gpt.model_config('llama_tiny'): rotary
           positions, RMSNorm, SwiGLU, grouped-query attention with 2 kv heads, no biases,
           untied embeddings); ':moe' adds a mixture of 4 experts, top-2, in every block.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import gpt

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny", "llama", "moe")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny', ':llama', ':moe' variants."""
    base.check_variant(__file__, arg, VARIANTS)
    c = base.config()  # the optimiser, run length, evaluation, checkpoint and mesh defaults are this run's
    c.task = "lm"
    c.model = gpt.model_config("tiny")
    c.data = base.text_data()

    if arg in ("llama", "moe"):
        c.model = gpt.model_config("llama_tiny")
        c.model.max_len = c.data.seq_len
        if arg == "moe":
            c.model.update(num_experts=4, experts_per_token=2, capacity_factor=1.25)
    elif arg == "tiny":
        c.model = gpt.model_config("nano")
        c.data.seq_len = 64
        base.tiny(c, steps=30, batch_size=8, warmup_steps=5, every=10, log_every=5, eval_batches=2)
    return c
