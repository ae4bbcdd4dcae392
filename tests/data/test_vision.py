"""Tests of the vision data layer: loaders on tiny files in the real formats, batching."""

import gzip
import pathlib
import struct
import sys

import chex
import numpy as np
import pytest

from ponder import errors
from ponder.data import augment
from ponder.data import vision
from tests import fakes

DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _images(rng, n, h=32, w=32, c=3):
  return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _synthetic(n: int, shape=(32, 32, 3), mode: str = "crop_flip") -> vision.ImageDataset:
  """A dataset whose label is the example's index, so a batch shows which examples it drew."""
  rng = np.random.default_rng(7)
  images = _images(rng, n, *shape)
  c = shape[-1]
  return vision.ImageDataset(
      name="synthetic", train_images=images, train_labels=np.arange(n, dtype=np.int32),
      test_images=images[:3], test_labels=np.arange(3, dtype=np.int32), num_classes=n,
      mean=(0.5,) * c, std=(0.25,) * c, augment=mode)


@pytest.fixture(scope="module")
def digits():
  return vision.load_image_dataset("digits")


# Local loaders.


@pytest.mark.parametrize("inside", [True, False], ids=["parent_dir", "batches_dir"])
def test_cifar10_reads_python_pickles(tmp_path, inside):
  rng = np.random.default_rng(0)
  folder = tmp_path / "cifar-10-batches-py"
  train, labels = [], []
  for i in range(1, 6):
    x, y = _images(rng, 2), [i % 10, (3 * i) % 10]
    fakes.write_pickle(folder / f"data_batch_{i}",
                  {b"batch_label": b"training batch", b"labels": y, b"data": fakes.cifar_rows(x)})
    train.append(x)
    labels += y
  test = _images(rng, 3)
  fakes.write_pickle(folder / "test_batch", {b"labels": [7, 8, 9], b"data": fakes.cifar_rows(test)})

  ds = vision.load_image_dataset(
      "cifar10", source="local", data_dir=str(tmp_path if inside else folder))

  np.testing.assert_array_equal(ds.train_images, np.concatenate(train))
  np.testing.assert_array_equal(ds.train_labels, labels)
  np.testing.assert_array_equal(ds.test_images, test)
  np.testing.assert_array_equal(ds.test_labels, [7, 8, 9])
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert (ds.num_classes, ds.augment) == (10, "crop_flip")
  all_train = np.concatenate(train).astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, all_train.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(ds.std, all_train.std(axis=(0, 1, 2)), rtol=1e-12)


def test_cifar100_reads_fine_labels(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / "cifar-100-python"
  train, test = _images(rng, 4), _images(rng, 2)
  fakes.write_pickle(folder / "train", {b"filenames": [b"a.png"] * 4, b"fine_labels": [99, 0, 42, 7],
                                   b"coarse_labels": [1, 2, 3, 4], b"data": fakes.cifar_rows(train)})
  fakes.write_pickle(folder / "test", {b"fine_labels": [5, 98], b"coarse_labels": [0, 19],
                                  b"data": fakes.cifar_rows(test)})

  ds = vision.load_image_dataset("cifar100", data_dir=str(tmp_path))

  np.testing.assert_array_equal(ds.train_images, train)
  np.testing.assert_array_equal(ds.train_labels, [99, 0, 42, 7])
  np.testing.assert_array_equal(ds.test_images, test)
  np.testing.assert_array_equal(ds.test_labels, [5, 98])
  assert ds.num_classes == 100


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_idx_files(tmp_path, compress):
  rng = np.random.default_rng(2)
  train, test = _images(rng, 5, 28, 28, 1)[..., 0], _images(rng, 3, 28, 28, 1)[..., 0]
  train_y, test_y = np.array([0, 9, 3, 3, 1]), np.array([4, 2, 8])
  for stem, array in [("train-images-idx3-ubyte", train), ("train-labels-idx1-ubyte", train_y),
                      ("t10k-images-idx3-ubyte", test), ("t10k-labels-idx1-ubyte", test_y)]:
    fakes.write_idx(tmp_path / stem, array, compress)

  ds = vision.load_image_dataset("mnist", source="local", data_dir=str(tmp_path))

  np.testing.assert_array_equal(ds.train_images, train[..., None])
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_images, test[..., None])
  np.testing.assert_array_equal(ds.test_labels, test_y)
  assert ds.augment == "crop"


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    f.write(struct.pack(">II", 0x0D03, 1) + b"\0" * 12)  # Type 0x0D is float32.
  with pytest.raises(errors.MissingDataError, match="not an unsigned-byte idx"):
    vision.read_idx(bad)
  short = tmp_path / "short"
  short.write_bytes(struct.pack(">IIII", 2051, 2, 28, 28) + b"\0" * 100)
  with pytest.raises(errors.MissingDataError, match="truncated"):
    vision.read_idx(short)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian package dataset-fashion-mnist is not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist():
  ds = vision.load_image_dataset("fashion_mnist", source="local")
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  # The published Fashion-MNIST train statistics.
  np.testing.assert_allclose(ds.mean, [0.2860], atol=1e-4)
  np.testing.assert_allclose(ds.std, [0.3530], atol=1e-4)


def test_digits(digits):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  assert digits.train_images.shape == (1437, 8, 8, 1)
  assert digits.test_images.shape == (360, 8, 8, 1)
  assert digits.train_images.dtype == np.uint8
  assert (digits.train_images.min(), digits.train_images.max()) == (0, 255)
  assert digits.augment == "none" and digits.num_classes == 10
  # The two splits are exactly sklearn's digits, each once, scaled 16 -> 255.
  reference = datasets.load_digits()
  ours = np.concatenate([digits.train_images, digits.test_images]).reshape(1797, 64)
  theirs = np.round(reference.data * 255 / 16).astype(np.uint8)
  order = lambda a: a[np.lexsort(a.T)]
  np.testing.assert_array_equal(order(ours), order(theirs))
  # The split is fixed, not a function of the run.
  again = vision.load_image_dataset("digits", source="sklearn")
  np.testing.assert_array_equal(again.test_labels, digits.test_labels)
  with pytest.raises(ValueError):
    digits.train_images[0, 0, 0, 0] = 1  # Read-only.


def test_tfds_data_source(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds is an optional dependency")
  from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(dataset_builder.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(num_examples=5):
    ds = vision.load_image_dataset("cifar100", source="tfds")
  assert ds.train_images.shape == ds.test_images.shape == (5, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert np.all((ds.train_labels >= 0) & (ds.train_labels < 100))


# Errors.


def test_missing_local_and_tfds_names_every_way_to_get_it(tmp_path):
  with pytest.raises(errors.MissingDataError) as info:
    vision.load_image_dataset("fashion_mnist", data_dir=str(tmp_path))
  message = str(info.value)
  for needle in ["apt-get install dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist",
                 "train-images-idx3-ubyte", "tfds 'fashion_mnist'", str(tmp_path)]:
    assert needle in message
  assert isinstance(info.value, FileNotFoundError)


def test_missing_cifar_names_layout(tmp_path):
  with pytest.raises(errors.MissingDataError, match="cifar-10-batches-py/.*data_batch_1"):
    vision.load_image_dataset("cifar10", source="local", data_dir=str(tmp_path))


def test_tfds_not_installed(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(errors.MissingDataError, match="tfds is not installed.*tfds build cifar10"):
    vision.load_image_dataset("cifar10", source="tfds", data_dir=str(tmp_path))


def test_bad_names_are_config_errors():
  with pytest.raises(errors.ConfigError, match="cifar10, cifar100, digits, fashion_mnist, mnist"):
    vision.load_image_dataset("imagenet")
  with pytest.raises(errors.ConfigError, match="auto, local, sklearn, tfds"):
    vision.load_image_dataset("cifar10", source="hub")
  with pytest.raises(errors.ConfigError, match="digits has no 'tfds' source"):
    vision.load_image_dataset("digits", source="tfds")


# Batching.


def test_train_batch_is_a_pure_function_of_seed_and_step(digits):
  batch = lambda **kw: vision.train_batch(digits, batch_size=64, **{"seed": 0, "step": 3, **kw})
  chex.assert_trees_all_equal(batch(), batch())
  assert not np.array_equal(batch()["label"], batch(step=4)["label"])
  assert not np.array_equal(batch()["image"], batch(seed=1)["image"])
  cifar_like = _synthetic(50)
  chex.assert_trees_all_equal(vision.train_batch(cifar_like, seed=2, step=9, batch_size=16),
                              vision.train_batch(cifar_like, seed=2, step=9, batch_size=16))


def test_each_epoch_visits_every_example_once():
  n, batch_size = 37, 8  # Batches straddle the epoch boundaries.
  ds = _synthetic(n, shape=(4, 4, 1), mode="none")
  stream = np.concatenate([vision.train_batch(ds, seed=5, step=s, batch_size=batch_size)["label"]
                           for s in range(3 * n // batch_size + 1)])
  epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  # A batch larger than the dataset spans several whole epochs.
  big = vision.batch_indices(5, seed=0, step=1, batch_size=12)
  np.testing.assert_array_equal(np.sort(big[3:8]), np.arange(5))
  assert vision.steps_per_epoch(ds, batch_size) == 4
  assert vision.steps_per_epoch(ds, 100) == 1


def test_train_batch_gathers_and_normalises_without_augmentation():
  ds = _synthetic(20)
  batch = vision.train_batch(ds, seed=1, step=2, batch_size=6, augment=False)
  chex.assert_shape(batch["image"], (6, 32, 32, 3))
  chex.assert_type([batch["image"], batch["label"]], [np.float32, np.int32])
  expected = (ds.train_images[batch["label"]] / 255 - 0.5) / 0.25
  np.testing.assert_allclose(batch["image"], expected, atol=1e-5)


def test_normalised_train_set_has_zero_mean_unit_std(digits):
  batches = list(vision.eval_batches(digits, batch_size=500, split="train"))
  images = np.concatenate([b["image"] for b in batches]).astype(np.float64)
  real = np.concatenate([b["mask"] for b in batches]) == 1
  np.testing.assert_allclose(images[real].mean(), 0, atol=1e-5)
  np.testing.assert_allclose(images[real].std(), 1, atol=1e-5)


def test_eval_batches_pad_to_one_static_shape(digits):
  batches = list(vision.eval_batches(digits, batch_size=100, pad_to_multiple=8))
  assert len(batches) == 4  # 360 in batches of 104.
  for b in batches:
    chex.assert_shape([b["image"], b["label"], b["mask"]], [(104, 8, 8, 1), (104,), (104,)])
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(masks, np.r_[np.ones(360), np.zeros(56)])
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:360], digits.test_labels)
  with pytest.raises(errors.ConfigError, match="test, train"):
    next(vision.eval_batches(digits, batch_size=8, split="valid"))


# Augmentation.


def _crafted(h=6, w=6):
  """An image with no zero and no symmetry, so every shift and mirror is visible."""
  return np.arange(h * w, dtype=np.uint8).reshape(1, h, w, 1) + 1


def test_crop_flip_on_a_crafted_image():
  x, pad = _crafted(), 2
  at = lambda y, x_, f: augment.crop_flip(x, np.array([y]), np.array([x_]), np.array([f]),
                                          pad=pad)[0, ..., 0]
  img = x[0, ..., 0]
  np.testing.assert_array_equal(at(pad, pad, False), img)
  np.testing.assert_array_equal(at(pad, pad, True), img[:, ::-1])
  shifted = at(0, 0, False)  # The window starts in the padding: content moves down-right.
  np.testing.assert_array_equal(shifted[pad:, pad:], img[:-pad, :-pad])
  assert not shifted[:pad].any() and not shifted[:, :pad].any()
  np.testing.assert_array_equal(at(2 * pad, pad - 1, False)[:-pad, 1:], img[pad:, :-1])


def _windows(image, pad):
  """Every crop of the padded image, written out with loops."""
  h, w = image.shape[:2]
  padded = np.zeros((h + 2 * pad, w + 2 * pad) + image.shape[2:], image.dtype)
  padded[pad:pad + h, pad:pad + w] = image
  return [padded[y:y + h, x:x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_flip_draws_valid_windows(flip):
  x = np.repeat(_crafted(), 200, axis=0)
  out = augment.random_crop_flip(x, np.random.default_rng(0), pad=2, flip=flip)
  assert out.shape == x.shape and out.dtype == x.dtype
  plain = _windows(x[0], 2)
  mirrored = [w[:, ::-1] for w in plain]
  is_plain = [any(np.array_equal(o, w) for w in plain) for o in out]
  is_mirrored = [any(np.array_equal(o, w) for w in mirrored) for o in out]
  assert all(p or m for p, m in zip(is_plain, is_mirrored))
  assert any(is_mirrored) == flip and any(is_plain)
  assert len({o.tobytes() for o in out}) > 15  # Many different offsets were drawn.


@pytest.mark.parametrize("mode,shape,pad,flip", [
    ("crop_flip", (32, 32, 3), 4, True),  # CIFAR: He et al. 2016, Sec. 4.2.
    ("crop", (28, 28, 1), 2, False),  # Fashion-MNIST: mirrored clothes are fine, but not usual.
    ("none", (8, 8, 1), 0, False),  # Digits: no augmentation.
])
def test_train_batch_crops_and_flips_as_the_dataset_says(mode, shape, pad, flip):
  image = (np.arange(np.prod(shape)) % 251 + 1).astype(np.uint8).reshape(shape)
  c = shape[-1]
  ds = vision.ImageDataset(
      name=mode, train_images=np.repeat(image[None], 64, axis=0),
      train_labels=np.zeros(64, np.int32), test_images=image[None],
      test_labels=np.zeros(1, np.int32), num_classes=1, mean=(0.0,) * c, std=(1.0,) * c,
      augment=mode)
  out = vision.train_batch(ds, seed=0, step=0, batch_size=64)["image"]
  pixels = np.rint(out * 255).astype(np.uint8)  # Undo (x / 255 - 0) / 1.
  plain = {w.tobytes() for w in _windows(image, pad)}
  mirrored = {w[:, ::-1].tobytes() for w in _windows(image, pad)}
  drawn = [p.tobytes() for p in pixels]
  assert all(d in plain or (flip and d in mirrored) for d in drawn)
  assert any(d in mirrored for d in drawn) == flip
  assert (len(set(drawn)) > 10) == (mode != "none")  # Many offsets, or none at all.


def test_shard_train_batch_over_a_one_device_mesh(digits):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ponder import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
  host = vision.train_batch(digits, seed=0, step=0, batch_size=32)
  placed = mesh_lib.shard_batch(host, mesh)
  for key in host:
    assert placed[key].sharding.spec == P(mesh_lib.DATA)
    np.testing.assert_array_equal(np.asarray(placed[key]), host[key])
