"""PonderTTT allocation helpers against numpy references."""

import jax
import numpy as np
import pytest

from ponder import errors
from ponder.nn import ponder_alloc as pa


def _np_entropy(logits):
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return -(p * np.log(p)).sum(-1)


def test_entropy_and_mini_batch_difficulty_match_numpy():
  logits = np.random.RandomState(0).standard_normal((3, 24, 11)).astype(np.float32) * 3
  ent = _np_entropy(logits.astype(np.float64))
  np.testing.assert_allclose(pa.token_entropy(logits), ent, rtol=1e-5)
  mb = 8
  own = np.asarray(pa.mini_batch_difficulty(logits, mb, causal=False))
  np.testing.assert_allclose(own, ent.reshape(3, 3, 8).mean(-1), rtol=1e-5)
  causal = np.asarray(pa.mini_batch_difficulty(logits, mb))
  # Mini-batch i: the (up to) mb positions ending at its first position i * mb.
  ref = np.stack([ent[:, max(0, i * mb - mb + 1):i * mb + 1].mean(-1) for i in range(3)], 1)
  np.testing.assert_allclose(causal, ref, rtol=1e-5)
  with pytest.raises(errors.ShapeError):
    pa.mini_batch_difficulty(logits[:, :23], mb)


def test_causal_difficulty_ignores_later_positions():
  logits = np.random.RandomState(1).standard_normal((2, 32, 7)).astype(np.float32)
  mb = 8
  base = np.asarray(pa.mini_batch_difficulty(logits, mb))
  for i in range(4):
    changed = logits.copy()
    changed[:, i * mb + 1:] *= 5.0  # Positions every token of mini-batch i cannot see.
    np.testing.assert_array_equal(np.asarray(pa.mini_batch_difficulty(changed, mb))[:, :i + 1],
                                  base[:, :i + 1])


@pytest.mark.parametrize("n", [97, 1000])
def test_calibrated_allocation_hits_the_target_fractions(n):
  d = np.random.RandomState(n).gamma(2.0, 1.0, n).astype(np.float32)
  target, buckets = (0.3, 0.4, 0.3), (1, 2, 4)
  thresholds = np.asarray(pa.calibrate(d, target, buckets))
  np.testing.assert_allclose(thresholds, np.quantile(d, [0.3, 0.7]), rtol=1e-5)
  steps = np.asarray(pa.allocate(d, thresholds, buckets))
  ref = np.asarray(buckets)[np.searchsorted(thresholds, d, side="right")]
  np.testing.assert_array_equal(steps, ref)
  # Cumulative fractions are exact up to one element per threshold.
  cumulative = np.cumsum([np.mean(steps == b) for b in buckets])
  np.testing.assert_allclose(cumulative, np.cumsum(target), atol=1.0 / n + 1e-9)
  assert steps.dtype == np.int32


def test_budget_scales_thresholds_to_the_smallest_factor():
  d = np.random.RandomState(3).gamma(2.0, 1.0, 500).astype(np.float32)
  buckets = (1, 2, 4)
  thresholds = pa.calibrate(d, (0.3, 0.4, 0.3), buckets)
  mean = lambda t: float(np.mean(np.asarray(pa.allocate(d, t, buckets))))
  assert mean(thresholds) == pytest.approx(0.3 + 0.8 + 1.2, abs=0.02)
  np.testing.assert_allclose(pa.budget_thresholds(d, thresholds, buckets, budget=3.0),
                             thresholds)  # Already within budget: unchanged.
  for budget in (2.0, 1.5, 1.0):
    scaled = np.asarray(pa.budget_thresholds(d, thresholds, buckets, budget=budget))
    assert mean(scaled) <= budget
    scale = scaled[0] / float(thresholds[0])
    np.testing.assert_allclose(scaled, scale * np.asarray(thresholds), rtol=1e-6)
    assert mean(np.asarray(thresholds) * scale * (1 - 1e-5)) > budget
  jitted = jax.jit(lambda d: pa.budget_thresholds(d, thresholds, buckets, budget=1.5))
  assert mean(jitted(d)) <= 1.5
  with pytest.raises(errors.ConfigError, match="below the smallest bucket"):
    pa.budget_thresholds(d, thresholds, buckets, budget=0.5)


def test_adaptive_flops_count_the_skip_first_pass():
  cost = {0: 10.0, 1: 12.0, 2: 14.0, 4: 18.0}
  assert pa.adaptive_flops_per_token(np.array([1, 2, 4, 4]), cost) == 10.0 + 15.5
  with pytest.raises(errors.ConfigError, match="missing"):
    pa.adaptive_flops_per_token(np.array([1]), {1: 1.0})


def test_bad_buckets_raise():
  with pytest.raises(errors.ConfigError):
    pa.calibrate(np.ones(4), (0.5, 0.5), (1, 2, 4))
  with pytest.raises(errors.ConfigError):
    pa.calibrate(np.ones(4), (0.5, 0.5), (2, 1))
  with pytest.raises(errors.ShapeError):
    pa.allocate(np.ones(4), np.ones(3), (1, 2, 4))
