r"""BERT pre-training (masked language modelling) on the CPython standard library, byte level.

Command:   bigmodel train --config experiments/bert_stdlib.py --workdir runs/bert_stdlib
Hardware:  2 CPU cores (any JAX backend works; the mesh fills all devices with 'data').
Wall time: 509 s measured on 2 shared cores (load average about 3.5; the dataset was
           already built), so about 5-6 minutes on quiet cores.
Expected:  evaluation loss 1.79 nats and accuracy 0.54 on the masked bytes (measured:
           2.33 / 2.02 / 1.85 / 1.79 at steps 200 / 400 / 600 / 800), against a unigram
           entropy of 3.19 nats.

The model is BERT 'tiny' (2 layers, width 128, 2 heads; Turc et al. 2019) over bytes:
ids 0-255, end-of-document 256, then [MASK] 257, [CLS] 258, [SEP] 259 (bigmodel.data.mlm),
in a vocabulary padded to 384. Rows are [CLS] + 126 bytes of concatenated files + [SEP];
15% of the bytes are predicted, 80/10/10 mask/random/keep. No next-sentence objective and
no pooler, as RoBERTa. The data settings are gpt_tiny's except validation_fraction 0.2:
the held-out files are the test files of experiments/bert_classify.py, so the encoder it
fine-tunes has never seen them.

Positions are rotary (model.position='rope', as RoFormer and ModernBERT) rather than the
reference's learned table. With the table this budget is not enough: the model stays on the
context-free plateau (about 2.9 nats at 800 and at 1200 steps, attention close to uniform,
for every peak learning rate from 5e-4 to 2e-3, with 40% masking and with 64-byte rows),
because attending to a masked byte's neighbours must first be learned from absolute
positions. Rotary attention sees relative offsets from the first step and leaves the
plateau after about 200 steps.
`--config.model.position=learned` gives the original BERT.

Variants:  ':tiny' runs in seconds (used by the tests).
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import bert

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny' variant."""
    base.check_variant(__file__, arg, VARIANTS)
    c = base.config()
    c.task = "mlm"
    c.model = bert.model_config("tiny")
    c.model.head = "mlm"
    c.model.vocab_size = 384  # 257 byte-tokenizer ids + MASK, CLS, SEP, padded to a multiple of 128
    c.model.max_len = 128
    c.model.position = "rope"  # relative offsets from the start; 'learned' is the reference's table
    c.model.dropout = 0.0  # a few minutes see a fraction of the corpus once: underfitting, nothing to regularise

    c.data = base.text_data()  # the tokenizer's specials follow its vocabulary; rows are [CLS] + 126 tokens + [SEP]
    c.data.validation_fraction = 0.2  # text_files: share of files held out (bert_classify's test files)
    c.data.mask_rate = 0.15  # share of tokens predicted
    c.data.mask_token_fraction = 0.8  # of those, replaced by [MASK]
    c.data.random_token_fraction = 0.1  # of those, replaced by a random id (the rest are kept)

    c.optim.learning_rate = 1e-3  # post-LN: at 2e-3 and above small runs can stall at chance
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.98  # RoBERTa's, steadier than 0.999 for short runs
    c.optim.eps = 1e-6
    c.train.batch_size = 64
    c.eval.update(every=200, batch_size=64, num_batches=16)
    c.checkpoint.every = 200
    c.log.every = 25

    if arg == "tiny":
        tiny_model(c.model)
        c.data.seq_len = 32
        base.tiny(c, steps=10, batch_size=8, warmup_steps=3, every=5, log_every=5, eval_batches=2)
    return c


def tiny_model(model: ml_collections.ConfigDict) -> None:
    """Shrink a BERT model config to seconds-on-a-CPU size (shared with bert_classify's ':tiny')."""
    model.num_layers = 1
    model.d_model = 32
    model.num_heads = 2
    model.max_len = 64
