r"""An encoder-decoder Transformer learns multi-digit addition from characters (offline default).

Command:   bigmodel train --config experiments/transformer_seq2seq.py --workdir runs/seq2seq
           bigmodel evaluate-seq2seq --workdir runs/seq2seq --beam_size 4
Hardware:  2 CPU cores (any JAX backend works; the mesh fills all devices with 'data').
Wall time: about 6 minutes (349 s in the trainer, 212 s of CPU time) on 2 cores shared
           with other jobs (load average about 11); 5000 steps of 128 problems.
Expected:  held-out exact match 99.5% greedy and 99.5% with beam size 4 (character BLEU
           99.3) at step 5000; 97% at step 3000. A second run here gave the same numbers.

The task: "123+456" -> "579", operands of 1..3 digits, answers written most significant
digit first. 5% of all problems (chosen by a hash of the problem) are held out; the
periodic evaluation decodes 1024 of them greedily (eval_exact_match), and
`evaluate-seq2seq` adds beam search and corpus BLEU (sacrebleu, character-level here).
Other built-in tasks: --config.data.name=reverse or sort, digit strings of 1..max_digits
(e.g. --config.data.max_digits=8 --config.data.source_len=8 --config.data.target_len=9).

Translation (TFDS, prepared once with `tfds build wmt14_translate/de-en --data_dir DIR
--file_format array_record` on a machine with network):
  bigmodel train --config experiments/transformer_seq2seq.py:wmt --workdir runs/wmt \
      --config.data.data_dir=DIR
which is --config.data.name=wmt14_translate --config.data.source_lang=de
--config.data.target_lang=en with a 32k SentencePiece vocabulary trained on the train
split (cached under DIR/bigmodel_spm), the Transformer 'base' size and 64-token sources
and targets; BLEU is then sacrebleu's standard 13a-tokenised corpus BLEU.

Variants:  ':tiny' runs in seconds (used by the tests); ':wmt' as above.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import transformer

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny", "wmt")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny' / ':wmt' variants."""
    base.check_variant(__file__, arg, VARIANTS)
    c = base.config()
    c.task = "seq2seq"
    c.model = transformer.model_config("tiny")
    c.model.vocab_size = 16  # the character vocabulary has 14 ids
    c.model.max_len = 16  # longest source/target
    c.model.num_layers = 2
    c.model.d_model = 64  # 'tiny' is 128/512: 4x the FLOPs for little gain per step on this task
    c.model.num_heads = 4
    c.model.d_ff = 256

    c.data = ml_collections.ConfigDict()
    c.data.name = "addition"  # 'addition' | 'reverse' | 'sort' (built in) or a TFDS translation set: 'wmt14_translate'
    c.data.max_digits = 3  # built-in tasks: digits per operand / string
    c.data.test_fraction = 0.05  # built-in tasks: share of all problems held out (by a hash of the problem)
    c.data.source_len = 7  # source ids per example (longer translation sources are cut)
    c.data.target_len = 5  # target ids incl. EOS; also the decoding length
    c.data.bos_id = 1  # both the character vocabulary and SentencePiece use BOS 1, EOS 2 (0 pads)
    c.data.eos_id = 2
    c.data.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.source_lang = "de"  # translation: feature translated from
    c.data.target_lang = "en"  # translation: feature translated into
    c.data.spm_vocab_size = 32000  # translation: SentencePiece BPE shared by both languages
    c.data.prefetch = 0  # batches prefetched by a background thread

    c.optim.update(warmup_steps=100, end_lr_ratio=0.05, weight_decay=0.01, b2=0.98, eps=1e-9)
    c.train.update(steps=5000, batch_size=128)
    c.eval.update(every=1000, batch_size=256, num_batches=4)  # 1024 distinct held-out problems
    c.checkpoint.every = 1000
    c.log.every = 100

    if arg == "tiny":
        c.model.update(d_model=32, num_heads=2, d_ff=64, num_layers=1)
        c.data.update(max_digits=2, source_len=5, target_len=4)
        base.tiny(c, steps=6, batch_size=16, warmup_steps=2, every=6, log_every=2, eval_batches=1)
    elif arg == "wmt":
        c.model = transformer.model_config("base")
        c.model.vocab_size = 32000
        c.data.name = "wmt14_translate"
        c.data.source_len = 64
        c.data.target_len = 64
        c.data.eval_split = "test"  # newstest2014
        c.optim.update(learning_rate=7e-4, warmup_steps=4000, weight_decay=0.0)
        c.train.update(steps=100_000, batch_size=256)
        c.eval.update(every=5000, batch_size=64, num_batches=16)
        c.checkpoint.every = 5000
    return c
