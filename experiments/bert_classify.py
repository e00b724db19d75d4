r"""Fine-tune a pre-trained BERT to tell which stdlib package a 126-byte snippet comes from.

Command:   bigmodel train --config experiments/bert_classify.py --workdir runs/bert_classify
           (after experiments/bert_stdlib.py has trained runs/bert_stdlib; from scratch for
           comparison: add --config.init.workdir= and use another --workdir)
Hardware:  2 CPU cores.
Wall time: 319 s fine-tuned and 224 s from scratch, measured on 2 shared cores (load
           average about 3); the fine-tuned run also reads the pre-training checkpoint.
Expected:  test accuracy 0.43 fine-tuned from runs/bert_stdlib against 0.27 from scratch
           (measured; majority class 0.125). Fine-tuned: 0.29 / 0.36 / 0.42 / 0.43 at steps
           250 / 500 / 750 / 1000, still rising; from scratch 0.25 / 0.28 / 0.28 / 0.27. For
           scale, a logistic regression on the same snippets scores 0.43 on byte counts and
           0.75 on character 1-3-grams: a 2-layer byte model pre-trained for 800 steps is far
           from what the data allow, but pre-training is what gets it off the floor.

Task (bigmodel.data.text_classify, data.name 'text_files'): CLASSES below, the eight
first-level stdlib packages with the most files on Python 3.10-3.13. Snippets are
[CLS] + 126 bytes + [SEP] windows of the files; training and test files are disjoint (the
text-files split by path hash, validation_fraction 0.2, the same as bert_stdlib's, so the
pre-trained encoder never saw a test file). Up to 1024 training and 64 test snippets per
class (7,885 and 512 here: importlib has 717 training snippets); the class counts and the
majority-class accuracy are in summary.json.

Initialisation: `init.workdir` names the pre-training run and `init.params=('bert',)` copies
its encoder (embeddings and layers). The classifier's pooler and head do not exist in the
MLM model and start fresh; `load_pretrained` prints which parameters it copied and which
it left fresh. The model settings (sizes, vocabulary, max_len) are bert_stdlib's, so the
shapes match.

Other data: `--config.data.name=glue/sst2 --config.data.text_key=sentence
--config.data.eval_split=validation --config.model.num_classes=2` or
`--config.data.name=imdb_reviews --config.data.eval_split=test --config.model.num_classes=2`
(prepared under data.data_dir). Variants ':sst2' and ':imdb' set those keys.

Variants:  ':tiny' runs in seconds from scratch (the tests point init.workdir at a ':tiny'
           bert_stdlib run); ':sst2', ':imdb'.
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny", "sst2", "imdb")
CLASSES = ("asyncio", "ctypes", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "unittest")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny', ':sst2' and ':imdb' variants."""
    base.check_variant(__file__, arg, VARIANTS)
    # Start from the pre-training config so model shapes and data settings match it.
    c = config_lib.sibling_config(__file__, "bert_stdlib.py", "tiny" if arg == "tiny" else "")
    c.task = "classify"
    c.model.head = "classify"
    c.model.num_classes = len(CLASSES)
    c.model.dropout = 0.1

    data = ml_collections.ConfigDict()
    data.kind = "text"  # the trainer dispatches task 'classify' on this: 'text' or 'image'
    data.name = "text_files"  # 'text_files' (labels: first directory of each path) or a TFDS name
    data.source = ""  # text_files: directory or glob; '' = this Python's stdlib sources
    data.validation_fraction = c.data.validation_fraction  # text_files: test files (as in pre-training)
    data.data_dir = ""
    data.train_split = "train"
    data.eval_split = "validation"
    data.text_key = "text"  # TFDS: feature holding the text ('sentence' for glue/sst2)
    data.label_key = "label"  # TFDS: the ClassLabel feature
    data.classes = CLASSES  # text_files: first directories to tell apart, label = position here
    data.snippets_per_class = 1024  # text_files: training rows per class (fewer if a class runs out)
    data.eval_snippets_per_class = 64  # text_files: test rows per class
    data.tokenizer = c.data.tokenizer  # must be the pre-training tokenizer
    data.spm_vocab_size = c.data.spm_vocab_size
    data.seq_len = c.data.seq_len
    data.add_cls = True  # [CLS] ids [SEP]: BERT's framing, as in pre-training
    data.prefetch = 0
    c.data = data

    c.optim.learning_rate = 5e-4  # gentle enough to keep pre-trained features, fast enough from scratch
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.01
    c.train.steps = 1000  # about 4 epochs of the 8 x 1024 training snippets
    c.train.batch_size = 32
    c.eval.every = 250
    c.eval.batch_size = 64
    c.eval.num_batches = 0  # <= 0: the whole test set (8 classes x 64 snippets)
    c.checkpoint.every = 250
    c.log.every = 50

    c.init.workdir = "runs/bert_stdlib"  # '' trains from scratch
    c.init.params = ("bert",)  # the encoder; pooler and head are new

    if arg == "tiny":
        c.data.snippets_per_class = 32
        c.data.eval_snippets_per_class = 8
        c.init.workdir = ""
        base.tiny(c, steps=10, batch_size=8, warmup_steps=3, every=5, log_every=5, eval_batches=0)
    elif arg == "sst2":
        c.data.name, c.data.text_key, c.data.eval_split = "glue/sst2", "sentence", "validation"
        c.model.num_classes = 2
        c.eval.num_batches = 0  # all 872 validation sentences
    elif arg == "imdb":
        c.data.name, c.data.text_key, c.data.eval_split = "imdb_reviews", "text", "test"
        c.model.num_classes = 2
        c.eval.num_batches = 64  # 4096 of the 25,000 test reviews (0 = all)
    return c
