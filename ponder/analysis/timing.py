"""Wall-clock speed: latency, throughput and the machine's matmul peak.

JAX dispatches asynchronously, so a timer that does not wait for the result measures
the dispatch, not the work: every timed call here is followed by `sync`
(`jax.block_until_ready` by default). The first calls compile and warm caches, so they
run untimed; the median of the timed runs resists the noise of a shared machine.
"""

import collections
import glob
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from ponder import errors


def measure_interleaved(runs_by_name: Mapping[str, Callable[[], Any]], *, warmup: int = 2,
                        runs: int = 5, sync: Callable[[Any], Any] = jax.block_until_ready
                        ) -> Dict[str, dict]:
  """Times several no-argument callables in round robin, each call synced.

  Side-by-side comparisons interleave their runs so that a burst of load on a shared
  machine slows every side alike instead of whichever happened to run during it.
  `warmup` untimed rounds come first. Callables take no arguments so that stateful
  steps (a train step that consumes and returns its donated state) carry their state.
  `jax.block_until_ready` passes other outputs through, which suits CPU PyTorch (its
  ops return finished tensors); for CUDA PyTorch pass a `sync` that synchronizes.
  Returns, per name, median_s, min_s, max_s and every time (times_s).
  """
  if runs < 1 or warmup < 0:
    raise errors.ConfigError(f"need runs >= 1 and warmup >= 0, got runs={runs}, "
                             f"warmup={warmup}")
  for _ in range(warmup):
    for run in runs_by_name.values():
      sync(run())
  times = {name: [] for name in runs_by_name}
  for _ in range(runs):
    for name, run in runs_by_name.items():
      start = time.perf_counter()
      sync(run())
      times[name].append(time.perf_counter() - start)
  return {name: dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), times_s=t)
          for name, t in times.items()}


def measure(run: Callable[[], Any], *, warmup: int = 2, runs: int = 5,
            sync: Callable[[Any], Any] = jax.block_until_ready) -> dict:
  """Times `run()` alone: `measure_interleaved` with one callable."""
  return measure_interleaved({"run": run}, warmup=warmup, runs=runs, sync=sync)["run"]


def latency_and_throughput(fn: Callable, params, item_shape: Sequence[int], *,
                           batch_size: int = 256, dtype=jnp.float32, warmup: int = 2,
                           runs: int = 5) -> dict:
  """Inference speed of `fn(params, inputs)`: batch-1 latency and large-batch throughput.

  Latency (one item) is what an interactive user waits; throughput (a large batch) is
  what offline evaluation gets. Both run the jitted `fn` on zeros of `item_shape`.
  """
  jitted = jax.jit(fn)

  def timed(batch):
    inputs = jnp.zeros((batch, *item_shape), dtype)
    return measure(lambda: jitted(params, inputs), warmup=warmup, runs=runs)

  latency, bulk = timed(1), timed(batch_size)
  return dict(latency_s=latency["median_s"], batch_size=batch_size,
              items_per_s=batch_size / bulk["median_s"])


def matmul_peak_flops(sizes: Sequence[int] = (1024, 2048), *, dtype=jnp.float32,
                      warmup: int = 2, runs: int = 5) -> float:
  """The machine's measured dense-matmul FLOP/s: the best over square `sizes`.

  This is the denominator of model FLOP utilisation (MFU): what the hardware sustains
  on the friendliest workload, measured rather than read off a datasheet.
  """
  matmul = jax.jit(jnp.matmul)
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(n), (n, n), dtype)
    seconds = measure(lambda: matmul(a, a), warmup=warmup, runs=runs)["median_s"]
    best = max(best, 2 * n ** 3 / seconds)
  return best


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_module_name(compiled) -> str:
  """The HLO module name of a `jax.stages.Compiled` ("jit_train_step"), as the profiler
  reports it."""
  match = re.match(r"HloModule ([\w.\-]+)", compiled.as_text())
  if not match:
    raise errors.PonderError("the compiled program's text does not start with its HloModule")
  return match.group(1)


def hlo_op_info(compiled) -> Dict[str, dict]:
  """Per instruction of a `jax.stages.Compiled`: its result `shape` ("f32[2048,50257]")
  and `source` (the jax op it came from, e.g. ".../wte.attend/dot_general"; "" when XLA
  made it up). Tuple-shaped instructions are left out."""
  info = {}
  for line in compiled.as_text().splitlines():
    match = _HLO_LINE.match(line)
    if match:
      source = _OP_NAME.search(line)
      info[match.group(1)] = dict(shape=match.group(2), source=source.group(1) if source else "")
  return info


def op_profile(run: Callable[[], Any], *, module: Optional[str] = None, runs: int = 3,
               sync: Callable[[Any], Any] = jax.block_until_ready) -> Dict[str, float]:
  """Mean seconds per call of `run()` spent in each XLA instruction (kernel, fusion,
  library call) of the compiled `module` (e.g. "jit_train_step"; None: every module
  that ran), from a `jax.profiler` trace of `runs` synced calls, largest first.

  Where a step's time goes decides what is worth optimising; the wall clock of the
  whole step cannot say it. Keys are HLO names (look them up with `hlo_op_info`). Call
  `run` once before, so that compilation stays out of the trace. An op's time is its
  span on the thread that ran it; independent ops may run at the same time (XLA:CPU's
  thunk executor does that), so the times can add up to more than the wall time.
  """
  if runs < 1:
    raise errors.ConfigError(f"need runs >= 1, got {runs}")
  with tempfile.TemporaryDirectory(prefix="ponder_profile_") as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(runs):
        sync(run())
    traces = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    if not traces:
      raise errors.PonderError(f"jax.profiler wrote no trace under {log_dir}")
    profile = jax.profiler.ProfileData.from_file(traces[0])
  # On an accelerator the device planes hold the kernels' own spans; the host's
  # launch events may carry the same op names, so they are left out there.
  planes = ([p for p in profile.planes if p.name.startswith("/device:")]
            or list(profile.planes))
  seconds = collections.Counter()
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats and module in (None, stats.get("hlo_module")):
          seconds[stats["hlo_op"]] += event.duration_ns * 1e-9 / runs
  return dict(seconds.most_common())
