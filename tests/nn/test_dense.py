"""ponder.nn.dense.Dense against flax.linen.Dense: same parameters, same values and
gradients; the vision models' smoke losses and gradients unchanged by it."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dendritic_liquid_vit as dlv_config
from configs import vit as vit_config
from ponder.nn import dense
from train import tasks


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


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


_SMOKE = {"vit": (vit_config, "smoke", {}),
          "dendritic_liquid_vit": (dlv_config, "smoke,scratch", {"step": 50}),
          "dendritic_vit": (dlv_config, "smoke,variant=dendritic_vit", {})}


@pytest.mark.parametrize("name", list(_SMOKE))
def test_vision_smoke_losses_and_gradients_are_unchanged(name, monkeypatch):
  config, arg, extra = _SMOKE[name]
  cfg = config.get_config(arg)
  model = tasks.build_model(cfg.model, num_classes=10)
  side = 4 * cfg.model.patch  # 16 patch tokens.
  batch = {"image": _normal(3, (8, side, side, 1)), "label": jnp.arange(8) % 10}
  params = jax.jit(lambda k: model.init(k, batch["image"]))(jax.random.key(0))["params"]
  leaves, tree = jax.tree.flatten(params)  # Non-zero everywhere (the head starts at 0).
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  def loss_and_grad():
    loss = lambda p: tasks.classification_loss(
        p, batch, jax.random.key(5), model=model, label_smoothing=0.0, train=True, **extra)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  loss, grads = loss_and_grad()
  monkeypatch.setattr(dense, "Dense", dense.FlaxDense)  # Every model's dense layers, as before.
  reference_loss, reference_grads = loss_and_grad()
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, reference_grads, atol=1e-6, rtol=1e-5)
