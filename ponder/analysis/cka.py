"""Centred kernel alignment between representations (n examples x d features).

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited", eq. 4 with linear kernels): with X, Y column-centred,

  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
            = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T, L = Y Y^T,
  HSIC_0(K, L) = tr(K H L H) / (n - 1)^2,                  H = I - 11^T / n.

It is invariant to orthogonal transforms and isotropic scaling of either side, and to
adding a constant (the centring). The biased HSIC_0 makes CKA of independent
representations large when d is not small against n. The unbiased estimator
(Song et al. 2012, "Feature Selection via Dependence Maximization", eq. 5; used for
CKA by Nguyen et al. 2021, "Do Wide and Deep Networks Learn the Same Things?"), with
K~, L~ the Gram matrices with zeroed diagonals,

  HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                  - 2 / (n-2) 1^T K~ L~ 1] / (n (n-3)),

removes that bias ("debiased CKA"; it can be slightly negative).

Minibatch CKA (Nguyen et al. 2021, Sec. 3.1) averages HSIC_1 over k minibatches before
the ratio, an unbiased estimate whose memory does not grow with the dataset:

  CKA_mb = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) mean_i HSIC_1(L_i, L_i))

`MinibatchCKA` accumulates those sums for every pair of a list of layers.
"""

from typing import Sequence

import flax
import jax
import jax.numpy as jnp

from ponder import errors


def _check(x, y):
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise errors.ShapeError(
        f"CKA compares [n, d1] with [n, d2] (the same n examples); got {x.shape}, "
        f"{y.shape}.")


def center(x, mask=None):
  """Columns minus their mean; with a mask [n] (1 = keep), the mean of the kept rows
  and the dropped rows set to zero (they then add nothing to any sum below)."""
  x = x.astype(jnp.float32)
  if mask is None:
    return x - jnp.mean(x, axis=0, keepdims=True)
  m = mask.astype(jnp.float32)[:, None]
  mean = jnp.sum(x * m, axis=0, keepdims=True) / jnp.maximum(jnp.sum(m), 1.0)
  return (x - mean) * m


def gram_linear(x):
  """K = X X^T."""
  x = x.astype(jnp.float32)
  return x @ x.T


def hsic_biased(k, l):
  """HSIC_0(K, L) = tr(K H L H) / (n - 1)^2."""
  n = k.shape[0]
  h = jnp.eye(n) - 1.0 / n
  return jnp.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k, l):
  """Song et al.'s unbiased HSIC_1(K, L) (module docstring); needs n >= 4."""
  n = k.shape[0]
  if n < 4:
    raise errors.ShapeError(f"the unbiased HSIC needs at least 4 examples; got {n}.")
  k = k * (1.0 - jnp.eye(n))
  l = l * (1.0 - jnp.eye(n))
  kl = jnp.sum(k * l)  # tr(K~ L~) for symmetric matrices.
  ones_kl = jnp.sum(k.sum(0) * l.sum(0))  # 1^T K~ L~ 1
  total = kl + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl
  return total / (n * (n - 3))


def cka_from_grams(k, l, *, debiased: bool = False):
  """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of two Gram matrices."""
  hsic = hsic_unbiased if debiased else hsic_biased
  return hsic(k, l) / jnp.sqrt(hsic(k, k) * hsic(l, l))


def linear_cka(x, y, *, debiased: bool = False, mask=None):
  """Linear CKA of x [n, d1] and y [n, d2].

  The biased form uses the features (||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), cost
  O(n d1 d2)); the debiased one the n x n Gram matrices. `mask` [n] (biased only)
  drops examples, e.g. padding tokens.
  """
  _check(x, y)
  if debiased:
    if mask is not None:
      raise errors.ConfigError("a mask is supported by the biased CKA only; select the "
                               "examples before calling the debiased one.")
    x, y = center(x), center(y)
    return cka_from_grams(gram_linear(x), gram_linear(y), debiased=True)
  x, y = center(x, mask), center(y, mask)
  xy = jnp.sum(jnp.square(y.T @ x))
  return _safe_ratio(xy, jnp.sum(jnp.square(x.T @ x)) * jnp.sum(jnp.square(y.T @ y)))


def _safe_ratio(num, den_squared):
  """num / sqrt(den_squared), and 0 (with zero gradients, not NaN) where den_squared = 0:
  CKA with a constant representation (e.g. a residual update of a block whose output
  projection is still zero-initialised, as in RWKV-4) is taken as no alignment, so
  a training loss 1 - CKA stays finite."""
  ok = den_squared > 0
  return jnp.where(ok, num / jnp.sqrt(jnp.where(ok, den_squared, 1.0)), 0.0)


# --- Minibatch CKA -----------------------------------------------------------------------


@flax.struct.dataclass
class MinibatchCKA:
  """Sums over minibatches of HSIC_1 for every (x layer, y layer) pair and of each
  layer with itself; `count` minibatches so far."""
  xy: jax.Array  # [layers_x, layers_y]
  xx: jax.Array  # [layers_x]
  yy: jax.Array  # [layers_y]
  count: jax.Array


def minibatch_cka_init(layers_x: int, layers_y: int) -> MinibatchCKA:
  return MinibatchCKA(jnp.zeros((layers_x, layers_y)), jnp.zeros(layers_x),
                      jnp.zeros(layers_y), jnp.zeros((), jnp.int32))


def minibatch_cka_update(acc: MinibatchCKA, xs: Sequence[jax.Array], ys: Sequence[jax.Array],
                         *, debiased: bool = True) -> MinibatchCKA:
  """Adds one minibatch: xs, ys lists of [n, d] features of the same n examples
  (leading axes are flattened into n)."""
  flat = lambda a: a.reshape(-1, a.shape[-1])
  hsic = hsic_unbiased if debiased else hsic_biased
  kx = [gram_linear(center(flat(x))) for x in xs]
  ky = [gram_linear(center(flat(y))) for y in ys]
  if len(kx) != acc.xx.shape[0] or len(ky) != acc.yy.shape[0]:
    raise errors.ShapeError(
        f"accumulator is for {acc.xy.shape} layers; got {len(kx)} x {len(ky)}.")
  xy = jnp.stack([jnp.stack([hsic(k, l) for l in ky]) for k in kx])
  return MinibatchCKA(acc.xy + xy, acc.xx + jnp.stack([hsic(k, k) for k in kx]),
                      acc.yy + jnp.stack([hsic(l, l) for l in ky]), acc.count + 1)


def minibatch_cka_result(acc: MinibatchCKA) -> jax.Array:
  """[layers_x, layers_y] CKA from the accumulated sums (the 1/k of the means cancels)."""
  return acc.xy / jnp.sqrt(acc.xx[:, None] * acc.yy[None, :])


def minibatch_cka(batches_x: Sequence[jax.Array], batches_y: Sequence[jax.Array], *,
                  debiased: bool = True) -> jax.Array:
  """Minibatch CKA of one pair of representations given as lists of minibatches
  ([n_i, d1] and [n_i, d2])."""
  acc = minibatch_cka_init(1, 1)
  for x, y in zip(batches_x, batches_y, strict=True):
    acc = minibatch_cka_update(acc, [x], [y], debiased=debiased)
  return minibatch_cka_result(acc)[0, 0]
