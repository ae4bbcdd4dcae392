"""What the benchmarks share: the machine record, JSON output, and the train steps
(ponder's jitted step and a PyTorch peer with the same optimizer) they time."""

import contextlib
from concurrent import futures
import datetime
import functools
import importlib
import json
import multiprocessing
import os
import platform
import time
import types
from typing import Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ponder import errors
from ponder.nn import dense
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
              load_average_start=os.getloadavg(),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
              bf16_matmul_hardware=dense.bf16_matmul_hardware(), **extra)


def define_step_flags(*, quick: str, bf16: str) -> types.SimpleNamespace:
  """The flags of the step benchmarks (vit_throughput, lm_throughput), defined by the
  program that calls this; `quick` and `bf16` are their help texts."""
  return types.SimpleNamespace(
      out=flags.DEFINE_string("out", "", "JSON file for the results ('' = print only)."),
      quick=flags.DEFINE_bool("quick", False, quick),
      runs=flags.DEFINE_integer("runs", 10, "Timed steps per side (median reported)."),
      warmup=flags.DEFINE_integer("warmup", 2, "Untimed steps per side after its first."),
      bf16=flags.DEFINE_bool("bf16", True, bf16),
      old_default=flags.DEFINE_bool(
          "old_default", True, "Also time ponder's pre-issue-21 default step (system "
          "allocator, float32, 3-D nn.Dense) in a child process, in the same round robin."),
      reuse_memory=flags.DEFINE_bool("reuse_memory", True, "As train.main's --reuse_memory."))


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


# A 1-minute load average above this before a run on the 2-core machine (or above it
# plus the cores the run itself keeps busy, after it) means other work shared the cores:
# its ratios hold, its absolute rates and MFU do not.
LOADED = 1.5
PEAK_SIZES = (512, 1024, 2048)
# The two matmul precisions a step can use: float32, and bfloat16 operands with float32
# accumulation (`preferred_element_type=float32`; a bf16 result picks a slower kernel).
PEAK_DTYPES = ("float32", "bfloat16")


def torch_bf16_sides(names, out: dict) -> list:
  """`names` (torch's bf16 autocast sides) where torch's bf16 matmul is fast enough to
  time; elsewhere (a CPU without AVX512_BF16, where it runs on one thread at about
  1 GFLOP/s and a ViT step would take hours) records each as skipped in `out`."""
  if dense.bf16_matmul_hardware():
    return list(names)
  for name in names:
    out[name] = dict(error="skipped: no AVX512_BF16 here, and torch's bf16 CPU matmul "
                     "then runs on one thread at about 1 GFLOP/s")
  return []


def load_record(start, end, limit: float = LOADED, own: Optional[int] = None) -> dict:
  """The 1-minute load averages around a measurement, and whether other work shared
  the cores (`loaded`: absolute rates and MFU of that run are not the machine's): the
  load before it above `limit`, or after it above `limit` + `own`, the threads the
  measurement itself kept running (default: every core; a benchmark that keeps 2 cores
  busy ends at a load near 2 with nothing else running)."""
  own = os.cpu_count() if own is None else own
  return dict(load_average_start=list(start), load_average_end=list(end),
              loaded=bool(start[0] > limit or end[0] > limit + own), loaded_above=limit,
              loaded_above_after=limit + own)


def finish_machine(record: dict, start: float) -> None:
  """Completes a `machine()` record at the end of a run started at perf_counter
  `start`: the load after it (`load_record`) and the wall time."""
  record.update(load_record(record["load_average_start"], os.getloadavg()),
                wall_s=time.perf_counter() - start)


def _xla_matmul(dtype: str, n: int):
  a = jax.random.normal(jax.random.key(n), (n, n), jnp.dtype(dtype))
  matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  jax.block_until_ready(matmul(a, a))  # Compiled here, not in a timed call.
  return lambda: jax.block_until_ready(matmul(a, a))


def _torch_matmul(dtype: str, n: int):
  """torch's n x n matmul, or None for bf16 on a CPU without AVX512_BF16: there it runs
  on one thread at a few GFLOP/s, is never the peak, and a probe call of it took most
  of a benchmark's time."""
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == "bfloat16" and not dense.bf16_matmul_hardware():
    return None
  a = torch.randn(n, n).to(getattr(torch, dtype))  # bf16 @ bf16 accumulates in f32 (oneDNN).
  return lambda: a @ a


class PeakProbe:
  """Dense-matmul peaks (FLOP/s) per precision: the best over `sizes` and every call.

  The denominator of MFU. One probe call times one n x n matmul per (framework, dtype,
  size); a benchmark calls it between rounds of its own steps (e.g. as one more entry
  of `analysis.measure_interleaved`), so that the peak is taken under the same load as
  the steps and the best of many calls approaches what an idle core sustains. A single
  matmul timed before the steps under load gave a peak 2.8x too low.

  `frameworks` maps a name to make(dtype, n) -> a no-argument callable that runs (and
  finishes) that matmul, or None where that framework does not take part at `dtype`;
  `clock` is the timer.
  """

  def __init__(self, sizes=PEAK_SIZES, dtypes=PEAK_DTYPES, frameworks=None,
               clock=time.perf_counter):
    frameworks = frameworks or {"xla": _xla_matmul}
    self._clock = clock
    runs = {(fw, dtype, n): make(dtype, n) for fw, make in frameworks.items()
            for dtype in dtypes for n in sizes}
    self._runs = {key: run for key, run in runs.items() if run is not None}
    self.best = {key: 0.0 for key in self._runs}  # FLOP/s per (framework, dtype, size).
    self.calls = 0

  def __call__(self) -> None:
    for (fw, dtype, n), run in self._runs.items():
      start = self._clock()
      run()
      seconds = self._clock() - start
      self.best[fw, dtype, n] = max(self.best[fw, dtype, n], 2 * n ** 3 / seconds)
    self.calls += 1

  def peak(self, dtype: str) -> float:
    """The best FLOP/s at `dtype` over every framework, size and call."""
    return max(flops for (_, d, _), flops in self.best.items() if d == dtype)

  def record(self) -> dict:
    """The JSON record: peak per dtype, the best per framework/dtype/size, calls."""
    return dict(peak_flops={d: self.peak(d) for d in sorted({d for _, d, _ in self.best})},
                best_flops={f"{fw}/{d}/{n}": v for (fw, d, n), v in self.best.items()},
                calls=self.calls, definition="best over sizes and calls of 2 n^3 / time "
                "of one n x n matmul with float32 accumulation")


def peak_probe(**kwargs) -> PeakProbe:
  """A `PeakProbe` over XLA's and, where installed, PyTorch's matmuls."""
  frameworks = {"xla": _xla_matmul}
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    frameworks["torch"] = _torch_matmul
  except ImportError:
    pass
  return PeakProbe(frameworks=frameworks, **kwargs)


def mfu(flops_per_step: float, step_s: float, peak_flops: float) -> float:
  """Model FLOP utilisation: the step's FLOPs per second over the matmul peak of the
  precision it multiplies in."""
  return flops_per_step / step_s / peak_flops


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


def run_dependencies(runs: dict) -> dict:
  """{workdir: the workdirs of `runs` ({workdir: config}) that it starts from
  (`init.from_workdir`) or distils from (`distill.teacher_workdir`)}: those must
  finish before it starts."""
  ours = {os.path.abspath(w): w for w in runs}
  deps = {}
  for workdir, cfg in runs.items():
    paths = (cfg.get("init", {}).get("from_workdir", ""),
             cfg.get("distill", {}).get("teacher_workdir", ""))
    deps[workdir] = {ours[os.path.abspath(p)] for p in paths if p and os.path.abspath(p) in ours}
  return deps


def _train_logged(cfg, workdir: str, log: str) -> None:
  """One run in a worker process, its progress bar and messages in `log`."""
  with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
    train(cfg, workdir)


def train_parallel(runs: dict, jobs: int, echo=print) -> None:
  """Trains (resumes, or reuses) `runs` ({workdir: config}) in `jobs` spawned processes,
  each with its log in `<workdir>.log`, a run once its `run_dependencies` are done (in
  `runs`' order among the ready ones). A failed run's error, or a SIGTERM's SystemExit,
  is raised here. On 2 cores, 2 jobs of the small models here train about 1.25x the
  steps per second of 1 (2026-12-03, quiet cores: a patch-4 ViT 1.9 steps/s alone,
  1.27 + 1.12 as two), because one such run keeps neither core busy."""
  deps = run_dependencies(runs)
  pending, running, done = list(runs), {}, set()
  with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")
                                   ) as pool:
    while pending or running:
      for workdir in [w for w in pending if deps[w] <= done][:jobs - len(running)]:
        pending.remove(workdir)
        name, log = os.path.basename(workdir), f"{workdir}.log"
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
        echo(f"== {name}: {runs[workdir].trainer.total_steps} steps in {workdir} (log {log})")
        running[pool.submit(_train_logged, runs[workdir], workdir, log)] = workdir
      finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
      for future in finished:
        workdir = running.pop(future)
        future.result()
        done.add(workdir)
        echo(f"== {os.path.basename(workdir)}: done")


def system_allocator_env() -> dict:
  """This process's environment without the memory-reusing glibc tunables
  (`train.cli.REUSE_MEMORY_TUNABLES`): the allocator ponder ran with before them."""
  from train import cli  # pylint: disable=g-import-not-at-top
  tunables = os.environ.get("GLIBC_TUNABLES", "").replace(cli.REUSE_MEMORY_TUNABLES, "")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables.strip(":"):
    env["GLIBC_TUNABLES"] = tunables.strip(":")
  return env


def _step_worker(conn, builder: str, kwargs: dict) -> None:
  module, name = builder.split(":")
  run, info = getattr(importlib.import_module(module), name)(**kwargs)
  conn.send({k: v for k, v in info.items() if k != "final_loss"})
  while conn.recv() == "step":
    jax.block_until_ready(run())
    conn.send(float(info["final_loss"]))
  conn.close()


class ChildStep:
  """A train step that runs in a child process with its own environment, one call at a
  time: a side of a round-robin comparison whose allocator differs from this
  process's (glibc reads GLIBC_TUNABLES once, at process start).

  `builder` ("module:function") is called in the child with `kwargs` and returns
  (run, info) like `jitted_train_step`. Calling the ChildStep runs one step there and
  waits for it; `info` holds the child's info and, after a call, its final_loss. The
  pipe's round trip (well under a millisecond) is in the time a caller measures.
  """

  def __init__(self, builder: str, kwargs: dict, env: dict):
    ctx = multiprocessing.get_context("spawn")
    self._builder = builder
    self._conn, child = ctx.Pipe()
    saved = dict(os.environ)
    os.environ.clear()  # A spawned child starts with the parent's environment of now.
    os.environ.update(env)
    try:
      self._process = ctx.Process(target=_step_worker, args=(child, builder, kwargs),
                                  daemon=True)
      self._process.start()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    self.info = self._receive()

  def _receive(self):
    while not self._conn.poll(1.0):
      if not self._process.is_alive():
        raise errors.PonderError(
            f"the child process of {self._builder} exited with code "
            f"{self._process.exitcode}; its traceback is on stderr above.")
    return self._conn.recv()

  def __call__(self):
    self._conn.send("step")
    self.info["final_loss"] = self._receive()
    return self.info["final_loss"]

  def close(self) -> None:
    self._conn.send("stop")
    self._process.join(timeout=60)
