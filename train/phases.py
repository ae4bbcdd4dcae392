"""Phase policies: a run that changes what it trains when a measured quantity says so.

A policy watches the training loss (`on_log`, every `trainer.log_every` steps) and the
validation metrics (`on_eval`, after each evaluation) and may answer with a `Change`: a
new policy state, new parameters (grown, pruned or reloaded), a fresh optimizer, or the
end of training. The policy state says which structure the run has now, and
`configure(cfg, state)` turns it into the config that builds it (the model's dendrite
count, a head mask, a loss weight): the trainer rebuilds the task, the optimizer and the
jitted step whenever that config changes. The loop itself has no special cases.

The policy state is JSON, kept beside every checkpoint and evaluation as
`<workdir>/phases/<step>.json` = {"evaluated": the state whose structure the evaluated
(and best-kept) parameters have, "state": the state after the policy acted}, so a run
killed mid-cycle resumes in the same phase, with the same structure and counters, and the
best checkpoint of any phase can be restored into its own structure. Changes are also
logged as `split="phase"` rows in metrics.jsonl.

Policies are named by `cfg.policy.name` ("" = none) and looked up in `POLICIES`.
"""

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections

from ponder import checkpoint as ckpt_lib
from ponder import errors
from ponder.analysis import dendrite_plots
from ponder.nn import perforated

# cfg.policy.name -> "module:Class". Imported on use, so a policy's dependencies load
# only in the runs that use it.
POLICIES = {
    "dendrites": "train.phases:DendritePolicy",
    "plasticity": "ponder.plasticity:PlasticityPolicy",
    "goose": "train.goose:GoosePolicy",
}


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What a policy sees after an evaluation. `evaluate(params, cfg, split="val")` scores
  params of the structure `cfg` builds; `train_batches(cfg, start, n)` yields the
  training batches of steps start..start+n-1 (for scoring passes such as gradient
  importance)."""
  step: int
  val: dict
  state: dict
  params: Any
  cfg: ml_collections.ConfigDict
  workdir: str
  key: jax.Array
  evaluate: Callable
  abstract_params: Callable
  train_batches: Callable[..., Iterator]


@dataclasses.dataclass(frozen=True)
class Change:
  """A policy's answer. params None keeps the current parameters; reset_optimizer starts
  a fresh optimizer state (and learning-rate schedule) on the parameters; stop ends
  training after this evaluation; phase names the change in the metrics and the log."""
  state: dict
  params: Any = None
  reset_optimizer: bool = True
  stop: bool = False
  phase: str = ""


class Policy:
  """The no-op policy; subclasses override what they use."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg

  def init(self, cfg: ml_collections.ConfigDict) -> dict:
    return {}

  def configure(self, cfg: ml_collections.ConfigDict, state: dict) -> ml_collections.ConfigDict:
    return cfg

  def on_log(self, state: dict, step: int, train_means: dict) -> dict:
    return state

  def on_eval(self, ctx: EvalContext) -> Optional[Change]:
    return None

  def finish(self, state: dict, workdir: str) -> None:
    """After the run's last step (reports, pictures)."""


def build(cfg: ml_collections.ConfigDict) -> Optional[Policy]:
  """The policy `cfg.policy.name` names, or None (no `policy` block, or name "")."""
  block = cfg.get("policy", None)
  name = block.get("name", "") if block is not None else ""
  if not name:
    return None
  if name not in POLICIES:
    raise errors.unknown_key("policy", name, POLICIES)
  module, attr = POLICIES[name].split(":")
  return getattr(importlib.import_module(module), attr)(cfg)


def copy_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(cfg.to_dict())


def _path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "phases", f"{int(step)}.json")


def save_record(workdir: str, step: int, state: dict, evaluated: Optional[dict] = None, *,
                opt_start: int = 0, keep: bool = False) -> None:
  """Writes phases/<step>.json atomically (temp file + rename). `evaluated` defaults to
  `state`; `keep` leaves an existing record's "evaluated" as it is (a checkpoint saved
  after the evaluation at the same step)."""
  if jax.process_index() != 0:
    return
  path = _path(workdir, step)
  if evaluated is None:
    evaluated = state
    if keep and os.path.exists(path):
      with open(path) as f:
        evaluated = json.load(f)["evaluated"]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"evaluated": evaluated, "state": state, "opt_start": int(opt_start)}, f)
  os.replace(path + ".tmp", path)


def load_record(workdir: str, step: int) -> dict:
  """The record saved at `step`: "state" (the policy state after it acted, for
  resuming), "evaluated" (the state whose structure the parameters evaluated there
  have) and "opt_start" (the step the optimizer state started at)."""
  path = _path(workdir, step)
  if not os.path.exists(path):
    raise errors.CheckpointError(
        f"{path} is missing: the checkpoint at step {step} was written by a run without "
        "this phase policy, or the phases/ directory was removed. Rerun with the "
        "workdir's own config (its config.json), or train in a new --workdir.")
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------
# PerforatedAI's dendrite cycles (ponder/nn/perforated.py's tracker) as a policy.


def tracker_config(block: ml_collections.ConfigDict) -> perforated.TrackerConfig:
  """policy.* -> the tracker's settings (the package's GPA.pc.* names)."""
  fields = {f.name for f in dataclasses.fields(perforated.TrackerConfig)}
  given = {k: v for k, v in block.items() if k in fields}
  if "improvement_threshold" in given:
    given["improvement_threshold"] = tuple(float(x) for x in given["improvement_threshold"])
  return perforated.TrackerConfig(**given)


class DendritePolicy(Policy):
  """Neurons train; the tracker (`perforated.update`) reads each validation score; on
  "restructure" / "retry" the best parameters come back, every wrapped layer gains one
  dendrite (`perforated.grow`) and a fresh optimizer starts; on "complete" the best
  parameters come back and training ends.

  policy.rule "gd": after a switch every parameter trains by backprop (the open-source
  package). "cc": first `policy.candidate_steps` steps train only the newest dendrites
  on the cascade-correlation objective with the rest frozen
  (`model.dendrite_phase="candidates"`, see perforated.correlation_loss), then the
  neurons phase trains every parameter again, starting with u = 0 for the new
  dendrite. The tracker only reads scores of neurons phases.

  The dendrite count is `model.dendrites`; the tracker's best parameters are kept in
  `<workdir>/phases/best/` with the count they have.
  """

  def __init__(self, cfg):
    super().__init__(cfg)
    block = cfg.policy
    self.tracker = tracker_config(block)
    self.rule = block.get("rule", "gd")
    if self.rule not in ("gd", "cc"):
      raise errors.unknown_key("policy.rule", self.rule, ("gd", "cc"))
    self.candidate_steps = int(block.get("candidate_steps", 0))
    if self.rule == "cc" and self.candidate_steps <= 0:
      raise errors.ConfigError("policy.rule='cc' trains candidates first: set "
                               "policy.candidate_steps to a positive number of steps.")
    self.metric = block.get("metric", "accuracy")

  def init(self, cfg):
    k = int(cfg.model.get("dendrites", 0))
    return {"tracker": perforated.tracker_to_json(perforated.init_tracker(self.tracker)),
            "dendrites": k, "best_dendrites": k, "phase": "neurons", "phase_start": 0,
            "history": []}

  def configure(self, cfg, state):
    cfg = copy_config(cfg)
    cfg.model.dendrites = int(state["dendrites"])
    cfg.model.dendrite_phase = state["phase"]
    if state["phase"] == "candidates":
      # Frozen parameters get zero gradients, so a fresh Adam leaves them exactly where
      # they are, unless decoupled weight decay pulls them: none in this phase.
      cfg.optim.weight_decay = 0.0
    return cfg

  def _best(self, workdir):
    return ckpt_lib.Checkpointer(os.path.join(workdir, "phases", "best"), keep=1)

  def on_eval(self, ctx):
    state = dict(ctx.state)
    if state["phase"] == "candidates":
      if ctx.step - state["phase_start"] < self.candidate_steps:
        return None
      return Change(dict(state, phase="neurons", phase_start=ctx.step), phase="neurons")
    score = float(ctx.val[self.metric])
    tracker, decision = perforated.update(
        perforated.tracker_from_json(state["tracker"]), score, self.tracker)
    state["tracker"] = perforated.tracker_to_json(tracker)
    n_params = sum(int(x.size) for x in jax.tree.leaves(ctx.params))
    state["history"] = state["history"] + [
        {"step": ctx.step, "score": score, "num_dendrites": state["dendrites"],
         "params": n_params, "action": decision.action}]
    if decision.save_best:
      best = self._best(ctx.workdir)
      best.save(ctx.step, ctx.params)
      best.close()
      state["best_dendrites"] = state["dendrites"]
    if decision.action == perforated.CONTINUE:
      return Change(state, reset_optimizer=False)  # new counters, same training
    params = self._restore_best(ctx, state)
    if decision.action == perforated.COMPLETE:
      state["dendrites"] = state["best_dendrites"]
      return Change(state, params=params, stop=True, phase="complete")
    from models import bert  # pylint: disable=g-import-not-at-top
    paths = bert.dendrite_spec(1, ctx.cfg.model.dendrite_layers).paths
    for i in range(decision.num_dendrites - state["best_dendrites"]):
      params = perforated.grow(params, paths, jax.random.fold_in(ctx.key, i))
    state.update(dendrites=decision.num_dendrites, phase_start=ctx.step,
                 phase="candidates" if self.rule == "cc" else "neurons")
    return Change(state, params=params, phase=f"{decision.action}:{decision.num_dendrites}")

  def finish(self, state, workdir):
    """DIR/dendrites.png: scores with the switches marked, best score per architecture."""
    if state["history"] and jax.process_index() == 0:
      dendrite_plots.dendrite_history(state["history"], workdir, maximize=self.tracker.maximize,
                                      title=f"{self.cfg.model.name}, rule {self.rule}")

  def _restore_best(self, ctx, state):
    """The tracker's best parameters, restored into the structure they were saved with."""
    best = self._best(ctx.workdir)
    step = best.latest_step()
    abstract = ctx.abstract_params(self.configure(ctx.cfg, dict(
        state, dendrites=state["best_dendrites"], phase="neurons")))
    params = best.restore(step, abstract)
    best.close()
    return params
