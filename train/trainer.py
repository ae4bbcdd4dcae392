"""The train loop every experiment shares.

Phases, each a function below: `check_rerun` (a rerun's config against the workdir's,
before anything is written) -> `build_run` (mesh, teacher, task, optimizer) ->
`init_or_restore` (the state, from the newest readable checkpoint) -> `train_loop` (step,
log, evaluate on the validation split, checkpoint, keep the best) -> `finish` (the
checkpoint selected on validation, scored once on the test split). The step is a
module-level pure function; the loop owns all side effects.

Reproducibility: the batch at step t is a pure function of (seed, t), and the step's
PRNG key is `fold_in(key, t)`, so a run resumed from a checkpoint ends with the same
parameters as one that never stopped.
"""

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ponder import checkpoint as ckpt_lib
from ponder.analysis import plots
from ponder import errors
from ponder import metric_log as plog
from ponder import mesh as mesh_lib
from train import tasks as tasks_lib

log = logging.getLogger(__name__)

# Metrics whose non-finite value stops the run.
WATCHED = ("loss", "grad_norm")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW with linear warm-up then cosine decay, and global-norm clipping.

  Weight decay applies to matrices and embeddings (ndim > 1), not to biases and norms.
  `optim.lr_scales` (optional, {module-name prefix: factor}) scales the learning rate of
  the parameters under such modules (see `scale_by_module`); absent or empty, no change.
  Returns (optax transformation, learning-rate schedule).
  """
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                   mask=decay_mask)
  if optim.clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.clip), tx)
  scales = dict(optim.get("lr_scales", None) or {})
  if scales:
    tx = optax.chain(tx, scale_by_module(scales))
  return tx, schedule


def scale_by_module(scales: dict) -> optax.GradientTransformation:
  """Multiplies the update of every parameter whose path has a module name starting with
  a key of `scales` by that key's factor (the first key that matches).

  After AdamW this is a per-module learning rate: AdamW's update, weight decay included,
  is proportional to the learning rate.
  """
  def factor(path):
    names = [str(getattr(k, "key", k)) for k in path]
    return next((f for prefix, f in scales.items()
                 if any(n.startswith(prefix) for n in names)), 1.0)

  return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(
      lambda path, u: u * factor(path), updates))


def train_step(state: TrainState, batch, key, *, loss_fn: Callable, tx, schedule):
  """One optimizer step. `loss_fn(params, batch, key, step=, train=True) -> (loss, metrics)`
  (the step drives the model's own schedules, e.g. DynamicViT's temperature).

  A non-finite loss or gradient skips the update (the state passes through unchanged)
  and reports `finite=False`, so the state is never poisoned and the host can stop the
  run with the last good checkpoint intact.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, step=state.step, train=True),
                               has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, key)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + finite.astype(state.step.dtype),
                         params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state))
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                 finite=finite)
  return new_state, metrics


def _first_nonfinite(metrics) -> Optional[tuple]:
  for name in WATCHED:
    value = float(metrics[name])
    if not np.isfinite(value):
      return name, value
  return ("loss", float("nan")) if not bool(metrics["finite"]) else None


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(task: "tasks_lib.Task", eval_fn, params, mesh, split: str = "val") -> dict:
  """Runs the task's whole validation (or "test") split and summarizes the summed metrics."""
  totals = None
  for batch in (task.eval_batches() if split == "val" else task.test_batches()):
    sums = eval_fn(params, mesh_lib.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return task.summarize(jax.device_get(totals))


def init_state(task: "tasks_lib.Task", tx, key) -> TrainState:
  """Fresh parameters from the task and the optimizer state that goes with them."""
  params = task.init(key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise errors.MissingDataError(
        f"{path} not found: is {workdir} the --workdir of a train.main run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict:
  """{dotted key: (old value, new value)} for every field that differs (missing = None),
  compared as the JSON that config.json holds."""
  a = _flat(json.loads(old.to_json_best_effort()))
  b = _flat(json.loads(new.to_json_best_effort()))
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


# Fields a rerun may change: they alter how long the run goes and how often it reports,
# not what it trains. `reference` is the expected-result text printed at the end.
RESUMABLE_CHANGES = ("trainer.total_steps", "trainer.log_every", "trainer.eval_every",
                     "trainer.ckpt_every", "trainer.keep_ckpts", "reference")


def resolve_paths(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `cfg` with the teacher's workdir made absolute, so the run's config.json
  names the same teacher from any directory."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  distill = cfg.get("distill", None)
  if distill is not None and distill.get("teacher_workdir", ""):
    distill.teacher_workdir = os.path.abspath(os.path.expanduser(distill.teacher_workdir))
  return cfg


def check_rerun(cfg: ml_collections.ConfigDict, workdir: str, *,
                allow_config_change: bool = False, echo: Callable = print) -> None:
  """Stops a rerun whose config differs from the one the workdir was made with.

  Only `RESUMABLE_CHANGES` pass silently; `allow_config_change` accepts any other
  difference (restoring then still fails, naming the arrays, if the state's structure
  changed). Reads only: nothing is written here.
  """
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return
  diff = config_diff(load_config(workdir), cfg)
  blocking = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
  if blocking and not allow_config_change:
    lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in blocking.items())
    raise errors.ConfigError(
        f"{workdir} was made with another config ({lines}). Nothing was changed. Use a "
        "new --workdir for the new config, rerun with the workdir's config.json "
        "settings, or pass --allow_config_change to continue this run with them (for "
        "fields that keep the state's shape, such as optim.lr).")
  if diff:
    echo("Config changes on this rerun: " + "; ".join(
        f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()))


def restore_run(workdir: str, **data_overrides):
  """(cfg, task, params, step, mesh) of the newest checkpoint in a train.main workdir.

  Needs nothing but the workdir (no teacher: that is for training). `data_overrides`
  change the data block (e.g. eval_split) before the task is built.
  """
  cfg = load_config(workdir)
  cfg.data.update(data_overrides)
  mesh = mesh_lib.make_mesh(**cfg.mesh)
  task = tasks_lib.build(cfg, mesh)
  tx, _ = make_optimizer(cfg.optim, cfg.trainer.total_steps)
  repl = mesh_lib.replicated(mesh)
  abstract = jax.eval_shape(functools.partial(init_state, task, tx), jax.random.key(0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                          abstract)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, step = ckpt.restore_latest(abstract)
  ckpt.close()
  if state is None:
    raise errors.CheckpointError(f"no checkpoint under {workdir}/checkpoints; train first.")
  return cfg, task, state.params, step, mesh


def load_teacher(workdir: str, how_to_train: str = "") -> Callable:
  """images -> (logits, final tokens) of the newest checkpoint in a train.main workdir.

  The final tokens are the output of the teacher's `ln_final` LayerNorm (the name in
  models/vit.py and models/dendritic_liquid_vit.py), captured without changing it.
  """
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise errors.MissingDataError(
        f"the teacher run {workdir} does not exist (no config.json there). Train it "
        f"first{': ' + how_to_train if how_to_train else ''}, or point "
        "distill.teacher_workdir at a trained run.")
  _, task, params, _, _ = restore_run(workdir)
  model = task.model

  def apply(images):
    logits, state = model.apply({"params": params}, images, train=False,
                                capture_intermediates=lambda m, _: m.name == "ln_final",
                                mutable=["intermediates"])
    return logits, state["intermediates"]["ln_final"]["__call__"][0]

  return apply


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass(frozen=True)
class Run:
  """What `build_run` assembles from a config: everything the loop needs but the state."""
  cfg: ml_collections.ConfigDict
  mesh: Any
  task: "tasks_lib.Task"
  tx: Any
  schedule: Callable
  init_key: jax.Array
  step_key: jax.Array


def build_run(cfg: ml_collections.ConfigDict) -> Run:
  """Mesh, teacher (training only), task and optimizer; raises PonderError on bad input
  before any file is written."""
  mesh = mesh_lib.make_mesh(**cfg.mesh)
  mesh_lib.check_batch_size(cfg.trainer.batch_size, mesh)
  distill = cfg.get("distill", None)
  teacher = None
  if distill is not None and distill.get("teacher_workdir", ""):
    teacher = load_teacher(distill.teacher_workdir, tasks_lib.how_to_train_teacher(cfg))
  task = tasks_lib.build(cfg, mesh, teacher=teacher)
  tx, schedule = make_optimizer(cfg.optim, cfg.trainer.total_steps)
  init_key, step_key = jax.random.split(jax.random.key(cfg.seed))
  return Run(cfg, mesh, task, tx, schedule, init_key, step_key)


def init_or_restore(run: Run, workdir: str, echo: Callable):
  """(state, resumed_from, checkpointer): the newest readable checkpoint, or a fresh
  state. A checkpoint that does not fit the model is an error, never quarantined."""
  repl = mesh_lib.replicated(run.mesh)
  state = jax.jit(functools.partial(init_state, run.task, run.tx),
                  out_shardings=repl)(run.init_key)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=run.cfg.trainer.keep_ckpts)
  restored, resumed_from = ckpt.restore_latest(ckpt_lib.abstract_like(state))
  if restored is not None:
    state = restored
    echo(f"Resuming from checkpoint at step {resumed_from} in {ckpt.directory}")
  return state, resumed_from, ckpt


def _best_checkpointer(workdir: str, task: "tasks_lib.Task") -> ckpt_lib.Checkpointer:
  """Keeps only the parameters of the best validation evaluation so far."""
  metric, mode = task.select
  return ckpt_lib.Checkpointer(os.path.join(workdir, "best"), keep=1, best_metric=metric,
                               best_mode=mode)


def train_loop(run: Run, state: TrainState, workdir: str, ckpt, best, *, echo: Callable,
               stop_after: Optional[int] = None) -> tuple:
  """Steps from `state.step` to total_steps: logs, evaluates on the validation split,
  checkpoints (periodically, on SIGTERM, at the end), and keeps the best parameters.
  Returns (state, reached_end, preempted)."""
  cfg, task, mesh = run.cfg, run.task, run.mesh
  total, start = cfg.trainer.total_steps, int(state.step)
  repl, data_sh = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=task.loss_fn, tx=run.tx, schedule=run.schedule),
      in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl), donate_argnums=(0,))
  eval_fn = jax.jit(task.eval_fn, in_shardings=(repl, data_sh), out_shardings=repl)
  # Rows past the restored step came from the part of a run that was lost: drop them.
  plog.truncate_metrics(workdir, start)
  writer = plog.MetricWriter(workdir, purge_step=start + 1 if start else None)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  echo(f"{cfg.model.name}: {n_params:,} parameters; {mesh.devices.size} device(s) "
       f"{dict(mesh.shape)}; steps {start} -> {total}")

  interval, pending, run_steps, done = [], None, 0, start

  def check(entry):
    step, metrics = entry
    bad = _first_nonfinite(jax.device_get(metrics))
    if bad is not None:
      ckpt.close()
      writer.close()
      raise errors.NonFiniteLossError(step, *bad)

  bar = plog.progress(total, start)
  t0 = time.time()
  preempted = False
  try:
    with _Preemption() as preempt:
      for step in range(start, total):
        batch = mesh_lib.shard_batch(task.train_batch(step), mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(run.step_key, step))
        if pending is not None:
          check(pending)  # The previous step is done by now: no pipeline stall.
        pending = (step, metrics)
        interval.append(metrics)
        done = step + 1
        bar.update(1)
        run_steps += 1
        at_end = done == total
        if done % cfg.trainer.log_every == 0 or at_end:
          check(pending)
          means = {k: float(np.mean(v)) for k, v in jax.device_get(
              jax.tree.map(lambda *xs: jnp.stack(xs), *interval)).items() if k != "finite"}
          means["steps_per_s"] = len(interval) / max(time.time() - t0, 1e-9)
          writer.write(done, means)
          bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
          interval, t0 = [], time.time()
        if done % cfg.trainer.eval_every == 0 or at_end:
          check(pending)
          val = evaluate(task, eval_fn, state.params, mesh)
          writer.write(done, val, split="eval")
          best.save(done, state.params, metrics=val)
          bar.write(f"step {done}: val {plog.format_metrics(val)}")
        if done % cfg.trainer.ckpt_every == 0 or at_end or preempt.requested:
          check(pending)
          ckpt.save(done, state)
        if preempt.requested:
          preempted = True
          bar.write(f"SIGTERM: saved checkpoint at step {done}; rerun the same command "
                    "to resume.")
          break
        if stop_after is not None and run_steps >= stop_after:
          break
  finally:
    bar.close()
    writer.close()
  return state, done >= total, preempted


def finish(run: Run, state: TrainState, workdir: str, best) -> dict:
  """Scores the checkpoint selected on validation once on the test split and writes
  final_metrics.json: the headline (test, or validation where the data has no test
  split) flat, plus "val" and "test" blocks and which step was selected."""
  task, mesh = run.task, run.mesh
  repl, data_sh = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  eval_fn = jax.jit(task.eval_fn, in_shardings=(repl, data_sh), out_shardings=repl)
  selected = best.best_step()
  params = state.params
  if selected is not None and selected != int(state.step):
    params = best.restore(selected, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), state.params))
  val = evaluate(task, eval_fn, params, mesh)
  test = evaluate(task, eval_fn, params, mesh, split="test") if task.test_batches else None
  metric, mode = task.select
  final = {"step": int(state.step), "selected_step": selected or int(state.step),
           "selected_on": f"val {metric} ({mode})", "split": "test" if test else "val",
           **(test or val), "val": val, "test": test}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  return final


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: Optional[int] = None, echo: Callable = print,
                       allow_config_change: bool = False) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint.

  `stop_after` ends the run after that many steps of this invocation without a final
  checkpoint, as a crash would (tests use it to check resumption). Returns the final
  metrics (`finish`; empty when the run stopped early) plus `state`, `resumed_from` and
  `preempted`.
  """
  cfg = resolve_paths(cfg)
  check_rerun(cfg, workdir, allow_config_change=allow_config_change, echo=echo)
  run = build_run(cfg)
  state, resumed_from, ckpt = init_or_restore(run, workdir, echo)
  write_config(cfg, workdir)
  best = _best_checkpointer(workdir, run.task)
  try:
    state, reached_end, preempted = train_loop(run, state, workdir, ckpt, best, echo=echo,
                                               stop_after=stop_after)
  finally:
    ckpt.close()
  final = {}
  if reached_end:
    if resumed_from is not None and resumed_from >= cfg.trainer.total_steps:
      echo(f"Already at step {resumed_from} >= total_steps {cfg.trainer.total_steps}; "
           "evaluated the selected checkpoint.")
    final = finish(run, state, workdir, best)
  best.close()
  if jax.process_index() == 0:
    plots.training_curves(plog.read_metrics(workdir), os.path.join(workdir, "curves.png"),
                          title=f"{cfg.model.name} ({workdir})")
  return dict(final, state=state, resumed_from=resumed_from, preempted=preempted)
