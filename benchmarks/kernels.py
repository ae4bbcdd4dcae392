"""Speed of block-sparse attention and ternary matmul against their dense peers.

  python -m benchmarks.kernels --out=kernels.json [--quick] [--impl=auto|pallas|xla]
      [--seqs=1024,2048] [--dtypes=float32,bfloat16]

Attention: batch 1, 8 heads, head dim 64, at block densities 1.0, 0.5, 0.25 and 0.1,
forward and forward+backward (the gradient of a random projection of the output with
respect to q, k and v). Sequences 1024-4096 in float32 on CPU; 1024-8192 in float32
and bfloat16 on a GPU or TPU. Each query-block row of the mask has exactly
round(density * blocks) active key blocks, chosen at random, so the XLA path's static
bound equals the real count. The peer is `jax.nn.dot_product_attention` (dense, in
its native [batch, seq, heads, dim] layout; implementation="cudnn" on a GPU where
cuDNN takes the dtype, else XLA's; `dense_impl` says which). For one sequence length,
dtype and pass, dense and every density run in round robin (so load from other
processes on a shared machine slows them alike) and the median is kept.

The goal for the compiled kernel (impl=pallas on an accelerator) is computed from the
measured fields: faster than dense (`speedup > 1`) at every density <= 0.5 and within
1.3x of dense (`ms <= 1.3 * dense_ms`) at density 1, for every sequence, dtype and pass.

Ternary: packed activations [M, K] (uint32, 16 codes a word) times float32 weights
[K, N], and ternary times ternary, against the float32 matmul of the same shape; and
the bytes of the packed activations against their float32 form.

One record per case, with backend, impl, dtype, seq, density, ms, dense_ms and
speedup; the JSON also names the devices (`jax.devices()`, and `nvidia-smi` on a GPU).
"""

import functools
import json
import math
import os
import subprocess

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from kernels import block_sparse_attention as bsa
from kernels import ternary
from ponder import ops
from ponder.analysis import timing

_OUT = flags.DEFINE_string("out", "", "JSON file for the results ('' = print only).")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Short smoke run: sequences 256 and 512, one timed run.")
_IMPL = flags.DEFINE_enum("impl", "auto", ops.IMPLS,
                          "Attention/ternary implementation (see ponder.ops).")
_RUNS = flags.DEFINE_integer("runs", 3, "Timed runs per case (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs per case after compiling.")
_BLOCK = flags.DEFINE_integer("block", 128, "Attention tile size (block_q = block_k).")
_SEQS = flags.DEFINE_list("seqs", [], "Attention sequence lengths ('' = the default "
                          "for the backend and --quick).")
_DTYPES = flags.DEFINE_list("dtypes", [], "Attention dtypes ('' = float32 on CPU, "
                            "float32,bfloat16 on an accelerator).")

SEQS, ACCELERATOR_SEQS, QUICK_SEQS = (1024, 2048, 4096), (1024, 2048, 4096, 8192), (256, 512)
DENSITIES = (1.0, 0.5, 0.25, 0.1)
BATCH, HEADS, HEAD_DIM = 1, 8, 64
TERNARY_SHAPE, QUICK_TERNARY_SHAPE = (2048, 2048, 2048), (256, 512, 256)  # M, K, N
# The goal of the compiled kernel against dense attention.
SPARSE_DENSITY, FULL_DENSITY_SLOWDOWN = 0.5, 1.3


def accelerated() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


def fixed_density_mask(rng, num_rows, num_cols, active):
  """[BATCH, HEADS, rows, cols] with exactly `active` random True per row."""
  scores = rng.random((BATCH, HEADS, num_rows, num_cols))
  kth = np.sort(scores, axis=-1)[..., num_cols - active][..., None]
  return jnp.asarray(scores >= kth)


def with_grad(fn):
  """fn's output (forward) or its gradient to q, k, v (forward+backward)."""
  return jax.jit(jax.grad(lambda q, k, v, ct, *rest: jnp.sum(
      fn(q, k, v, *rest).astype(jnp.float32) * ct), argnums=(0, 1, 2)))


def forward(fn):
  return jax.jit(lambda q, k, v, ct, *rest: fn(q, k, v, *rest))


def dense_attention(sample_args):
  """`jax.nn.dot_product_attention` with cuDNN where it compiles for these
  arguments (a GPU, a dtype it takes), else XLA's; returns (fn, implementation)."""
  if jax.default_backend() == "gpu":
    cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    try:
      with_grad(cudnn).lower(*sample_args).compile()
      return cudnn, "cudnn"
    except Exception:  # pylint: disable=broad-except
      pass  # cuDNN's fused attention takes float16/bfloat16 only.
  return functools.partial(jax.nn.dot_product_attention, implementation="xla"), "xla"


def attention_records(seqs, dtypes, impl, runs, warmup, block):
  impl_name, interpret = ops.resolve_impl(impl)
  block_sizes = bsa.BlockSizes(block, block)
  rng = np.random.default_rng(0)
  records = []
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for seq in seqs:
      records += _attention_at(seq, dtype, impl, impl_name, interpret, block_sizes, rng,
                               runs, warmup)
  return records


def _attention_at(seq, dtype, impl, impl_name, interpret, block_sizes, rng, runs,
                  warmup):
  keys = jax.random.split(jax.random.key(seq), 4)
  q, k, v, ct = [jax.random.normal(key, (BATCH, HEADS, seq, HEAD_DIM)).astype(dtype)
                 for key in keys]
  bshd = lambda x: x.swapaxes(1, 2)
  dense_args = [bshd(x) for x in (q, k, v, ct)]
  nk = block_sizes.grid(seq, seq)[1]
  dense_fn, dense_impl = dense_attention(dense_args)
  records = []
  cases, fns = {}, {}
  for density in DENSITIES:
    active = max(1, round(density * nk))
    # The mask is an argument, so the kernel compiles once for all densities; the
    # XLA path's static bound makes one program per density.
    bound = active if impl_name == "xla" else None
    fn = fns.setdefault(bound, functools.partial(
        ops.attention, block_sizes=block_sizes, impl=impl, max_active_blocks=bound))
    cases[density] = (active, fixed_density_mask(rng, nk, nk, active), fn)
  for pass_name in ("fwd", "fwd+bwd"):
    wrap = forward if pass_name == "fwd" else with_grad
    wrapped = {id(fn): wrap(fn) for fn in fns.values()}
    runs_by_name = {density: functools.partial(wrapped[id(fn)], q, k, v, ct, mask)
                    for density, (_, mask, fn) in cases.items()}
    runs_by_name["dense"] = functools.partial(wrap(dense_fn), *dense_args)
    # Density 1.0 computes full attention: a check that the two peers agree.
    error = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))),
        runs_by_name[1.0](),
        jax.tree.map(lambda x: bshd(x).astype(jnp.float32), runs_by_name["dense"]()))
    times = timing.measure_interleaved(runs_by_name, warmup=warmup, runs=runs)
    dense_ms = 1e3 * times["dense"]["median_s"]
    full_ms = 1e3 * times[1.0]["median_s"]
    for density in DENSITIES:
      active = cases[density][0]
      ms = 1e3 * times[density]["median_s"]
      records.append(dict(
          op="block_sparse_attention", backend=jax.default_backend(),
          impl=impl_name, interpret=interpret, dtype=dtype.name, mode=pass_name,
          seq=seq, density=density, active_density=active / nk, active_blocks=active,
          block=block_sizes.block_q, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM,
          ms=ms, dense_ms=dense_ms, dense_impl=dense_impl, speedup=dense_ms / ms,
          time_vs_full=ms / full_ms, max_abs_diff_full_vs_dense=max(jax.tree.leaves(error))))
      print(f"attention {dtype.name:8s} {pass_name:7s} seq {seq:5d} density {density:4.2f} "
            f"({active:2d}/{nk} blocks): {ms:9.2f} ms  dense ({dense_impl}) "
            f"{dense_ms:9.2f} ms  x{dense_ms / ms:5.2f}  (time / full: "
            f"{ms / full_ms:4.2f})", flush=True)
  return records


def attention_goal(records) -> dict:
  """The goal, checked on every measured (dtype, seq, pass): speedup > 1 at density
  <= 0.5 and ms <= 1.3 * dense_ms at density 1. `evaluated` is False unless the
  records are of the compiled kernel on an accelerator (the goal is about it)."""
  checks = []
  for r in records:
    if r["density"] <= SPARSE_DENSITY:
      target, met = "faster than dense", r["ms"] < r["dense_ms"]
    elif math.isclose(r["density"], 1.0):
      target = f"within {FULL_DENSITY_SLOWDOWN}x of dense"
      met = r["ms"] <= FULL_DENSITY_SLOWDOWN * r["dense_ms"]
    else:
      continue
    checks.append(dict(dtype=r["dtype"], seq=r["seq"], mode=r["mode"],
                       density=r["density"], target=target, speedup=r["speedup"],
                       met=bool(met)))
  evaluated = bool(records) and all(
      r["impl"] == "pallas" and not r["interpret"] and r["backend"] in ("gpu", "tpu")
      for r in records)
  return dict(
      criteria=(f"compiled kernel faster than dense attention at density <= "
                f"{SPARSE_DENSITY} and within {FULL_DENSITY_SLOWDOWN}x of it at density "
                "1, for every sequence, dtype and pass"),
      evaluated=evaluated, met=bool(checks) and all(c["met"] for c in checks),
      failed=[c for c in checks if not c["met"]], checks=checks)


def devices() -> dict:
  """What ran the benchmark: jax's devices and, where there is one, nvidia-smi."""
  info = dict(devices=[str(d) for d in jax.devices()],
              device_kinds=sorted({d.device_kind for d in jax.devices()}))
  try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    if smi.returncode == 0:
      info["nvidia_smi"] = smi.stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    pass  # No NVIDIA driver here.
  return info


def ternary_records(shape, impl, runs, warmup):
  impl_name, interpret = ops.resolve_impl(impl)
  m, k, n = shape
  rng = np.random.default_rng(1)
  codes = jnp.asarray(rng.integers(-1, 2, (m, k)), jnp.int8)
  x_float = codes.astype(jnp.float32)
  x_packed = ternary.pack_ternary(codes, jnp.uint32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  w_packed = ternary.pack_ternary(jnp.asarray(rng.integers(-1, 2, (n, k)), jnp.int8),
                                  jnp.uint32)
  matmul = jax.jit(functools.partial(ops.ternary_matmul, impl=impl))
  float_matmul = jax.jit(jnp.matmul)
  error = float(jnp.max(jnp.abs(matmul(x_packed, w) - float_matmul(x_float, w))))
  times = timing.measure_interleaved(
      {"float": functools.partial(float_matmul, x_float, w),
       "ternary_x_float": functools.partial(matmul, x_packed, w),
       "ternary_x_ternary": functools.partial(matmul, x_packed, w_packed)},
      warmup=warmup, runs=runs)
  float_ms = 1e3 * times["float"]["median_s"]
  records = []
  for name in ("ternary_x_float", "ternary_x_ternary"):
    ms = 1e3 * times[name]["median_s"]
    records.append(dict(
        op=f"ternary_matmul:{name}", backend=jax.default_backend(), impl=impl_name,
        interpret=interpret, m=m, k=k, n=n, ms=ms, float_matmul_ms=float_ms,
        speedup=float_ms / ms, packed_bytes=x_packed.nbytes,
        float32_bytes=x_float.nbytes, bytes_ratio=x_packed.nbytes / x_float.nbytes,
        max_abs_diff_vs_float=error if name == "ternary_x_float" else None))
    print(f"{name:18s} [{m}x{k}]@[{k}x{n}]: {ms:8.1f} ms  float32 matmul "
          f"{float_ms:8.1f} ms  x{float_ms / ms:4.2f}  packed/float32 bytes "
          f"{x_packed.nbytes}/{x_float.nbytes} = 1/{x_float.nbytes / x_packed.nbytes:g}",
          flush=True)
  return records


def save_partial(path, result):
  """Writes `result` to `path` (if any) without a message, marked partial."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(dict(result, partial=True), f, indent=2)


def main(argv):
  del argv
  quick = _QUICK.value
  runs = 1 if quick else _RUNS.value
  if _SEQS.value:
    seqs = tuple(int(x) for x in _SEQS.value)
  else:
    seqs = QUICK_SEQS if quick else ACCELERATOR_SEQS if accelerated() else SEQS
  dtypes = tuple(_DTYPES.value) or (
      ("float32", "bfloat16") if accelerated() else ("float32",))
  result = dict(machine=common.machine(**devices()), attention=[])
  for seq in seqs:  # Longest last; each finished sequence is saved at once, so a
    # run stopped by a time limit keeps what it measured.
    result["attention"] += attention_records((seq,), dtypes, _IMPL.value, runs,
                                             _WARMUP.value, _BLOCK.value)
    result["attention_goal"] = attention_goal(result["attention"])
    save_partial(_OUT.value, result)
  goal = result["attention_goal"]
  result["ternary"] = ternary_records(QUICK_TERNARY_SHAPE if quick else TERNARY_SHAPE,
                                      _IMPL.value, runs, _WARMUP.value)
  for c in goal["checks"] if goal["evaluated"] else []:
    print(f"goal: {c['dtype']:8s} {c['mode']:7s} seq {c['seq']:5d} density "
          f"{c['density']:4.2f}: x{c['speedup']:.2f} vs dense ({c['target']}): "
          f"{'met' if c['met'] else 'MISSED'}")
  print(f"goal ({goal['criteria']}): {'met' if goal['met'] else 'not met'}"
        + ("" if goal["evaluated"] else " (not evaluated: the goal is for the compiled "
           "kernel on an accelerator, run with --impl=pallas there)"))
  result["machine"]["load_average_end"] = os.getloadavg()
  result["partial"] = False
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
