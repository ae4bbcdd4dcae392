"""DendriticGate: the seed's parameter count, its init, and a per-branch jnp reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder.nn import dendrites


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(gate, x, seed=0):
  return jax.jit(gate.init)(jax.random.key(seed), x)["params"]


def test_seed_parameter_count():
  # 4 branches x (256 x 64 + 64 hidden, 64 x 1 + 1 output) = 4 x 16,513 = 66,052.
  gate = dendrites.DendriticGate(num_branches=4, hidden_dim=64)
  shapes = jax.eval_shape(lambda: gate.init(jax.random.key(0), jnp.zeros((1, 65, 256))))
  assert _count(shapes) == 66_052 == 4 * (256 * 64 + 64 + 64 * 1 + 1)


def _reference(params, x):
  """Branch by branch, written from the equation, independently of the module."""
  branch_outputs = []
  for k in range(params["soma_bias"].shape[0]):
    w1 = params["dendrites"]["kernel"][:, k, :]
    b1 = params["dendrites"]["bias"][k]
    hidden = jax.nn.gelu(x @ w1 + b1, approximate=False)
    branch_outputs.append(hidden @ params["soma_kernel"][k] + params["soma_bias"][k])
  return 1.0 / (1.0 + jnp.exp(-jnp.max(jnp.stack(branch_outputs, -1), axis=-1)))


@pytest.mark.parametrize("branches,hidden", [(3, 5), (1, 8)])
def test_matches_reference(branches, hidden):
  x = _normal(1, (2, 7, 12))
  gate = dendrites.DendriticGate(num_branches=branches, hidden_dim=hidden)
  params = _init(gate, x)
  params = jax.tree.map(  # Move the biases away from their init so they are tested too.
      lambda p: p + 0.1 * _normal(3, p.shape), params)
  out = gate.apply({"params": params}, x)
  assert out.shape == (2, 7)
  chex.assert_trees_all_close(out, _reference(params, x), atol=1e-6)


def test_initial_importance_is_high_so_nothing_is_pruned():
  x = _normal(4, (4, 33, 32))
  gate = dendrites.DendriticGate(num_branches=4, hidden_dim=16)
  params = _init(gate, x)
  importance = np.asarray(gate.apply({"params": params}, x))
  assert np.all((importance > 0.5) & (importance < 1.0))
  # The max over zero-mean branches is positive on average: at least sigmoid(2).
  assert importance.mean() > 1 / (1 + np.exp(-2.0))
  # With silent branches the importance is exactly sigmoid(bias) = sigmoid(2) = 0.88.
  silent = dict(params, soma_kernel=jnp.zeros_like(params["soma_kernel"]))
  chex.assert_trees_all_close(gate.apply({"params": silent}, x),
                              jnp.full((4, 33), jax.nn.sigmoid(2.0)), atol=1e-7)


def test_gradients_reach_every_branch():
  x = _normal(6, (2, 16, 8))
  gate = dendrites.DendriticGate(num_branches=3, hidden_dim=4)
  params = _init(gate, x)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(gate.apply({"params": p}, x) * jnp.arange(16.0))))(params)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  # The max routes each token's gradient to one branch; over 32 tokens every branch
  # wins somewhere, so every branch's output weights get a gradient.
  assert np.all(np.abs(np.asarray(grads["soma_kernel"])).sum(axis=1) > 0)
