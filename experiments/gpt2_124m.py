r"""GPT-2 124M on a prepared token store, with the GPT-2/nanoGPT reproduction's batch and schedule.

Command:   bigmodel prepare --source 'fineweb-edu/sample/10BT/*.parquet' --format parquet \
               --tokenizer hf:gpt2/tokenizer.json --out stores/fineweb-edu-10b
           bigmodel train --config experiments/gpt2_124m.py --workdir runs/gpt2_124m
           (any store works: --config.data.sources='("stores/openwebtext",)'; a mixture:
           --config.data.sources='("stores/fineweb-edu-10b", "stores/openwebtext")'
           --config.data.weights='(0.8, 0.2)'; more held-out sets, each reported as eval_<folder>/loss
           and /bits_per_byte: --config.eval.sets='("stores/openwebtext",)')
Hardware:  8 GPUs with 80 GB (H100): 512 sequences of 1024 tokens per step (524,288 tokens), as two
           microbatches of 32 sequences per GPU; bfloat16 compute, float32 parameters and moments.
Schedule:  19,073 steps = 10B tokens (one pass over FineWeb-Edu's 10BT sample); AdamW peak 6e-4,
           715 warmup steps, cosine to 10%, weight decay 0.1, betas (0.9, 0.95), clipping at 1.0,
           as in the nanoGPT/llm.c reproductions of GPT-2 124M.
Wall time: not measured here (no GPU at hand); at 40% MFU of 8 × 989 TFLOP/s about 2 hours.
Expected:  not measured here; the reproductions report a validation loss near 3.3 nats on FineWeb-Edu
           with GPT-2's tokenizer.

Variants:  ':tiny' trains the 'nano' GPT for 30 steps on two small stores mixed 2:1 and evaluates
           on each of them; the tests write a parquet and a jsonl corpus from the standard library,
           train a byte-level BPE of 512 ids, prepare both stores and pass them as
           --config.data.sources and --config.eval.sets.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import gpt

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """GPT-2 124M on stores/fineweb-edu-10b, or the ':tiny' variant."""
    base.check_variant(__file__, arg, VARIANTS)
    c = base.config()
    c.task = "lm"
    c.model = gpt.model_config("124m")
    c.model.update(dtype="bfloat16", vocab_size=50304)  # GPT-2's 50,257 ids padded to a multiple of 128
    c.data = base.text_data()
    c.data.sources = ("stores/fineweb-edu-10b",)
    c.data.tokenizer = "store"  # the store's own (GPT-2's tokenizer.json when prepared as above)
    c.data.seq_len = 1024
    c.data.prefetch = 2
    c.train.batch_size = 512
    c.train.grad_accum = 2
    c.train.steps = 19_073
    c.optim.update(learning_rate=6e-4, warmup_steps=715, end_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                   grad_clip=1.0)
    c.eval.batch_size = 64
    c.eval.num_batches = 20
    c.eval.every = 250
    c.checkpoint.every = 1000
    c.log.every = 10

    if arg == "tiny":
        c.model = gpt.model_config("nano")
        c.model.vocab_size = 512  # the tests' BPE
        c.data.sources = ("stores/tiny_parquet", "stores/tiny_jsonl")
        c.data.weights = (2.0, 1.0)
        c.eval.sets = c.data.sources
        c.data.seq_len = 64
        c.data.prefetch = 0
        c.train.grad_accum = 1
        c.optim.learning_rate = 3e-3  # a nano model learns faster than GPT-2's rate allows in 30 steps
        base.tiny(c, steps=30, batch_size=8, warmup_steps=5, every=10, log_every=5, eval_batches=2)
    return c
