"""The compiled (not interpreted) kernels against their references, on a GPU or TPU.

Skipped on CPU, where `test_lowering.py` checks that the kernels lower for both
accelerators and the other tests run them in the Pallas interpreter. On a device
this is where Triton's and Mosaic's own compilers see the kernels
(`benchmarks/device_check.sh` runs it).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse_attention as bsa
from kernels import ternary as tk

pytestmark = pytest.mark.skipif(
    jax.default_backend() not in ("gpu", "tpu"),
    reason="needs a GPU or TPU (the kernels are compiled, not interpreted)")

# (forward atol, gradient atol) against a float32 reference. TPU's and the GPU's
# default float32 matmul precision rounds operands to bfloat16-like precision.
TOLERANCES = {jnp.float32: (2e-2, 5e-2), jnp.bfloat16: (4e-2, 1e-1)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("seq,causal,padding,density", [
    (256, False, False, 1.0),
    (200, True, True, 0.5),     # Not a multiple of the block; padding keys.
    (640, True, False, 0.25),
])
def test_compiled_attention_matches_reference(dtype, seq, causal, padding, density):
  block_sizes = bsa.BlockSizes()
  kq, kk, kv, km, kc, kp = jax.random.split(jax.random.key(seq), 6)
  shape = (2, 2, seq, 64)
  q, k, v, cotangent = [jax.random.normal(key, shape).astype(dtype)
                        for key in (kq, kk, kv, kc)]
  mask = jax.random.uniform(km, (2, 2) + block_sizes.grid(seq, seq)) < density
  kv_padding = None
  if padding:
    kv_padding = jnp.arange(seq)[None, :] >= jax.random.randint(kp, (2, 1), seq // 2,
                                                                seq + 1)
  kw = dict(causal=causal, kv_padding=kv_padding, block_sizes=block_sizes)
  fast = functools.partial(bsa.block_sparse_attention, block_mask=mask, **kw)
  slow = functools.partial(bsa.block_sparse_attention_reference, block_mask=mask, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: fast(q, k, v), q, k, v)
  want, want_vjp = jax.vjp(lambda q, k, v: slow(q, k, v), f32(q), f32(k), f32(v))
  atol, grad_atol = TOLERANCES[dtype]
  chex.assert_trees_all_close(f32(out), want, atol=atol, rtol=atol)
  chex.assert_trees_all_close(jax.tree.map(f32, vjp(cotangent)),
                              want_vjp(f32(cotangent)), atol=grad_atol, rtol=grad_atol)


@pytest.mark.parametrize("word", [jnp.uint8, jnp.uint32], ids=["u8", "u32"])
@pytest.mark.parametrize("rhs", ["float32", "bfloat16", "packed"])
def test_compiled_ternary_matmul_matches_reference(word, rhs):
  m, k, n = 200, 3000, 300
  rng = np.random.default_rng(0)
  x_packed = tk.pack_ternary(jnp.asarray(rng.integers(-1, 2, (m, k)), jnp.int8), word)
  if rhs == "packed":
    w = tk.pack_ternary(jnp.asarray(rng.integers(-1, 2, (n, k)), jnp.int8), word)
    atol = 0.0  # Integer sums, exact in float32.
  else:
    w = jnp.asarray(rng.normal(size=(k, n)), rhs)
    atol = 0.5 if rhs == "bfloat16" else 0.2  # Sums of 3000 terms of size ~1.
  got = tk.ternary_matmul(x_packed, w)
  want = tk.ternary_matmul_reference(x_packed, w)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=atol, rtol=0.02)
