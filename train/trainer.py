"""The train loop every experiment shares.

Phases: build the task (model, data, losses) -> build the mesh and optimizer -> init or
restore the state -> loop (step, log, evaluate, checkpoint) -> final checkpoint and
evaluation. The step is a module-level pure function; the loop owns all side effects.

Reproducibility: the batch at step t is a pure function of (seed, t), and the step's
PRNG key is `fold_in(key, t)`, so a run resumed from a checkpoint ends with the same
parameters as one that never stopped.
"""

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
  """One optimizer step. `loss_fn(params, batch, key, train=True) -> (loss, metrics)`.

  A non-finite loss or gradient skips the update (the state passes through unchanged)
  and reports `finite=False`, so the state is never poisoned and the host can stop the
  run with the last good checkpoint intact.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, train=True), has_aux=True)
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


def evaluate(task: "tasks_lib.Task", eval_fn, params, mesh) -> dict:
  """Runs the task's whole evaluation split and summarizes the summed metrics."""
  totals = None
  for batch in task.eval_batches():
    sums = eval_fn(params, mesh_lib.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return task.summarize(jax.device_get(totals))


def init_state(task: "tasks_lib.Task", tx, key) -> TrainState:
  params = task.init(key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise errors.MissingDataError(
        f"{path} not found: is {workdir} the --workdir of a train.main run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_run(workdir: str, **data_overrides):
  """(cfg, task, params, step, mesh) of the newest checkpoint in a train.main workdir.

  `data_overrides` change the data block (e.g. eval_split) before the task is built.
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


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: Optional[int] = None, echo: Callable = print) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint.

  `stop_after` ends the run after that many steps of this invocation without a final
  checkpoint, as a crash would (tests use it to check resumption). Returns the final
  evaluation metrics plus `state` and `resumed_from`.
  """
  write_config(cfg, workdir)
  mesh = mesh_lib.make_mesh(**cfg.mesh)
  mesh_lib.check_batch_size(cfg.trainer.batch_size, mesh)
  task = tasks_lib.build(cfg, mesh)
  total = cfg.trainer.total_steps
  tx, schedule = make_optimizer(cfg.optim, total)
  repl, data_sh = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  init_key, step_key = jax.random.split(jax.random.key(cfg.seed))

  state = jax.jit(functools.partial(init_state, task, tx), out_shardings=repl)(init_key)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=cfg.trainer.keep_ckpts)
  restored, resumed_from = ckpt.restore_latest(ckpt_lib.abstract_like(state))
  if restored is not None:
    state = restored
    echo(f"Resuming from checkpoint at step {resumed_from} in {ckpt.directory}")
  start = int(state.step)

  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=task.loss_fn, tx=tx, schedule=schedule),
      in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl), donate_argnums=(0,))
  eval_fn = jax.jit(task.eval_fn, in_shardings=(repl, data_sh), out_shardings=repl)
  writer = plog.MetricWriter(workdir)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  echo(f"{cfg.model.name}: {n_params:,} parameters; {mesh.devices.size} device(s) "
       f"{dict(mesh.shape)}; steps {start} -> {total}")

  interval, pending, eval_metrics = [], None, {}
  run_steps = 0

  def check(entry):
    step, metrics = entry
    bad = _first_nonfinite(jax.device_get(metrics))
    if bad is not None:
      ckpt.close()
      writer.close()
      raise errors.NonFiniteLossError(step, *bad)

  bar = plog.progress(total, start)
  t0 = time.time()
  try:
    with _Preemption() as preempt:
      for step in range(start, total):
        batch = mesh_lib.shard_batch(task.train_batch(step), mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, step))
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
          eval_metrics = evaluate(task, eval_fn, state.params, mesh)
          writer.write(done, eval_metrics, split="eval")
          bar.write(f"step {done}: eval {plog.format_metrics(eval_metrics)}")
        if done % cfg.trainer.ckpt_every == 0 or at_end or preempt.requested:
          check(pending)
          ckpt.save(done, state)
        if preempt.requested:
          bar.write(f"SIGTERM: saved checkpoint at step {done}; rerun the same command "
                    "to resume.")
          break
        if stop_after is not None and run_steps >= stop_after:
          break
  finally:
    bar.close()
  ckpt.close()
  if start >= total and not eval_metrics:
    eval_metrics = evaluate(task, eval_fn, state.params, mesh)
    echo(f"Already at step {start} >= total_steps {total}; evaluated the checkpoint.")
  writer.close()
  if jax.process_index() == 0:
    if eval_metrics:
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump({"step": int(state.step), **eval_metrics}, f, indent=2)
    plots.training_curves(plog.read_metrics(workdir), os.path.join(workdir, "curves.png"),
                          title=f"{cfg.model.name} ({workdir})")
  return dict(eval_metrics, state=state, resumed_from=resumed_from,
              preempted=preempt.requested)
