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
import functools
import os
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from ponder import checkpoint as ckpt_lib
from ponder import errors
from ponder import metric_log as plog
from ponder import plateau
from ponder.analysis import flops as flops_lib
from ponder.analysis import heads as heads_lib
from ponder.analysis import timing

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


def _kept_slices(mask, layout: HeadLayout):
  """Per HeadSlice of the layout: (slice, heads its layer has, positions on its axis of
  the heads `mask` keeps, every group, in order)."""
  d = layout.head_dim
  for i, layer_slices in enumerate(layout.slices):
    h = layout.heads[i]
    keep = np.flatnonzero(mask[i, :h])
    for s in layer_slices:
      index = ((np.arange(s.groups)[:, None, None] * h + keep[None, :, None]) * d
               + np.arange(d)[None, None, :])
      yield s, h, jnp.asarray(index.reshape(-1), jnp.int32)


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
  for s, h, index in _kept_slices(mask, layout):
    flat[s.path] = jnp.take(_param(flat, s.path, layout, s, h), index, axis=s.axis)
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


def regrow_heads(importance, mask, *, max_count: Optional[int] = None,
                 quantile: float = 0.0) -> MaskChange:
  """Revives masked heads whose |dL/dxi_h| at xi_h = 0 exceeds the `quantile` of the
  importance among the active heads (0: the smallest, the issue's rule; 0.5: the
  median, which revives only heads that would rank in the upper half).

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
  if not 0.0 <= quantile <= 1.0:
    raise errors.ConfigError(f"regrowth quantile={quantile} must lie in [0, 1].")
  threshold = float(np.quantile(importance[active], quantile)) if active.any() else 0.0
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


def expand_params(pruned, fill, mask, layout: HeadLayout):
  """The inverse of `prune_params`: a full-structure tree (laid out by `layout`, whose
  layers have every head) whose kept heads (mask 1) hold `pruned`'s entries and whose
  pruned heads hold `fill`'s (the full tree saved when they were pruned). Leaves outside
  the layout come from `pruned`."""
  _check_mask(mask, layout)
  mask = np.asarray(jax.device_get(mask))
  flat, flat_fill = traverse_util.flatten_dict(pruned), traverse_util.flatten_dict(fill)
  for s, h, index in _kept_slices(mask, layout):
    full = jnp.moveaxis(_param(flat_fill, s.path, layout, s, h), s.axis, 0)
    full = full.at[index].set(jnp.moveaxis(flat[s.path], s.axis, 0))
    flat[s.path] = jnp.moveaxis(full, 0, s.axis)
  return traverse_util.unflatten_dict(flat)


# --- The multi-cycle run as a train.main phase policy ------------------------------------
#
# `PlasticityPolicy` drives the cycle above from `train.main` (train/phases.py's
# interface). Its state is JSON: the `CycleState` (as lists), the plateau detector's
# state, the step the current phase began, the baseline's numbers and one record per
# cycle, so a run killed mid-cycle resumes in the same phase with the same structure.
#
# The structure is the mask: `configure` sets `model.heads_per_layer` from it, so the
# fine-tune trains the structurally pruned model (the pruned heads are absent from the
# parameters: they cannot drift back, and the fine-tune costs less). Their weights at
# pruning time are kept in <workdir>/plasticity/full/ (every head, full structure) for
# the regrowth signal and for reviving them; the baseline's parameters at the end of
# warm-up stay in <workdir>/plasticity/baseline/ for the side-by-side comparisons.


def to_json(state) -> dict:
  """A struct of arrays (CycleState, plateau.PlateauState) as JSON lists."""
  return {k: np.asarray(v).tolist()
          for k, v in flax.serialization.to_state_dict(state).items()}


def from_json(template, data: dict):
  """`to_json`'s inverse, into `template`'s structure and dtypes."""
  return flax.serialization.from_state_dict(
      template, {k: jnp.asarray(v, jnp.asarray(getattr(template, k)).dtype)
                 for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class Family:
  """What the policy needs from a model family, for the full-structure model."""
  model: Any  # Every head present.
  layout: HeadLayout
  prune: Callable  # (model, params, mask) -> (pruned model, pruned params).
  apply: Callable  # head_analysis_apply(model): (params, batch, mask) -> (loss, probs).
  causal: bool
  mask_fn: Optional[Callable]  # batch -> [batch, seq] real positions (None: all).
  inputs: Callable  # (batch, seq) -> the model's positional inputs, for cost and time.


def family(cfg, vocab_size: Optional[int] = None) -> Family:
  """The full-structure model of `cfg` (`model.heads_per_layer` ignored) and its
  head functions: models/gpt2.py for language models, models/bert.py for SST-2.
  `vocab_size` is the trained embedding's (None: the checkpoint's, else 1, for when
  only the layer and head counts are needed).

  The policy runs only under train.main, so it reaches for the model builders of
  train/tasks.py and the model files on use; nothing at import time.
  """
  # pylint: disable=g-import-not-at-top
  from models import bert, gpt2
  from train import tasks
  full = ml_collections.ConfigDict(cfg.to_dict())
  full.model.heads_per_layer = None
  vocab = vocab_size or 1
  if full.model.name == "gpt2":
    model = tasks.build_lm_model(full, vocab)
    return Family(model, gpt2.head_layout(model.config), gpt2.prune_heads,
                  gpt2.head_analysis_apply(model), True, None,
                  lambda b, t: (jnp.zeros((b, t), jnp.int32),))
  if full.model.name == "bert":
    checkpoint = tasks.resolve_init_from(full.model.init_from)
    if vocab_size is None and checkpoint:
      vocab = bert.config_from_checkpoint(checkpoint).vocab_size
    model = tasks.build_text_model(full.model, vocab, checkpoint)
    return Family(model, bert.head_layout(model), bert.prune_heads,
                  bert.head_analysis_apply(model), False,
                  lambda batch: batch["attention_mask"],
                  lambda b, t: (jnp.full((b, t), 5, jnp.int32), jnp.ones((b, t), jnp.int32),
                                jnp.zeros((b, t), jnp.int32)))
  raise errors.unknown_key("plasticity model", full.model.name, ("gpt2", "bert"))


@functools.lru_cache(maxsize=16)
def _forward(model):
  """`model.apply`, jitted once per model, so every cycle's comparison reuses the
  baseline's compiled program."""
  return jax.jit(lambda p, *x: model.apply({"params": p}, *x))


def cost(fam: Family, params, mask, *, batch: int, seq: int, runs: int = 5) -> dict:
  """The full model (every head, the baseline's structure) and the model `mask` prunes
  structurally, side by side: parameters, compiled FLOPs and the median CPU time of a
  forward pass on [batch, seq] inputs, timed interleaved (`timing.measure_interleaved`)."""
  small_model, small_params = fam.prune(fam.model, params, mask)
  inputs = fam.inputs(batch, seq)
  out, runners = {}, {}
  for name, model, p in (("baseline", fam.model, params), ("pruned", small_model, small_params)):
    compiled = _forward(model).lower(p, *inputs).compile()
    out[name] = {"params": int(sum(x.size for x in jax.tree.leaves(p))),
                 "flops": float(flops_lib.cost_of(compiled)["flops"])}
    runners[name] = lambda compiled=compiled, p=p: compiled(p, *inputs)
  times = timing.measure_interleaved(runners, warmup=1, runs=runs)
  for name in out:
    out[name]["time_s"] = times[name]["median_s"]
  out["speedup"] = out["baseline"]["time_s"] / max(out["pruned"]["time_s"], 1e-12)
  return out


def _heads(changed) -> list:
  return [[int(a), int(b)] for a, b in np.argwhere(np.asarray(changed))]


class PlasticityPolicy:
  """warm-up (until `ponder.plateau` calls the training loss flat, or its cap) ->
  per cycle: analysis (entropy and gradient importance at the current mask) -> prune
  (`prune_heads` on `policy.score`) -> fine-tune (`policy.finetune_steps` steps of the
  structurally pruned model) -> regrow (`regrow_heads`) -> evaluate (validation metric,
  parameters, FLOPs, time and, for language models, generations, each beside the
  baseline's). After `policy.cycles` cycles training stops with the last evaluated
  model. Every on_eval rewrites <workdir>/dashboard.html.

  Transitions happen at evaluations (train.main calls on_eval every
  trainer.eval_every steps), so finetune_steps and the warm-up's end are rounded up to
  the next evaluation.
  """

  def __init__(self, cfg):
    self.cfg = cfg
    block = cfg.policy
    self.block = block
    self.plateau_cfg = plateau.PlateauConfig(
        window=int(block.plateau_window), z=float(block.plateau_z),
        rel_tol=float(block.plateau_rel_tol),
        max_steps=max(1, int(block.warmup_max_steps) // int(cfg.trainer.log_every)))
    if block.score not in heads_lib.METHODS:
      raise errors.unknown_key("policy.score", block.score, heads_lib.METHODS)
    if block.mode not in ("max", "min"):
      raise errors.unknown_key("policy.mode", block.mode, ("max", "min"))
    if block.regrow_init not in ("restore", "reinit"):
      raise errors.unknown_key("policy.regrow_init", block.regrow_init, ("restore", "reinit"))
    self._families = {}

  # --- train/phases.py's interface -------------------------------------------------------

  def init(self, cfg) -> dict:
    fam = family(cfg)
    cycle = init_cycle_state(fam.layout.n_layer, fam.layout.n_head,
                             max_cycles=int(self.block.cycles))
    return {"cycle": to_json(cycle), "plateau": to_json(plateau.init(self.plateau_cfg)),
            "warmup_end": None, "phase_start": 0, "baseline": None, "analysis": None,
            "cycles": [], "events": [{"step": 0, "phase": "warmup"}]}

  def configure(self, cfg, state: dict):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    mask = np.asarray(state["cycle"]["mask"])
    cfg.model.heads_per_layer = None if mask.all() else [int(h) for h in mask.sum(1)]
    return cfg

  def on_log(self, state: dict, step: int, train_means: dict) -> dict:
    if state["warmup_end"] is not None:
      return state
    detector = plateau.update(from_json(plateau.init(self.plateau_cfg), state["plateau"]),
                              train_means["loss"], self.plateau_cfg)
    state = dict(state, plateau=to_json(detector))
    if detector.ended:
      state["warmup_end"] = {"step": int(step), "reason": detector.reason_name,
                             "slope": float(detector.slope), "slope_ucb":
                             float(detector.slope_ucb)}
    return state

  def on_eval(self, ctx):
    from train import phases  # pylint: disable=g-import-not-at-top
    state = dict(ctx.state)
    cycle = from_json(init_cycle_state(*np.shape(state["cycle"]["mask"]),
                                       max_cycles=int(self.block.cycles)), state["cycle"])
    change = None
    if bool(cycle.done):
      pass
    elif cycle.phase_name == "warmup" and state["warmup_end"] is not None:
      change = self._end_warmup(ctx, state, cycle, phases)
    elif (cycle.phase_name == "finetune"
          and ctx.step - state["phase_start"] >= int(self.block.finetune_steps)):
      change = self._end_cycle(ctx, state, cycle, phases)
    self._dashboard(ctx.workdir, change.state if change else state)
    return change

  # --- the phases ------------------------------------------------------------------------

  def _family(self, cfg, params) -> Family:
    vocab = int(embedding(params).shape[0])
    key = (self.configure(cfg, {"cycle": {"mask": [[1]]}}).model.to_json_best_effort(), vocab)
    if key not in self._families:  # One apply per model: its jitted passes compile once.
      self._families[key] = family(cfg, vocab)
    return self._families[key]

  def _store(self, workdir: str, name: str):
    return ckpt_lib.Checkpointer(os.path.join(workdir, "plasticity", name), keep=1)

  def _save(self, workdir, name, step, params):
    store = self._store(workdir, name)
    store.save(step, params)
    store.close()

  def _load(self, ctx, name, full_cfg):
    store = self._store(ctx.workdir, name)
    params = store.restore(store.latest_step(), ctx.abstract_params(full_cfg))
    store.close()
    return params

  def _stats(self, ctx, fam, full, mask):
    batches = ctx.train_batches(ctx.cfg, ctx.step, int(self.block.score_batches))
    return heads_lib.head_statistics(fam.apply, full, batches, head_mask=mask,
                                     causal=fam.causal, query_mask_fn=fam.mask_fn,
                                     key_mask_fn=fam.mask_fn)

  def _end_warmup(self, ctx, state, cycle, phases):
    """The warm-up's params are the baseline: kept, measured, then the first cycle."""
    fam = self._family(ctx.cfg, ctx.params)
    self._save(ctx.workdir, "baseline", ctx.step, ctx.params)
    metric = float(ctx.val[self.block.metric])
    state["baseline"] = {"step": ctx.step, "metric": metric, "val": _floats(ctx.val),
                         "generations": self._generate(ctx.cfg, fam.model, ctx.params)}
    state["events"] = state["events"] + [
        {"step": ctx.step, "phase": "baseline", "metric": metric,
         "ended_by": state["warmup_end"]["reason"]}]
    return self._analyse_and_prune(ctx, state, next_phase(cycle), fam, ctx.params, phases)

  def _analyse_and_prune(self, ctx, state, cycle, fam, full, phases):
    """analysis -> prune -> finetune: scores at the current mask, the lowest pruned."""
    stats = self._stats(ctx, fam, full, cycle.mask)
    key = jax.random.fold_in(ctx.key, int(cycle.cycle))
    scores = heads_lib.scores(stats, self.block.score, key=key)
    cycle = next_phase(cycle)
    change = prune_heads(scores, cycle.mask, fraction=float(self.block.prune_fraction),
                         min_heads_per_layer=int(self.block.min_heads_per_layer))
    cycle = next_phase(record_prune(cycle, change))
    # Every head's weights as they are now: the pruned ones come back from here.
    self._save(ctx.workdir, "full", ctx.step, full)
    c = int(cycle.cycle)
    state.update(
        cycle=to_json(cycle), phase_start=ctx.step,
        analysis={"cycle": c, "step": ctx.step, "pruned": _heads(change.changed),
                  **{k: np.asarray(getattr(stats, k)).tolist() for k in
                     ("entropy", "normalized_entropy", "importance")},
                  "scores": np.asarray(scores).tolist(), "loss": float(stats.loss)},
        events=state["events"] + [{"step": ctx.step, "phase": "prune", "cycle": c,
                                   "count": change.count}])
    _, small = fam.prune(fam.model, full, cycle.mask)
    return phases.Change(state, params=small, phase=f"prune:{c}")

  def _end_cycle(self, ctx, state, cycle, phases):
    """regrow -> evaluate (and the next cycle's analysis and prune, or the end)."""
    full_cfg = self.configure(ctx.cfg, {"cycle": {"mask": np.ones(cycle.mask.shape)}})
    fam = self._family(ctx.cfg, ctx.params)
    full = expand_params(ctx.params, self._load(ctx, "full", full_cfg), cycle.mask, fam.layout)
    cycle = next_phase(cycle)  # regrow
    stats = self._stats(ctx, fam, full, cycle.mask)
    limit = int(self.block.regrow_max) or None
    revived = regrow_heads(stats.importance, cycle.mask,
                           max_count=limit if self.block.regrow else 0,
                           quantile=float(self.block.regrow_quantile))
    if revived.count and self.block.regrow_init == "reinit":
      fresh = fam.model.init(jax.random.fold_in(ctx.key, 1000 + int(cycle.cycle)),
                             *fam.inputs(1, 8))["params"]
      back = jnp.asarray(revived.changed, jnp.float32)
      full = jax.tree.map(jnp.add, mask_head_slices(full, 1.0 - back, fam.layout),
                          mask_head_slices(fresh, back, fam.layout))
    cycle = next_phase(record_regrow(cycle, revived))  # evaluate
    new_cfg = self.configure(ctx.cfg, dict(state, cycle=to_json(cycle)))
    small_model, small = fam.prune(fam.model, full, cycle.mask)
    val = _floats(ctx.evaluate(small, new_cfg))
    metric = float(val[self.block.metric])
    cycle = record_evaluation(cycle, metric)
    c = int(cycle.cycle)
    baseline = self._load(ctx, "baseline", full_cfg)
    record = {
        "cycle": c, "step": ctx.step, "pruned": state["analysis"]["pruned"],
        "revived": _heads(revived.changed), "mask": np.asarray(cycle.mask).tolist(),
        "active": int(np.count_nonzero(cycle.mask)), "metric": metric, "val": val,
        "baseline_metric": state["baseline"]["metric"],
        "analysis": state["analysis"], "regrowth_signal": np.asarray(
            stats.importance).tolist(),
        "cost": cost(fam, baseline, cycle.mask, batch=int(self.block.time_batch),
                     seq=int(self.block.time_seq)),
        "generations": self._generate(new_cfg, small_model, small)}
    state["cycles"] = state["cycles"] + [record]
    self._scalars(ctx.workdir, record)
    state["events"] = state["events"] + [
        {"step": ctx.step, "phase": "regrow", "cycle": c, "count": revived.count},
        {"step": ctx.step, "phase": "evaluate", "cycle": c, "metric": metric}]
    cycle = next_phase(cycle)
    if bool(cycle.done):
      self._save(ctx.workdir, "full", ctx.step, full)
      state.update(cycle=to_json(cycle), phase_start=ctx.step)
      state["events"] = state["events"] + [{"step": ctx.step, "phase": "done"}]
      return phases.Change(state, params=small, stop=True, phase="done")
    return self._analyse_and_prune(ctx, state, cycle, fam, full, phases)

  def _generate(self, cfg, model, params) -> list:
    """Continuations of policy.prompts by `model` (language models; [] otherwise), with
    the same seed for the baseline and every pruned model."""
    prompts = list(self.block.prompts)
    if cfg.model.name != "gpt2" or not prompts:
      return []
    # pylint: disable=g-import-not-at-top
    from models import gpt2
    from train import tasks
    tok = tasks.build_tokenizer(cfg.data)
    out = []
    for i, prompt in enumerate(prompts):
      ids = jnp.asarray([tok.encode(prompt)], jnp.int32)
      tokens = gpt2.generate(model, params, ids, key=jax.random.key(i),
                             max_new_tokens=int(self.block.generate_tokens),
                             temperature=float(self.block.temperature),
                             top_k=min(int(self.block.top_k), model.config.vocab_size))
      out.append({"prompt": prompt, "seed": i,
                  "text": tok.decode([int(t) for t in tokens[0, ids.shape[1]:]])})
    return out

  def finish(self, state: dict, workdir: str) -> None:
    """The final dashboard and <workdir>/plasticity/cycles.md, the per-cycle table."""
    self._dashboard(workdir, state)
    os.makedirs(os.path.join(workdir, "plasticity"), exist_ok=True)  # A run cut short.
    with open(os.path.join(workdir, "plasticity", "cycles.md"), "w") as f:
      f.write(cycle_table(state, self.block.metric) + "\n")

  def _scalars(self, workdir: str, record: dict) -> None:
    """The cycle's numbers as TensorBoard scalars (and JSONL) under plasticity/."""
    cost_ = record["cost"]
    writer = plog.MetricWriter(os.path.join(workdir, "plasticity"))
    writer.write(record["step"], {
        "metric": record["metric"], "baseline_metric": record["baseline_metric"],
        "active_heads": record["active"], "pruned": len(record["pruned"]),
        "revived": len(record["revived"]), "speedup": cost_["speedup"],
        **{f"{side}_{k}": cost_[side][k] for side in ("baseline", "pruned")
           for k in ("params", "flops", "time_s")}}, split="cycle")
    writer.close()

  def _dashboard(self, workdir, state):
    from ponder.analysis import dashboard  # pylint: disable=g-import-not-at-top
    dashboard.write(workdir, state)


def embedding(params):
  """The token embedding table (GPT-2's wte, BERT's word_embeddings)."""
  flat = traverse_util.flatten_dict(params)
  for path, value in flat.items():
    if path[-2:] in (("wte", "embedding"), ("word_embeddings", "embedding")):
      return value
  raise errors.ShapeError("no token embedding (wte or word_embeddings) in the params.")


def _floats(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def cycle_table(state: dict, metric: str) -> str:
  """Markdown: per cycle the heads pruned and revived, the metric against the
  baseline's, parameters, compiled FLOPs and CPU time of the structurally pruned model
  against the baseline's (measured side by side)."""
  lines = [f"| cycle | step | pruned | revived | active | {metric} | baseline | params "
           "| FLOPs | time (s) | baseline time (s) | speed-up |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in state["cycles"]:
    b, p = c["cost"]["baseline"], c["cost"]["pruned"]
    lines.append(
        f"| {c['cycle']} | {c['step']} | {len(c['pruned'])} | {len(c['revived'])} | "
        f"{c['active']} | {c['metric']:.4g} | {c['baseline_metric']:.4g} | "
        f"{p['params']:,} / {b['params']:,} | {p['flops']:.3g} / {b['flops']:.3g} | "
        f"{p['time_s']:.4g} | {b['time_s']:.4g} | {c['cost']['speedup']:.3f}x |")
  return "\n".join(lines)
