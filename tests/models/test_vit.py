"""ViT: parameter counts against the seed document, attention against plain jnp."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import vit


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("qkv_bias,expected", [(False, 4_766_474), (True, 4_771_082)])
def test_seed_config_parameter_count(qkv_bias, expected):
  # The seed's 4,766,474 is this model without qkv biases (6 blocks x 768 fewer).
  model = vit.ViT(num_classes=10, patch=4, width=256, depth=6, heads=8, qkv_bias=qkv_bias)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert _count(shapes) == expected


def _reference_attention(p, x, heads):
  """Textbook multi-head attention, written independently of the module."""
  b, n, d = x.shape
  qkv = x @ p["qkv"]["kernel"] + p["qkv"].get("bias", 0.0)
  q, k, v = jnp.split(qkv, 3, axis=-1)
  split = lambda t: t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  w = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), axis=-1)
  out = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_attention_matches_reference():
  x = jax.random.normal(jax.random.key(1), (2, 9, 32))
  layer = vit.SelfAttention(num_heads=4)
  params = layer.init(jax.random.key(2), x, train=False)["params"]
  chex.assert_trees_all_close(layer.apply({"params": params}, x, train=False),
                              _reference_attention(params, x, 4), atol=1e-5)


def test_forward_shapes_and_class_token_readout():
  model = vit.ViT(num_classes=7, patch=2, width=32, depth=2, heads=4)
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  params = model.init(jax.random.key(1), images)["params"]
  # Zero-initialised head: logits start at exactly zero (a well-posed first step).
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  chex.assert_shape(logits, (3, 7))
  chex.assert_trees_all_close(logits, jnp.zeros_like(logits))
  assert params["embed"]["pos_embedding"].shape == (1, 16 + 1, 32)


def test_dropout_uses_explicit_rng_and_eval_is_deterministic():
  model = vit.ViT(num_classes=3, patch=2, width=16, depth=1, heads=2, dropout=0.5)
  images = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  params = model.init(jax.random.key(1), images)["params"]
  # A random (non-zero) head so that dropout shows in the logits.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  train = lambda k: model.apply({"params": params}, images, train=True, rngs={"dropout": k})
  chex.assert_trees_all_close(train(jax.random.key(3)), train(jax.random.key(3)))
  assert not np.allclose(train(jax.random.key(3)), train(jax.random.key(4)))
  chex.assert_trees_all_close(model.apply({"params": params}, images),
                              model.apply({"params": params}, images))
