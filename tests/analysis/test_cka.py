"""CKA from its definitions: invariances, symmetry, the debiased estimator, minibatch
CKA, and an independent numpy implementation (centring matrix; the U-statistic over
distinct index quadruples for the unbiased HSIC)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder import errors
from ponder.analysis import cka


def _features(seed, n=40, d1=12, d2=7):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d1))
  y = x @ rng.normal(size=(d1, d2)) + 0.5 * rng.normal(size=(n, d2))
  return x.astype(np.float32), y.astype(np.float32)


def _numpy_cka_biased(x, y):
  """tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), float64."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = x @ x.T, y @ y.T
  hsic = lambda a, b: np.trace(a @ h @ b @ h)
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _numpy_hsic_u_statistic(k, l):
  """Song et al.'s unbiased HSIC as the U-statistic it is: the mean over ordered
  quadruples of distinct indices (i, j, q, r) of K_ij L_ij + K_ij L_qr - 2 K_ij L_iq."""
  n = k.shape[0]
  total, count = 0.0, 0
  for i, j, q, r in itertools.permutations(range(n), 4):
    total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    count += 1
  return total / count


def test_linear_cka_matches_numpy_with_centring_matrix():
  x, y = _features(0)
  np.testing.assert_allclose(float(cka.linear_cka(x, y)), _numpy_cka_biased(x, y),
                             rtol=1e-5)
  k, l = cka.gram_linear(cka.center(x)), cka.gram_linear(cka.center(y))
  np.testing.assert_allclose(float(cka.cka_from_grams(k, l)), _numpy_cka_biased(x, y),
                             rtol=1e-5)


def test_unbiased_hsic_equals_the_u_statistic():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 4))
  k, l = x @ x.T, y @ y.T
  with jax.enable_x64(True):
    got = float(cka.hsic_unbiased(jnp.asarray(k), jnp.asarray(l)))
  np.testing.assert_allclose(got, _numpy_hsic_u_statistic(k, l), rtol=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances_and_symmetry(debiased):
  x, y = _features(2)
  q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(12, 12)))
  f = lambda a, b: float(cka.linear_cka(jnp.asarray(a), jnp.asarray(b), debiased=debiased))
  np.testing.assert_allclose(f(x, x @ q.astype(np.float32)), 1.0, rtol=1e-5)  # Orthogonal.
  np.testing.assert_allclose(f(x, 3.7 * x + 2.5), 1.0, rtol=1e-5)  # Scale and shift.
  np.testing.assert_allclose(f(x, y), f(y, x), rtol=1e-6)  # Symmetric.
  np.testing.assert_allclose(f(x @ q.astype(np.float32), -2 * y + 1), f(x, y), rtol=1e-4)
  assert 0.3 < f(x, y) < 1.0


def test_debiased_cka_is_near_zero_for_independent_data():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(50, 200)).astype(np.float32)
  y = rng.normal(size=(50, 300)).astype(np.float32)
  biased = float(cka.linear_cka(x, y))
  debiased = float(cka.linear_cka(x, y, debiased=True))
  assert biased > 0.5  # d >> n: the biased estimator sees structure that is not there.
  assert abs(debiased) < 0.05


def test_mask_drops_examples():
  x, y = _features(5)
  mask = np.arange(40) % 3 != 0
  np.testing.assert_allclose(float(cka.linear_cka(x, y, mask=jnp.asarray(mask))),
                             _numpy_cka_biased(x[mask], y[mask]), rtol=1e-5)


def test_minibatch_cka_accumulates_hsic_over_batches():
  """Accumulated over 4 minibatches == the same ratio of mean HSIC_1 computed with the
  U-statistic in numpy; one batch == debiased CKA; a layers x layers matrix."""
  rng = np.random.default_rng(6)
  batches = [_features(10 + i, n=8) for i in range(4)]
  got = float(cka.minibatch_cka([b[0] for b in batches], [b[1] for b in batches]))
  hs = np.array([[_numpy_hsic_u_statistic(a @ a.T, b @ b.T) for a, b in
                  ((x, y), (x, x), (y, y))] for x, y in
                 ((x.astype(np.float64), y.astype(np.float64)) for x, y in batches)])
  want = hs[:, 0].mean() / np.sqrt(hs[:, 1].mean() * hs[:, 2].mean())
  np.testing.assert_allclose(got, want, rtol=1e-4)
  x, y = batches[0]
  np.testing.assert_allclose(float(cka.minibatch_cka([x], [y])),
                             float(cka.linear_cka(x, y, debiased=True)), rtol=1e-5)
  acc = cka.minibatch_cka_init(2, 3)
  for x, y in batches:
    z = rng.normal(size=x.shape).astype(np.float32)
    acc = jax.jit(cka.minibatch_cka_update)(acc, [x, y], [x, y, z])
  matrix = cka.minibatch_cka_result(acc)
  chex.assert_shape(matrix, (2, 3))
  np.testing.assert_allclose(np.diag(np.asarray(matrix)[:, :2]), 1.0, rtol=1e-5)
  assert int(acc.count) == 4


def test_shape_errors():
  with pytest.raises(errors.ShapeError):
    cka.linear_cka(jnp.ones((5, 3)), jnp.ones((6, 3)))
  with pytest.raises(errors.ShapeError):
    cka.hsic_unbiased(jnp.ones((3, 3)), jnp.ones((3, 3)))


def test_cka_with_a_constant_representation_is_zero_with_finite_gradients():
  # A residual update of a block whose output projection is still zero-initialised
  # (RWKV-4) is constant: CKA is 0 there and 1 - CKA trains without NaNs.
  x = jax.random.normal(jax.random.key(0), (12, 5))
  zeros = jnp.zeros((12, 3))
  assert float(cka.linear_cka(x, zeros)) == 0.0
  grad = jax.grad(lambda z: cka.linear_cka(x, z))(zeros)
  assert bool(jnp.all(jnp.isfinite(grad)))
  chex.assert_trees_all_close(cka.linear_cka(x, x + 1.0), 1.0, atol=1e-5)
