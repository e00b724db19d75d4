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

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import resnet

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))
VARIANTS = ("", "tiny", "mnist")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Config for the default run, or the ':tiny', ':mnist' variants."""
    base.check_variant(__file__, arg, VARIANTS)
    c = base.config()
    c.task = "classify"
    c.model = resnet.cnn_model_config("small")  # conv 32 -> pool -> conv 64 -> pool -> dense 256
    c.data = base.image_data()

    c.optim.update(learning_rate=2e-3, warmup_steps=100, end_lr_ratio=0.01, weight_decay=0.05, b2=0.999)
    c.train.update(steps=600, batch_size=64)
    c.eval.update(every=200, batch_size=128, num_batches=0)  # 0 = the whole test split (last batch padded and masked)
    c.checkpoint.every = 200

    if arg == "tiny":
        base.tiny(c, steps=6, batch_size=16, warmup_steps=2, every=3, log_every=3, eval_batch_size=64)
    elif arg == "mnist":
        c.model = resnet.cnn_model_config("mnist")
        c.data.name = "mnist"
        c.data.crop_padding = 3
        c.train.update(steps=3000, batch_size=128)
        c.eval.update(every=1000, batch_size=400)  # 25 batches of the 10,000 test images, on 1, 2, 4, 8 or 16 devices
        c.checkpoint.every = 1000
    return c
