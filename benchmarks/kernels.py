"""Speed of block-sparse attention and ternary matmul against their dense peers.

  python -m benchmarks.kernels --out=kernels.json [--quick] [--impl=auto|pallas|xla]

Attention: batch 1, 8 heads, head dim 64, float32, at sequence lengths 1024, 2048 and
4096 and block densities 1.0, 0.5, 0.25 and 0.1, forward and forward+backward (the
gradient of a random projection of the output with respect to q, k and v). Each
query-block row of the mask has exactly round(density * blocks) active key blocks,
chosen at random, so the XLA path's static bound equals the real count. The peer is
`jax.nn.dot_product_attention` (dense, in its native [batch, seq, heads, dim] layout).
For one sequence length and pass, dense and every density run in round robin (so load
from other processes on a shared machine slows them alike) and the median is kept.

Ternary: packed activations [M, K] (uint32, 16 codes a word) times float32 weights
[K, N], and ternary times ternary, against the float32 matmul of the same shape; and
the bytes of the packed activations against their float32 form.

One record per case, with backend, impl, seq, density, ms, dense_ms and speedup.
"""

import functools
import math
import os

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

SEQS, QUICK_SEQS = (1024, 2048, 4096), (256, 512)
DENSITIES = (1.0, 0.5, 0.25, 0.1)
BATCH, HEADS, HEAD_DIM = 1, 8, 64
TERNARY_SHAPE, QUICK_TERNARY_SHAPE = (2048, 2048, 2048), (256, 512, 256)  # M, K, N


def fixed_density_mask(rng, num_rows, num_cols, active):
  """[BATCH, HEADS, rows, cols] with exactly `active` random True per row."""
  scores = rng.random((BATCH, HEADS, num_rows, num_cols))
  kth = np.sort(scores, axis=-1)[..., num_cols - active][..., None]
  return jnp.asarray(scores >= kth)


def with_grad(fn):
  """fn's output (forward) or its gradient to q, k, v (forward+backward)."""
  return jax.jit(jax.grad(lambda q, k, v, ct: jnp.sum(fn(q, k, v) * ct),
                          argnums=(0, 1, 2)))


def attention_records(seqs, impl, runs, warmup, block):
  impl_name, interpret = ops.resolve_impl(impl)
  block_sizes = bsa.BlockSizes(block, block)
  rng = np.random.default_rng(0)
  records = []
  for seq in seqs:
    keys = jax.random.split(jax.random.key(seq), 4)
    q, k, v, ct = [jax.random.normal(key, (BATCH, HEADS, seq, HEAD_DIM)) for key in keys]
    bshd = lambda x: x.swapaxes(1, 2)
    dense_args = [bshd(x) for x in (q, k, v, ct)]
    nk = block_sizes.grid(seq, seq)[1]
    cases = {}
    for density in DENSITIES:
      active = max(1, round(density * nk))
      mask = fixed_density_mask(rng, nk, nk, active)
      cases[density] = (active, functools.partial(
          ops.attention, block_mask=mask, block_sizes=block_sizes,
          max_active_blocks=active, impl=impl))
    for pass_name in ("fwd", "fwd+bwd"):
      if pass_name == "fwd":
        wrap = lambda fn: jax.jit(lambda q, k, v, ct: fn(q, k, v))
      else:
        wrap = with_grad
      fns = {density: wrap(fn) for density, (_, fn) in cases.items()}
      fns["dense"] = wrap(jax.nn.dot_product_attention)
      runs_by_name = {name: functools.partial(fn, q, k, v, ct)
                      for name, fn in fns.items() if name != "dense"}
      runs_by_name["dense"] = functools.partial(fns["dense"], *dense_args)
      # Density 1.0 computes full attention: a check that the two peers agree.
      error = jax.tree.map(
          lambda a, b: float(jnp.max(jnp.abs(a - b))), runs_by_name[1.0](),
          jax.tree.map(bshd, runs_by_name["dense"]()))
      times = timing.measure_interleaved(runs_by_name, warmup=warmup, runs=runs)
      dense_ms = 1e3 * times["dense"]["median_s"]
      full_ms = 1e3 * times[1.0]["median_s"]
      for density in DENSITIES:
        active = cases[density][0]
        ms = 1e3 * times[density]["median_s"]
        records.append(dict(
            op="block_sparse_attention", backend=jax.default_backend(),
            impl=impl_name, interpret=interpret, mode=pass_name, seq=seq,
            density=density, active_density=active / nk, active_blocks=active,
            block=block, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, ms=ms,
            dense_ms=dense_ms, speedup=dense_ms / ms, time_vs_full=ms / full_ms,
            max_abs_diff_full_vs_dense=max(jax.tree.leaves(error))))
        print(f"attention {pass_name:7s} seq {seq:5d} density {density:4.2f} "
              f"({active:2d}/{nk} blocks): {ms:9.1f} ms  dense {dense_ms:9.1f} ms  "
              f"x{dense_ms / ms:5.2f}  (time / full: {ms / full_ms:4.2f})", flush=True)
  return records


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


def main(argv):
  del argv
  quick = _QUICK.value
  runs = 1 if quick else _RUNS.value
  result = dict(
      machine=common.machine(),
      attention=attention_records(QUICK_SEQS if quick else SEQS, _IMPL.value, runs,
                                  _WARMUP.value, _BLOCK.value),
      ternary=ternary_records(QUICK_TERNARY_SHAPE if quick else TERNARY_SHAPE,
                              _IMPL.value, runs, _WARMUP.value))
  goal = [r for r in result["attention"]
          if r["seq"] == 2048 and math.isclose(r["density"], 0.25)]
  for r in goal:
    print(f"goal: seq 2048 density 0.25 {r['mode']}: x{r['speedup']:.2f} vs dense "
          f"(target 2.5)")
  result["machine"]["load_average_end"] = os.getloadavg()
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
