"""Ternary spikes, 2-bit packing and the ternary matmul kernel (interpret mode)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ternary import (
    BlockSizes, codes_per_word, pack_ternary, surrogate_spike, ternary_matmul,
    ternary_matmul_reference, ternary_spike, unpack_ternary)


def spike_inputs(seed, shape=(3, 5, 8)):
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  alpha = rng.uniform(0.5, 2.0, channels)
  theta = rng.uniform(0.2, 1.0, channels)
  x = rng.normal(size=shape)
  # Keep x off the kinks |x| = theta, where the surrogate's second derivative jumps
  # and a finite difference would straddle it.
  x = np.where(np.abs(np.abs(x) - theta) < 0.02, x + 0.05, x)
  return x, alpha, theta


def test_spike_values():
  x, alpha, theta = spike_inputs(0)
  s = np.asarray(ternary_spike(jnp.float32(x), jnp.float32(alpha), jnp.float32(theta)))
  want = np.where(x >= theta, alpha, np.where(x <= -theta, -alpha, 0.0))
  chex.assert_trees_all_close(s, want.astype(np.float32))
  on_grid = (s == 0) | np.isclose(s, alpha.astype(np.float32)) | np.isclose(
      s, -alpha.astype(np.float32))
  assert on_grid.all()


def test_spike_gradient_is_the_documented_surrogate():
  """custom_vjp gradients == finite differences of `surrogate_spike` (x, theta) and of
  the spike itself (alpha, in which it is linear), in float64."""
  x, alpha, theta = spike_inputs(1)
  cotangent = np.random.default_rng(2).normal(size=x.shape)
  eps = 1e-6
  with jax.enable_x64(True):
    got = jax.grad(lambda x, a, t: jnp.sum(cotangent * ternary_spike(x, a, t)),
                   argnums=(0, 1, 2))(x, alpha, theta)
    loss = lambda f, x, a, t: float(jnp.sum(cotangent * f(x, a, t)))

    def central(f, args, which):
      grad = np.zeros_like(args[which])
      for idx in np.ndindex(grad.shape):
        up, down = [list(args) for _ in range(2)]
        up[which], down[which] = args[which].copy(), args[which].copy()
        up[which][idx] += eps
        down[which][idx] -= eps
        grad[idx] = (loss(f, *up) - loss(f, *down)) / (2 * eps)
      return grad

    args = (x, alpha, theta)
    want = (central(surrogate_spike, args, 0), central(ternary_spike, args, 1),
            central(surrogate_spike, args, 2))
  assert np.abs(want[0]).max() > 0 and np.abs(want[2]).max() > 0
  chex.assert_trees_all_close(tuple(map(np.asarray, got)), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint32])
@pytest.mark.parametrize("shape", [(7, 37), (2, 3, 64)])
def test_pack_round_trip_and_size(dtype, shape):
  codes = np.random.default_rng(3).integers(-1, 2, shape).astype(np.int8)
  packed = pack_ternary(jnp.asarray(codes), dtype)
  per = codes_per_word(dtype)
  assert packed.dtype == dtype and packed.shape == shape[:-1] + (-(-shape[-1] // per),)
  np.testing.assert_array_equal(np.asarray(unpack_ternary(packed, shape[-1])), codes)
  if shape[-1] % per == 0:  # 2 bits instead of 32 per value.
    assert packed.nbytes * 16 == codes.astype(np.float32).nbytes


def test_pack_layout_is_planar():
  """Element k sits in word k % W at bits 2 * (k // W) (0 -> 0, +1 -> 1, -1 -> 2)."""
  codes = np.zeros(32, np.int8)
  codes[[0, 17, 31]] = [1, -1, 1]  # W = 2: words 0, 1, 1 at fields 0, 8, 15.
  packed = np.asarray(pack_ternary(jnp.asarray(codes), jnp.uint32))
  np.testing.assert_array_equal(packed, [1, (2 << 16) | (1 << 30)])


MATMUL_CASES = [
    # m, k, n, packed dtype, weight dtype (None: ternary x ternary), block sizes
    (70, 200, 90, jnp.uint32, jnp.float32, BlockSizes(32, 32, 4)),
    (64, 256, 48, jnp.uint8, jnp.float32, BlockSizes(32, 16, 16)),
    (33, 100, 40, jnp.uint32, jnp.bfloat16, BlockSizes(16, 32, 8)),
    (50, 300, 20, jnp.uint32, None, BlockSizes(32, 16, 4)),
    (16, 64, 16, jnp.uint8, None, BlockSizes(16, 16, 8)),
]


@pytest.mark.parametrize("m,k,n,packed_dtype,w_dtype,block_sizes", MATMUL_CASES)
def test_matmul_matches_dense(m, k, n, packed_dtype, w_dtype, block_sizes):
  rng = np.random.default_rng(m + k + n)
  t = rng.integers(-1, 2, (m, k)).astype(np.int8)
  x_packed = pack_ternary(jnp.asarray(t), packed_dtype)
  if w_dtype is None:
    w_codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
    w = pack_ternary(jnp.asarray(w_codes.T), packed_dtype)
    want, atol = t.astype(np.float32) @ w_codes.astype(np.float32), 0.0  # Exact.
  else:
    w = jnp.asarray(rng.normal(size=(k, n)), w_dtype)
    want = t.astype(np.float32) @ np.asarray(w, np.float32)
    atol = 1e-4 if w_dtype == jnp.float32 else 0.15  # bf16 output rounding.
  kernel = ternary_matmul(x_packed, w, block_sizes=block_sizes, interpret=True)
  for got in (kernel, ternary_matmul_reference(x_packed, w)):
    assert got.shape == (m, n)
    chex.assert_trees_all_close(np.asarray(got, np.float32), want, atol=atol,
                                rtol=1e-2 if atol else 0.0)


def test_matmul_gradient_to_float_weights():
  rng = np.random.default_rng(5)
  t = rng.integers(-1, 2, (40, 80)).astype(np.int8)
  x_packed = pack_ternary(jnp.asarray(t))
  w = jnp.asarray(rng.normal(size=(80, 24)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
  fast = functools.partial(ternary_matmul, block_sizes=BlockSizes(16, 16, 2),
                           interpret=True)
  got = jax.grad(lambda w: jnp.sum(cotangent * fast(x_packed, w)))(w)
  want = jax.grad(lambda w: jnp.sum(cotangent * (t.astype(np.float32) @ w)))(w)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)


def test_matmul_rejects_mismatched_operands():
  x_packed = pack_ternary(jnp.zeros((4, 64), jnp.int8))  # 4 words.
  with pytest.raises(ValueError, match="must be"):
    ternary_matmul(x_packed, jnp.zeros((80, 8)), interpret=True)
  with pytest.raises(ValueError, match="packed rhs"):
    ternary_matmul(x_packed, jnp.zeros((8, 5), jnp.uint32), interpret=True)


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
def test_matmul_lowers_for_accelerators(platform, custom_call):
  """Float and ternary right-hand sides lower with Triton and Mosaic (no device)."""
  x_packed = jnp.zeros((256, 128), jnp.uint32)  # K = 2048.
  previous = jax.config.jax_pallas_use_mosaic_gpu
  jax.config.update("jax_pallas_use_mosaic_gpu", False)  # Triton, as on a GPU host.
  try:
    for w in (jnp.zeros((2048, 256), jnp.bfloat16), jnp.zeros((256, 128), jnp.uint32)):
      text = jax.jit(ternary_matmul).trace(x_packed, w).lower(
          lowering_platforms=(platform,)).as_text()
      assert text.count(custom_call) == 1
  finally:
    jax.config.update("jax_pallas_use_mosaic_gpu", previous)
