"""Image data: the fixed digits split, grain augmentation, exact evaluation passes, TFDS sources."""

import itertools
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel import config as config_lib, tasks
from bigmodel.config import ConfigError
from bigmodel.data import images

from conftest import REPO

RESNET = str(REPO / "experiments" / "resnet_digits.py")


def config(*overrides, spec=RESNET + ":tiny"):
    return config_lib.load(spec, list(overrides))


def preprocess(**kw):
    fields = {"image_size": 8, "max_value": 16.0, "mean": (0.0,), "std": (1.0,)}
    return images.Preprocess(**(fields | kw))


def digits():
    return images.digits_source(config().data)


def take(ds, n):
    return list(itertools.islice(iter(ds), n))


def test_digits_split_is_fixed_disjoint_and_stratified():
    train, test = images.digits_split()
    again_train, again_test = images.digits_split()
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    assert (len(train), len(test)) == (1438, 359)
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(1797))
    _, labels = images._load_digits()
    assert np.bincount(labels[test]).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]  # 20% of each class
    source = digits()
    assert (len(source.train), len(source.eval)) == (1438, 359)
    assert source.image_shape == (8, 8, 1) and source.num_classes == 10
    assert source.eval[0]["image"].shape == (8, 8, 1) and source.eval[0]["image"].max() <= 16


def test_pad_and_crop_keeps_shape_and_translates():
    image = np.arange(1, 65, dtype=np.uint8).reshape(8, 8, 1)
    shifts = set()
    for seed in range(40):
        out = images.pad_and_crop(image, 1, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == image.dtype
        # The output is the image shifted by (dy, dx) in [-1, 1]², zero-filled.
        match = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if np.array_equal(out, np.roll(image, (dy, dx), (0, 1)) * _keep(dy, dx))]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) == 9  # every offset occurs


def _keep(dy, dx):
    keep = np.ones((8, 8, 1), np.uint8)
    if dy:
        keep[0 if dy > 0 else -1] = 0
    if dx:
        keep[:, 0 if dx > 0 else -1] = 0
    return keep


def test_augmentation_is_deterministic_per_seed_and_changes_images():
    source = digits()
    aug = preprocess(crop_padding=1)
    a = take(images.train_dataset(source.train, aug, batch_size=32, seed=0), 3)
    b = take(images.train_dataset(source.train, aug, batch_size=32, seed=0), 3)
    c = take(images.train_dataset(source.train, aug, batch_size=32, seed=1), 3)
    plain = take(images.train_dataset(source.train, preprocess(), batch_size=32, seed=0), 3)
    for x, y, z, p in zip(a, b, c, plain):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["labels"], p["labels"])  # augmentation leaves the order alone
        assert not np.array_equal(x["inputs"], z["inputs"])
        changed = [not np.array_equal(x["inputs"][i], p["inputs"][i]) for i in range(32)]
        assert sum(changed) > 16  # 8 of 9 offsets move the image
        assert x["inputs"].shape == (32, 8, 8, 1) and x["inputs"].dtype == np.float32
    # A new epoch reshuffles and re-augments: batch 45 (epoch 2) differs from batch 0.
    later = take(images.train_dataset(source.train, aug, batch_size=32, seed=0), 46)[-1]
    assert not np.array_equal(later["labels"], a[0]["labels"])


def test_flips_are_off_for_digits_and_work_when_asked():
    cfg = config()
    assert cfg.data.flip is False
    source = digits()
    # Without translation and flips, training inputs are exactly the evaluation inputs.
    plain = preprocess()
    for i in range(50):
        np.testing.assert_array_equal(plain.train(source.train[i], np.random.default_rng(i))["inputs"],
                                      plain.eval(source.train[i])["inputs"])
    flip = preprocess(flip=True)
    mirrored = 0
    for i in range(50):
        out = flip.train(source.train[i], np.random.default_rng(i))["inputs"]
        ref = plain.eval(source.train[i])["inputs"]
        if not np.array_equal(out, ref):
            np.testing.assert_array_equal(out, ref[:, ::-1])
            mirrored += 1
    assert 10 < mirrored < 40


@pytest.mark.parametrize("num_batches, expected", [(0, 359), (-1, 359), (2, 128), (100, 359)])
def test_evaluation_covers_the_split_exactly_once(num_batches, expected):
    source = digits()
    pre = preprocess()
    batches = list(images.eval_dataset(source.eval, pre, batch_size=64, num_batches=num_batches))
    assert len(batches) == -(-expected // 64)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == expected and weights[:expected].all()
    inputs = np.concatenate([b["inputs"] for b in batches])[weights > 0]
    labels = np.concatenate([b["labels"] for b in batches])[weights > 0]
    want = [pre.eval(source.eval[i]) for i in range(expected)]
    np.testing.assert_array_equal(inputs, np.stack([w["inputs"] for w in want]))
    np.testing.assert_array_equal(labels, [w["labels"] for w in want])
    # A second pass is identical (deterministic, no augmentation).
    again = list(images.eval_dataset(source.eval, pre, batch_size=64, num_batches=num_batches))
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_weighted_classification_metrics_ignore_padding():
    metrics = jax.jit(tasks.Classification().loss_and_metrics)  # one compile instead of one per op
    logits = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
    labels = np.asarray([1, 2, 3, 4, 5, 6], np.int32)
    loss_real, mets_real = metrics(logits[:4], {"labels": labels[:4]})
    loss_pad, mets_pad = metrics(logits, {"labels": labels, "weights": np.asarray([1, 1, 1, 1, 0, 0], np.float32)})
    assert float(loss_pad) == pytest.approx(float(loss_real), rel=1e-6)
    for key in ("loss", "accuracy"):
        assert float(mets_pad[key][1]) == 4.0
        assert float(mets_pad[key][0]) == pytest.approx(float(mets_real[key][0]), rel=1e-6)


def test_processes_keep_their_rows_of_each_global_batch():
    source = digits()
    pre = preprocess(crop_padding=1)
    whole = take(images.train_dataset(source.train, pre, batch_size=16, seed=2), 5)
    parts = [take(images.train_dataset(source.train, pre, batch_size=16, seed=2, shard=(i, 4)), 5) for i in range(4)]
    for step, batch in enumerate(whole):
        for key in ("inputs", "labels"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])
        assert parts[0][step]["inputs"].shape == (4, 8, 8, 1)
    evals = list(images.eval_dataset(source.eval, pre, batch_size=64, num_batches=0))
    eval_parts = [list(images.eval_dataset(source.eval, pre, batch_size=64, num_batches=0, shard=(i, 2)))
                  for i in range(2)]
    for step, batch in enumerate(evals):
        np.testing.assert_array_equal(np.concatenate([p[step]["weights"] for p in eval_parts]), batch["weights"])
        np.testing.assert_array_equal(np.concatenate([p[step]["inputs"] for p in eval_parts]), batch["inputs"])
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        images.train_dataset(source.train, pre, batch_size=16, seed=2, shard=(0, 3))


@pytest.mark.parametrize("threads", [0, 2])
def test_iterator_state_resumes_at_the_same_batch(threads):
    data = images.build(config(f"data.threads={threads}"), shard=(0, 1))
    it = iter(data.train)
    for _ in range(95):  # past the end of the first epoch (1438 / 16 ≈ 90 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the trainer saves it as JSON
    expected = [next(it) for _ in range(3)]
    fresh = iter(data.train)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["labels"], want["labels"])


def test_build_reports_dataset_facts():
    data = images.build(config(), shard=(0, 1))
    assert data.units_per_example == 1
    assert data.info["num_classes"] == 10 and data.info["image_shape"] == [8, 8, 1]
    sizes = (data.info["train_examples"], data.info["eval_split_examples"], data.info["eval_examples"])
    assert sizes == (1438, 359, 359)
    batch = next(iter(data.train))
    assert batch["inputs"].shape == (16, 8, 8, 1) and batch["labels"].dtype == np.int32
    first = next(data.eval_batches())
    assert set(first) == {"inputs", "labels", "weights"} and first["inputs"].shape == (64, 8, 8, 1)


@pytest.mark.parametrize("name, shape, mean, std", [
    ("mnist", (28, 28, 1), (0.1307,), (0.3081,)),
    ("cifar10", (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
])
def test_tfds_datasets_through_mock_data(tmp_path, name, shape, mean, std):
    overrides = [f"data.name={name}", f"data.data_dir={tmp_path}", f"model.image_size={shape[0]}",
                 f"model.num_channels={shape[2]}", "data.crop_padding=4", "data.flip=true"]
    with tfds.testing.mock_data(num_examples=40):
        data = images.build(config(*overrides), shard=(0, 1))
        raw = tfds.data_source(name, split="test", data_dir=str(tmp_path), download=False)
        train = take(data.train, 3)
        evals = list(data.eval_batches())
        raw_eval = [raw[i] for i in range(len(raw))]
    assert data.info["num_classes"] == 10 and data.info["image_shape"] == list(shape)
    assert data.info["dataset"].startswith(f"{name}/")
    for batch in train:
        assert batch["inputs"].shape == (16, *shape) and batch["inputs"].dtype == np.float32
        assert batch["labels"].dtype == np.int32 and 0 <= batch["labels"].min() and batch["labels"].max() < 10
    # Evaluation inputs are the raw images scaled to [0, 1] and normalised with the dataset's statistics.
    assert len(evals) == 1 and evals[0]["weights"].sum() == 40
    want = (np.stack([ex["image"] for ex in raw_eval]) / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(evals[0]["inputs"][:40], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(evals[0]["labels"][:40], [ex["label"] for ex in raw_eval])


def test_variable_size_images_are_resized(tmp_path):
    overrides = ["data.name=imagenet2012", f"data.data_dir={tmp_path}", "data.eval_split=validation",
                 "data.random_resized_crop=true", "data.crop_padding=0", "data.flip=true", "model.image_size=24",
                 "model.num_channels=3", "model.num_classes=1000"]
    with tfds.testing.mock_data(num_examples=20):
        data = images.build(config(*overrides), shard=(0, 1))
        train = next(iter(data.train))
        evals = next(data.eval_batches())
    assert data.info["image_shape"] == [None, None, 3]
    assert train["inputs"].shape == (16, 24, 24, 3) and evals["inputs"].shape == (64, 24, 24, 3)
    assert np.isfinite(train["inputs"]).all() and train["labels"].max() < 1000


def test_unknown_dataset_is_refused():
    with pytest.raises(ConfigError,
                       match=r"config.data.name='no_such_images' is not a known TFDS dataset .*use 'digits'"):
        images.build(config("data.name=no_such_images"), shard=(0, 1))


def test_unprepared_tfds_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"TFDS dataset 'mnist' is not prepared .*tfds build mnist"):
        images.build(config("data.name=mnist", f"data.data_dir={tmp_path}", "model.image_size=28"), shard=(0, 1))


@pytest.mark.parametrize("override, message", [
    ("model.num_classes=5", "config.model.num_classes=5 but digits has 10 classes; set --config.model.num_classes=10"),
    ("model.num_channels=3", ("config.model.num_channels=3 but digits's images have 1 channel(s); "
                              "set --config.model.num_channels=1")),
    ("model.image_size=32", "config.model.image_size=32 but digits's images are 8×8; set --config.model.image_size=8"),
    ("data.eval_split=validation", "config.data.eval_split='validation': digits has the splits 'train' and 'test'"),
    ("data.mean=(0.5, 0.5)", "set both config.data.mean and config.data.std"),
])
def test_mismatched_model_or_data_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        images.build(config(override), shard=(0, 1))
