r"""A byte-level LSTM language model on the CPython standard library: gpt_tiny's task and data.

Command:   bigmodel train --config experiments/lstm_stdlib.py --workdir runs/lstm_stdlib
Hardware:  2 CPU cores.
Wall time: about 3 minutes on 2 cores (19k tokens/s; 180 s measured at a load average
           of about 1.5).
Expected:  validation about 3.05 bits/byte, against a unigram entropy of 4.69 bits/byte
           (gpt_tiny, same data, steps and non-embedding parameter count: about 3.4).

Everything but the model is experiments/gpt_tiny.py's (corpus, split, byte tokenizer,
sequence length, batch, optimiser and schedule), so the evaluation bits per byte compare
directly with gpt_tiny's. The model is bigmodel.models.rnn's RNNLM: a 128-wide byte
embedding, one LSTM layer of 384 units (787,968 non-embedding parameters, as gpt_tiny's
793,344) and an untied output layer, predicting the next byte at every step. At this
budget the LSTM is ahead: local byte statistics are most of what either model learns in
3.3M tokens, and the recurrence gets them quickly. Its MFU is understated: XLA's cost
analysis counts the time loop's body once.

Variants:  ':tiny' runs in seconds (used by the tests).
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import rnn

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny' variant."""
    base.check_variant(__file__, arg, VARIANTS)
    c = config_lib.sibling_config(__file__, "gpt_tiny.py", arg)
    model = rnn.model_config("tiny" if arg == "tiny" else "small")
    model.cell = "lstm"
    model.head = "lm"
    model.num_layers = 1
    model.d_model = 64 if arg == "tiny" else 128  # byte embeddings need little width
    model.hidden = 64 if arg == "tiny" else 384  # 4·384·(128+384) = 786k recurrent weights, gpt_tiny's count
    model.max_len = c.data.seq_len
    c.model = model
    return c
