"""What the benchmarks share: the machine record, JSON output, and the train steps
(ponder's jitted step and a PyTorch peer with the same optimizer) they time."""

import datetime
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import trainer


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:  # Not Linux.
    names = []
  return names[0] if names else platform.processor() or platform.machine()


def machine(**extra) -> dict:
  """Date, backend, device, processor, versions and the load when the run started.

  The load average is recorded because side-by-side ratios survive a busy machine but
  absolute rates do not.
  """
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
              cpu_count=os.cpu_count(), processor=cpu_name(), jax_version=jax.__version__,
              load_average_start=os.getloadavg(), **extra)


def write_json(path: str, result: dict) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


def jitted_train_step(loss_fn, cfg, params, batch):
  """The trainer's jitted step (`train.trainer.train_step`, donated state, the
  schedule of `cfg.trainer.total_steps`) as a no-argument callable that carries its
  state between calls.

  Returns (run, info): info holds compile_s and train_flops_per_step_compiled, and
  each run leaves its loss in info["final_loss"]; run.compiled is the compiled step
  (for `op_breakdown`).
  """
  from ponder import analysis  # pylint: disable=g-import-not-at-top
  from train import trainer  # pylint: disable=g-import-not-at-top
  tx, schedule = trainer.make_optimizer(cfg.optim, cfg.trainer.total_steps)
  step_fn = jax.jit(functools.partial(trainer.train_step, loss_fn=loss_fn, tx=tx,
                                      schedule=schedule), donate_argnums=(0,))
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  root = jax.random.key(cfg.seed)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, root).compile()
  info = dict(compile_s=time.perf_counter() - start,
              train_flops_per_step_compiled=analysis.cost_of(compiled)["flops"])
  step = 0

  def run():
    nonlocal state, step
    state, metrics = compiled(state, batch, jax.random.fold_in(root, step))
    step += 1
    info["final_loss"] = metrics["loss"]
    return state, metrics

  run.compiled = compiled
  return run, info


def op_breakdown(run, *, top: int = 8, runs: int = 2) -> dict:
  """Where the time of a `jitted_train_step` goes: its `top` XLA ops by time per step,
  each with ms, share of the profiled step, result shape and the jax op it came from.
  Shares are of the summed op times (`analysis.op_profile`), which the profiler
  inflates a little and concurrent ops can push past the wall time."""
  from ponder import analysis  # pylint: disable=g-import-not-at-top
  seconds = analysis.op_profile(run, module=analysis.hlo_module_name(run.compiled),
                                runs=runs)
  info = analysis.hlo_op_info(run.compiled)
  total = sum(seconds.values())
  return dict(summed_op_s=total, ops=[
      dict(op=name, ms=1e3 * s, share=s / total, **info.get(name, {}))
      for name, s in list(seconds.items())[:top]])


def torch_matmul_peak(n: int = 2048) -> float:
  """PyTorch's dense n x n float32 matmul FLOP/s on this machine (the XLA side's is
  `analysis.matmul_peak_flops`); MFU takes the better of the two as the peak."""
  import torch  # pylint: disable=g-import-not-at-top
  from ponder import analysis  # pylint: disable=g-import-not-at-top
  a = torch.randn(n, n)
  return 2 * n ** 3 / analysis.measure(lambda: a @ a)["median_s"]


def torch_train_step(model, cfg, steps: int, loss_of):
  """The same step in PyTorch: `torch.optim.AdamW` with ponder's decay groups
  (matrices and embeddings, not biases and norms), learning-rate schedule and
  global-norm clipping (`train.trainer.make_optimizer`), for at most `steps` calls.
  `loss_of()` is the loss of the fixed batch.

  Returns (run, info) like `jitted_train_step`; the first step runs here, untimed,
  because under torch.compile it is the compilation (info["first_step_s"]).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from train import trainer  # pylint: disable=g-import-not-at-top
  optim = cfg.optim
  params = list(model.parameters())
  opt = torch.optim.AdamW(
      [{"params": [p for p in params if p.ndim > 1], "weight_decay": optim.weight_decay},
       {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
      lr=optim.lr, betas=(optim.b1, optim.b2), eps=1e-8)
  _, schedule = trainer.make_optimizer(optim, cfg.trainer.total_steps)
  lrs = np.asarray(schedule(np.arange(steps)), np.float64).tolist()
  info, step = {}, 0

  def run():  # CPU torch returns finished tensors: nothing to sync.
    nonlocal step
    for group in opt.param_groups:
      group["lr"] = lrs[step]
    opt.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    if optim.clip > 0:
      torch.nn.utils.clip_grad_norm_(params, optim.clip)
    opt.step()
    step += 1
    info["final_loss"] = loss.detach()
    return loss

  start = time.perf_counter()
  run()
  info["first_step_s"] = time.perf_counter() - start
  return run, info


def train(cfg, workdir: str, echo=print) -> dict:
  """`trainer.train_and_evaluate`, except that a SIGTERM ends the whole benchmark: the
  trainer checkpoints the run and returns, and a benchmark that went on to its next run
  would ignore the signal. Rerunning the benchmark resumes the run."""
  result = trainer.train_and_evaluate(cfg, workdir, echo=echo)
  if result["preempted"]:
    raise SystemExit(f"stopped by SIGTERM; {workdir} is checkpointed: rerun the same "
                     "command to resume.")
  return result
