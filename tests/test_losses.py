"""Distillation losses: KD against a numpy KL, the gradient reversal layer, CTKD's
temperature moving against the student, the cosine schedule, CKA on layer updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder import errors, losses


def _logits(seed, shape=(2, 5, 11)):
  rng = np.random.default_rng(seed)
  return jnp.float32(2 * rng.normal(size=shape)), jnp.float32(2 * rng.normal(size=shape))


def _numpy_kd(s, t, temperature, mask=None):
  s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  p_t = np.exp(log_softmax(t))
  kl = (p_t * (log_softmax(t) - log_softmax(s))).sum(-1)
  mask = np.ones(kl.shape) if mask is None else mask
  return temperature ** 2 * (kl * mask).sum() / mask.sum()


def test_kd_loss_is_t_squared_kl_mean_over_tokens():
  s, t = _logits(0)
  for temperature in (1.0, 4.0):
    np.testing.assert_allclose(float(losses.kd_loss(s, t, temperature)),
                               _numpy_kd(s, t, temperature), rtol=1e-5)
  mask = np.random.default_rng(1).integers(0, 2, (2, 5)).astype(np.float32)
  mask[0, 0] = 1
  np.testing.assert_allclose(float(losses.kd_loss(s, t, 2.0, mask=jnp.asarray(mask))),
                             _numpy_kd(s, t, 2.0, mask), rtol=1e-5)
  assert float(losses.kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
  g_teacher = jax.grad(lambda t: losses.kd_loss(s, t, 2.0))(t)  # The teacher is fixed.
  assert not np.asarray(g_teacher).any()


def test_distillation_loss_adds_weighted_cross_entropy():
  s, t = _logits(2)
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 5)))
  loss, parts = losses.distillation_loss(s, t, labels, temperature=2.0, kd_weight=0.7,
                                         ce_weight=0.3)
  logp = jax.nn.log_softmax(s)
  ce = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(labels)[..., None], -1))
  np.testing.assert_allclose(float(parts["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.7 * float(parts["kd"]) + 0.3 * ce, rtol=1e-5)


def test_gradient_reversal_sign_and_scale():
  x = jnp.float32([0.5, -1.0, 2.0])
  f = lambda x: jnp.sum(jnp.sin(x) * x)
  plain = jax.grad(f)(x)
  for lam in (0.0, 0.3, 1.0):
    reversed_ = jax.grad(lambda x: f(losses.gradient_reversal(x, lam)))(x)
    chex.assert_trees_all_close(reversed_, -lam * plain, atol=1e-7)
  chex.assert_trees_all_equal(losses.gradient_reversal(x, 0.5), x)  # Identity forward.
  # lambda may be traced (a schedule inside jit) and gets no gradient.
  g_lam = jax.jit(jax.grad(lambda lam: f(losses.gradient_reversal(x, lam)), argnums=0))(0.5)
  assert float(g_lam) == 0.0


def test_ctkd_temperature_ascends_the_kd_loss():
  """The gradient that reaches raw through the GRL is -lambda times the KD loss's own
  gradient, so a descent step on raw increases the KD loss (the adversary)."""
  s, t = _logits(4)
  t_min, t_max, lam = 1.0, 21.0, 0.8
  raw = losses.ctkd_raw_init(4.0, t_min=t_min, t_max=t_max)
  temp = losses.ctkd_temperature(raw, lam, t_min=t_min, t_max=t_max)
  np.testing.assert_allclose(float(temp), 4.0, rtol=1e-6)
  kd_of_raw = lambda r, lam: losses.kd_loss(
      s, t, losses.ctkd_temperature(r, lam, t_min=t_min, t_max=t_max))
  g = float(jax.grad(kd_of_raw)(raw, lam))
  # The KD loss's gradient without reversal: d KD / d T * d T / d raw.
  d_kd_d_t = float(jax.grad(lambda T: losses.kd_loss(s, t, T))(temp))
  sig = float(jax.nn.sigmoid(raw))
  true_grad = d_kd_d_t * (t_max - t_min) * sig * (1 - sig)
  assert true_grad != 0
  np.testing.assert_allclose(g, -lam * true_grad, rtol=1e-5)
  stepped = raw - 0.5 * g  # What the student's optimizer does.
  assert float(kd_of_raw(stepped, lam)) > float(kd_of_raw(raw, lam))
  # Joint step: the student lowers the loss at a fixed temperature, the temperature raises it.
  grads = jax.grad(lambda s, r: losses.kd_loss(
      s, t, losses.ctkd_temperature(r, lam, t_min=t_min, t_max=t_max)), argnums=(0, 1))(s, raw)
  t_after = losses.ctkd_temperature(raw - 0.5 * grads[1], lam, t_min=t_min, t_max=t_max)
  assert float(losses.kd_loss(s, t, t_after)) > float(losses.kd_loss(s, t, temp))
  assert float(losses.kd_loss(s - 0.5 * grads[0], t, temp)) < float(losses.kd_loss(s, t, temp))


def test_cosine_lambda_schedule():
  np.testing.assert_allclose(
      [float(losses.cosine_lambda(e, 10, 2.0)) for e in (0, 2.5, 5, 10, 15)],
      [0.0, 2.0 * (1 - np.cos(np.pi / 4)) / 2, 1.0, 2.0, 2.0], atol=1e-6)
  with pytest.raises(errors.ConfigError):
    losses.ctkd_raw_init(30.0)


def test_fdd_cka_loss_on_layer_updates():
  rng = np.random.default_rng(5)
  teacher = jnp.float32(np.cumsum(rng.normal(size=(5, 2, 6, 16)), axis=0))  # 4 blocks.
  deltas = losses.layer_deltas(teacher)
  chex.assert_shape(deltas, (4, 2, 6, 16))
  q, _ = np.linalg.qr(rng.normal(size=(16, 8)))  # Student: rotated, narrower, scaled.
  student_deltas = 3.0 * deltas[jnp.array([1, 3])] @ jnp.float32(q)
  student = jnp.concatenate([jnp.zeros((1, 2, 6, 8)), jnp.cumsum(student_deltas, 0)], 0)
  assert losses.default_layer_map(2, 4) == (1, 3)
  # An orthogonal projection to 8 of 16 dims is not a rotation, so compare against CKA.
  want = np.mean([1 - float(losses.cka_lib.linear_cka(
      student_deltas[i].reshape(-1, 8), deltas[j].reshape(-1, 16)))
      for i, j in enumerate((1, 3))])
  np.testing.assert_allclose(float(losses.fdd_cka_loss(student, teacher)), want, rtol=1e-5)
  same = losses.fdd_cka_loss(teacher, 2.0 * teacher, layer_map=(0, 1, 2, 3))
  assert float(same) == pytest.approx(0.0, abs=1e-5)
  mask = jnp.asarray(rng.integers(0, 2, (2, 6)))
  g = jax.grad(lambda s: losses.fdd_cka_loss(s, teacher, mask=mask))(student)
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
  with pytest.raises(errors.ShapeError):
    losses.fdd_cka_loss(student, teacher, layer_map=(0, 4))
