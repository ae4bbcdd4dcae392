"""Neural plasticity: iterative head pruning, regrowth, and the cycle that runs them.

Heads are pruned as in Michel, Levy & Neubig 2019 ("Are Sixteen Heads Really Better
than One?", Sec. 4 and 5): a gate xi_h multiplies each head's output, the importance
I_h = E_x |dL/dxi_h| (`ponder.analysis.heads`) ranks the heads, and each cycle masks
the least important active heads, a fixed fraction of all heads (their 10%), before
the model is fine-tuned with the mask held.

Regrowth is this module's addition (not in Michel et al.): the same gradient, taken at
xi_h = 0 for a masked head, is the first-order change of the loss if the head came
back, so a masked head whose |dL/dxi_h| at 0 exceeds the smallest importance among the
active heads is revived (`regrow_heads`). Its parameters are the ones it had when it
was pruned, because `hold_pruned_heads` keeps the optimizer from moving them.

A cycle moves through PHASES: warmup (once, ended by `ponder.plateau`) -> analysis ->
prune -> finetune -> regrow -> evaluate -> analysis of the next cycle. `CycleState`
holds the phase, the mask and a fixed-size history, all arrays, so it lives in the
train state and the checkpoint. The trainer runs the phases; these functions decide.

Where the heads lie in a model's parameters is a `HeadLayout` (a model file provides
one, e.g. `models.gpt2.head_layout`); `mask_head_slices` and `prune_params` are
generic over it.
"""

import dataclasses
from typing import NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ponder import errors

PHASES = ("warmup", "analysis", "prune", "finetune", "regrow", "evaluate")


# --- Where the heads lie -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadSlice:
  """A parameter that holds heads: its `axis` is laid out [groups, heads, head_dim]
  (groups = 3 for a fused q/k/v projection, 1 for a separate one or an output
  projection's input rows)."""
  path: tuple  # Keys into the params tree, e.g. ("h_0", "attn", "c_attn", "kernel").
  axis: int
  groups: int = 1


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Per layer, the parameters that hold its heads. The mask's head axis is n_head
  wide; layer i has heads[i] <= n_head heads (fewer after structural pruning), and
  row i's first heads[i] mask entries are its heads in order."""
  n_head: int
  head_dim: int
  heads: tuple  # Heads present per layer.
  slices: tuple  # Per layer, a tuple of HeadSlice.

  @property
  def n_layer(self) -> int:
    return len(self.heads)


def _check_mask(mask, layout: HeadLayout):
  shape = (layout.n_layer, layout.n_head)
  if tuple(np.shape(mask)) != shape:
    raise errors.ShapeError(f"head mask has shape {np.shape(mask)}; expected "
                            f"(n_layer, n_head) = {shape}.")


def _param(flat, path, layout: HeadLayout, head_slice: HeadSlice, heads: int):
  if path not in flat:
    raise errors.ShapeError(f"the head layout names {'/'.join(path)}, which the params "
                            f"do not have; valid: {sorted('/'.join(p) for p in flat)[:8]} ...")
  value = flat[path]
  size = head_slice.groups * heads * layout.head_dim
  if value.shape[head_slice.axis] != size:
    raise errors.ShapeError(
        f"{'/'.join(path)} has {value.shape[head_slice.axis]} entries on axis "
        f"{head_slice.axis}; the layout expects {head_slice.groups} x {heads} heads x "
        f"{layout.head_dim} = {size}. Is the layout from this model's config?")
  return value


def mask_head_slices(tree, mask, layout: HeadLayout):
  """Multiplies every head's slices in a params-shaped tree (params, gradients or
  updates) by its mask entry; leaves outside the layout pass unchanged. jit-friendly.
  """
  _check_mask(mask, layout)
  flat = traverse_util.flatten_dict(tree)
  for i, layer_slices in enumerate(layout.slices):
    h = layout.heads[i]
    per_head = jnp.repeat(jnp.asarray(mask)[i, :h], layout.head_dim)
    for s in layer_slices:
      value = _param(flat, s.path, layout, s, h)
      shape = [1] * value.ndim
      shape[s.axis] = value.shape[s.axis]
      flat[s.path] = value * jnp.tile(per_head, s.groups).reshape(shape).astype(value.dtype)
  return traverse_util.unflatten_dict(flat)


def hold_pruned_heads(layout: HeadLayout) -> optax.GradientTransformationExtraArgs:
  """An optax transform that zeroes the updates of masked heads' slices.

  Put it last in the chain and pass the mask on every update:
  `tx = optax.chain(optax.adamw(...), hold_pruned_heads(layout))`,
  `tx.update(grads, opt_state, params, head_mask=mask)`. A gated head's q/k/v and
  output-projection gradients are already exactly 0, but momentum from before it was
  pruned and decoupled weight decay would still move its parameters; zeroing the final
  updates keeps them where they were, so a revived head comes back as it was.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, head_mask=None, **extra_args):
    del params, extra_args
    if head_mask is None:
      raise errors.PonderError("hold_pruned_heads needs head_mask=: call "
                               "tx.update(grads, opt_state, params, head_mask=mask).")
    return mask_head_slices(updates, head_mask, layout), state

  return optax.GradientTransformationExtraArgs(init, update)


def heads_after(mask, layout: HeadLayout) -> tuple:
  """Heads each layer keeps under a 0/1 mask."""
  _check_mask(mask, layout)
  mask = np.asarray(mask)
  return tuple(int(np.count_nonzero(mask[i, :h])) for i, h in enumerate(layout.heads))


def prune_params(params, mask, layout: HeadLayout):
  """Removes the heads a 0/1 `mask` turns off from the parameters (structural pruning):
  each HeadSlice axis keeps only the kept heads' entries, in order. The result fits
  the model config whose heads per layer are `heads_after(mask, layout)`."""
  _check_mask(mask, layout)
  mask = np.asarray(jax.device_get(mask))
  if not np.isin(mask, (0.0, 1.0)).all():
    raise errors.PonderError("structural pruning needs a 0/1 head mask; a fractional gate "
                             "cannot be folded into removed heads.")
  flat = traverse_util.flatten_dict(params)
  d = layout.head_dim
  for i, layer_slices in enumerate(layout.slices):
    h = layout.heads[i]
    keep = np.flatnonzero(mask[i, :h])
    for s in layer_slices:
      value = _param(flat, s.path, layout, s, h)
      index = ((np.arange(s.groups)[:, None, None] * h + keep[None, :, None]) * d
               + np.arange(d)[None, None, :]).reshape(-1)
      flat[s.path] = jnp.take(value, jnp.asarray(index, jnp.int32), axis=s.axis)
  return traverse_util.unflatten_dict(flat)


# --- Pruning and regrowth decisions ------------------------------------------------------


class MaskChange(NamedTuple):
  """A new mask, the heads that changed ([n_layer, n_head] bool) and how many."""
  mask: jax.Array
  changed: np.ndarray
  count: int


def prune_heads(scores, mask, *, fraction: float = 0.1, count: Optional[int] = None,
                min_heads_per_layer: int = 0) -> MaskChange:
  """Masks the least important active heads.

  Args:
    scores: [n_layer, n_head]; lower = less important (pruned first). Ties go to the
      lower (layer, head) index.
    mask: the current 0/1 mask; only active (nonzero) heads are pruned.
    fraction: heads pruned per call as a fraction of all heads, at least 1 when > 0
      (Michel et al.'s iterative pruning takes 10% per step). Ignored when `count` is
      given.
    min_heads_per_layer: a layer never drops below this many active heads (Michel
      et al. allow empty layers: 0).

  Returns:
    MaskChange; fewer heads than asked are pruned when not enough are prunable.
  """
  scores, mask = np.asarray(scores, np.float64), np.asarray(mask, np.float32)
  _check_shapes(scores, mask)
  if count is None:
    count = max(1, int(fraction * mask.size)) if fraction > 0 else 0
  active = mask != 0
  per_layer = active.sum(axis=1)
  flat = np.flatnonzero(active.ravel())
  order = flat[np.argsort(scores.ravel()[flat], kind="stable")]
  changed = np.zeros(mask.shape, bool)
  for index in order:
    if changed.sum() >= count:
      break
    layer, head = divmod(int(index), mask.shape[1])
    if per_layer[layer] > min_heads_per_layer:
      changed[layer, head] = True
      per_layer[layer] -= 1
  return MaskChange(jnp.asarray(np.where(changed, 0.0, mask), jnp.float32), changed,
                    int(changed.sum()))


def regrow_heads(importance, mask, *, max_count: Optional[int] = None) -> MaskChange:
  """Revives masked heads whose |dL/dxi_h| at xi_h = 0 exceeds the smallest importance
  among the active heads.

  Args:
    importance: [n_layer, n_head] gradient importance taken at gates = `mask` (so the
      active heads' entries are their importance at xi = 1, the masked heads' the
      gradient at xi = 0), on one scale: `HeadStats.importance` from
      `ponder.analysis.heads`, normalised per layer by the active heads' l2 norm.
    mask: the current 0/1 mask.
    max_count: revive at most this many (the largest signals first); None = all that
      pass.

  Returns:
    MaskChange (changed = the revived heads). With no active head, any masked head
    with a nonzero gradient passes.
  """
  importance, mask = np.asarray(importance, np.float64), np.asarray(mask, np.float32)
  _check_shapes(importance, mask)
  active = mask != 0
  threshold = importance[active].min() if active.any() else 0.0
  candidates = (~active) & (importance > threshold)
  if max_count is not None and candidates.sum() > max_count:
    flat = np.flatnonzero(candidates.ravel())
    chosen = flat[np.argsort(-importance.ravel()[flat], kind="stable")[:max_count]]
    candidates = np.zeros(mask.shape, bool)
    candidates.ravel()[chosen] = True
  return MaskChange(jnp.asarray(np.where(candidates, 1.0, mask), jnp.float32), candidates,
                    int(candidates.sum()))


def _check_shapes(scores, mask):
  if scores.shape != mask.shape or mask.ndim != 2:
    raise errors.ShapeError(f"scores {scores.shape} and mask {mask.shape} must both be "
                            "[n_layer, n_head].")


# --- The cycle ---------------------------------------------------------------------------


@flax.struct.dataclass
class CycleState:
  """Where the plasticity cycle stands; every field is an array (checkpointable).

  History entries are per cycle (index = cycle); `metric` is NaN until the cycle's
  evaluation is recorded.
  """
  cycle: jax.Array  # int32: the current cycle, 0-based.
  phase: jax.Array  # int32: index into PHASES.
  done: jax.Array  # bool: max_cycles cycles have been evaluated.
  mask: jax.Array  # float32 [n_layer, n_head]: 1 active, 0 pruned.
  pruned: jax.Array  # int32 [max_cycles]: heads pruned in each cycle.
  revived: jax.Array  # int32 [max_cycles]: heads revived in each cycle.
  active: jax.Array  # int32 [max_cycles]: active heads at each cycle's evaluation.
  metric: jax.Array  # float32 [max_cycles]: each cycle's evaluation metric.
  masks: jax.Array  # float32 [max_cycles, n_layer, n_head]: mask at each evaluation.

  @property
  def phase_name(self) -> str:
    return PHASES[int(self.phase)]


def init_cycle_state(n_layer: int, n_head: int, *, max_cycles: int) -> CycleState:
  """Cycle 0 in warm-up, every head active."""
  if max_cycles < 1:
    raise errors.ConfigError(f"max_cycles={max_cycles}; at least 1 cycle is needed.")
  zeros = jnp.zeros((max_cycles,), jnp.int32)
  return CycleState(
      cycle=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32),
      done=jnp.zeros((), bool), mask=jnp.ones((n_layer, n_head), jnp.float32),
      pruned=zeros, revived=zeros, active=zeros,
      metric=jnp.full((max_cycles,), jnp.nan, jnp.float32),
      masks=jnp.zeros((max_cycles, n_layer, n_head), jnp.float32))


def next_phase(state: CycleState) -> CycleState:
  """The phase after this one: warmup -> analysis -> prune -> finetune -> regrow ->
  evaluate -> analysis of the next cycle; after the last cycle's evaluation `done`
  is set and the state stays in evaluate."""
  evaluate = PHASES.index("evaluate")
  max_cycles = state.pruned.shape[0]
  at_end = state.phase == evaluate
  last = at_end & (state.cycle + 1 >= max_cycles)
  return state.replace(
      phase=jnp.where(last, evaluate,
                      jnp.where(at_end, PHASES.index("analysis"), state.phase + 1)),
      cycle=jnp.where(at_end & ~last, state.cycle + 1, state.cycle),
      done=state.done | last)


def record_prune(state: CycleState, change: MaskChange) -> CycleState:
  """Takes the pruned mask and counts the heads in this cycle's history."""
  return state.replace(mask=jnp.asarray(change.mask, jnp.float32),
                       pruned=state.pruned.at[state.cycle].add(change.count))


def record_regrow(state: CycleState, change: MaskChange) -> CycleState:
  """Takes the regrown mask and counts the revived heads in this cycle's history."""
  return state.replace(mask=jnp.asarray(change.mask, jnp.float32),
                       revived=state.revived.at[state.cycle].add(change.count))


def record_evaluation(state: CycleState, metric) -> CycleState:
  """Stores this cycle's evaluation metric, mask and active-head count."""
  c = state.cycle
  return state.replace(
      metric=state.metric.at[c].set(jnp.asarray(metric, jnp.float32)),
      masks=state.masks.at[c].set(state.mask),
      active=state.active.at[c].set(jnp.sum(state.mask != 0).astype(jnp.int32)))
