"""Tiny datasets in the real on-disk formats, for tests of loaders and of configs."""

import gzip
import pathlib
import pickle
import struct

import numpy as np



def cifar_rows(images: np.ndarray) -> np.ndarray:
  """[N, 32, 32, 3] -> [N, 3072]: the red plane, then green, then blue, each row-major."""
  return np.concatenate([images[..., c].reshape(len(images), 1024) for c in range(3)], axis=1)


def write_pickle(path: pathlib.Path, batch: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=2)


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool) -> None:
  magic = {3: 2051, 1: 2049}[array.ndim]  # uint8 images [N, rows, cols], labels [N].
  raw = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
  opener = gzip.open if compress else open
  with opener(str(path) + (".gz" if compress else ""), "wb") as f:
    f.write(raw)


def write_cifar(root: pathlib.Path, num_classes: int, n_train: int = 20, n_test: int = 10,
                seed: int = 0) -> pathlib.Path:
  """A CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`) directory."""
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = lambda n: rng.integers(0, num_classes, n).tolist()
  if num_classes == 10:
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
      write_pickle(folder / f"data_batch_{i}",
                   {b"labels": labels(n_train), b"data": cifar_rows(images(n_train))})
    write_pickle(folder / "test_batch", {b"labels": labels(n_test),
                                         b"data": cifar_rows(images(n_test))})
  else:
    folder = root / "cifar-100-python"
    for split, n in (("train", n_train), ("test", n_test)):
      write_pickle(folder / split, {b"fine_labels": labels(n), b"coarse_labels": labels(n),
                                    b"data": cifar_rows(images(n))})
  return root


def write_fashion_mnist(root: pathlib.Path, n_train: int = 40, n_test: int = 20,
                        seed: int = 0) -> pathlib.Path:
  """The four idx `.gz` files of (Fashion-)MNIST."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), True)
    write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), True)
  return root
