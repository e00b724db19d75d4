r"""The groups every experiment shares, with every default; the text and image data groups; the ':tiny' shrink.

Not an experiment (no get_config): experiment files load it by path, as they load each other,
because experiments/ is not a package and runs from a clone or a copy alike (from
experiments/scaling/ the path is `pathlib.Path(__file__).parents[1] / "base.py"`):

    base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))

    def get_config(arg: str = "") -> ml_collections.ConfigDict:
        base.check_variant(__file__, arg, VARIANTS)
        c = base.config()  # seed, optim, train, eval, checkpoint, log, init, mesh, sharding
        c.task = "lm"
        c.model = ...
        c.data = base.text_data()
        c.optim.update(learning_rate=1e-3, b2=0.98)  # only what differs from the defaults below
        if arg == "tiny":
            base.tiny(c, steps=10, batch_size=8, warmup_steps=3, every=5, log_every=5, eval_batches=2)
        return c

The defaults are those of experiments/gpt_tiny.py (a byte-level GPT trained for 800 steps);
each experiment overrides the keys that differ in its own file. The trainer supplies no
default: every key it reads is set here or in the experiment.
"""

import pathlib

import ml_collections

from bigmodel import sharding
from bigmodel.config import ConfigError


def config() -> ml_collections.ConfigDict:
    """Seed, optimiser, run length, evaluation, checkpoints, logging, initialisation, mesh and sharding."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # the one root key: parameters, dropout and data order derive from it

    # AdamW with linear warmup to learning_rate, then cosine decay to end_lr_ratio of it.
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3  # peak
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 0  # 0 = train.steps; set it to stop early on the same schedule
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global gradient norm

    c.train = ml_collections.ConfigDict()
    c.train.steps = 800
    c.train.batch_size = 32  # global: split over the data, fsdp and expert axes
    c.train.grad_accum = 1  # microbatches per step (batch_size must divide by it)
    c.train.on_nonfinite = "halt"  # 'halt' names the step and stops; 'skip' drops that update and counts it
    c.train.profile_steps = ""  # 'START:COUNT' traces steps START.. (jax.profiler) into WORKDIR/profile; '' = off

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 400  # steps; a multiple of log.every (and always at the last step)
    c.eval.batch_size = 32
    c.eval.num_batches = 40  # 0 = the whole held-out split, where the task has a fixed one
    c.eval.sets = ()  # language models: more held-out token stores (their validation splits), reported per set
    # Language models: bigmodel.eval tasks run with each evaluation ('validation', 'text:PATH', 'mc:FILE.jsonl').
    c.eval.tasks = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 400
    c.checkpoint.keep = 2  # newest checkpoints kept
    c.checkpoint.async_save = True  # write in the background while training goes on
    c.checkpoint.on_error = "stop"  # 'stop' or 'continue' (warn and retry at the next save)

    c.log = ml_collections.ConfigDict()
    c.log.every = 20  # steps between metrics.jsonl rows
    c.log.progress = True  # a progress line on the terminal
    # Where the rows go: 'jsonl' (metrics.jsonl), 'tensorboard', 'wandb', 'mlflow' (pip install 'bigmodel[trackers]').
    c.log.trackers = ("jsonl", "tensorboard")
    c.log.project = "bigmodel"  # W&B project / MLflow experiment
    c.log.tracking_uri = ""  # MLflow server; '' = MLFLOW_TRACKING_URI or ./mlruns (W&B: WANDB_MODE, WANDB_BASE_URL)

    c.init = ml_collections.ConfigDict()
    c.init.workdir = ""  # start from another run's latest checkpoint (fine-tuning); '' = from scratch
    c.init.params = ()  # top-level parameter names to copy from it; () = all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 fills the devices the other axes leave
    c.mesh.fsdp = 1
    c.mesh.expert = 1  # data parallel outside mixture-of-experts layers
    c.mesh.sequence = 1  # splits activations along the sequence
    c.mesh.tensor = 1  # must divide the model's heads
    c.mesh.slices = 1  # > 1: that many slices/nodes joined over DCN along dcn_axis
    c.mesh.dcn_axis = "data"
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = sharding.DEFAULT_RULES  # logical axis name -> mesh axes
    c.sharding.zero1 = False  # True: Adam's moments split over 'data' (ZeRO-1)
    return c


def text_data() -> ml_collections.ConfigDict:
    """Byte-level text: the CPython standard library's sources through our text-files builder, or a TFDS set."""
    d = ml_collections.ConfigDict()
    d.name = "text_files"  # our builder for text files; or a TFDS name such as 'lm1b'
    d.source = ""  # directory or glob for text_files; '' = this Python's stdlib sources
    d.validation_fraction = 0.05  # text_files: share of files held out, chosen by path hash
    d.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    d.train_split = "train"
    d.eval_split = "validation"
    d.text_key = "text"  # feature holding the text (e.g. 'text' for lm1b)
    d.tokenizer = "byte"  # 'byte' or 'sentencepiece' (BPE trained on the train split)
    d.spm_vocab_size = 4096
    d.seq_len = 128
    d.prefetch = 0  # batches prefetched by a background thread
    d.shuffle_window = 0  # training sequences shuffled within windows of this many after packing (0: off)
    # Prepared token stores (`bigmodel prepare`); when set they replace name/source above, and
    # tokenizer is 'store' (the stores' own) or the tokenizer they must have been prepared with.
    d.sources = ()  # store directories; several are mixed
    d.weights = ()  # mixture weights, one per store; () = equal
    return d


def image_data() -> ml_collections.ConfigDict:
    """Images: scikit-learn's bundled 8×8 digits, or a prepared TFDS image set."""
    d = ml_collections.ConfigDict()
    d.kind = "image"
    d.name = "digits"  # scikit-learn's bundled digits, or a TFDS name: 'mnist', 'cifar10', 'imagenet2012'
    d.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    d.train_split = "train"
    d.eval_split = "test"
    d.image_key = "image"  # TFDS feature names
    d.label_key = "label"
    d.mean = ()  # per-channel normalisation of [0, 1] pixels; () = the dataset's own statistics
    d.std = ()
    d.crop_padding = 1  # random translation by up to this many pixels (pad-and-crop); 0 = off
    d.flip = False  # random horizontal flips (never for digits)
    d.random_resized_crop = False  # Inception-style crops (ImageNet) instead of pad-and-crop
    d.threads = 1  # threads preparing training batches; 0 = in the training loop
    d.prefetch = 2  # training batches prepared ahead (with threads > 0)
    return d


def tiny(c: ml_collections.ConfigDict, *, batch_size: int, every: int, log_every: int, steps: int | None = None,
         warmup_steps: int | None = None, eval_batch_size: int = 0, eval_batches: int | None = None) -> None:
    """The ':tiny' shrink: a few steps of small batches that evaluate, save and log often enough for a test to see each.

    `every` is both the evaluation and the checkpoint interval; eval_batch_size 0 means batch_size;
    None leaves a key as it is (a sweep sets steps and warmup per run).
    """
    c.train.batch_size = batch_size
    c.eval.every = every
    c.checkpoint.every = every
    c.log.every = log_every
    c.eval.batch_size = eval_batch_size or batch_size
    if steps is not None:
        c.train.steps = steps
    if warmup_steps is not None:
        c.optim.warmup_steps = warmup_steps
    if eval_batches is not None:
        c.eval.num_batches = eval_batches


def check_variant(experiment_file: str, arg: str, variants: tuple[str, ...]) -> None:
    """Refuse a variant the experiment does not declare (a ConfigError, so a ValueError), listing the ones it does."""
    if arg not in variants:
        names = ", ".join(f"':{v}'" for v in variants if v)
        also = " or nothing" if "" in variants else ""
        raise ConfigError(f"unknown variant {arg!r} for {pathlib.Path(experiment_file).stem}; use {names}{also}")
