r"""Transformers against LSTMs: L(N) of both families on one width ladder (Kaplan et al. 2020, fig. 7).

Command:   bigmodel sweep --config experiments/scaling/transformer_vs_lstm.py --workdir runs/sweep_vs_lstm
Hardware:  2 CPU cores, one run at a time.
Wall time: about 15 minutes on lightly loaded cores, 25 on busy ones: 8 runs of 1.6M tokens;
           measured 25k and 8k tokens/s for 2-layer LSTMs of width 64 and 160 on busy cores,
           the GPTs as in gpt_stdlib.
Expected:  DIR/fit/families_loss_vs_params.png overlays loss against non-embedding parameters
           for both families at the same token budget (81k..860k GPT parameters with
           embeddings). At equal N the GPT should reach the lower loss and fall more steeply
           with N, the LSTM flattening first, as in Kaplan et al.'s fig. 7 (there at 1e5..1e9
           parameters and far more data); at this scale and budget the gap may be small, so
           read the plot rather than trusting this sentence. With one budget per family there
           are 4 runs each, fewer than the 6 an approach-3 fit needs; add a budget
           (--config.sweep.tokens='(819200,1638400)') to get DIR/fit/gpt/ and DIR/fit/lstm/.

The GPT half is experiments/scaling/gpt_stdlib.py (same base config, ladder and rules). The
LSTM (bigmodel.models.rnn, cell 'lstm', head 'lm') takes each width as both its embedding and
recurrent width, with a fixed depth of 2 layers; its output head is untied, and the trainer
counts it with the embeddings, so both families' non-embedding counts leave out every
vocabulary-sized matrix.

Variants:  ':tiny' 3 one-layer widths × 1 budget per family on the small-corpus settings.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import rnn

base = config_lib.experiment_module(pathlib.Path(__file__).parents[1] / "base.py")
VARIANTS = ("", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """GPT and LSTM on the gpt_stdlib ladder, one token budget."""
    base.check_variant(__file__, arg, VARIANTS)
    c = config_lib.sibling_config(__file__, "gpt_stdlib.py", arg)
    c.sweep.families = ("gpt", "lstm")
    c.sweep.tokens = c.sweep.tokens[-1:]  # one budget: L(N) at fixed data, as in the figure
    lstm = rnn.model_config("tiny")  # width and depth set by the ladder
    lstm.cell = "lstm"
    lstm.head = "lm"
    lstm.max_len = c.base.model.max_len
    c.families.lstm = ml_collections.ConfigDict()
    c.families.lstm.base = ml_collections.ConfigDict({"model": lstm})
    c.families.lstm.sweep = ml_collections.ConfigDict({"num_layers": 2 if arg != "tiny" else 1})
    return c
