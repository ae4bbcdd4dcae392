"""Head importance: gradient importance against finite differences, entropy of known
attention patterns, masked heads against structurally removed ones, the scores."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from models import gpt2
from ponder import errors
from ponder.analysis import heads

TINY = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def tiny():
  model = gpt2.GPT2(gpt2.GPT2Config(**TINY))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params, gpt2.head_analysis_apply(model)


def _batches(n, batch=2, seq=12):
  rng = np.random.RandomState(0)
  return [{"tokens": jnp.asarray(rng.randint(0, TINY["vocab_size"], (batch, seq + 1)))}
          for _ in range(n)]


def test_gradient_importance_equals_finite_differences(tiny):
  """I_h = mean over batches of |dL/dxi_h|, at a mask with a pruned head (xi = 0)."""
  _, params, apply = tiny
  batches = _batches(2)
  mask = jnp.ones((2, 4)).at[1, 2].set(0.0)
  stats = heads.head_statistics(apply, params, batches, head_mask=mask)
  loss = jax.jit(lambda m, b: apply(params, b, m)[0])
  eps = 1e-2  # Central differences in float32: roundoff ~1e-5, truncation ~eps^2.
  fd = np.zeros((2, 4))
  for b in batches:
    for layer in range(2):
      for head in range(4):
        delta = jnp.zeros((2, 4)).at[layer, head].set(eps)
        fd[layer, head] += abs(float(loss(mask + delta, b) - loss(mask - delta, b))) / (2 * eps)
  fd /= len(batches)
  np.testing.assert_allclose(stats.gradient, fd, rtol=2e-2, atol=2e-4)
  assert stats.batches == 2 and float(stats.gradient.min()) > 0.0
  np.testing.assert_allclose(stats.loss, np.mean([float(loss(mask, b)) for b in batches]),
                             rtol=1e-5)
  # Per-layer l2 normalisation over the active heads.
  active_norm = jnp.sqrt(jnp.sum(jnp.where(mask > 0, stats.importance, 0.0) ** 2, -1))
  np.testing.assert_allclose(active_norm, 1.0, rtol=1e-5)
  # The masked head's regrowth signal is on the active heads' scale.
  active_l2 = np.linalg.norm(np.asarray(stats.gradient)[1, [0, 1, 3]])
  np.testing.assert_allclose(stats.importance[1, 2], stats.gradient[1, 2] / active_l2,
                             rtol=1e-5)


def _uniform(n_layer, batch, n_head, allowed):
  """Uniform probabilities over `allowed` [batch, q, k] keys."""
  p = allowed / allowed.sum(-1, keepdims=True)
  return jnp.broadcast_to(p[None, :, None], (n_layer, batch, n_head) + allowed.shape[1:])


def test_entropy_of_uniform_attention_is_log_n():
  q = k = 6
  full = jnp.ones((2, q, k))
  h, hn = heads.attention_entropy(_uniform(3, 2, 2, full), causal=False)
  np.testing.assert_allclose(h, np.log(k), rtol=1e-6)
  np.testing.assert_allclose(hn, 1.0, rtol=1e-6)
  # Causal: query i attends i + 1 keys; the first (one key, no choice) is left out of
  # the normalised mean.
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((q, k))), (2, q, k))
  h, hn = heads.attention_entropy(_uniform(3, 2, 2, causal))
  np.testing.assert_allclose(h, np.mean(np.log(np.arange(1, q + 1))), rtol=1e-6)
  np.testing.assert_allclose(hn, 1.0, rtol=1e-6)
  # Padding (bidirectional, as BERT): example 1 has 4 real tokens; its padded queries
  # are not averaged and its padded keys are not attended.
  real = jnp.asarray([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
  h, hn = heads.attention_entropy(_uniform(1, 2, 1, jnp.broadcast_to(real[:, None], (2, q, k))),
                                  query_mask=real, key_mask=real, causal=False)
  np.testing.assert_allclose(h, (6 * np.log(6) + 4 * np.log(4)) / 10, rtol=1e-6)
  np.testing.assert_allclose(hn, 1.0, rtol=1e-6)
  # Attention on one key has entropy 0.
  one_hot = jnp.broadcast_to(jnp.eye(q, k), (1, 2, 1, q, k))
  h, hn = heads.attention_entropy(one_hot)
  assert float(h.max()) == 0.0 and float(hn.max()) == 0.0


def test_gpt2_with_zero_queries_attends_uniformly(tiny):
  """Zero q weights give equal scores, so GPT-2's causal attention is uniform."""
  _, params, apply = tiny
  flat = traverse_util.flatten_dict(params)
  for i in range(2):
    for leaf in ("kernel", "bias"):
      path = (f"h_{i}", "attn", "c_attn", leaf)
      flat[path] = flat[path].at[..., :TINY["n_embd"]].set(0.0)  # The q columns.
  stats = heads.head_statistics(apply, traverse_util.unflatten_dict(flat), _batches(2),
                                n_layer=2, n_head=4)
  np.testing.assert_allclose(stats.entropy, np.mean(np.log(np.arange(1, 13))), rtol=1e-5)
  np.testing.assert_allclose(stats.normalized_entropy, 1.0, rtol=1e-5)


def test_masking_a_head_equals_removing_it(tiny):
  """Gate 0 on a head and the structurally pruned model give the same loss, and the
  same gradient for the heads that stay."""
  model, params, apply = tiny
  mask = jnp.asarray([[1, 0, 1, 1], [1, 1, 1, 0]], jnp.float32)
  small, small_params = gpt2.prune_heads(model, params, mask)
  batches = _batches(1)
  masked = heads.head_statistics(apply, params, batches, head_mask=mask)
  pruned = heads.head_statistics(gpt2.head_analysis_apply(small), small_params, batches,
                                 head_mask=jnp.ones((2, 4)).at[:, 3].set(0.0))
  np.testing.assert_allclose(pruned.loss, masked.loss, rtol=1e-6)
  for i in range(2):
    kept = np.flatnonzero(mask[i])
    np.testing.assert_allclose(pruned.gradient[i, :3], masked.gradient[i, kept], rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(pruned.entropy[i, :3], masked.entropy[i, kept], rtol=1e-5)


def test_combined_and_control_scores():
  importance = jnp.asarray([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
  entropy = jnp.asarray([[0.2, 0.9, 0.5], [0.1, 0.95, 0.4]])  # Normalised.
  mask = jnp.asarray([[1, 1, 1], [1, 1, 0]])
  score = heads.combined_score(importance, entropy, mask=mask)
  # Active ranks (0..4): importance 0.1 0.9 0.5 0.3 0.2 -> 0 4 3 2 1; focus 1 - entropy
  # 0.8 0.1 0.5 0.9 0.05 -> 3 1 2 4 0.
  expected = 0.5 * (np.array([[0, 4, 3], [2, 1, 0]]) + np.array([[3, 1, 2], [4, 0, 0]])) / 4
  np.testing.assert_allclose(score, np.where(mask, expected, 0.0), rtol=1e-6)
  stats = heads.HeadStats(entropy=entropy, normalized_entropy=entropy, gradient=importance,
                          importance=importance, mask=mask, loss=jnp.zeros(()), batches=1)
  np.testing.assert_allclose(heads.scores(stats, "combined"), score)
  np.testing.assert_allclose(heads.scores(stats, "entropy"), 1.0 - entropy)
  control = heads.scores(stats, "random", key=jax.random.key(3))
  chex.assert_shape(control, (2, 3))
  np.testing.assert_array_equal(control, heads.random_scores(jax.random.key(3), (2, 3)))
  with pytest.raises(errors.ConfigError, match="gradient"):
    heads.scores(stats, "magnitude")
