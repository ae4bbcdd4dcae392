"""ponder.nn.dense.Dense against flax.linen.Dense: same parameters, same values and
gradients; every model family's training loss and gradients unchanged by it."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder.nn import dense
from tests.nn import model_steps

_normal = model_steps.normal


@pytest.mark.parametrize("shape", [(5, 8), (3, 7, 8), (2, 3, 4, 8)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_same_parameters_values_and_gradients_as_nn_dense(shape, use_bias):
  x = _normal(0, shape)
  ours, theirs = (cls(6, use_bias=use_bias, kernel_init=nn.initializers.normal(1.0))
                  for cls in (dense.Dense, nn.Dense))
  params = ours.init(jax.random.key(1), x)
  reference = theirs.init(jax.random.key(1), x)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  chex.assert_trees_all_equal(params, reference)  # Same names, shapes, initial values.
  y = jax.jit(ours.apply)(params, x)
  chex.assert_shape(y, shape[:-1] + (6,))
  chex.assert_trees_all_close(y, jax.jit(theirs.apply)(params, x), atol=1e-6, rtol=1e-6)

  def grads(module):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), (0, 1)))(
        params, x)

  chex.assert_trees_all_close(grads(ours), grads(theirs), atol=1e-6, rtol=1e-6)


def test_weight_gradient_needs_no_transposed_copy():
  # The reason for the layer: on [batch, tokens, features] the weight gradient of
  # nn.Dense contracts two axes, and XLA:CPU copies the output gradient transposed first.
  x = _normal(2, (4, 17, 32))
  layer = dense.Dense(48)
  params = layer.init(jax.random.key(0), x)
  hlo = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))).lower(
      params).compile().as_text()
  assert " transpose(" not in hlo


@pytest.mark.parametrize("name", list(model_steps.LOSSES))
def test_every_model_s_losses_and_gradients_are_unchanged(name, monkeypatch):
  loss, params, _ = model_steps.LOSSES[name]("float32")
  value_and_grad = lambda: jax.jit(jax.value_and_grad(loss))(params)
  value, grads = value_and_grad()
  monkeypatch.setattr(dense, "Dense", dense.FlaxDense)  # Every model's dense layers, as before.
  reference_value, reference_grads = value_and_grad()
  np.testing.assert_allclose(value, reference_value, rtol=1e-6)
  chex.assert_trees_all_close(grads, reference_grads, atol=1e-6, rtol=1e-5)
