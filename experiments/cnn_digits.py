r"""The flax MNIST example's small CNN on scikit-learn's 8×8 digits (offline default).

Command:   bigmodel train --config experiments/cnn_digits.py --workdir runs/cnn_digits
Hardware:  2 CPU cores (any JAX backend works; the mesh fills all devices with 'data').
Wall time: about 11 s (11.3 s measured at load average 4.6, compile included).
Expected:  test accuracy 97.5% on the 359 test images (seed 0). 87,178 parameters, 600 steps of 64.

Model: CNN 'small' (two 3×3 convolutions of 32 and 64 channels with 2×2 average pooling,
a 256-wide dense layer). No BatchNorm: a baseline for the ResNet and the ViT.
Data: the fixed stratified digits split (1438 train / 359 test images, see
bigmodel/data/images.py); evaluation covers the whole test split (eval.num_batches=0).
Augmentation: random translation by up to 1 pixel (pad-and-crop); no flips.

Variants:  ':tiny' runs in seconds (used by the tests).
           ':mnist' (the CNN's 'mnist' size, 28×28) reads a prepared TFDS mnist from
           --config.data.data_dir; prepare it with
           `tfds build mnist --data_dir DIR --file_format array_record`.
"""

import ml_collections

from bigmodel import sharding
from bigmodel.models import resnet


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny', ':mnist' variants."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classify"
    c.model = resnet.cnn_model_config("small")  # conv 32 -> pool -> conv 64 -> pool -> dense 256

    c.data = ml_collections.ConfigDict()
    c.data.kind = "image"
    c.data.name = "digits"  # scikit-learn's bundled digits, or a TFDS name: 'mnist', 'cifar10', 'imagenet2012'
    c.data.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"  # TFDS feature names
    c.data.label_key = "label"
    c.data.mean = ()  # per-channel normalisation of [0, 1] pixels; () = the dataset's own statistics
    c.data.std = ()
    c.data.crop_padding = 1  # random translation by up to this many pixels (pad-and-crop); 0 = off
    c.data.flip = False  # random horizontal flips (never for digits)
    c.data.random_resized_crop = False  # Inception-style crops (ImageNet) instead of pad-and-crop
    c.data.threads = 1  # threads preparing training batches; 0 = in the training loop
    c.data.prefetch = 2  # training batches prepared ahead (with threads > 0)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0  # 0 = train.steps
    c.optim.end_lr_ratio = 0.01
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.grad_accum = 1
    c.train.on_nonfinite = "halt"  # 'halt' names the step and stops; 'skip' drops that update and counts it

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 200
    c.eval.batch_size = 128
    c.eval.num_batches = 0  # 0 = the whole test split (last batch padded and masked)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200
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

    if arg == "tiny":
        c.train.steps = 6
        c.train.batch_size = 16
        c.optim.warmup_steps = 2
        c.eval.every = 3
        c.eval.batch_size = 64
        c.checkpoint.every = 3
        c.log.every = 3
    elif arg == "mnist":
        c.model = resnet.cnn_model_config("mnist")
        c.data.name = "mnist"
        c.data.crop_padding = 3
        c.train.steps = 3000
        c.train.batch_size = 128
        c.eval.every = 1000
        c.eval.batch_size = 500
        c.checkpoint.every = 1000
    elif arg:
        raise ValueError(f"unknown variant {arg!r} for cnn_digits; use ':tiny', ':mnist' or nothing")
    return c
