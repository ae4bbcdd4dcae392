"""ponder.nn.layer_norm against flax.linen.LayerNorm: same parameters, values and
gradients (autodiff of flax's), on 2-D and 3-D inputs."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder.nn import layer_norm


@pytest.mark.parametrize("shape", [(6, 32), (2, 5, 48)])
def test_values_and_gradients_equal_flax_layer_norm(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  ours, theirs = layer_norm.LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6)
  params = ours.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(params, theirs.init(jax.random.key(0), x))
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  chex.assert_trees_all_close(jax.jit(ours.apply)(params, x),
                              jax.jit(theirs.apply)(params, x), atol=1e-5)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def grads(module):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(weights * jnp.tanh(module.apply(p, x))),
                            (0, 1)))(params, x)

  chex.assert_trees_all_close(grads(ours), grads(theirs), atol=1e-5, rtol=1e-5)
