"""Corruption robustness (Hendrycks & Dietterich 2019): accuracy under the 15 common
corruptions at 5 severities, their mean, and the drop from clean accuracy.

Corrupting images is the slow part (numpy / scipy on the host), so one pass corrupts
each (corruption, severity) set once and scores every model on it: models compared in a
table see identical corrupted images. The sets come from a provider
`(name, severity) -> (images in [0, 1] [B, H, W, C], labels [B])`:

  generated(images, labels, seed)  `ponder.data.corruptions` applied to a clean test set
                                   (any dataset; a pure function of the seed);
  tfds_cifar10_c(data_dir)         the released CIFAR-10-C (tfds `cifar10_corrupted`),
                                   when it is prepared as array_record (no TensorFlow).
"""

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ponder import errors
from ponder import metric_log as plog
from ponder.data import corruptions as corruptions_lib

Provider = Callable[[str, int], Tuple[np.ndarray, np.ndarray]]


def generated(images: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> Provider:
  """Corrupts `images` (uint8 or floats in [0, 1]) on demand; the randomness of set
  (name, severity) is seeded by (seed, its index), so every call gives the same set."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  names = list(corruptions_lib.CORRUPTIONS)

  def provide(name, severity):
    rng = np.random.default_rng([seed, names.index(name), severity])
    return corruptions_lib.corrupt(images, name, severity, rng), np.asarray(labels)

  return provide


def tfds_cifar10_c(data_dir: Optional[str] = None) -> Provider:
  """The released CIFAR-10-C through tfds' random-access data source.

  Raises MissingDataError (saying how to prepare it) if tfds or the prepared
  `cifar10_corrupted` configs are not there; nothing is downloaded.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise errors.MissingDataError(
        "tensorflow-datasets is not installed; pip install tensorflow-datasets "
        "importlib_resources, or use the generated corruptions.") from e

  def provide(name, severity):
    try:
      source = tfds.data_source(f"cifar10_corrupted/{name}_{severity}", split="test",
                                data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared".
      raise errors.MissingDataError(
          f"tfds cifar10_corrupted/{name}_{severity} is not prepared under "
          f"{data_dir or '~/tensorflow_datasets'} as array_record ({e}); prepare it on a "
          "machine with a network (tfds build cifar10_corrupted "
          "--file_format=array_record) or use the generated corruptions.") from e
    rows = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0
    return images, np.asarray([r["label"] for r in rows])

  return provide


def accuracy(predict: Callable, images: np.ndarray, labels: np.ndarray, batch_size: int
             ) -> float:
  """Accuracy of `predict` (images in [0, 1] [b, ...] -> logits) in batches of one shape;
  uint8 `images` are scaled to [0, 1] batch by batch."""
  correct = 0
  for start in range(0, len(labels), batch_size):
    x = images[start:start + batch_size]
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 255.0
    n = len(x)
    if n < batch_size:  # Pad: one compiled shape for every batch.
      x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    logits = np.asarray(predict(x))[:n]
    correct += int((logits.argmax(-1) == labels[start:start + n]).sum())
  return correct / max(len(labels), 1)


def corruption_report(predicts: Mapping[str, Callable], clean_images: np.ndarray,
                      clean_labels: np.ndarray, provider: Provider, *,
                      names: Sequence[str] = tuple(corruptions_lib.CORRUPTIONS),
                      severities: Sequence[int] = corruptions_lib.SEVERITIES,
                      batch_size: int = 256) -> Dict[str, dict]:
  """Per model: clean accuracy, accuracy per corruption and severity, their mean and the
  drop from clean.

  Args:
    predicts: model name -> fn(images in [0, 1] [b, H, W, C]) -> logits [b, classes]
      (normalisation is the fn's business).
    clean_images, clean_labels: the uncorrupted set (floats in [0, 1] or uint8).
    provider: `generated(...)` or `tfds_cifar10_c(...)`.
  Returns:
    {model: {"clean", "per_corruption": {name: [acc per severity]}, "per_severity",
    "mean", "drop"}}; "mean" averages all names x severities (the CIFAR-10-C convention).
  """
  if not predicts:
    raise errors.ConfigError("corruption_report needs at least one model")
  clean_images, clean_labels = np.asarray(clean_images), np.asarray(clean_labels)
  table = {m: {"clean": accuracy(f, clean_images, clean_labels, batch_size),
               "per_corruption": {}} for m, f in predicts.items()}
  bar = plog.progress(len(names) * len(severities), 0, desc="corruptions")
  for name in names:
    for m in predicts:
      table[m]["per_corruption"][name] = []
    for severity in severities:
      images, labels = provider(name, severity)
      for m, f in predicts.items():
        table[m]["per_corruption"][name].append(accuracy(f, images, labels, batch_size))
      bar.update(1)
  bar.close()
  for row in table.values():
    grid = np.asarray(list(row["per_corruption"].values()))  # [names, severities]
    row["per_severity"] = grid.mean(0).tolist()
    row["mean"] = float(grid.mean())
    row["drop"] = row["clean"] - row["mean"]
  return table
