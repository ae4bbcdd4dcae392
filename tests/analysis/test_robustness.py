"""Corruption report: per-set accuracies against a direct count, the mean and drop, one
corrupted set shared by every model, reproducible generated sets."""

import chex
import numpy as np
import pytest

from ponder import errors
from ponder.analysis import robustness
from ponder.data import corruptions


def _data(n=12, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.0, 1.0, (n, 8, 8, 1)).astype(np.float32)
  labels = (images.mean((1, 2, 3)) > 0.5).astype(np.int32)
  return images, labels


def _brightness_classifier(images):
  """Logits [b, 2] that say 'bright' when the mean pixel is above 0.5."""
  m = np.asarray(images).mean((1, 2, 3))
  return np.stack([0.5 - m, m - 0.5], -1)


def test_report_matches_a_direct_count_and_shares_sets_between_models():
  images, labels = _data()
  provider = robustness.generated(images, labels, seed=3)
  calls = []

  def counting_provider(name, severity):
    calls.append((name, severity))
    return provider(name, severity)

  names, severities = ("gaussian_noise", "brightness", "contrast"), (1, 3, 5)
  report = robustness.corruption_report(
      {"a": _brightness_classifier, "b": lambda x: -_brightness_classifier(x)},
      images, labels, counting_provider, names=names, severities=severities, batch_size=5)
  assert len(calls) == len(names) * len(severities)  # Each set corrupted once for both.
  for name in names:
    for i, s in enumerate(severities):
      x, y = provider(name, s)
      expected = np.mean(_brightness_classifier(x).argmax(-1) == y)
      np.testing.assert_allclose(report["a"]["per_corruption"][name][i], expected)
      np.testing.assert_allclose(report["b"]["per_corruption"][name][i], 1 - expected)
  for row in report.values():
    grid = np.asarray([row["per_corruption"][n] for n in names])
    np.testing.assert_allclose(row["mean"], grid.mean())
    np.testing.assert_allclose(row["per_severity"], grid.mean(0))
    np.testing.assert_allclose(row["drop"], row["clean"] - row["mean"])
  assert report["a"]["clean"] == 1.0  # Labels are the classifier's rule on clean images.


def test_generated_sets_are_reproducible_and_match_corrupt():
  images, labels = _data()
  x1, y1 = robustness.generated(images, labels, seed=1)("shot_noise", 2)
  chex.assert_shape(x1, images.shape)
  np.testing.assert_array_equal(y1, labels)
  np.testing.assert_array_equal(x1, robustness.generated(images, labels, seed=1)("shot_noise", 2)[0])
  index = list(corruptions.CORRUPTIONS).index("shot_noise")
  direct = corruptions.corrupt(images, "shot_noise", 2, np.random.default_rng([1, index, 2]))
  np.testing.assert_array_equal(x1, direct)
  x2, _ = robustness.generated(images, labels, seed=2)("shot_noise", 2)
  assert not np.array_equal(x1, x2)  # The seed matters.


def test_accuracy_pads_the_last_batch_and_scales_uint8():
  images, labels = _data(n=7)
  seen = []

  def predict(x):
    seen.append(x.shape[0])
    assert x.max() <= 1.0
    return _brightness_classifier(x)

  as_uint8 = (images * 255).astype(np.uint8)
  acc = robustness.accuracy(predict, as_uint8, labels, batch_size=4)
  assert seen == [4, 4]
  expected = np.mean(_brightness_classifier(as_uint8 / 255.0).argmax(-1) == labels)
  np.testing.assert_allclose(acc, expected)


def test_empty_model_set_and_unprepared_tfds_are_clear_errors(tmp_path):
  images, labels = _data()
  with pytest.raises(errors.ConfigError):
    robustness.corruption_report({}, images, labels, robustness.generated(images, labels))
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(errors.MissingDataError, match="cifar10_corrupted"):
    robustness.tfds_cifar10_c(str(tmp_path))("fog", 1)
