"""Spiking units: ternary spikes with learnable alpha/theta, the LIF neuron and its
surrogate, and the spiking dense layer's packed ternary_matmul path."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ternary import surrogate_spike
from ponder import errors
from ponder.nn import spiking

EPS = 1e-6


def _central(f, x, eps=EPS):
  """Central finite differences of the scalar f at every entry of x (float64)."""
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    grad[idx] = (f(up) - f(down)) / (2 * eps)
  return grad


def _ternary_inputs(seed, shape=(2, 3, 6)):
  rng = np.random.default_rng(seed)
  alpha = rng.uniform(0.5, 2.0, shape[-1])
  theta = rng.uniform(0.2, 1.0, shape[-1])
  x = rng.normal(size=shape)
  # Off the kinks |x| = theta, where finite differences of the surrogate straddle one.
  x = np.where(np.abs(np.abs(x) - theta) < 0.02, x + 0.05, x)
  return x, alpha, theta


def test_ternary_spike_values_and_parameters():
  x, _, _ = _ternary_inputs(0)
  unit = spiking.TernarySpike(alpha_init=1.5, theta_init=0.5)
  params = unit.init(jax.random.key(0), jnp.float32(x))["params"]
  chex.assert_trees_all_equal(params, {"alpha": jnp.full(6, 1.5), "theta": jnp.full(6, 0.5)})
  s = np.asarray(unit.apply({"params": params}, jnp.float32(x)))
  want = np.where(x >= 0.5, 1.5, np.where(x <= -0.5, -1.5, 0.0))
  np.testing.assert_array_equal(s, want.astype(np.float32))
  codes, alpha = unit.apply({"params": params}, jnp.float32(x), return_codes=True)
  np.testing.assert_array_equal(np.asarray(codes) * 1.5, s)


def test_ternary_surrogate_gradients_reach_alpha_and_theta():
  """Gradients through the module's parameters: nonzero, and equal to finite
  differences of the spike (alpha: it is linear in alpha) and of the documented
  surrogate `kernels.ternary.surrogate_spike` (x and theta), in float64."""
  x, alpha, theta = _ternary_inputs(1, shape=(4, 6, 6))
  ct = np.random.default_rng(2).normal(size=x.shape)
  unit = spiking.TernarySpike()
  with jax.enable_x64(True):
    loss = lambda p, x: jnp.sum(ct * unit.apply({"params": p}, x))
    params = {"alpha": jnp.asarray(alpha), "theta": jnp.asarray(theta)}
    grads, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    surrogate = lambda x, a, t: float(jnp.sum(ct * surrogate_spike(x, a, t)))
    spike = lambda a: float(loss({"alpha": jnp.asarray(a), "theta": jnp.asarray(theta)},
                                 jnp.asarray(x)))
    want_alpha = _central(spike, alpha)
    want_theta = _central(lambda t: surrogate(x, alpha, t), theta)
    want_x = _central(lambda x: surrogate(x, alpha, theta), x)
  assert np.abs(grads["alpha"]).min() > 0 and np.abs(grads["theta"]).min() > 0
  np.testing.assert_allclose(grads["alpha"], want_alpha, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grads["theta"], want_theta, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(gx, want_x, rtol=1e-6, atol=1e-8)


def test_heaviside_atan_surrogate_is_the_arctan_derivative():
  u = np.linspace(-2, 2, 41) + 0.013
  with jax.enable_x64(True):
    h = spiking.heaviside_atan(jnp.asarray(u), 2.0)
    g = jax.grad(lambda u: jnp.sum(spiking.heaviside_atan(u, 2.0)))(jnp.asarray(u))
    want = _central(lambda u: float(jnp.sum(spiking.atan_surrogate(jnp.asarray(u), 2.0))), u)
  np.testing.assert_array_equal(np.asarray(h), (u >= 0).astype(float))
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6)
  with jax.enable_x64(True):  # Peak a/2 = 1 at u = 0.
    assert float(jax.grad(lambda u: spiking.heaviside_atan(u, 2.0))(0.0)) == 1.0


def _lif_numpy(x, v0, tau, threshold, reset_pattern=None, smooth=False, alpha=2.0):
  """SpikeGPT's LIF loop, numpy: charge, fire, hard reset. With `reset_pattern` the
  resets are fixed (detach_reset) and `smooth` replaces the step by the arctan
  surrogate: the function whose gradient the LIF's backward pass is."""
  v, spikes, fired = v0.copy(), [], []
  for t in range(x.shape[-2]):
    h = v + (x[..., t, :] - v) / tau
    hard = (h >= threshold).astype(x.dtype)
    s = np.arctan(np.pi / 2 * alpha * (h - threshold)) / np.pi + 0.5 if smooth else hard
    r = hard if reset_pattern is None else reset_pattern[..., t, :]
    v = h * (1 - r)
    spikes.append(s)
    fired.append(hard)
  return np.stack(spikes, -2), v, np.stack(fired, -2)


def test_lif_matches_the_loop_and_continues_from_its_state():
  rng = np.random.default_rng(3)
  x = rng.normal(1.0, 1.5, size=(2, 12, 5)).astype(np.float32)
  s, v = spiking.lif(jnp.asarray(x), tau=2.0, threshold=1.0)
  want_s, want_v, _ = _lif_numpy(x, np.zeros((2, 5), np.float32), 2.0, 1.0)
  np.testing.assert_array_equal(np.asarray(s), want_s)
  np.testing.assert_allclose(np.asarray(v), want_v, rtol=1e-6)
  assert 0.1 < want_s.mean() < 0.9
  s1, v1 = spiking.lif(jnp.asarray(x[:, :5]))
  s2, v2 = spiking.lif(jnp.asarray(x[:, 5:]), v1)
  np.testing.assert_array_equal(np.concatenate([s1, s2], 1), np.asarray(s))
  chex.assert_trees_all_close(v2, v)


def test_lif_surrogate_gradient_matches_finite_differences():
  rng = np.random.default_rng(4)
  x = rng.normal(1.0, 1.5, size=(2, 6, 3))
  ct = rng.normal(size=x.shape)
  _, _, fired = _lif_numpy(x, np.zeros((2, 3)), 2.0, 1.0)
  with jax.enable_x64(True):
    g = jax.grad(lambda x: jnp.sum(ct * spiking.lif(x, tau=2.0, threshold=1.0)[0]))(
        jnp.asarray(x))
  smooth = lambda x: float(np.sum(ct * _lif_numpy(
      x, np.zeros((2, 3)), 2.0, 1.0, reset_pattern=fired, smooth=True)[0]))
  np.testing.assert_allclose(np.asarray(g), _central(smooth, x), rtol=1e-5, atol=1e-8)
  assert np.abs(np.asarray(g)).min() > 0


@pytest.mark.parametrize("spike", ["ternary", "lif"])
def test_packed_spiking_dense_equals_dense_on_decoded_spikes(spike):
  """`ternary_matmul` on packed codes == a plain matmul of the decoded spikes (the
  codes unpacked from the same bytes, times alpha) with the kernel."""
  rng = np.random.default_rng(5)
  x = jnp.float32(rng.normal(0.5, 1.5, size=(2, 7, 24)))  # K = 24: not a multiple of 16.
  dense = spiking.SpikingDense(9, spike=spike)
  params = dense.init(jax.random.key(1), x)["params"]
  if spike == "ternary":  # Spread the per-channel parameters.
    params = {**params, "spike": {"alpha": jnp.float32(rng.uniform(0.5, 2, 24)),
                                  "theta": jnp.float32(rng.uniform(0.2, 1, 24))}}
  packed = spiking.SpikingDense(9, spike=spike, matmul="packed")
  y_packed, v_packed = packed.apply({"params": params}, x)
  y_dense, v_dense = dense.apply({"params": params}, x)
  if spike == "ternary":
    codes, alpha = spiking.TernarySpike().apply({"params": params["spike"]}, x,
                                                return_codes=True)
  else:
    codes, alpha = spiking.lif(x)[0].astype(jnp.int8), jnp.ones(24)
  import ponder.ops  # pylint: disable=g-import-not-at-top
  decoded = ponder.ops.unpack_ternary(
      ponder.ops.pack_ternary(codes.reshape(-1, 24)), 24, jnp.float32)
  want = (decoded * alpha) @ params["kernel"]
  chex.assert_trees_all_close(y_packed.reshape(-1, 9), want, atol=1e-5, rtol=1e-6)
  chex.assert_trees_all_close(y_dense, y_packed, atol=1e-5, rtol=1e-6)
  chex.assert_trees_all_equal(v_packed, v_dense)
  assert 0 < float(jnp.mean(codes != 0)) < 1


def test_lif_dense_is_causal():
  """Output token t depends on inputs of tokens <= t only (the threshold and the
  membrane never look ahead)."""
  x = jnp.float32(np.random.default_rng(6).normal(1.0, 1.0, size=(1, 6, 4)))
  dense = spiking.SpikingDense(3, spike="lif")
  params = dense.init(jax.random.key(0), x)["params"]
  # Through the surrogate: d y_t / d x_s must vanish for s > t.
  jac = jax.jacobian(lambda x: dense.apply({"params": params}, x)[0])(x)[0, :, :, 0]
  future = np.triu(np.ones((6, 6), bool), 1)  # [t, s] with s > t.
  assert not np.asarray(jac).transpose(0, 2, 1, 3)[future].any()


def test_unknown_spike_raises():
  with pytest.raises(errors.ConfigError, match="spike"):
    spiking.SpikingDense(3, spike="izhikevich").init(jax.random.key(0), jnp.ones((1, 2, 4)))
