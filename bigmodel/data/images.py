"""Image classification data: scikit-learn's digits or any TFDS image dataset, through grain.

Sources (`config.data.name`):
  'digits'   scikit-learn's bundled `load_digits`: 1797 real 8×8 grey images of the digits
             0-9, pixel values 0..16. It has no official split, so we fix one: within each
             class, a permutation drawn with seed 0 (independent of `config.seed`) holds out
             round(20%) of the images. Splits 'train' (1438 images) and 'test' (359); every
             run of every config evaluates on the same 359 images.
  any TFDS name whose examples have an image and a class label (mnist, cifar10,
             imagenet2012, …), read with `tfds.data_source` (ArrayRecord, no TensorFlow).
             Prepare it once with `tfds build NAME --data_dir DIR --file_format array_record`.

Batches: {'inputs': [B, S, S, C] float32 (normalised), 'labels': [B] int32}; evaluation
batches add 'weights': [B] float32 (0 on the padding of the last batch).

Training: shuffle (the run's seed, reshuffled every epoch) -> repeat -> per-example
augmentation -> global batch -> this process's rows (as bigmodel.data.pipeline does, so
the data order does not depend on the topology and the iterator state is one small JSON
object). Augmentation is a grain `random_map` whose generator is derived from the seed
and the example's position in the stream, so it is identical on every process and after
a resume. It is: pad-and-crop (a random translation by up to `crop_padding` pixels),
optional horizontal flip (off for digits: a mirrored digit is another symbol or none),
or Inception-style random-resized-crop (ImageNet). Images are scaled to [0, 1] and
normalised with the dataset's per-channel mean and std.

Evaluation: no augmentation, the split in order; `config.eval.num_batches` batches, or
the whole split when it is <= 0 (the last batch is padded and masked by 'weights', so
every image counts exactly once). Datasets whose images vary in size (ImageNet) are
resized (shorter side to size/0.875) and centre-cropped to `config.model.image_size`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from bigmodel.config import ConfigError
from bigmodel.data import Data, pipeline

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed: the test split must not move with config.seed

# Per-channel mean and std of pixel values scaled to [0, 1] (digits: of its train split).
STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3055,), (0.3761,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STATISTICS_SAMPLE = 1000  # training images used to estimate mean/std of other datasets
EVAL_CROP_FRACTION = 0.875  # ImageNet convention: resize to size/0.875, centre-crop size


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass
class ImageSource:
    """The train and eval splits of an image dataset and the facts the model must match."""

    train: Sequence[dict]  # examples {'image': uint8 [h, w, C], 'label': int}
    eval: Sequence[dict]
    dataset_id: str
    num_classes: int | None  # None when the label feature does not say
    image_shape: tuple[int | None, int | None, int]  # (h, w, C); None where sizes vary
    max_value: float  # the pixel value that means white (16 for digits, 255 for uint8)


class ArraySource(Sequence):
    """Random-access examples from in-memory image and label arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are the integers 0..16: uint8 keeps them exact and lets PIL resize them.
    return digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int32)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into load_digits: fixed, stratified, disjoint, each sorted."""
    _, labels = _load_digits()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[: round(DIGITS_TEST_FRACTION * len(members))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def digits_source(cfg: ml_collections.ConfigDict) -> ImageSource:
    """scikit-learn's digits with our fixed 'train'/'test' split."""
    images, labels = _load_digits()
    splits = dict(zip(("train", "test"), digits_split()))
    for key in ("train_split", "eval_split"):
        if cfg[key] not in splits:
            raise ConfigError(f"config.data.{key}={cfg[key]!r}: digits has the splits 'train' and 'test'")
    train, test = (splits[cfg[k]] for k in ("train_split", "eval_split"))
    return ImageSource(
        train=ArraySource(images[train], labels[train]),
        eval=ArraySource(images[test], labels[test]),
        dataset_id=f"sklearn_digits/test{DIGITS_TEST_FRACTION}-seed{DIGITS_SPLIT_SEED}",
        num_classes=10,
        image_shape=(8, 8, 1),
        max_value=16.0,
    )


class _Renamed(Sequence):
    """A TFDS data source seen as {'image', 'label'} examples (other features dropped)."""

    def __init__(self, source: Sequence[dict], image_key: str, label_key: str) -> None:
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        ex = self.source[index]
        return {"image": ex[self.image_key], "label": int(ex[self.label_key])}


def tfds_source(cfg: ml_collections.ConfigDict) -> ImageSource:
    """Open a prepared TFDS image dataset with `tfds.data_source` (clear errors otherwise)."""
    builder = pipeline.tfds_builder(
        cfg.name, cfg.data_dir, "use 'digits' or a TFDS image dataset such as 'mnist', 'cifar10' or 'imagenet2012'")
    features = builder.info.features
    for what in ("image", "label"):
        key = cfg[f"{what}_key"]
        if key not in features:
            raise ConfigError(
                f"config.data.{what}_key={key!r} is not a feature of {cfg.name}; features: {sorted(features)}"
            )
    image = features[cfg.image_key]
    if not isinstance(image, tfds.features.Image):
        raise ConfigError(f"feature {cfg.image_key!r} of {cfg.name} is not an image (config.data.image_key)")
    if image.np_dtype != np.uint8:
        raise ConfigError(f"{cfg.name}'s images are {image.np_dtype}; only uint8 images are supported")
    label = features[cfg.label_key]
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
    train, evals = pipeline.tfds_splits(cfg.name, cfg.data_dir, (cfg.train_split, cfg.eval_split), builder)
    return ImageSource(
        train=_Renamed(train, cfg.image_key, cfg.label_key),
        eval=_Renamed(evals, cfg.image_key, cfg.label_key),
        dataset_id=f"{cfg.name}/{builder.version}",
        num_classes=num_classes,
        image_shape=tuple(image.shape),
        max_value=255.0,
    )


def image_source(cfg: ml_collections.ConfigDict) -> ImageSource:
    """The dataset named by `config.data.name`."""
    return digits_source(cfg) if cfg.name == "digits" else tfds_source(cfg)


def statistics(cfg: ml_collections.ConfigDict, source: ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std): config values, else the table, else estimated from train images."""
    channels = source.image_shape[-1]
    if bool(cfg.mean) != bool(cfg.std):
        raise ConfigError("set both config.data.mean and config.data.std, or neither (dataset defaults)")
    if cfg.mean:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    elif cfg.name in STATISTICS:
        mean, std = STATISTICS[cfg.name]
    else:
        # Deterministic: the first images of the train split, all pixels pooled.
        n = min(len(source.train), STATISTICS_SAMPLE)
        pixels = np.concatenate([source.train[i]["image"].reshape(-1, channels) for i in range(n)])
        pixels = pixels.astype(np.float64) / source.max_value
        mean, std = tuple(pixels.mean(0)), tuple(pixels.std(0) + 1e-6)
    for key, value in (("mean", mean), ("std", std)):
        if len(value) not in (1, channels):
            raise ConfigError(f"config.data.{key} has {len(value)} values; {cfg.name} has {channels} channel(s)")
    if min(std) <= 0:
        raise ConfigError(f"config.data.std={std} must be positive")
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


# --------------------------------------------------------------------------- transforms


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 [h, w, C] image."""
    from PIL import Image

    grey = image.shape[-1] == 1
    out = np.asarray(Image.fromarray(image[..., 0] if grey else image).resize((width, height), Image.BILINEAR))
    return out[..., None] if grey else out


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size/0.875, then take the central size×size crop."""
    h, w = image.shape[:2]
    short = math.ceil(size / EVAL_CROP_FRACTION)
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    image = resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop: random area share and aspect ratio, resized to size×size."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return resize(image[top:top + ch, left:left + cw], size, size)
    side = min(h, w)  # fallback: the central square
    top, left = (h - side) // 2, (w - side) // 2
    return resize(image[top:top + side, left:left + side], size, size)


def pad_and_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad by `padding` pixels, then crop back to the original size at a random offset."""
    h, w, channels = image.shape
    padded = np.zeros((h + 2 * padding, w + 2 * padding, channels), image.dtype)  # np.pad is ~5× slower
    padded[padding:padding + h, padding:padding + w] = image
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top:top + h, left:left + w]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Per-example transforms from a source example to a model-ready {'inputs', 'labels'}."""

    image_size: int  # S: side of the square model input
    max_value: float  # pixel value of white in the source
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    resize: bool = False  # sizes vary (or differ from S): resize/crop to S
    crop_padding: int = 0  # train: random translation by up to this many pixels; 0 = off
    flip: bool = False  # train: mirror left-right with probability 1/2
    random_resized_crop: bool = False  # train: Inception-style crop instead of resize

    def _finish(self, image: np.ndarray, label: int) -> dict:
        x = (image.astype(np.float32) / self.max_value - np.asarray(self.mean, np.float32)) / np.asarray(
            self.std, np.float32)
        return {"inputs": x.astype(np.float32), "labels": np.int32(label)}

    def train(self, ex: dict, rng: np.random.Generator) -> dict:
        """Augmented example; `rng` is grain's per-example generator."""
        image = ex["image"]
        if self.random_resized_crop:
            image = random_resized_crop(image, self.image_size, rng)
        elif self.resize:
            image = center_crop_resize(image, self.image_size)
        if self.crop_padding:
            image = pad_and_crop(image, self.crop_padding, rng)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return self._finish(image, ex["label"])

    def eval(self, ex: dict) -> dict:
        """Deterministic example: resize/centre-crop if needed, normalise."""
        image = center_crop_resize(ex["image"], self.image_size) if self.resize else ex["image"]
        return self._finish(image, ex["label"])


# --------------------------------------------------------------------------- pipelines


def _rows(batch_size: int, shard: tuple[int, int]) -> slice:
    index, count = shard
    if batch_size % count:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {count} processes")
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


def train_dataset(examples: Sequence[dict], preprocess: Preprocess, *, batch_size: int, seed: int,
                  shard: tuple[int, int] = (0, 1), threads: int = 0, prefetch: int = 0) -> grain.IterDataset:
    """This process's rows of endless, shuffled, augmented global training batches."""
    rows = _rows(batch_size, shard)
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
    # After repeat, so each epoch sees fresh augmentations (the generator depends on the position).
    ds = ds.random_map(preprocess.train, seed=seed).batch(batch_size, drop_remainder=True)
    if shard[1] > 1:
        ds = ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    # Each element is a whole batch: `threads` threads prepare up to `prefetch` batches ahead.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))


def eval_dataset(examples: Sequence[dict], preprocess: Preprocess, *, batch_size: int, num_batches: int,
                 shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """This process's rows of ordered evaluation batches; num_batches <= 0 means the whole split.

    The last batch is padded with copies of the first example weighted 0, so the weighted
    metrics count each image of the pass exactly once.
    """
    rows = _rows(batch_size, shard)
    total = len(examples) if num_batches <= 0 else min(len(examples), num_batches * batch_size)
    padded = -(-total // batch_size) * batch_size

    def example(i: int) -> dict:
        out = preprocess.eval(examples[i if i < total else 0])
        out["weights"] = np.float32(i < total)
        return out

    ds = grain.MapDataset.range(padded).map(example).batch(batch_size, drop_remainder=True)
    if shard[1] > 1:
        ds = ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    return ds


def check_model(model: ml_collections.ConfigDict, source: ImageSource, name: str, resized: bool) -> None:
    """Refuse a model whose classes, channels or image size do not fit the data."""
    for key in ("num_classes", "num_channels", "image_size"):
        if key not in model:
            raise ConfigError(
                f"config.model ({model.name}) has no {key}; image classification needs an image model "
                "(resnet, cnn, vit)"
            )
    h, w, channels = source.image_shape
    if source.num_classes is not None and model.num_classes != source.num_classes:
        raise ConfigError(
            f"config.model.num_classes={model.num_classes} but {name} has {source.num_classes} classes; "
            f"set --config.model.num_classes={source.num_classes}"
        )
    if model.num_channels != channels:
        raise ConfigError(
            f"config.model.num_channels={model.num_channels} but {name}'s images have {channels} channel(s); "
            f"set --config.model.num_channels={channels}"
        )
    if not resized and model.image_size != h:
        raise ConfigError(
            f"config.model.image_size={model.image_size} but {name}'s images are {h}×{w}; "
            f"set --config.model.image_size={h}"
        )


def build(config: ml_collections.ConfigDict, shard: tuple[int, int]) -> Data:
    """Data for the 'classify' task with config.data.kind='image' (bigmodel.data.build)."""
    cfg = config.data
    source = image_source(cfg)
    for key, split in (("train_split", source.train), ("eval_split", source.eval)):
        if len(split) == 0:
            raise ConfigError(f"the {cfg[key]!r} split of {cfg.name} is empty (config.data.{key})")
    h, w, _ = source.image_shape
    # Images of varying or non-square size are brought to the model's size by resizing.
    resized = h is None or w is None or h != w
    check_model(config.model, source, cfg.name, resized)
    if cfg.crop_padding < 0:
        raise ConfigError(f"config.data.crop_padding={cfg.crop_padding} must be >= 0 (0 turns it off)")
    mean, std = statistics(cfg, source)
    preprocess = Preprocess(
        image_size=config.model.image_size, max_value=source.max_value, mean=tuple(mean.tolist()),
        std=tuple(std.tolist()), resize=resized, crop_padding=cfg.crop_padding, flip=cfg.flip,
        random_resized_crop=cfg.random_resized_crop,
    )
    train = train_dataset(source.train, preprocess, batch_size=config.train.batch_size, seed=config.seed,
                          shard=shard, threads=cfg.threads, prefetch=cfg.prefetch)
    evals = eval_dataset(source.eval, preprocess, batch_size=config.eval.batch_size,
                         num_batches=config.eval.num_batches, shard=shard)

    read = grain.ReadOptions(num_threads=cfg.threads, prefetch_buffer_size=cfg.prefetch)

    def eval_batches() -> Iterator[dict]:
        return iter(evals.to_iter_dataset(read))

    per_pass = len(source.eval) if config.eval.num_batches <= 0 else min(
        len(source.eval), config.eval.num_batches * config.eval.batch_size)
    info: dict[str, Any] = {
        "dataset": source.dataset_id,
        "num_classes": source.num_classes,
        "image_shape": list(source.image_shape),
        "train_examples": len(source.train),
        "eval_split_examples": len(source.eval),
        "eval_examples": per_pass,
        "normalize_mean": mean.tolist(),
        "normalize_std": std.tolist(),
    }
    return Data(train=train, eval_batches=eval_batches, units_per_example=1, info=info)
