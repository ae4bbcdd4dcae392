"""benchmarks/head_pruning.py: the curve masks the stated share of heads at each level,
re-scoring as it goes, and the goal check compares against random level by level."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import head_pruning
from models import gpt2
from ponder import plasticity

TINY = dict(vocab_size=97, n_positions=64, n_embd=40, n_layer=2, n_head=5)  # 10 heads.


def test_curve_masks_each_level_with_rescoring():
  model = gpt2.GPT2(gpt2.GPT2Config(**TINY))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  fam = plasticity.Family(model, gpt2.head_layout(model.config), gpt2.prune_heads,
                          gpt2.head_analysis_apply(model), True, None, None)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 9)))
  calls, masks = [], []

  def score_batches():
    calls.append(1)
    return [{"tokens": tokens}]

  def eval_fn(mask):
    masks.append(np.asarray(mask))
    return float(mask.sum())

  values = head_pruning.curve(fam, params, "gradient", score_batches=score_batches,
                              eval_fn=eval_fn)
  assert values == [10.0 - round(10 * level) for level in head_pruning.LEVELS]
  assert len(calls) == 9  # One scoring pass per level after 0%: iterative re-scoring.
  for before, after in zip(masks, masks[1:]):  # Masked heads stay masked.
    assert np.all(after <= before)
  calls.clear()
  head_pruning.curve(fam, params, "random", score_batches=score_batches, eval_fn=eval_fn)
  assert not calls  # The control needs no data.


def test_beats_random_needs_every_level_from_20_to_60():
  levels = head_pruning.LEVELS
  rand = [0.9 - 0.05 * i for i in range(10)]
  better = [r + 0.01 for r in rand]
  once_worse = list(better)
  once_worse[levels.index(0.4)] = rand[levels.index(0.4)] - 0.01
  result = head_pruning.beats_random(
      {"random": rand, "gradient": better, "entropy": once_worse}, "max")
  assert result == {"gradient": True, "entropy": False}
  # For perplexity lower is better: the same curves flip.
  assert head_pruning.beats_random({"random": rand, "gradient": better}, "min") == {
      "gradient": False}
