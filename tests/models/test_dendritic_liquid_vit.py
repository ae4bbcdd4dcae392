"""DendriticViT and DendriticLiquidViT: shapes, parameter counts, reduction to the ViT,
pruning at init, the straight-through gradient and compiled FLOPs of the pruned path."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import dendritic_liquid_vit as dlv
from models import vit
from ponder import errors
from ponder.analysis import flops
from ponder.nn import token_pruning

# A small model: 8x8 images in 2x2 patches = 16 patch tokens + the class token.
SMALL = dict(num_classes=5, patch=2, width=32, depth=4, heads=4)
LIQUID = dict(SMALL, stages=(1, 2, 3), keep_ratio=0.5, anneal_steps=100,
              soft_warmup_steps=10, cfc_backbone_units=16, hidden_dim=8)


def _images(b=3, seed=0, size=8):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 1))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _perturb(params, seed=7, scale=0.1):
  """Random non-zero values everywhere (the zero-initialised head hides differences)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _init(kind, **overrides):
  model = kind(**{**(SMALL if kind is dlv.DendriticViT else LIQUID), **overrides})
  params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), _images())
  return model, params["params"]


def _vit_params(params):
  """The parameters a plain ViT has: everything but gates, predictors and the CfC path."""
  return {k: v for k, v in params.items()
          if not k.startswith(("gate", "predictor", "cfc", "liquid_out"))}


def test_seed_size_dendritic_vit_parameter_count():
  # The seed document: 66,052 per gate (dim 256, 4 branches, hidden 64), 6 gates on its
  # 4,766,474-parameter ViT (no qkv bias): 4,766,474 + 396,312.
  model = dlv.DendriticViT(num_classes=10, patch=4, width=256, depth=6, heads=8,
                           qkv_bias=False)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert _count(shapes) == 4_766_474 + 6 * 66_052


def test_shapes_and_aux():
  model, params = _init(dlv.DendriticLiquidViT)
  x = _images()
  logits, aux = model.apply({"params": params}, x, train=True, step=50, return_aux=True,
                            rngs={"dropout": jax.random.key(2)})
  chex.assert_shape(logits, (3, 5))
  assert len(aux["keep_masks"]) == len(aux["importance"]) == 3
  chex.assert_shape(aux["keep_masks"], [(3, 17)] * 3)
  chex.assert_shape(aux["final_tokens"], (3, 17, 32))
  logits, aux = model.apply({"params": params}, x, train=False, return_aux=True)
  chex.assert_shape(logits, (3, 5))
  # 16 patches -> 8 -> 4 -> 2 kept at keep_ratio 0.5.
  assert aux["num_tokens"] == [9, 5, 3] == dlv.kept_tokens(17, 0.5, 3)
  chex.assert_shape(aux["final_tokens"], (3, 3, 32))
  assert aux["keep_masks"] == []
  chex.assert_shape(aux["importance"], [(3, 17), (3, 9), (3, 5)])
  # Kept positions: the class token first, increasing, each stage a subset of the last.
  previous = np.broadcast_to(np.arange(17), (3, 17))
  for kept, n in zip(aux["kept_positions"], aux["num_tokens"]):
    kept = np.asarray(kept)
    chex.assert_shape(kept, (3, n))
    assert (kept[:, 0] == 0).all() and (np.diff(kept, axis=1) > 0).all()
    assert all(set(k) <= set(p) for k, p in zip(kept, previous))
    previous = kept
  model, params = _init(dlv.DendriticViT)
  logits, aux = model.apply({"params": params}, x, return_aux=True)
  chex.assert_shape(logits, (3, 5))
  chex.assert_shape(aux["importance"], [(3, 17)] * 4)


def test_bad_stages_are_config_errors():
  with pytest.raises(errors.ConfigError, match="stages"):
    dlv.DendriticLiquidViT(**{**LIQUID, "stages": (2, 1)}).init(jax.random.key(0), _images())
  with pytest.raises(errors.ConfigError, match="stages"):
    dlv.DendriticLiquidViT(**{**LIQUID, "stages": (4,)}).init(jax.random.key(0), _images())


@pytest.mark.parametrize("scale_residual", [False, True])
def test_dendritic_vit_reduces_to_vit(scale_residual):
  # Importance forced to 1 (huge soma bias) or not used at all: exactly the ViT.
  model, params = _init(dlv.DendriticViT, scale_residual=scale_residual)
  params = _perturb(params)
  if scale_residual:
    params = {k: (dict(v, soma_bias=v["soma_bias"] + 100.0) if k.startswith("gate") else v)
              for k, v in params.items()}
  base = vit.ViT(**SMALL)
  x = _images()
  chex.assert_trees_all_close(model.apply({"params": params}, x),
                              base.apply({"params": _vit_params(params)}, x), atol=1e-5)
  if scale_residual:  # A real importance changes the output.
    damped = {k: (dict(v, soma_bias=v["soma_bias"] - 104.0) if k.startswith("gate") else v)
              for k, v in params.items()}
    assert not np.allclose(model.apply({"params": damped}, x),
                           base.apply({"params": _vit_params(params)}, x), atol=1e-3)


def _neutral(params, keep_everything=False):
  """The liquid readout forced to zero (the CfC path adds nothing) and, optionally, the
  predictors' keep logits forced up so that training keeps every token."""
  out = {}
  for k, v in params.items():
    if k.startswith("liquid_out"):
      v = jax.tree.map(jnp.zeros_like, v)
    if keep_everything and k.startswith("predictor"):
      v = dict(v, logits=dict(v["logits"], bias=v["logits"]["bias"].at[1].add(1e3)))
    out[k] = v
  return out


def test_liquid_state_only_at_the_stages_costs_less():
  everywhere, p_all = _init(dlv.DendriticLiquidViT)
  at_stages, p_stages = _init(dlv.DendriticLiquidViT, liquid_blocks="stages", stages=(1, 3))
  assert sorted(k for k in p_stages if k.startswith("liquid_out")) == [
      "liquid_out1", "liquid_out3"]
  x = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32)
  cost = lambda m, p: flops.compiled_flops(lambda p, x: m.apply({"params": p}, x), p, x)
  assert cost(at_stages, p_stages) < cost(everywhere.clone(stages=(1, 3)), p_all)


def test_liquid_vit_with_neutral_gate_and_full_keep_ratio_is_the_vit():
  model, params = _init(dlv.DendriticLiquidViT, keep_ratio=1.0)
  params = _neutral(_perturb(params), keep_everything=True)
  x = _images()
  expected = vit.ViT(**SMALL).apply({"params": _vit_params(params)}, x)
  # Inference with keep ratio 1.0 gathers every token (in order).
  chex.assert_trees_all_close(model.apply({"params": params}, x), expected, atol=1e-5)
  # Training whose predictors keep everything: the policy attention is plain attention.
  out, aux = model.apply({"params": params}, x, train=True, step=1000, return_aux=True,
                         rngs={"dropout": jax.random.key(3)})
  assert all(bool(jnp.all(m == 1.0)) for m in aux["keep_masks"])
  chex.assert_trees_all_close(out, expected, atol=1e-5)
  # The liquid path, once not neutral, changes the output.
  live = dict(params, **{k: _perturb(v, seed=11) for k, v in params.items()
                         if k.startswith("liquid_out")})
  assert not np.allclose(model.apply({"params": live}, x), expected, atol=1e-3)


def test_training_masks_at_init_prune_gently_and_monotonically():
  model, params = _init(dlv.DendriticLiquidViT)
  x = _images(b=64, seed=5)
  _, aux = jax.jit(lambda p, k: model.apply({"params": p}, x, train=True, step=1000,
                                            return_aux=True, rngs={"dropout": k}))(
      params, jax.random.key(4))
  prev = jnp.ones((64, 17))
  for s, (mask, a) in enumerate(zip(aux["keep_masks"], aux["importance"])):
    assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}  # Hard after the warm-up.
    assert bool(jnp.all(mask[:, 0] == 1.0))  # The class token is always kept.
    assert bool(jnp.all(mask <= prev))  # A dropped token stays dropped.
    prev = mask
    # The dendritic bias (+2) makes the gate's keep odds ~e^2 at init, so each stage keeps
    # ~80-95% of the tokens still there, far more than the target keep_ratio 0.5.
    assert float(a.mean()) > 0.85
    kept = float(mask[:, 1:].mean())
    assert 0.7 ** (s + 1) < kept <= 1.0, (s, kept)
  # Soft warm-up: masks in (0, 1), not 0/1.
  _, aux = model.apply({"params": params}, x, train=True, step=0, return_aux=True,
                       rngs={"dropout": jax.random.key(4)})
  soft = np.asarray(aux["keep_masks"][0][:, 1:])
  assert np.any((soft > 0.01) & (soft < 0.99))


def test_straight_through_gradient_reaches_the_predictor_and_gate():
  model, params = _init(dlv.DendriticLiquidViT)
  params = _perturb(params)
  x, labels = _images(b=8, seed=6), jnp.arange(8) % 5

  def loss(p):  # Classification only: the masks act through the policy attention.
    logits, aux = model.apply({"params": p}, x, train=True, step=1000, return_aux=True,
                              rngs={"dropout": jax.random.key(8)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), aux

  grads, aux = jax.grad(loss, has_aux=True)(params)
  assert any(float(m[:, 1:].mean()) < 1.0 for m in aux["keep_masks"])  # Hard drops happen.
  for name in ("predictor0", "predictor1", "gate0", "cfc", "block3"):
    norm = float(optax.global_norm(grads[name]))
    assert np.isfinite(norm) and norm > 0.0, (name, norm)


def test_inference_flops_fall_with_the_keep_ratio():
  x = jax.ShapeDtypeStruct((4, 16, 16, 1), jnp.float32)  # 64 patch tokens.
  counts = {}
  for rho in (1.0, 0.5, 0.25):
    model = dlv.DendriticLiquidViT(**{**LIQUID, "keep_ratio": rho, "depth": 4,
                                      "stages": (1, 2, 3)})
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
    counts[rho] = flops.compiled_flops(
        lambda p, im: model.apply(p, im, train=False), params, x)
  assert counts[0.25] < counts[0.5] < counts[1.0]
  # Attention and MLP dominate; 3 of 4 blocks run on far fewer tokens at 0.25.
  assert counts[0.25] < 0.6 * counts[1.0], counts


def test_keep_loss_gradient_reaches_a_saturated_gate():
  # Gate 0 pushed to u ~ +30, where sigmoid(u) is 1.0 in float32 and the log-odds of a
  # clipped importance (the first version) had zero gradient. The raw score still
  # carries the keep-ratio loss's gradient; checked against central differences of the
  # loss in the soft warm-up (smooth masks, fixed Gumbel noise).
  model, params = _init(dlv.DendriticLiquidViT, depth=2, stages=(1,))
  params = {k: (dict(v, soma_bias=v["soma_bias"] + 30.0) if k == "gate0" else v)
            for k, v in _perturb(params).items()}
  x = _images(b=4, seed=9)
  targets = model.keep_ratio_targets()

  def keep_loss(shift, p):
    p = dict(p, gate0=dict(p["gate0"], soma_bias=p["gate0"]["soma_bias"] + shift))
    _, aux = model.apply({"params": p}, x, train=True, step=0, return_aux=True,
                         rngs={"dropout": jax.random.key(5)})
    return token_pruning.keep_ratio_loss(aux["keep_masks"], targets), aux["importance"]

  (_, importance), (grad, grads) = jax.jit(
      jax.value_and_grad(keep_loss, argnums=(0, 1), has_aux=True))(0.0, params)
  assert bool(jnp.all(importance[0][:, 1:] == 1.0))  # Saturated in float32.
  eps = 0.05
  plus, minus = jax.jit(jax.vmap(lambda d: keep_loss(d, params)[0]))(jnp.array([eps, -eps]))
  assert abs(float(grad)) > 1e-5
  chex.assert_trees_all_close(grad, (plus - minus) / (2 * eps), rtol=0.05)
  # The gradient reaches the gate's branch weights and its learned scale too.
  for leaf in (grads["gate0"]["soma_kernel"], grads["gate_scale0"]):
    assert float(jnp.max(jnp.abs(leaf))) > 1e-6


@pytest.mark.parametrize("kind", [dlv.DendriticViT, dlv.DendriticLiquidViT])
def test_every_vit_parameter_has_the_same_path_and_shape(kind):
  # What init.from_workdir copies from a trained baseline (DynamicViT's fine-tuning):
  # every ViT leaf, found by path and shape; the rest is what the variant adds.
  shapes = lambda m: dict(jax.tree_util.tree_flatten_with_path(jax.eval_shape(
      lambda: m.init(jax.random.key(0), _images())["params"]))[0])
  base = shapes(vit.ViT(**SMALL))
  model = kind(**(SMALL if kind is dlv.DendriticViT else LIQUID))
  ours = shapes(model)
  copied = [k for k, v in base.items() if k in ours and ours[k].shape == v.shape]
  assert len(copied) == len(base)
  added = {jax.tree_util.keystr(k[:1]) for k in set(ours) - set(base)}
  prefixes = ("['gate", "['predictor", "['cfc", "['liquid_out")
  assert added and all(a.startswith(prefixes) for a in added), added


def test_keep_policies_rank_by_their_own_scores():
  # Same weights, same counts; only the ranking differs (the benchmark's ablations).
  model, params = _init(dlv.DendriticLiquidViT, depth=2, stages=(1,))
  params = _perturb(params)
  x = _images(b=2, seed=12)
  run = lambda policy: model.clone(keep_policy=policy).apply(
      {"params": params}, x, train=False, return_aux=True)[1]
  aux = {p: run(p) for p in dlv.KEEP_POLICIES}
  learned = aux["learned"]["keep_scores"][0]
  chex.assert_trees_all_close(aux["inverted"]["keep_scores"][0], -learned)
  # Pixel variance of each 2x2 patch, computed from the image directly.
  patches = np.asarray(x).reshape(2, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5)
  variance = patches.reshape(2, 16, 4).var(axis=-1)
  chex.assert_trees_all_close(aux["pixel_variance"]["keep_scores"][0][:, 1:], variance,
                              atol=1e-5)
  for policy, a in aux.items():
    assert a["num_tokens"] == aux["learned"]["num_tokens"]
    np.testing.assert_array_equal(a["kept_positions"][0],
                                  token_pruning.top_index(a["keep_scores"][0], 0.5))
  assert not np.array_equal(aux["random"]["kept_positions"][0],
                            aux["learned"]["kept_positions"][0])
  with pytest.raises(errors.ConfigError, match="keep_policy"):
    model.clone(keep_policy="brightest").apply({"params": params}, x)
