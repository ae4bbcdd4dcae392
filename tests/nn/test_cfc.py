"""CfCCell against the paper's equations written in plain jnp, at and away from extremes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder import errors
from ponder.nn import cfc

FEATURES, IN = 6, 5


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _backbone(p, x, h, layers):
  z = jnp.concatenate([x, h], -1)
  for i in range(layers):
    d = p[f"backbone{i}"]
    z = 1.7159 * jnp.tanh(0.666 * (z @ d["kernel"] + d["bias"]))
  return z


def _linear(p, name, z):
  return z @ p[name]["kernel"] + p[name]["bias"]


def _reference(p, x, h, t, mode, layers=1):
  """Eq. 10 (default), its no-gate ablation and the direct solution of Eq. 2 (pure)."""
  z = _backbone(p, x, h, layers)
  if mode == "pure":
    f = _linear(p, "ff1", z)
    return (0.0 - p["A"]) * jnp.exp(-(jnp.abs(p["w_tau"]) + jnp.abs(f)) * t) * f + p["A"]
  g1, g2 = jnp.tanh(_linear(p, "ff1", z)), jnp.tanh(_linear(p, "ff2", z))
  gate = 1.0 / (1.0 + jnp.exp(-(_linear(p, "time_a", z) * t + _linear(p, "time_b", z))))
  if mode == "no_gate":
    return g1 + gate * g2
  return (1.0 - gate) * g1 + gate * g2


@functools.lru_cache(maxsize=None)  # One compiled init per configuration.
def _setup(mode, layers=1):
  cell = cfc.CfCCell(FEATURES, backbone_units=8, backbone_layers=layers, mode=mode)
  x, h = _normal(0, (2, 3, IN)), _normal(1, (2, 3, FEATURES))
  t = jnp.asarray(np.random.default_rng(2).uniform(0, 2, (2, 3, 1)), jnp.float32)
  params = jax.jit(cell.init)(jax.random.key(0), x, h, t)["params"]
  return cell, params, x, h, t


@pytest.mark.parametrize("mode,layers", [("default", 2), ("no_gate", 1), ("pure", 1)])
def test_matches_reference(mode, layers):
  cell, params, x, h, t = _setup(mode, layers)
  # Nonzero biases, w_tau and A, so every parameter enters the comparison.
  params = jax.tree.map(lambda p: p + 0.3 * _normal(p.size, p.shape), params)
  out = jax.jit(cell.apply)({"params": params}, x, h, t)
  assert out.shape == (2, 3, FEATURES)
  reference = jax.jit(_reference, static_argnums=(4, 5))
  chex.assert_trees_all_close(out, reference(params, x, h, t, mode, layers), atol=1e-5)
  if mode == "default":  # A scalar time (normalised layer time) broadcasts the same way.
    chex.assert_trees_all_close(jax.jit(cell.apply)({"params": params}, x, h, 0.5),
                                reference(params, x, h, 0.5, mode, layers), atol=1e-5)


def _force_gate(params, value):
  """Parameters whose gate sigma is exactly `value` (0 or 1) for every input."""
  p = jax.tree.map(lambda a: a, params)
  p["time_a"] = jax.tree.map(jnp.zeros_like, p["time_a"])
  p["time_b"] = {"kernel": jnp.zeros_like(p["time_b"]["kernel"]),
                 "bias": jnp.full_like(p["time_b"]["bias"], 1e3 if value else -1e3)}
  return p


@pytest.mark.parametrize("mode", ["default", "no_gate"])
def test_gate_extremes(mode):
  cell, params, x, h, t = _setup(mode)
  z = jax.jit(_backbone, static_argnums=3)(params, x, h, 1)
  g1, g2 = jnp.tanh(_linear(params, "ff1", z)), jnp.tanh(_linear(params, "ff2", z))
  apply = jax.jit(cell.apply)
  closed = apply({"params": _force_gate(params, 0)}, x, h, t)
  opened = apply({"params": _force_gate(params, 1)}, x, h, t)
  chex.assert_trees_all_close(closed, g1, atol=1e-6)  # sigma = 0: h' = tanh(W_1 z).
  chex.assert_trees_all_close(opened, g2 if mode == "default" else g1 + g2, atol=1e-6)


@pytest.mark.parametrize("mode", cfc.MODES)
def test_gradients_finite_for_large_inputs(mode):
  cell, params, x, h, t = _setup(mode)
  big_x, big_h, big_t = 1e4 * x, 1e4 * h, 1e3 * t

  def loss(p, x, h, t):
    return jnp.sum(cell.apply({"params": p}, x, h, t) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
      params, big_x, big_h, big_t)
  for leaf in jax.tree.leaves((value, grads)):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_neutral_bias_init():
  _, params, *_ = _setup("default")
  for name in ("backbone0", "ff1", "ff2", "time_a", "time_b"):
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  _, pure, *_ = _setup("pure")
  np.testing.assert_array_equal(pure["w_tau"], 0.0)
  np.testing.assert_array_equal(pure["A"], 1.0)


def test_bad_arguments_are_explained():
  x, h = jnp.zeros((1, IN)), jnp.zeros((1, FEATURES))
  with pytest.raises(errors.ConfigError, match="no_gate"):
    cfc.CfCCell(FEATURES, mode="gated").init(jax.random.key(0), x, h, 1.0)
  with pytest.raises(errors.ShapeError, match="features"):
    cfc.CfCCell(FEATURES + 1).init(jax.random.key(0), x, h, 1.0)
