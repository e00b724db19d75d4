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

import ml_collections

from bigmodel import sharding
from bigmodel.models import gpt


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny' variant."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "lm"
    c.model = gpt.model_config("tiny")

    c.data = ml_collections.ConfigDict()
    c.data.name = "text_files"  # our builder for text files; or a TFDS name such as 'lm1b'
    c.data.source = ""  # directory or glob for text_files; '' = this Python's stdlib sources
    c.data.validation_fraction = 0.05  # text_files: share of files held out, chosen by path hash
    c.data.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.text_key = "text"  # feature holding the text (e.g. 'text' for lm1b)
    c.data.tokenizer = "byte"  # 'byte' or 'sentencepiece' (BPE trained on the train split)
    c.data.spm_vocab_size = 4096
    c.data.seq_len = 128
    c.data.prefetch = 0  # batches prefetched by a background thread

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 0  # 0 = train.steps; set it to stop early on the same schedule
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 800
    c.train.batch_size = 32
    c.train.grad_accum = 1
    c.train.on_nonfinite = "halt"  # 'halt' names the step and stops; 'skip' drops that update and counts it

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 400
    c.eval.batch_size = 32
    c.eval.num_batches = 40

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 400
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.on_error = "stop"  # 'stop' or 'continue' (warn and retry at the next save)

    c.log = ml_collections.ConfigDict()
    c.log.every = 20
    c.log.progress = True

    c.init = ml_collections.ConfigDict()
    c.init.workdir = ""  # start from another run's latest checkpoint (fine-tuning)
    c.init.params = ()  # top-level parameter names to copy from it; () = all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.expert = 1  # data parallel outside mixture-of-experts layers
    c.mesh.sequence = 1  # splits activations along the sequence
    c.mesh.tensor = 1
    c.mesh.slices = 1  # > 1: that many slices/nodes joined over DCN along dcn_axis
    c.mesh.dcn_axis = "data"
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = sharding.DEFAULT_RULES
    c.sharding.zero1 = False  # True: Adam's moments split over 'data' (ZeRO-1)

    if arg in ("llama", "moe"):
        c.model = gpt.model_config("llama_tiny")
        c.model.max_len = c.data.seq_len
        if arg == "moe":
            c.model.update(num_experts=4, experts_per_token=2, capacity_factor=1.25)
    elif arg == "tiny":
        c.model = gpt.model_config("nano")
        c.data.seq_len = 64
        c.optim.warmup_steps = 5
        c.train.steps = 30
        c.train.batch_size = 8
        c.eval.every = 10
        c.eval.batch_size = 8
        c.eval.num_batches = 2
        c.checkpoint.every = 10
        c.log.every = 5
    elif arg:
        raise ValueError(f"unknown variant {arg!r} for gpt_tiny; use ':tiny', ':llama', ':moe' or nothing")
    return c
