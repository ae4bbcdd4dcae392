"""ponder.nn.perforation: the regulariser against hand-computed values, the scorer
against a numpy loop, masked attention against the kernel's plain reference, the
straight-through gradient, the row caps and the fixed patterns."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_sparse_attention import BlockSizes, block_sparse_attention_reference
from ponder import errors
from ponder.nn import perforation as P

# Two layers, one example, one head, 2 x 2 tiles (values chosen to compute by hand).
MASKS = jnp.array([[[[[1.0, 0.0], [0.5, 0.5]]]],
                   [[[[1.0, 1.0], [1.0, 0.0]]]]])


def test_regulariser_terms_by_hand():
  # Mean of the 8 entries: 5 / 8, so the achieved sparsity is 3 / 8.
  chex.assert_trees_all_close(P.sparsity(MASKS), 3 / 8)
  chex.assert_trees_all_close(P.target_term(MASKS, 0.5), (3 / 8 - 1 / 2) ** 2)
  chex.assert_trees_all_close(P.l1_term(MASKS), 5 / 8)
  # Rows [1, 0] and [1, 0] have entropy 0; [0.5, 0.5] and [1, 1] normalise to a fair
  # coin, entropy ln 2. The term is minus the mean: -(2 ln 2) / 4.
  chex.assert_trees_all_close(P.entropy_term(MASKS), -math.log(2) / 2, atol=1e-6)
  # Layer sparsities 1 - 2/4 = 0.5 and 1 - 3/4 = 0.25; unbiased std |0.5 - 0.25| / sqrt(2).
  chex.assert_trees_all_close(P.consistency_term(MASKS), 0.25 / math.sqrt(2), atol=1e-7)
  chex.assert_trees_all_close(P.consistency_term(MASKS[:1]), 0.0)


def test_regulariser_weights_and_target_ramp():
  spec = P.PerforationSpec(target_sparsity=0.5, initial_sparsity=0.1,
                           sparsity_warmup_steps=10, lambda_sparse=2.0, lambda_l1=3.0,
                           lambda_entropy=5.0, lambda_consistency=7.0)
  # Step 5 of a 10-step ramp from 0.1 to 0.5: the target is 0.3.
  chex.assert_trees_all_close(P.target_sparsity(5, spec), 0.3)
  chex.assert_trees_all_close(P.target_sparsity(50, spec), 0.5)
  total, terms = P.regulariser(MASKS, 5, spec)
  want = (2.0 * (3 / 8 - 0.3) ** 2 + 3.0 * 5 / 8 + 5.0 * (-math.log(2) / 2)
          + 7.0 * 0.25 / math.sqrt(2))
  chex.assert_trees_all_close(total, want, atol=1e-6)
  chex.assert_trees_all_close(terms["target"], (3 / 8 - 0.3) ** 2, atol=1e-7)


def test_temperature_anneals_geometrically_to_the_floor():
  spec = P.PerforationSpec(temperature_init=1.0, temperature_floor=0.25, anneal_steps=100)
  chex.assert_trees_all_close(P.temperature(0, spec), 1.0)
  chex.assert_trees_all_close(P.temperature(50, spec), 0.5, atol=1e-6)  # sqrt(1 * 0.25)
  chex.assert_trees_all_close(P.temperature(1000, spec), 0.25, atol=1e-7)


def qkv(b=2, h=3, t=40, d=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, h, t, d)) for k in keys]


def test_block_scores_match_a_numpy_loop():
  q, k, _ = qkv(t=40)
  valid = jnp.arange(40)[None] < jnp.array([[40], [27]])
  log_tau, bias = jnp.array([0.0, 0.5, -0.3]), jnp.array([0.1, -1.0, 2.0])
  got = P.block_scores(q, k, valid, block=16, log_tau=log_tau, bias=bias)
  qn, kn, vn = np.asarray(q), np.asarray(k), np.asarray(valid)
  want = np.zeros((2, 3, 3, 3))
  for b in range(2):
    for h in range(3):
      for i in range(3):
        for j in range(3):
          rows = [r for r in range(16 * i, min(16 * i + 16, 40)) if vn[b, r]]
          cols = [c for c in range(16 * j, min(16 * j + 16, 40)) if vn[b, c]]
          qm = qn[b, h, rows].mean(0) if rows else np.zeros(8)
          km = kn[b, h, cols].mean(0) if cols else np.zeros(8)
          want[b, h, i, j] = (qm @ km / math.sqrt(8) * math.exp(-log_tau[h]) + bias[h]
                              if cols else P.PADDING_SCORE)  # Example 1's key block 2.
  chex.assert_trees_all_close(got, want.astype(np.float32), atol=1e-5)


def test_padding_key_blocks_are_never_kept_and_give_no_nan():
  """A sentence of 20 tokens padded to 64 (block 16: real key blocks 0 and 1). Every
  head's bias is 2 and every real tile's q . k is negative, so by Eq. (1) alone each
  padding tile (score = bias) would outrank real key block 1 in [CLS]'s row."""
  q = jnp.ones((1, 2, 64, 8))
  k = -jnp.ones((1, 2, 64, 8))
  valid = jnp.arange(64)[None] < 20
  scores = P.block_scores(q, k, valid, block=16, log_tau=jnp.zeros(2),
                          bias=jnp.full(2, 2.0))
  forced = P.forced_tiles(4, cls_column=True, cls_row=False)
  hard = np.asarray(P.hard_mask(scores + 10.0, forced, 2))  # Real scores made positive.
  # Rows 0 and 1 (real queries) keep exactly the two real tiles; no row keeps a padding
  # key block unless it is forced (the padding rows' own diagonal).
  np.testing.assert_array_equal(hard[0, :, :2, :], np.ones((2, 2, 4)) * [1, 1, 0, 0])
  assert not hard[0, :, :, 2:][..., ~np.asarray(forced)[:, 2:]].any()

  def soft_total(log_tau):
    s = P.block_scores(q, k, valid, block=16, log_tau=log_tau, bias=jnp.full(2, 2.0))
    _, soft = P.relaxed_mask(s, jax.random.key(0), 0.2, 0.0)
    return soft.sum(), soft
  (_, soft), grad = jax.value_and_grad(soft_total, has_aux=True)(jnp.zeros(2))
  assert float(jnp.abs(soft[..., 2:]).max()) == 0.0 and bool(jnp.all(jnp.isfinite(grad)))


def test_masked_attention_matches_the_kernel_reference():
  q, k, v = qkv(t=40)
  mask = jax.random.uniform(jax.random.key(3), (2, 3, 3, 3)) < 0.5
  valid = jnp.arange(40)[None] < jnp.array([[40], [27]])
  got = P.masked_attention(q, k, v, mask.astype(jnp.float32), valid, block=16)
  want = block_sparse_attention_reference(q, k, v, mask, kv_padding=~valid,
                                          block_sizes=BlockSizes(16, 16))
  chex.assert_trees_all_close(got, want, atol=2e-5)


def test_masked_attention_dropout_acts_on_the_probabilities():
  # Attention is linear in P, so doubling the probabilities doubles the output.
  q, k, v = qkv(t=40)
  valid = jnp.arange(40)[None] < jnp.array([[40], [27]])
  mask = jnp.ones((1, 1, 3, 3)).at[..., 2, 0].set(0.0)
  plain = P.masked_attention(q, k, v, mask, valid, block=16)
  doubled = P.masked_attention(q, k, v, mask, valid, block=16, dropout=lambda p: 2 * p)
  chex.assert_trees_all_close(doubled, 2 * plain, atol=1e-5)


def test_relaxation_gradient_reaches_the_scorer():
  q, k, v = qkv(t=32)
  valid = jnp.ones((2, 32), bool)
  key = jax.random.key(7)
  scorer = P.BlockScorer(P.PerforationSpec(block=8), heads=3, max_blocks=4)
  params = scorer.init(jax.random.key(0), q, k, valid)

  @jax.jit
  def loss(params, hard):
    mask, _ = P.relaxed_mask(scorer.apply(params, q, k, valid), key, 0.5, hard)
    return jnp.sum(P.masked_attention(q, k, v, mask, valid, block=8) * v)

  grad = jax.jit(jax.grad(loss))
  for hard in (0.0, 1.0):
    g = grad(params, hard)["params"]
    assert all(np.isfinite(x).all() and np.abs(x).sum() > 0 for x in jax.tree.leaves(g))
  # Relaxed phase: the gradient to one head's bias equals central finite differences.
  eps = 1e-3
  bump = lambda s: {"params": {**params["params"],  # noqa: E731
                               "bias": params["params"]["bias"].at[1].add(s)}}
  fd = (loss(bump(eps), 0.0) - loss(bump(-eps), 0.0)) / (2 * eps)
  chex.assert_trees_all_close(grad(params, 0.0)["params"]["bias"][1], fd,
                              rtol=2e-2, atol=1e-3)


def test_straight_through_forward_is_hard_and_backward_is_the_sigmoids():
  q, k, v = qkv(t=32)
  valid = jnp.ones((2, 32), bool)
  key, temp = jax.random.key(7), 0.5
  scores = jax.random.normal(jax.random.key(1), (2, 3, 4, 4))
  attend = lambda m: jnp.sum(P.masked_attention(q, k, v, m, valid, block=8) * v)  # noqa: E731
  mask, soft = P.relaxed_mask(scores, key, temp, 1.0)
  logits = scores + P.logistic_noise(key, scores.shape)
  chex.assert_trees_all_equal(mask, (logits > 0).astype(jnp.float32))
  chex.assert_trees_all_close(soft, jax.nn.sigmoid(logits / temp), atol=1e-6)
  # d loss / d s = (d loss / d m at the hard m) * sigmoid'(x) / T, x = (s + L) / T.
  got = jax.grad(lambda s: attend(P.relaxed_mask(s, key, temp, 1.0)[0]))(scores)
  want = jax.grad(attend)(mask) * soft * (1.0 - soft) / temp
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_hard_mask_keeps_forced_tiles_and_caps_rows():
  scores = jax.random.normal(jax.random.key(0), (2, 3, 8, 8)) + 0.5
  forced = P.forced_tiles(8, cls_column=True, cls_row=False)
  hard = P.hard_mask(scores, forced, 3)
  assert bool(jnp.all(hard[..., jnp.arange(8), jnp.arange(8)]))
  assert bool(jnp.all(hard[..., 0]))
  assert int(hard.sum(-1).max()) <= 3
  # Of the free tiles, exactly the positive-scoring ones up to the cap are kept.
  free = ~np.asarray(forced)
  s, h = np.asarray(scores), np.asarray(hard)
  for idx in np.ndindex(2, 3, 8):
    row_scores = np.where(free[idx[2]], s[idx], -np.inf)
    want = sorted(np.flatnonzero(row_scores > 0), key=lambda j: -row_scores[j])
    want = set(want[:3 - int((~free[idx[2]]).sum())])
    assert set(np.flatnonzero(h[idx] & free[idx[2]])) == want


def test_cls_row_is_kept_past_the_row_cap():
  # Before 2026-12-04 the cap cut the forced [CLS] row to the budget like any other.
  scores = jax.random.normal(jax.random.key(1), (2, 3, 8, 8))
  forced = P.forced_tiles(8, cls_column=True, cls_row=True)
  hard = np.asarray(P.hard_mask(scores, forced, 3))
  assert hard[..., 0, :].all()
  np.testing.assert_array_equal(hard[..., 1:, :],
                                np.asarray(P.hard_mask(scores, P.forced_tiles(
                                    8, cls_column=True, cls_row=False), 3))[..., 1:, :])
  spec = P.PerforationSpec(block=64, target_sparsity=0.5, keep_cls_row=True)
  assert spec.row_budget(8) == 4 and spec.max_active(512) == 8
  assert P.PerforationSpec(block=64, target_sparsity=0.5).max_active(512) == 4


@pytest.mark.parametrize("mode", ["random", "band_global", "bigbird"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_fixed_patterns_have_the_row_budget(mode, sparsity):
  spec = P.PerforationSpec(mode=mode, target_sparsity=sparsity)
  m = P.fixed_pattern(spec, 8, 4, layer=2)
  budget = spec.row_budget(8)
  assert budget == max(2, math.ceil((1 - sparsity) * 8 - 1e-6))
  np.testing.assert_array_equal(m.sum(-1), budget)
  assert m[:, np.arange(8), np.arange(8)].all() and m[..., 0].all()
  np.testing.assert_array_equal(m, P.fixed_pattern(spec, 8, 4, layer=2))  # Fixed draw.
  if mode == "band_global":
    k = budget - 1  # Besides the global column, the tiles nearest the diagonal.
    i = 5
    kept = set(np.flatnonzero(m[0, i])) - {0}
    assert max(abs(j - i) for j in kept) <= k


def test_collect_stacks_layers_in_order():
  sown = {"encoder": {f"layer_{i}": {"attention": {"self": {"perforation_hard": (
      jnp.full((1, 1, 2, 2), i),)}}} for i in (0, 2, 1, 10)}}
  got = P.collect(sown, "perforation_hard")
  np.testing.assert_array_equal(got[:, 0, 0, 0, 0], [0, 1, 2, 10])
  assert P.collect(sown, "perforation_soft") is None


def test_bad_settings_are_config_errors():
  with pytest.raises(errors.ConfigError, match="valid"):
    P.PerforationSpec(mode="dynamic")
  with pytest.raises(errors.ConfigError, match="target_sparsity"):
    P.PerforationSpec(target_sparsity=1.0)
  with pytest.raises(errors.ConfigError, match="valid"):
    P.control(0, P.PerforationSpec(), impl="triton")


def test_row_cap_is_exact_when_scores_tie():
  scores = jnp.zeros((1, 1, 6, 6))  # A static table at init: every score equal.
  forced = P.forced_tiles(6, cls_column=True, cls_row=False)
  hard = P.hard_mask(scores + 1.0, forced, 3)
  np.testing.assert_array_equal(np.asarray(hard).sum(-1), 3)
  capped = P.cap_rows(jnp.ones((1, 1, 6, 6)), scores, forced, jnp.int32(4))
  np.testing.assert_array_equal(np.asarray(capped).sum(-1), 4)


def test_masked_attention_gradient_is_finite_when_kept_logits_are_far_below_dropped():
  # Keys of block 1 score ~300 above block 0's; the mask keeps only block 0 (a hard mask
  # on real attention can drop the best keys): exp of the gap underflows float32.
  q = jnp.ones((1, 1, 16, 4))
  k = jnp.concatenate([-jnp.ones((1, 1, 8, 4)), 75.0 * jnp.ones((1, 1, 8, 4))], axis=2)
  v = jax.random.normal(jax.random.key(0), (1, 1, 16, 4))
  valid = jnp.ones((1, 16), bool)
  mask = jnp.array([[[[1.0, 0.0], [1.0, 0.0]]]])
  f = lambda m: jnp.sum(P.masked_attention(q, k, v, m, valid, block=8) ** 2)  # noqa: E731
  want = block_sparse_attention_reference(q, k, v, mask > 0, block_sizes=BlockSizes(8, 8))
  chex.assert_trees_all_close(P.masked_attention(q, k, v, mask, valid, block=8), want,
                              atol=1e-5)
  g = jax.grad(f)(mask)
  assert np.isfinite(np.asarray(g)).all()


def test_dropped_tile_gradient_is_the_secant_and_kept_tiles_the_tangent():
  # L is linear in the output, so for a dropped tile T, L(m with m_T = 1) - L(m) is the
  # sum over T's query rows of their secants: what the gradient to m_T must equal.
  # Kept tiles keep the exact derivative (central differences around m_T = 1).
  q, k, v = qkv(b=1, h=2, t=30, d=8)  # 30 = 3 full blocks of 8 + a partial one
  k = k.at[:, 0, 16:24].multiply(6.0)  # head 0: block 2 holds large logits
  valid = jnp.arange(30)[None] < 27
  cot = jax.random.normal(jax.random.key(3), v.shape)
  mask = jnp.array(np.random.default_rng(0).random((1, 2, 4, 4)) < 0.5, jnp.float32)
  mask = jnp.maximum(mask, jnp.eye(4))  # diagonal kept, as every mask has it
  mask = mask.at[0, 0, 1, 2].set(0.0).at[0, 0, 3, 2].set(0.0)
  loss = lambda m: jnp.sum(P.masked_attention(q, k, v, m, valid, block=8) * cot)  # noqa: E731
  grad = jax.grad(loss)(mask)
  checked = 0
  for h, i, j in np.argwhere(np.asarray(mask[0]) == 0):
    secant = loss(mask.at[0, h, i, j].set(1.0)) - loss(mask)
    np.testing.assert_allclose(grad[0, h, i, j], secant, rtol=1e-4, atol=1e-5)
    checked += 1
  assert checked >= 4
  eps = 1e-3
  for h, i, j in np.argwhere(np.asarray(mask[0]) == 1)[:6]:
    fd = (loss(mask.at[0, h, i, j].add(eps)) - loss(mask.at[0, h, i, j].add(-eps))) / (2 * eps)
    np.testing.assert_allclose(grad[0, h, i, j], fd, rtol=2e-2, atol=2e-3)
  # The blow-up case: dropped keys ~300 logits above the kept ones, where the tangent
  # is ~e^80 times the secant.
  q1 = jnp.ones((1, 1, 16, 4))
  k1 = jnp.concatenate([-jnp.ones((1, 1, 8, 4)), 75.0 * jnp.ones((1, 1, 8, 4))], axis=2)
  v1 = jax.random.normal(jax.random.key(0), (1, 1, 16, 4))
  drop = jnp.array([[[[1.0, 0.0], [1.0, 0.0]]]])
  f = lambda m: jnp.sum(P.masked_attention(q1, k1, v1, m, jnp.ones((1, 16), bool),  # noqa: E731
                                           block=8))
  g = jax.grad(f)(drop)
  np.testing.assert_allclose(g[0, 0, :, 1], [f(drop.at[0, 0, r, 1].set(1.0)) - f(drop)
                                             for r in range(2)], rtol=1e-3, atol=1e-3)
