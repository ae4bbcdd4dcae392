"""Pruning and regrowth decisions, the cycle state, and holding pruned heads still."""

import json

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from models import gpt2
from ponder import errors, plasticity

TINY = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def test_prune_takes_the_lowest_active_heads():
  scores = np.array([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.05, 0.7], [0.6, 0.4, 0.35, 0.0]])
  mask = np.ones((3, 4)).astype(np.float32)
  mask[2, 3] = 0.0  # Already pruned: its low score is ignored.
  change = plasticity.prune_heads(scores, mask, fraction=0.1)  # 10% of 12 -> 1 head.
  assert change.count == 1 and change.changed[1, 2]
  change = plasticity.prune_heads(scores, mask, count=3)
  np.testing.assert_array_equal(np.argwhere(change.changed), [[0, 1], [1, 0], [1, 2]])
  assert float(change.mask.sum()) == 11 - 3 and float(change.mask[2, 3]) == 0.0
  # A layer keeps at least min_heads_per_layer heads.
  change = plasticity.prune_heads(scores, mask, count=9, min_heads_per_layer=2)
  np.testing.assert_array_equal(np.asarray(change.mask).sum(1), [2, 2, 2])
  assert change.count == 5
  assert plasticity.prune_heads(scores, mask, fraction=0.0).count == 0
  with pytest.raises(errors.ShapeError):
    plasticity.prune_heads(scores[:2], mask)


def test_regrowth_revives_heads_above_the_weakest_active_one():
  importance = np.array([[0.6, 0.3, 0.5, 0.1], [0.2, 0.9, 0.25, 0.4]])
  mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], np.float32)  # Weakest active: 0.2.
  change = plasticity.regrow_heads(importance, mask)
  np.testing.assert_array_equal(np.argwhere(change.changed), [[0, 2], [1, 2], [1, 3]])
  assert change.count == 3 and float(change.mask.sum()) == 7
  change = plasticity.regrow_heads(importance, mask, max_count=1)
  np.testing.assert_array_equal(np.argwhere(change.changed), [[0, 2]])
  assert plasticity.regrow_heads(importance, np.ones((2, 4))).count == 0


def test_cycle_state_walks_the_phases_and_round_trips():
  state = plasticity.init_cycle_state(2, 4, max_cycles=2)
  step = jax.jit(plasticity.next_phase)
  seen = []
  for _ in range(12):
    seen.append((int(state.cycle), state.phase_name, bool(state.done)))
    if state.phase_name == "prune":
      mask = jnp.ones((2, 4)).at[int(state.cycle), 0].set(0.0) * state.mask
      state = plasticity.record_prune(state, plasticity.MaskChange(mask, None, 1))
    if state.phase_name == "evaluate":
      state = plasticity.record_evaluation(state, 3.0 - int(state.cycle))
    state = step(state)
  assert [s[1] for s in seen[:7]] == ["warmup", "analysis", "prune", "finetune", "regrow",
                                      "evaluate", "analysis"]
  assert seen[6][0] == 1 and seen[10] == (1, "evaluate", False)
  assert seen[11] == (1, "evaluate", True) and bool(state.done)
  np.testing.assert_array_equal(state.pruned, [1, 1])
  np.testing.assert_array_equal(state.active, [7, 6])
  np.testing.assert_allclose(state.metric, [3.0, 2.0])
  # Arrays only: serialises like the rest of a train state.
  restored = flax.serialization.from_bytes(plasticity.init_cycle_state(2, 4, max_cycles=2),
                                           flax.serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.phase_name == "evaluate"


def test_hold_pruned_heads_keeps_their_parameters():
  """After momentum has built up, AdamW with weight decay still moves a gated head's
  parameters; `hold_pruned_heads` keeps them exactly."""
  model = gpt2.GPT2(gpt2.GPT2Config(**TINY))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  layout = gpt2.head_layout(model.config)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 17)))
  mask = jnp.ones((2, 4)).at[0, 1].set(0.0).at[1, 3].set(0.0)

  def loss(p, m):
    logits = model.apply({"params": p}, ids[:, :-1], head_mask=m)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def train(tx, steps_unmasked=2, steps_masked=2):
    """Params after the unmasked steps and after the masked ones."""
    p, state = params, tx.init(params)

    @jax.jit
    def step(p, state, m):
      grads = jax.grad(loss)(p, m)
      updates, state = tx.update(grads, state, p, head_mask=m)
      return optax.apply_updates(p, updates), state

    for _ in range(steps_unmasked):
      p, state = step(p, state, jnp.ones((2, 4)))
    before = p
    for _ in range(steps_masked):
      p, state = step(p, state, mask)
    return before, p

  def frozen_part(p, base):  # Pruned heads' slices of p, minus the params after warm-up.
    return traverse_util.flatten_dict(plasticity.mask_head_slices(
        jax.tree.map(jnp.subtract, p, base), 1.0 - mask, layout))

  base, held = train(optax.chain(optax.adamw(1e-2, weight_decay=0.1),
                                 plasticity.hold_pruned_heads(layout)))
  base_free, free = train(optax.adamw(1e-2, weight_decay=0.1))
  # The same until the mask (up to how XLA fuses each program).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), base_free, base)
  for path in [s.path for layer in layout.slices for s in layer]:
    assert float(jnp.abs(frozen_part(held, base)[path]).max()) == 0.0, path
    assert float(jnp.abs(frozen_part(free, base)[path]).max()) > 0.0, path
  # The kept heads and the rest of the model still train.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), held, base)
  assert min(jax.tree.leaves(moved)) > 0.0


def test_regrowth_quantile_raises_the_bar():
  importance = np.array([[0.6, 0.3, 0.5, 0.1], [0.2, 0.9, 0.25, 0.4]])
  mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], np.float32)  # Active: 0.6 0.3 0.2 0.9.
  median = float(np.median([0.6, 0.3, 0.2, 0.9]))  # 0.45: only 0.5 (head [0, 2]) passes.
  change = plasticity.regrow_heads(importance, mask, quantile=0.5)
  np.testing.assert_array_equal(np.argwhere(change.changed),
                                np.argwhere((importance > median) & (mask == 0)))
  assert change.count == 1
  with pytest.raises(errors.ConfigError):
    plasticity.regrow_heads(importance, mask, quantile=1.5)


def test_expand_params_inverts_prune_params():
  """Kept heads come from the pruned tree, pruned heads from the fill, the rest from
  the pruned tree: prune(expand(prune(p), fill)) == prune(p), and the pruned heads'
  slices of expand(...) equal the fill's."""
  model = gpt2.GPT2(gpt2.GPT2Config(**TINY))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  fill = jax.tree.map(lambda x: x + 1.0, params)
  layout = gpt2.head_layout(model.config)
  mask = jnp.asarray([[1, 0, 1, 1], [0, 0, 1, 0]], jnp.float32)
  small = plasticity.prune_params(params, mask, layout)
  full = plasticity.expand_params(small, fill, mask, layout)
  chex.assert_trees_all_equal(plasticity.prune_params(full, mask, layout), small)
  chex.assert_trees_all_equal(plasticity.mask_head_slices(full, mask, layout),
                              plasticity.mask_head_slices(params, mask, layout))
  pruned_part = lambda tree: traverse_util.flatten_dict(  # noqa: E731
      plasticity.mask_head_slices(tree, 1.0 - mask, layout))
  for path in [s.path for layer in layout.slices for s in layer]:
    chex.assert_trees_all_equal(pruned_part(full)[path], pruned_part(fill)[path])


def test_cycle_and_plateau_states_round_trip_through_json():
  from ponder import plateau
  state = plasticity.record_prune(plasticity.init_cycle_state(2, 4, max_cycles=3),
                                  plasticity.prune_heads(np.arange(8.0).reshape(2, 4),
                                                         np.ones((2, 4)), count=2))
  data = json.loads(json.dumps(plasticity.to_json(state)))
  back = plasticity.from_json(plasticity.init_cycle_state(2, 4, max_cycles=3), data)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  cfg = plateau.PlateauConfig(window=5)
  detector = plateau.run(np.linspace(3, 2, 7), cfg)
  back = plasticity.from_json(plateau.init(cfg), json.loads(json.dumps(
      plasticity.to_json(detector))))
  jax.tree.map(np.testing.assert_array_equal, back, detector)
