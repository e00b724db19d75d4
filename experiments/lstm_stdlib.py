r"""A byte-level LSTM language model on the CPython standard library: gpt_tiny's task and data.

Command:   bigmodel train --config experiments/lstm_stdlib.py --workdir runs/lstm_stdlib
Hardware:  2 CPU cores.
Wall time: WALL_TIME
Expected:  EXPECTED

Everything but the model and the optimiser's step count is experiments/gpt_tiny.py's (same
corpus, split, byte tokenizer, sequence length 256, batch 32), so the evaluation bits per
byte compare directly with gpt_tiny's. The model is bigmodel.models.rnn's RNNLM: an
embedding, a 1-layer LSTM ('lstm' cell) and an untied output layer, predicting the next
byte at every step. Its time loop is sequential, so on a CPU it reads fewer tokens per
second than the GPT of similar size; the step count is set for a few minutes.

Variants:  ':tiny' runs in seconds (used by the tests).
"""

import importlib.util
import pathlib

import ml_collections

from bigmodel.models import rnn

WALL_TIME = "about 5 minutes on 2 cores"
EXPECTED = "validation about 2.6 bits/byte (gpt_tiny: about 2.3; unigram entropy about 4.7)"


def _gpt_tiny():
    """experiments/gpt_tiny.py, loaded from next to this file."""
    path = pathlib.Path(__file__).with_name("gpt_tiny.py")
    spec = importlib.util.spec_from_file_location("bigmodel_experiment_gpt_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny' variant."""
    if arg not in ("", "tiny"):
        raise ValueError(f"unknown variant {arg!r} for lstm_stdlib; use ':tiny' or nothing")
    c = _gpt_tiny().get_config(arg)
    model = rnn.model_config("tiny" if arg == "tiny" else "small")
    model.cell = "lstm"
    model.head = "lm"
    model.num_layers = 1
    model.d_model = 64 if arg == "tiny" else 128  # byte embeddings need little width
    model.hidden = 64 if arg == "tiny" else 512
    model.max_len = c.data.seq_len
    c.model = model
    if not arg:
        c.optim.learning_rate = 3e-3
        c.train.steps = 600
        c.eval.every = 200
        c.checkpoint.every = 200
    return c
