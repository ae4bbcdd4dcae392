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
from ponder.nn import dense
from train import phases
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
  """A copy of `cfg` with the teacher's and the warm start's workdirs made absolute, so
  the run's config.json names the same runs from any directory."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for block, field in (("distill", "teacher_workdir"), ("init", "from_workdir")):
    sub = cfg.get(block, None)
    if sub is not None and sub.get(field, ""):
      sub[field] = os.path.abspath(os.path.expanduser(sub[field]))
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


def restore_run(workdir: str, *, selected: bool = False, params_dir: str = "",
                **data_overrides):
  """(cfg, task, params, step, mesh) of a train.main workdir: its newest checkpoint, or
  with `selected` the parameters selected on validation (best/; the newest checkpoint
  when there is none). cfg and task are those of the phase the parameters come from.
  `params_dir` (relative to the workdir) restores the newest parameters saved there
  instead, in the structure of the workdir's config.json (e.g. `plasticity/baseline`,
  the unpruned model a plasticity run keeps).

  Needs nothing but the workdir (no teacher: that is for training). `data_overrides`
  change the data block (e.g. eval_split) before the task is built.
  """
  cfg = load_config(workdir)
  cfg.data.update(data_overrides)
  run = build_run(cfg, with_teacher=False)

  def run_at(step, which="state"):
    if run.policy is None:
      return run
    return configured(run, phases.load_record(workdir, step)[which])

  if params_dir:
    store = ckpt_lib.Checkpointer(os.path.join(workdir, params_dir))
    step = store.latest_step()
    if step is None:
      store.close()
      raise errors.CheckpointError(f"no parameters under {workdir}/{params_dir}.")
    params = store.restore(step, abstract_state(run).params)
    store.close()
    return run.cfg, run.task, params, step, run.mesh
  if selected:
    best = _best_checkpointer(workdir, run.task)
    step = best.best_step()
    if step is not None:
      at = run_at(step, "evaluated")
      params = best.restore(step, abstract_state(at).params)
      best.close()
      return at.cfg, at.task, params, step, run.mesh
    best.close()
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, step = ckpt.restore_latest(lambda s: abstract_state(run_at(s)))
  ckpt.close()
  if state is None:
    raise errors.CheckpointError(f"no checkpoint under {workdir}/checkpoints; train first.")
  at = run_at(step)
  return at.cfg, at.task, state.params, step, run.mesh


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
  """What `build_run` assembles from a config: everything the loop needs but the state.

  `cfg` builds the current phase's structure (`base_cfg` configured by the phase
  policy, train/phases.py; the same config without a policy); `opt_start` is the step
  at which the current optimizer state started (its learning-rate schedule's step 0).
  """
  cfg: ml_collections.ConfigDict
  mesh: Any
  task: "tasks_lib.Task"
  tx: Any
  schedule: Callable
  init_key: jax.Array
  step_key: jax.Array
  base_cfg: ml_collections.ConfigDict = None
  policy: Optional[phases.Policy] = None
  teacher: Optional[Callable] = None
  opt_start: int = 0


def build_run(cfg: ml_collections.ConfigDict, *, with_teacher: bool = True) -> Run:
  """Mesh, teacher (training only: `with_teacher`), phase policy, task and optimizer;
  raises PonderError on bad input before any file is written."""
  mesh = mesh_lib.make_mesh(**cfg.mesh)
  mesh_lib.check_batch_size(cfg.trainer.batch_size, mesh)
  distill = cfg.get("distill", None)
  teacher = None
  if with_teacher and distill is not None and distill.get("teacher_workdir", ""):
    teacher = load_teacher(distill.teacher_workdir, tasks_lib.how_to_train_teacher(cfg))
  policy = phases.build(cfg)
  now = policy.configure(cfg, policy.init(cfg)) if policy else cfg
  task = tasks_lib.build(now, mesh, teacher=teacher)
  tx, schedule = make_optimizer(now.optim, now.trainer.total_steps)
  init_key, step_key = jax.random.split(jax.random.key(cfg.seed))
  return Run(now, mesh, task, tx, schedule, init_key, step_key, base_cfg=cfg,
             policy=policy, teacher=teacher)


def configured(run: Run, pstate: Optional[dict], opt_start: int = 0) -> Run:
  """The run for policy state `pstate`: task, optimizer and schedule rebuilt only when
  the policy's config for it differs from the run's."""
  run = dataclasses.replace(run, opt_start=opt_start)
  if run.policy is None or pstate is None:
    return run
  return _run_for_cfg(run, run.policy.configure(run.base_cfg, pstate))


def abstract_state(run: Run) -> TrainState:
  """The run's train state as sharded ShapeDtypeStructs (for restoring)."""
  repl = mesh_lib.replicated(run.mesh)
  shapes = jax.eval_shape(functools.partial(init_state, run.task, run.tx), run.init_key)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                      shapes)


def warm_start(run: Run, state: TrainState, echo: Callable) -> TrainState:
  """`init.from_workdir`: every parameter with the same path and shape comes from that
  run's selected parameters (its best/ checkpoint, else its newest); the rest keep
  their fresh init. Logs how many leaves were copied and which were not."""
  block = run.base_cfg.get("init", None)
  source = block.get("from_workdir", "") if block is not None else ""
  if not source:
    return state
  _, _, src_params, src_step, _ = restore_run(source, selected=True)
  src = dict(jax.tree_util.tree_flatten_with_path(src_params)[0])
  copied, kept = [], []

  def take(path, leaf):
    other = src.get(path)
    if other is not None and other.shape == leaf.shape:
      copied.append(path)
      return jax.device_put(jnp.asarray(other, leaf.dtype), leaf.sharding)
    kept.append(jax.tree_util.keystr(path))
    return leaf

  params = jax.tree_util.tree_map_with_path(take, state.params)
  if not copied:
    raise errors.ConfigError(
        f"init.from_workdir={source}: no parameter of this model has the path and shape "
        "of one there; is it a run of the same architecture family?")
  echo(f"Warm start from {source} (step {src_step}): copied {len(copied)} parameter "
       f"arrays; {len(kept)} kept their fresh init"
       + (f": {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}" if kept else ""))
  return TrainState(step=state.step, params=params, opt_state=run.tx.init(params))


def init_or_restore(run: Run, workdir: str, echo: Callable):
  """(run, state, resumed_from, checkpointer, policy state): the newest readable
  checkpoint, in the structure its phase had, or a fresh (or warm-started) state. A
  checkpoint that does not fit the model is an error, never quarantined."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=run.cfg.trainer.keep_ckpts)
  pstate = run.policy.init(run.base_cfg) if run.policy else None

  def run_at(step):
    if run.policy is None:
      return run
    saved = phases.load_record(workdir, step)
    return configured(run, saved["state"], saved.get("opt_start", 0))

  restored, resumed_from = ckpt.restore_latest(lambda step: abstract_state(run_at(step)))
  if restored is not None:
    if run.policy is not None:
      pstate = phases.load_record(workdir, resumed_from)["state"]
    run = run_at(resumed_from)
    echo(f"Resuming from checkpoint at step {resumed_from} in {ckpt.directory}")
    return run, restored, resumed_from, ckpt, pstate
  repl = mesh_lib.replicated(run.mesh)
  state = jax.jit(functools.partial(init_state, run.task, run.tx),
                  out_shardings=repl)(run.init_key)
  return run, warm_start(run, state, echo), None, ckpt, pstate


def _best_checkpointer(workdir: str, task: "tasks_lib.Task") -> ckpt_lib.Checkpointer:
  """Keeps only the parameters of the best validation evaluation so far."""
  metric, mode = task.select
  return ckpt_lib.Checkpointer(os.path.join(workdir, "best"), keep=1, best_metric=metric,
                               best_mode=mode)


def _compile(run: Run):
  """(jitted train step, jitted eval step) of a run's task and optimizer."""
  repl, data_sh = mesh_lib.replicated(run.mesh), mesh_lib.batch_sharding(run.mesh)
  schedule = run.schedule
  if run.opt_start:
    schedule = lambda step: run.schedule(step - run.opt_start)  # noqa: E731
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=run.task.loss_fn, tx=run.tx, schedule=schedule),
      in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl), donate_argnums=(0,))
  eval_fn = jax.jit(run.task.eval_fn, in_shardings=(repl, data_sh), out_shardings=repl)
  return step_fn, eval_fn


def _policy_context(run: Run, state: TrainState, workdir: str, step: int, val: dict,
                    pstate: dict) -> phases.EvalContext:
  def evaluate_cfg(params, cfg=None, split="val"):
    other = run if cfg is None else _run_for_cfg(run, cfg)
    return evaluate(other.task, _compile(other)[1], params, run.mesh, split=split)

  def train_batches(cfg, start, n):
    task = _run_for_cfg(run, cfg).task
    return (mesh_lib.shard_batch(task.train_batch(s), run.mesh) for s in range(start, start + n))

  return phases.EvalContext(
      step=step, val=val, state=pstate, params=state.params, cfg=run.cfg, workdir=workdir,
      key=jax.random.fold_in(jax.random.fold_in(run.step_key, step), 1 << 30),
      evaluate=evaluate_cfg,
      abstract_params=lambda cfg: abstract_state(_run_for_cfg(run, cfg)).params,
      train_batches=train_batches)


def _run_for_cfg(run: Run, cfg: ml_collections.ConfigDict) -> Run:
  """`run` with the task and optimizer of `cfg` (rebuilt only if the configs differ)."""
  if not config_diff(cfg, run.cfg):
    return run
  task = tasks_lib.build(cfg, run.mesh, teacher=run.teacher)
  tx, schedule = make_optimizer(cfg.optim, cfg.trainer.total_steps)
  return dataclasses.replace(run, cfg=cfg, task=task, tx=tx, schedule=schedule)


def apply_change(run: Run, state: TrainState, change: phases.Change, step: int):
  """(run, state) after a policy's change: the run rebuilt for the new structure, the
  new parameters placed, and a fresh optimizer state when asked (or when the
  parameter tree changed, since the old one no longer fits)."""
  params = state.params if change.params is None else change.params
  reset = change.reset_optimizer or change.params is not None
  new = configured(run, change.state, step if reset else run.opt_start)
  repl = mesh_lib.replicated(run.mesh)
  params = jax.device_put(params, repl)
  opt_state = jax.jit(new.tx.init, out_shardings=repl)(params) if reset else state.opt_state
  return new, TrainState(step=state.step, params=params, opt_state=opt_state)


def train_loop(run: Run, state: TrainState, workdir: str, ckpt, best, *, echo: Callable,
               stop_after: Optional[int] = None, pstate: Optional[dict] = None) -> tuple:
  """Steps from `state.step` to total_steps: logs, evaluates on the validation split,
  checkpoints (periodically, on SIGTERM, at the end), keeps the best parameters, and
  lets the phase policy act after each log and evaluation. Returns (run, state,
  reached_end, preempted, policy state)."""
  total, start = run.cfg.trainer.total_steps, int(state.step)
  step_fn, eval_fn = _compile(run)
  # Rows past the restored step came from the part of a run that was lost: drop them.
  plog.truncate_metrics(workdir, start)
  writer = plog.MetricWriter(workdir, purge_step=start + 1 if start else None)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  dtype = run.cfg.model.get("compute_dtype", run.cfg.model.get("dtype", "float32"))
  echo(f"{run.cfg.model.name}: {n_params:,} parameters; {run.mesh.devices.size} device(s) "
       f"{dict(run.mesh.shape)}; matmuls in {dtype}; steps {start} -> {total}")
  warning = dense.slow_dtype_warning(dtype)
  if warning:
    echo(f"warning: {warning}")

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

  def log_interval(done, pstate):
    """Writes the mean metrics of the steps since the last log; empties the interval."""
    nonlocal interval, t0
    check(pending)
    means = {k: float(np.mean(v)) for k, v in jax.device_get(
        jax.tree.map(lambda *xs: jnp.stack(xs), *interval)).items() if k != "finite"}
    means["steps_per_s"] = len(interval) / max(time.time() - t0, 1e-9)
    writer.write(done, means)
    bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
    interval, t0 = [], time.time()
    return pstate if run.policy is None else run.policy.on_log(pstate, done, means)

  preempted = stop = False
  try:
    with _Preemption() as preempt:
      for step in range(start, total):
        cfg = run.cfg
        batch = mesh_lib.shard_batch(run.task.train_batch(step), run.mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(run.step_key, step))
        if pending is not None:
          check(pending)  # The previous step is done by now: no pipeline stall.
        pending = (step, metrics)
        interval.append(metrics)
        done = step + 1
        bar.update(1)
        run_steps += 1
        at_end = done == total
        changed = False
        if done % cfg.trainer.log_every == 0 or at_end:
          pstate = log_interval(done, pstate)
        if done % cfg.trainer.eval_every == 0 or at_end:
          check(pending)
          val = evaluate(run.task, eval_fn, state.params, run.mesh)
          writer.write(done, val, split="eval")
          best.save(done, state.params, metrics=val)
          bar.write(f"step {done}: val {plog.format_metrics(val)}")
          if run.policy is not None:
            evaluated = pstate
            change = run.policy.on_eval(
                _policy_context(run, state, workdir, done, val, pstate))
            if change is not None:
              pstate = change.state
              # A new phase may change only the config (e.g. a loss weight): that too
              # needs the step rebuilt, or the old config keeps training.
              if (change.params is not None or change.reset_optimizer
                  or config_diff(run.policy.configure(run.base_cfg, pstate), run.cfg)):
                # The new step may report other metrics (rule cc's candidate phase):
                # the steps before the change are logged as their own interval.
                if interval:
                  pstate = log_interval(done, pstate)
                run, state = apply_change(run, state, change, done)
                step_fn, eval_fn = _compile(run)
                changed = True
              if change.phase:
                writer.write(done, {"phase": change.phase}, split="phase")
                bar.write(f"step {done}: phase {change.phase}")
              stop = change.stop
            phases.save_record(workdir, done, pstate, evaluated, opt_start=run.opt_start)
        if (done % cfg.trainer.ckpt_every == 0 or at_end or preempt.requested or changed
            or stop):
          check(pending)
          if run.policy is not None:
            phases.save_record(workdir, done, pstate, opt_start=run.opt_start, keep=True)
          ckpt.save(done, state)
        if preempt.requested:
          preempted = True
          bar.write(f"SIGTERM: saved checkpoint at step {done}; rerun the same command "
                    "to resume.")
          break
        if stop or (stop_after is not None and run_steps >= stop_after):
          break
  finally:
    bar.close()
    writer.close()
  return run, state, done >= total or stop, preempted, pstate


def finish(run: Run, state: TrainState, workdir: str, best) -> dict:
  """Scores the checkpoint selected on validation once on the test split and writes
  final_metrics.json: the headline (test, or validation where the data has no test
  split) flat, plus "val" and "test" blocks and which step was selected."""
  selected = best.best_step()
  params = state.params
  if selected is not None and selected != int(state.step):
    if run.policy is not None:  # the structure the selected parameters were trained in
      run = configured(run, phases.load_record(workdir, selected)["evaluated"])
    params = best.restore(selected, abstract_state(run).params)
  eval_fn = _compile(run)[1]
  val = evaluate(run.task, eval_fn, params, run.mesh)
  test = (evaluate(run.task, eval_fn, params, run.mesh, split="test")
          if run.task.test_batches else None)
  metric, mode = run.task.select
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
  metrics (`finish`; empty when the run stopped early) plus `state`, `resumed_from`,
  `preempted` and, with a phase policy, `policy_state`.
  """
  cfg = resolve_paths(cfg)
  check_rerun(cfg, workdir, allow_config_change=allow_config_change, echo=echo)
  run = build_run(cfg)
  run, state, resumed_from, ckpt, pstate = init_or_restore(run, workdir, echo)
  write_config(cfg, workdir)
  best = _best_checkpointer(workdir, run.task)
  try:
    run, state, reached_end, preempted, pstate = train_loop(
        run, state, workdir, ckpt, best, echo=echo, stop_after=stop_after, pstate=pstate)
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
  out = dict(final, state=state, resumed_from=resumed_from, preempted=preempted)
  if run.policy is not None:
    if reached_end:
      run.policy.finish(pstate, workdir)
    out["policy_state"] = pstate
  return out
