"""Small image-classification datasets behind one interface, batched on the host.

Sources, per dataset:
- local directories in the layouts the datasets ship in: the CIFAR "python version"
  pickles (`cifar-10-batches-py/`, `cifar-100-python/`) and the idx files of MNIST and
  Fashion-MNIST (gzipped or not; the Debian package `dataset-fashion-mnist` installs
  them in /usr/share/datasets/fashion-mnist/);
- tfds, read as a random-access data source from array_record files, which works
  without TensorFlow (tfrecord and `as_dataset` need it, so they are not used);
- scikit-learn's bundled 8x8 digits.
Nothing here downloads: a missing dataset is a `MissingDataError` that says how to get it.

The whole dataset sits in host memory as uint8 (CIFAR-10 is 180 MB), so a batch is a
gather plus one vectorised augmentation. Its order is a pure function of (seed, step):
a resumed run sees the same batches as an uninterrupted one, with no iterator to save.
"""

import dataclasses
import gzip
import math
import pathlib
import pickle
import struct
from typing import Callable, Iterator, Sequence

import numpy as np

from ponder import errors
from ponder.data import augment as augment_lib

# (train images, train labels, test images, test labels), as read from a source.
_Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# Augmentation mode -> (zero padding of the random crop, whether to mirror).
# 4 pixels on 32x32 is the CIFAR recipe; 28x28 gray images get a smaller shift.
_AUGMENT = {"crop_flip": (4, True), "crop": (2, False), "none": None}

# Seed-sequence tags that keep the permutation and augmentation streams apart.
_ORDER, _AUGMENT_STREAM = 0, 1

_DIGITS_TEST_SIZE = 360  # 1,797 digits -> 1,437 train / 360 test, about the usual 80/20.


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """A whole dataset in host memory (`load_image_dataset` makes the arrays read-only).

  `eq=False`: datasets compare by identity (comparing arrays elementwise is neither
  cheap nor a bool).
  """
  name: str
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, C]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  mean: tuple  # per-channel mean of the train images scaled to [0, 1]
  std: tuple  # per-channel standard deviation, same scale
  augment: str  # "crop_flip", "crop" or "none"; see _AUGMENT
  val_images: np.ndarray | None = None  # uint8 [V, H, W, C] carved from train, or None
  val_labels: np.ndarray | None = None  # int32 [V]


@dataclasses.dataclass(frozen=True)
class _Layout:
  """A standard on-disk layout: the folder its archive unpacks to and the files in it.

  `files` lists the train files, then the test files; `read` turns their paths into
  splits. Each file may also be gzipped (`name.gz`).
  """
  folder: str | None
  files: tuple[str, ...]
  read: Callable[[Sequence[pathlib.Path]], _Splits]

  def find(self, root: pathlib.Path) -> list[pathlib.Path] | None:
    """The files under `root`, or under `root/folder`, or None where any is missing."""
    for directory in ([root / self.folder] if self.folder else []) + [root]:
      paths = [_existing(directory / name) for name in self.files]
      if all(paths):
        return paths
    return None

  def describe(self) -> str:
    where = f"DIR/{self.folder}/" if self.folder else "DIR/"
    return f"{where}{{{', '.join(self.files)}}} (each may be .gz)"


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What a dataset is and where it may come from."""
  num_classes: int
  augment: str
  sources: tuple[str, ...] = ("local", "tfds")  # in the order "auto" tries them
  layout: _Layout | None = None
  dirs: tuple[str, ...] = ()  # default local directories ("~" expanded at load time)
  tfds_name: str | None = None
  apt_package: str | None = None
  archive: str | None = None  # the official download that unpacks to `layout`
  # Validation images carved from the end of train, as a fraction of train (or a count):
  # 6,000 of Fashion-MNIST's 60,000, 5,000 of CIFAR's 50,000.
  val_size: float = 0.1


def _existing(path: pathlib.Path) -> pathlib.Path | None:
  for candidate in (path, path.with_name(path.name + ".gz")):
    if candidate.is_file():
      return candidate
  return None


def _open(path: pathlib.Path):
  return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads an unsigned-byte idx file (LeCun's MNIST format, also Fashion-MNIST's).

  The header is the magic number (two zero bytes, the type code 0x08 for uint8 and the
  number of dimensions: 2051 for images, 2049 for labels), then each dimension as a
  big-endian uint32; the values follow in row-major order.
  """
  path = pathlib.Path(path)
  with _open(path) as f:
    raw = f.read()
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
    raise errors.MissingDataError(
        f"{path} is not an unsigned-byte idx file (it starts with {raw[:4]!r}, not "
        "00 00 08 <ndim>); replace it with the original MNIST/Fashion-MNIST file.")
  ndim = raw[3]
  dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  values = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if values.size != math.prod(dims):
    raise errors.MissingDataError(
        f"{path} holds {values.size} values but its header promises {dims}; the file is "
        "truncated or damaged, fetch it again.")
  return values.reshape(dims)


def _read_idx_splits(paths: Sequence[pathlib.Path]) -> _Splits:
  train_x, train_y, test_x, test_y = map(read_idx, paths)
  return train_x[..., None], train_y, test_x[..., None], test_y


def _read_cifar_batch(path: pathlib.Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  """One pickled CIFAR batch: b"data" is uint8 [N, 3072], the R, G, B 32x32 planes.

  The pickles were written by Python 2, hence `encoding="bytes"`. Unpickling runs code
  from the file: point this only at files from the official archive.
  """
  with _open(path) as f:
    batch = pickle.load(f, encoding="bytes")
  images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, np.asarray(batch[label_key])


def _cifar_reader(label_key: bytes) -> Callable[[Sequence[pathlib.Path]], _Splits]:
  """Reads CIFAR batches: every file but the last is train, the last is test."""

  def read(paths):
    batches = [_read_cifar_batch(p, label_key) for p in paths]
    train_x, train_y = (np.concatenate(a) for a in zip(*batches[:-1]))
    return train_x, train_y, *batches[-1]

  return read


_IDX = _Layout(None, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), _read_idx_splits)
_CIFAR10 = _Layout("cifar-10-batches-py",
                   tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                   _cifar_reader(b"labels"))
_CIFAR100 = _Layout("cifar-100-python", ("train", "test"), _cifar_reader(b"fine_labels"))

_SPECS = {
    "digits": _Spec(num_classes=10, augment="none", sources=("sklearn",), val_size=0.2),
    "mnist": _Spec(
        num_classes=10, augment="crop", layout=_IDX,
        dirs=("~/.ponder/data/mnist",), tfds_name="mnist",
        archive="http://yann.lecun.com/exdb/mnist/ (the four .gz files)"),
    "fashion_mnist": _Spec(
        num_classes=10, augment="crop", layout=_IDX,
        dirs=("/usr/share/datasets/fashion-mnist", "~/.ponder/data/fashion_mnist"),
        tfds_name="fashion_mnist", apt_package="dataset-fashion-mnist",
        archive="https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"),
    "cifar10": _Spec(
        num_classes=10, augment="crop_flip", layout=_CIFAR10,
        dirs=("~/.ponder/data/cifar10",), tfds_name="cifar10",
        archive="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": _Spec(
        num_classes=100, augment="crop_flip", layout=_CIFAR100,
        dirs=("~/.ponder/data/cifar100",), tfds_name="cifar100",
        archive="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
_SOURCES = ("auto", "local", "tfds", "sklearn")


def _from_local(spec: _Spec, data_dir: str | None) -> _Splits:
  roots = [data_dir] if data_dir else spec.dirs
  for root in roots:
    paths = spec.layout.find(pathlib.Path(root).expanduser())
    if paths:
      return spec.layout.read(paths)
  raise errors.MissingDataError(
      f"no local copy in {', '.join(map(str, roots))} (expected {spec.layout.describe()})")


def _tfds_arrays(source) -> tuple[np.ndarray, np.ndarray]:
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e["image"] for e in examples]),
          np.asarray([e["label"] for e in examples]))


def _from_tfds(spec: _Spec, data_dir: str | None) -> _Splits:
  """Reads a prepared array_record copy as a tfds data source; never downloads."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDataError(
        "tfds is not installed (pip install 'ponder[tfds]', i.e. tensorflow-datasets, "
        "importlib_resources and array_record)") from e
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    raise errors.MissingDataError(
        f"tfds {spec.tfds_name!r} is not prepared in {builder.data_dir_root}")
  try:
    train, test = builder.as_data_source(split=["train", "test"])
  except NotImplementedError as e:  # Prepared, but only as tfrecord.
    raise errors.MissingDataError(
        f"tfds {spec.tfds_name!r} in {builder.data_dir} is {builder.info.file_format}, "
        "which needs TensorFlow to read; prepare it as array_record") from e
  return (*_tfds_arrays(train), *_tfds_arrays(test))


def _from_sklearn(spec: _Spec, data_dir: str | None) -> _Splits:
  """scikit-learn's 1,797 digits split by a fixed permutation, the same in every run.

  The 0..16 gray levels are scaled to 0..255 so every dataset is uint8 images.
  """
  del spec, data_dir  # The digits ship inside scikit-learn.
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDataError("scikit-learn is not installed") from e
  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  order = np.random.default_rng(0).permutation(len(images))
  train, test = order[_DIGITS_TEST_SIZE:], order[:_DIGITS_TEST_SIZE]
  return images[train], digits.target[train], images[test], digits.target[test]


_READERS = {"local": _from_local, "tfds": _from_tfds, "sklearn": _from_sklearn}


def _how_to_obtain(spec: _Spec) -> str:
  ways = []
  if spec.apt_package:
    ways.append(f"install the Debian package: apt-get install {spec.apt_package} "
                f"(puts the files in {spec.dirs[0]}/)")
  if spec.layout:
    ways.append(f"download {spec.archive}, unpack it as {spec.layout.describe()} with DIR "
                f"one of {', '.join(spec.dirs)} or your data_dir")
  if spec.tfds_name:
    ways.append(f"prepare tfds {spec.tfds_name!r} as array_record (tfds build "
                f"{spec.tfds_name} --file_format=array_record, once, on a machine with "
                "TensorFlow) and pass that data_dir with source='tfds'")
  if "sklearn" in spec.sources:
    ways.append("pip install scikit-learn, which ships it")
  return "To get it: " + "; or ".join(ways) + "."


def _channel_stats(images: np.ndarray, chunk: int = 1 << 16) -> tuple[tuple, tuple]:
  """Per-channel mean and std in [0, 1], exact, from a histogram of the uint8 values.

  A histogram in chunks avoids the float copy of the whole set that `np.std` would make
  (1.2 GB for CIFAR-10).
  """
  c = images.shape[-1]
  pixels = images.reshape(-1, c)
  counts = np.zeros((c, 256))
  for start in range(0, len(pixels), chunk):
    block = pixels[start:start + chunk]
    counts += [np.bincount(block[:, k], minlength=256) for k in range(c)]
  p = counts / len(pixels)
  levels = np.arange(256) / 255
  mean = p @ levels
  std = np.sqrt(np.sum(p * (levels - mean[:, None]) ** 2, axis=1))
  return tuple(map(float, mean)), tuple(map(float, std))


def _read_only(array: np.ndarray, dtype) -> np.ndarray:
  array = np.ascontiguousarray(array, dtype=dtype)
  array.setflags(write=False)
  return array


def _make_dataset(name: str, spec: _Spec, splits: _Splits) -> ImageDataset:
  train_x, train_y, test_x, test_y = splits
  for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
    if x.ndim != 4 or len(x) != len(y):
      raise errors.ShapeError(
          f"{name} {split}: images {x.shape} and labels {y.shape} do not form [N, H, W, C] "
          "and [N]; the files are not in the expected format.")
  mean, std = _channel_stats(train_x)
  return ImageDataset(
      name=name, train_images=_read_only(train_x, np.uint8),
      train_labels=_read_only(train_y, np.int32), test_images=_read_only(test_x, np.uint8),
      test_labels=_read_only(test_y, np.int32), num_classes=spec.num_classes, mean=mean,
      std=std, augment=spec.augment)


def with_validation(ds: ImageDataset, size: float) -> ImageDataset:
  """`ds` with its last `size` train images (a count, or a fraction of train when < 1)
  moved into a validation split: the same images in every run, disjoint from the ones
  trained on. The normalisation statistics are those of the remaining train images."""
  n = len(ds.train_labels)
  count = int(round(size * n)) if size < 1 else int(size)
  if not 0 < count < n:
    raise errors.ConfigError(
        f"data.val_size={size} gives {count} of the {n} train images of {ds.name}; use a "
        f"count in 1..{n - 1}, a fraction in (0, 1), or -1 for the dataset's default.")
  train_x, val_x = ds.train_images[:n - count], ds.train_images[n - count:]
  mean, std = _channel_stats(train_x)
  return dataclasses.replace(ds, train_images=train_x, train_labels=ds.train_labels[:n - count],
                             val_images=val_x, val_labels=ds.train_labels[n - count:],
                             mean=mean, std=std)


def default_val_size(name: str) -> float:
  """The validation carve of `with_validation` that a dataset uses by default."""
  if name not in _SPECS:
    raise errors.unknown_key("image dataset", name, _SPECS)
  return _SPECS[name].val_size


def load_image_dataset(name: str, *, source: str = "auto",
                       data_dir: str | None = None) -> ImageDataset:
  """Loads a dataset whole into host memory (train and test; see `with_validation`).

  Args:
    name: "digits", "fashion_mnist", "mnist", "cifar10" or "cifar100".
    source: "auto" tries a local directory and then tfds (digits: scikit-learn);
      "local", "tfds" or "sklearn" use only that one.
    data_dir: for "local", the directory holding the files (or the folder the archive
      unpacks to, like `cifar-10-batches-py/`); for "tfds", its data_dir; "auto" tries
      it as both. None looks in the standard places: /usr/share/datasets/fashion-mnist,
      ~/.ponder/data/<name>, and tfds's default data_dir.

  Raises:
    ConfigError: an unknown name or source, or a source the dataset does not have.
    MissingDataError: no source had the data; says what was tried and how to get it.
  """
  if name not in _SPECS:
    raise errors.unknown_key("image dataset", name, _SPECS)
  if source not in _SOURCES:
    raise errors.unknown_key("data source", source, _SOURCES)
  spec = _SPECS[name]
  if source != "auto" and source not in spec.sources:
    raise errors.ConfigError(
        f"{name} has no {source!r} source; use one of {', '.join(('auto',) + spec.sources)}.")
  tried = []
  for src in spec.sources if source == "auto" else (source,):
    try:
      return _make_dataset(name, spec, _READERS[src](spec, data_dir))
    except errors.MissingDataError as e:
      tried.append(f"{src}: {e}")
  raise errors.MissingDataError(
      f"{name} was not found. Tried {'; '.join(tried)}. {_how_to_obtain(spec)}")


def batch_indices(num_examples: int, *, seed: int, step: int, batch_size: int) -> np.ndarray:
  """The example indices of batch `step`: slices of one stream of epoch permutations.

  Batch `step` covers positions [step * batch_size, (step + 1) * batch_size) of the
  stream; position p is example `perm_e[p % N]` of epoch e = p // N, where perm_e is
  drawn from (seed, e) alone. Every example appears once per epoch, no example is
  dropped at an epoch boundary, and no state is kept.
  """
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    here = epochs == epoch
    perm = np.random.default_rng([seed, _ORDER, epoch]).permutation(num_examples)
    indices[here] = perm[offsets[here]]
  return indices


def normalise(ds: ImageDataset, images: np.ndarray, scale: float = 255.0) -> np.ndarray:
  """(x / scale - mean) / std per channel, in float32: uint8 pixels with the default
  scale, images already in [0, 1] (e.g. corrupted ones) with scale=1.

  Scale and shift are tiled over whole (W, C) rows and applied in place: broadcasting
  over a last axis of 3 channels runs numpy's inner loop 3 values at a time, 10x slower.
  """
  std = np.asarray(ds.std, np.float32)
  width = images.shape[-2]
  out = images.astype(np.float32)
  rows = out.reshape(*out.shape[:-2], -1)
  rows *= np.tile(1 / (scale * std), width)
  rows += np.tile(-np.asarray(ds.mean, np.float32) / std, width)
  return out


def train_batch(ds: ImageDataset, *, seed: int, step: int, batch_size: int,
                augment: bool = True) -> dict:
  """Training batch `step`: {"image": float32 [B, H, W, C] normalised, "label": int32 [B]}.

  A pure function of (seed, step): order from `batch_indices`, augmentation (the
  dataset's own mode, see `ImageDataset.augment`) from a generator seeded by
  (seed, step).
  """
  index = batch_indices(len(ds.train_labels), seed=seed, step=step, batch_size=batch_size)
  images = ds.train_images[index]
  mode = _AUGMENT[ds.augment]
  if augment and mode:
    pad, flip = mode
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, step])
    images = augment_lib.random_crop_flip(images, rng, pad=pad, flip=flip)
  return {"image": normalise(ds, images), "label": ds.train_labels[index]}


def eval_batches(ds: ImageDataset, *, batch_size: int, split: str = "test",
                 pad_to_multiple: int = 1) -> Iterator[dict]:
  """The split in order, in batches of one static shape (one compile for all of them).

  Yields {"image", "label", "mask"}: the last batch is padded with zero images, label
  0 and mask 0.0, so a metric sums `mask * value` and divides by `mask.sum()`. The
  batch size is `batch_size` rounded up to a multiple of `pad_to_multiple` (pass the
  size of the mesh's data axis so every batch shards evenly).
  """
  splits = {"train": (ds.train_images, ds.train_labels),
            "test": (ds.test_images, ds.test_labels)}
  if ds.val_images is not None:
    splits["val"] = (ds.val_images, ds.val_labels)
  if split not in splits:
    raise errors.unknown_key("split", split, splits)
  images, labels = splits[split]
  size = -(-batch_size // pad_to_multiple) * pad_to_multiple
  for start in range(0, len(labels), size):
    x, y = images[start:start + size], labels[start:start + size]
    missing = size - len(y)
    yield {
        "image": normalise(ds, np.pad(x, ((0, missing), (0, 0), (0, 0), (0, 0)))),
        "label": np.pad(y, (0, missing)),
        "mask": np.pad(np.ones(len(y), np.float32), (0, missing)),
    }


def steps_per_epoch(ds: ImageDataset, batch_size: int) -> int:
  """Full batches in one pass over the train split (at least 1, for tiny sets)."""
  return max(1, len(ds.train_labels) // batch_size)
