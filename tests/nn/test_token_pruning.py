"""DynamicViT token pruning: predictor, Gumbel decisions, masked attention, losses, gather."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder import errors
from ponder.analysis import flops
from ponder.nn import token_pruning as tp

B, N, D = 2, 9, 8  # Tokens: a class token and 8 patches.


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _predictor():
  model = tp.TokenPredictor()
  params = jax.jit(model.init)(jax.random.key(0), _normal(0, (B, N, D)), jnp.ones((B, N)))
  return model, params["params"]


# ---------------------------------------------------------------------------------
# Prediction module (Eq. 1-5).


def _reference_predictor(p, x, mask):
  """Eq. 1-5 from the paper's text, with the module's layer sizes."""
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  z = (x - mu) / jnp.sqrt(var + 1e-6) * p["ln"]["scale"] + p["ln"]["bias"]
  gelu = lambda v: jax.nn.gelu(v, approximate=False)
  local = gelu(z @ p["proj"]["kernel"] + p["proj"]["bias"])
  w = np.array(mask, np.float32)
  w[:, 0] = 0.0  # The class token is not a patch.
  glob = np.einsum("bn,bnc->bc", w, local) / w.sum(1, keepdims=True)
  feats = jnp.concatenate([local, jnp.broadcast_to(glob[:, None], local.shape)], -1)
  hidden = gelu(feats @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  hidden = gelu(hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"])
  return hidden @ p["logits"]["kernel"] + p["logits"]["bias"]


def test_predictor_matches_reference():
  model, params = _predictor()
  x = _normal(1, (B, N, D))
  mask = jnp.asarray(np.random.default_rng(2).random((B, N)) < 0.6, jnp.float32).at[:, :2].set(1)
  logits = jax.jit(model.apply)({"params": params}, x, mask)
  assert logits.shape == (B, N, 2)
  chex.assert_trees_all_close(logits, _reference_predictor(params, x, mask), atol=1e-5)


def test_global_feature_sees_only_kept_patch_tokens():
  model, params = _predictor()
  apply = jax.jit(model.apply)
  x = _normal(3, (B, N, D))
  mask = jnp.ones((B, N)).at[:, 4].set(0.0)
  base = apply({"params": params}, x, mask)
  others = np.array([1, 2, 3, 5, 6, 7, 8])
  change = 3.0 * _normal(30, (D,))  # Not constant across features: LayerNorm keeps it.
  # Changing a dropped token or the class token leaves the other tokens' logits alone...
  for pos in (0, 4):
    moved = apply({"params": params}, x.at[:, pos].add(change), mask)
    assert np.abs(np.asarray(moved - base))[:, pos].max() > 1e-4
    chex.assert_trees_all_close(moved[:, others], base[:, others], atol=1e-6)
  # ...while changing a kept patch token moves everyone's logits through z^global.
  moved = apply({"params": params}, x.at[:, 2].add(change), mask)
  assert np.all(np.abs(np.asarray(moved - base))[:, others[others != 2]].max(-1) > 1e-4)


# ---------------------------------------------------------------------------------
# Decisions (Eq. 6) and schedules.


def test_hard_decision_is_binary_hierarchical_and_keeps_class_token():
  logits = _normal(4, (B, N, 2)).at[:, 0].set(jnp.array([10.0, -10.0]))  # cls says drop
  prev = jnp.ones((B, N)).at[:, 3].set(0.0)
  keep = jax.jit(functools.partial(tp.keep_decision, temperature=1.0))(
      logits, prev, jax.random.key(1))
  assert set(np.unique(np.asarray(keep))) <= {0.0, 1.0}
  np.testing.assert_array_equal(keep[:, 0], 1.0)  # The class token is always kept.
  np.testing.assert_array_equal(keep[:, 3], 0.0)  # Once dropped, dropped for good.


def test_straight_through_gradient_is_the_soft_gradient():
  logits = _normal(5, (B, N, 2))
  weights = _normal(6, (B, N))
  key = jax.random.key(2)

  def objective(lg, hard):
    keep = tp.keep_decision(lg, jnp.ones((B, N)), key, temperature=0.7, hard=hard)
    return jnp.sum(weights * keep)

  gradient = jax.jit(jax.grad(objective), static_argnums=1)
  g_hard, g_soft = gradient(logits, True), gradient(logits, False)
  chex.assert_trees_all_close(g_hard, g_soft, atol=1e-6)
  assert np.abs(np.asarray(g_hard[:, 1:])).min() > 0  # Every patch token gets a gradient.


def test_hard_samples_follow_the_predicted_keep_probability():
  logits = jnp.array([[[0.0, 0.0], [0.0, 1.0], [1.5, 0.0], [-1.0, 1.0]]])
  keys = jax.random.split(jax.random.key(3), 4000)
  sample = jax.jit(jax.vmap(lambda k: tp.keep_decision(logits, jnp.ones((1, 4)), k,
                                                       temperature=0.3)))
  freq = np.asarray(sample(keys)).mean(0)[0, 1:]
  expected = np.asarray(jax.nn.softmax(logits, -1)[0, 1:, tp.KEEP])
  np.testing.assert_allclose(freq, expected, atol=0.03)  # ~4 standard errors.


def test_soft_warmup_then_hard_masks():
  logits = _normal(7, (B, N, 2))

  @jax.jit
  def mask_at(step):
    return tp.keep_decision(logits, jnp.ones((B, N)), jax.random.key(4), temperature=1.0,
                            hard=tp.use_hard_mask(step, soft_warmup_steps=100))

  soft, hard = np.asarray(mask_at(99)), np.asarray(mask_at(100))
  assert not np.all(np.isin(soft[:, 1:], [0.0, 1.0]))  # Relaxed probabilities.
  assert np.all(np.isin(hard, [0.0, 1.0]))
  np.testing.assert_array_equal(hard[:, 1:], soft[:, 1:] > 0.5)  # Same noise, rounded.


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_temperature_anneals_from_5_to_0_1(schedule):
  temp = jax.jit(functools.partial(tp.gumbel_temperature, anneal_steps=1000,
                                   schedule=schedule))
  values = np.array([temp(s) for s in (0, 250, 500, 999, 1000, 5000)])
  np.testing.assert_allclose(values[[0, -2, -1]], [5.0, 0.1, 0.1], rtol=1e-6)
  assert np.all(np.diff(values[:-1]) < 0)
  middle = np.sqrt(5.0 * 0.1) if schedule == "exponential" else 2.55
  np.testing.assert_allclose(values[2], middle, rtol=1e-5)
  with pytest.raises(errors.ConfigError, match="linear"):
    tp.gumbel_temperature(0, anneal_steps=10, schedule="cosine")


def test_keep_ratio_targets():
  np.testing.assert_allclose(tp.keep_ratio_targets(0.7), (0.7, 0.49, 0.343))


# ---------------------------------------------------------------------------------
# Attention masking (Eq. 7-9).


def _reference_weights(logits, mask):
  """Row i: an ordinary softmax over {j : D_j = 1} plus i itself; zero elsewhere."""
  out = np.zeros_like(logits)
  for b, h, i in np.ndindex(*logits.shape[:3]):
    allowed = [j for j in range(logits.shape[-1]) if mask[b, j] == 1 or j == i]
    e = np.exp(logits[b, h, i, allowed] - logits[b, h, i, allowed].max())
    out[b, h, i, allowed] = e / e.sum()
  return out


def test_masked_softmax_ignores_dropped_tokens_except_self():
  logits = np.array(_normal(8, (B, 2, N, N))) * 3
  logits[0, :, :, 5] = 200.0  # A dropped key with a huge logit must not upset its rows.
  mask = np.ones((B, N), np.float32)
  mask[0, [2, 5]] = 0.0
  mask[1, [1, 6, 7]] = 0.0
  weights = np.asarray(jax.jit(tp.masked_softmax)(jnp.asarray(logits), jnp.asarray(mask)))
  np.testing.assert_allclose(weights, _reference_weights(logits, mask), atol=1e-6)
  for b, j in [(0, 2), (0, 5), (1, 1), (1, 6), (1, 7)]:
    column = weights[b, :, :, j]
    assert np.all(column[:, np.arange(N) != j] == 0.0)  # Nobody else attends to j.
    assert np.all(column[:, j] > 0.0)  # j still attends to itself.
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_mask_gradient_is_exact_and_finite():
  logits = _normal(25, (1, 1, N, N))
  mask = jnp.ones((1, N)).at[0, 3].set(0.0)
  weights = _normal(26, (1, 1, N, N))

  def naive(m):  # Eq. 9 as written, no stabilisation (fine for small logits).
    e = jnp.exp(logits) * tp.attention_policy(m)
    return jnp.sum(weights * e / e.sum(-1, keepdims=True))

  gradient = jax.jit(jax.grad(lambda m, lg: jnp.sum(weights * tp.masked_softmax(lg, m))))
  grad = gradient(mask, logits)
  chex.assert_trees_all_close(grad, jax.jit(jax.grad(naive))(mask), atol=1e-5)
  assert abs(float(grad[0, 3])) > 0  # The dropped token still learns whether to return.
  grad = gradient(mask, logits.at[..., 3].set(300.0))  # exp overflows without the cap.
  assert np.all(np.isfinite(np.asarray(grad)))


def test_gradient_reaches_the_predictor_through_hard_masks():
  model, params = _predictor()
  x = _normal(12, (B, N, D))
  target = _normal(13, (B, N, 2, D // 2))

  def loss(p):
    keep = tp.keep_decision(model.apply({"params": p}, x, jnp.ones((B, N))),
                            jnp.ones((B, N)), jax.random.key(5), temperature=1.0)
    heads = x.reshape(B, N, 2, D // 2)
    out = tp.masked_attention(heads, heads, heads, keep)
    return jnp.mean((out - target) ** 2) + tp.keep_ratio_loss([keep], [0.5])

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, path


# ---------------------------------------------------------------------------------
# Inference gather.


def _gather(x, scores, ratio):
  """The inference gather of models/dendritic_liquid_vit.py."""
  return jnp.take_along_axis(x, tp.top_index(scores, ratio)[..., None], axis=1)


def test_top_index_keeps_class_token_and_top_scores_in_order():
  x = _normal(14, (B, N, D))
  scores = np.array(_normal(15, (B, N)))
  scores[:, 0] = -100.0  # The class token is kept whatever its score.
  out = _gather(x, jnp.asarray(scores), 0.5)
  assert out.shape == (B, 1 + 4, D)
  for b in range(B):
    top = np.sort(np.argsort(-scores[b, 1:])[:4] + 1)
    np.testing.assert_array_equal(out[b], np.asarray(x)[b, np.concatenate([[0], top])])


@pytest.mark.parametrize("ratio,kept", [(0.5, 4), (0.7, 6), (0.3, 3), (1.0, 8), (0.01, 1)])
def test_kept_count_is_a_static_ceiling(ratio, kept):
  assert tp.num_kept(N, ratio) == kept == max(1, math.ceil(round(ratio * (N - 1), 6)))
  assert tp.top_index(jnp.zeros((1, N)), ratio).shape == (1, 1 + kept)


def test_pruning_lowers_the_compiled_flops_of_the_next_block():
  n, d = 65, 32
  w1, w2 = _normal(16, (d, 4 * d)), _normal(17, (4 * d, d))

  def block_after_pruning(x, scores, ratio):
    x = _gather(x, scores, ratio)
    attn = jax.nn.softmax(x @ jnp.swapaxes(x, 1, 2) / np.sqrt(d), axis=-1) @ x
    return x + attn + jax.nn.gelu(x @ w1) @ w2

  args = (jax.ShapeDtypeStruct((2, n, d), jnp.float32), jax.ShapeDtypeStruct((2, n), jnp.float32))
  cost = {r: flops.compiled_flops(jax.jit(functools.partial(block_after_pruning, ratio=r)), *args)
          for r in (0.5, 0.9)}
  assert cost[0.5] < 0.7 * cost[0.9]


# ---------------------------------------------------------------------------------
# Losses (Eq. 11-13).


def test_keep_ratio_loss_matches_equation_13():
  masks = [np.random.default_rng(s).random((B, N)) for s in (18, 19, 20)]
  targets = tp.keep_ratio_targets(0.7)
  expected = np.mean([np.mean((m[:, 1:].mean(1) - r) ** 2) for m, r in zip(masks, targets)])
  np.testing.assert_allclose(tp.keep_ratio_loss([jnp.asarray(m) for m in masks], targets),
                             expected, rtol=1e-5)
  with pytest.raises(errors.ShapeError):
    tp.keep_ratio_loss([jnp.asarray(masks[0])], targets)


def test_distillation_kl_with_temperature():
  s, t = np.asarray(_normal(21, (3, 5))), np.asarray(_normal(22, (3, 5))) * 2
  for temp in (1.0, 4.0):
    pt = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    ps = np.exp(s / temp) / np.exp(s / temp).sum(-1, keepdims=True)
    expected = temp ** 2 * np.mean(np.sum(pt * np.log(pt / ps), -1))
    np.testing.assert_allclose(tp.distillation_kl(jnp.asarray(s), jnp.asarray(t), temp),
                               expected, rtol=1e-5)
  assert abs(float(tp.distillation_kl(jnp.asarray(s), jnp.asarray(s), 2.0))) < 1e-6
  teacher_grad = jax.grad(lambda t: tp.distillation_kl(jnp.asarray(s), t))(jnp.asarray(t))
  np.testing.assert_array_equal(teacher_grad, 0.0)


def test_token_distillation_counts_only_kept_patch_tokens():
  student, teacher = np.asarray(_normal(23, (B, N, D))), np.asarray(_normal(24, (B, N, D)))
  mask = np.ones((B, N), np.float32)
  mask[0, [2, 7]] = 0.0
  mask[1, 1:5] = 0.0
  kept = [(b, i) for b in range(B) for i in range(1, N) if mask[b, i]]
  expected = np.mean([np.mean((student[b, i] - teacher[b, i]) ** 2) for b, i in kept])
  got = tp.token_distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
