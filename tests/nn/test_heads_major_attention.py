"""Heads-major attention against flax's dot_product_attention: values and gradients."""

import chex
import flax.linen as nn
import jax
import pytest

from ponder.nn import heads_major_attention


def _inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (2, 65, 4, 32)) for k in keys]  # The seed ViT's shapes.


def test_values_and_gradients_equal_flax_attention():
  q, k, v = _inputs()
  chex.assert_trees_all_close(heads_major_attention.dot_product_attention(q, k, v),
                              nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda *a: (f(*a) ** 2).sum()
  ours = jax.grad(loss(heads_major_attention.dot_product_attention), argnums=(0, 1, 2))
  theirs = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))
  chex.assert_trees_all_close(ours(q, k, v), theirs(q, k, v), rtol=1e-4, atol=1e-5)


def test_dropout_keeps_the_expected_mass_and_a_mask_is_refused():
  q, k, v = _inputs()
  out = heads_major_attention.dot_product_attention(
      q, k, v, dropout_rate=0.5, deterministic=False, dropout_rng=jax.random.key(1))
  chex.assert_shape(out, q.shape)
  chex.assert_tree_all_finite(out)
  with pytest.raises(TypeError, match="mask"):
    heads_major_attention.dot_product_attention(q, k, v, mask=None)
