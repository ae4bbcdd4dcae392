"""Parity of the block-sparse attention kernel and XLA path with dense attention.

Every case runs the Pallas kernels in interpret mode and the XLA gather path against
`block_sparse_attention_reference`, forward and backward (all of dq, dk, dv), at
densities 0, 0.1, 0.5 and 1 on one compiled shape (the mask is data, so densities do
not recompile). Shapes are small: interpret mode is slow on CPU.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas.ops.tpu import splash_attention as splash
from kernels.block_sparse_attention import (
    BlockSizes, block_sparse_attention, block_sparse_attention_reference,
    block_sparse_attention_xla)

DENSITIES = (0.0, 0.1, 0.5, 1.0)
# (forward atol, gradient atol); bf16 results are compared with a float32 reference.
TOLERANCES = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (3e-2, 8e-2)}


def make_inputs(key, *, batch, heads, seq_q, seq_k, head_dim, dtype, padding=False):
  kq, kk, kv, kp, kg = jax.random.split(key, 5)
  q = jax.random.normal(kq, (batch, heads, seq_q, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, heads, seq_k, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, heads, seq_k, head_dim), jnp.float32)
  kv_padding = None
  if padding:  # A ragged tail of padding keys per example, as in a padded batch.
    lengths = jax.random.randint(kp, (batch, 1), seq_k // 2, seq_k + 1)
    kv_padding = jnp.arange(seq_k)[None, :] >= lengths
  cotangent = jax.random.normal(kg, q.shape, jnp.float32).astype(dtype)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), kv_padding, cotangent


def random_block_mask(key, shape, density):
  return jax.random.uniform(key, shape) < density


def value_and_grads(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cotangent)


CASES = [
    # batch, heads, seq_q, seq_k, head_dim, block_q, block_k, causal, padding, dtype
    (2, 2, 128, 128, 32, 32, 32, False, False, jnp.float32),
    (2, 1, 100, 100, 64, 32, 32, True, True, jnp.float32),   # 100 % 32 != 0
    (1, 2, 96, 160, 128, 16, 32, False, True, jnp.float32),  # seq_q != seq_k
    (2, 2, 200, 200, 64, 64, 64, True, False, jnp.bfloat16),
    (1, 2, 64, 64, 128, 32, 16, True, True, jnp.bfloat16),
    (2, 1, 128, 128, 32, 64, 32, False, True, jnp.bfloat16),
]


@pytest.mark.parametrize(
    "batch,heads,seq_q,seq_k,head_dim,block_q,block_k,causal,padding,dtype", CASES)
def test_matches_reference(batch, heads, seq_q, seq_k, head_dim, block_q, block_k,
                           causal, padding, dtype):
  key = jax.random.key(seq_q * 1000 + head_dim)
  q, k, v, kv_padding, cotangent = make_inputs(
      key, batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
      dtype=dtype, padding=padding)
  block_sizes = BlockSizes(block_q, block_k)
  nq, nk = block_sizes.grid(seq_q, seq_k)
  kwargs = dict(causal=causal, kv_padding=kv_padding, block_sizes=block_sizes)
  # A bound below nk exercises both the gathered branch (low densities) and the
  # dense fallback (rows above the bound) of the XLA path.
  impls = {
      "pallas": jax.jit(functools.partial(block_sparse_attention, interpret=True,
                                          **kwargs)),
      "xla": jax.jit(functools.partial(block_sparse_attention_xla,
                                       max_active_blocks=max(1, nk // 2), **kwargs)),
  }
  reference = jax.jit(functools.partial(block_sparse_attention_reference, **kwargs))
  out_atol, grad_atol = TOLERANCES[dtype]
  for i, density in enumerate(DENSITIES):
    mask = random_block_mask(jax.random.fold_in(key, i), (batch, heads, nq, nk),
                             density)
    want, want_grads = value_and_grads(lambda q, k, v: reference(q, k, v, mask),
                                       q, k, v, cotangent)
    for name, impl in impls.items():
      got, got_grads = value_and_grads(lambda q, k, v: impl(q, k, v, mask),
                                       q, k, v, cotangent)
      assert got.dtype == dtype and all(g.dtype == dtype for g in got_grads)
      chex.assert_trees_all_close(got, want, atol=out_atol, rtol=out_atol,
                                  custom_message=f"{name} output, density {density}")
      chex.assert_trees_all_close(got_grads, want_grads, atol=grad_atol,
                                  rtol=grad_atol,
                                  custom_message=f"{name} grads, density {density}")


def test_reference_is_softmax_attention_on_a_full_mask():
  """Anchors the reference itself to jax.nn.dot_product_attention (BSHD layout)."""
  q, k, v, _, _ = make_inputs(jax.random.key(1), batch=2, heads=2, seq_q=48,
                              seq_k=48, head_dim=32, dtype=jnp.float32)
  block_sizes = BlockSizes(16, 16)
  mask = jnp.ones((1, 1, 3, 3), jnp.bool_)
  for causal in (False, True):
    got = block_sparse_attention_reference(q, k, v, mask, causal=causal,
                                           block_sizes=block_sizes)
    bshd = lambda x: x.swapaxes(1, 2)
    want = bshd(jax.nn.dot_product_attention(bshd(q), bshd(k), bshd(v),
                                             is_causal=causal))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_are_zero_with_zero_gradients():
  """Empty rows (mask off, or only padding keys) give 0 and zero, finite gradients."""
  q, k, v, _, cotangent = make_inputs(jax.random.key(2), batch=2, heads=1, seq_q=64,
                                      seq_k=64, head_dim=32, dtype=jnp.float32)
  block_sizes = BlockSizes(32, 32)
  mask = jnp.array([[[[True, False], [False, False]]],
                    [[[True, True], [True, True]]]])
  kv_padding = jnp.zeros((2, 64), jnp.bool_).at[1].set(True)  # Example 1: all padding.
  fast = functools.partial(block_sparse_attention, block_mask=mask,
                           kv_padding=kv_padding, block_sizes=block_sizes,
                           interpret=True)
  out, (dq, dk, dv) = value_and_grads(lambda q, k, v: fast(q, k, v), q, k, v,
                                      cotangent)
  for x in (out, dq, dk, dv):
    assert bool(jnp.all(jnp.isfinite(x)))
  chex.assert_trees_all_close(out[0, :, 32:], jnp.zeros_like(out[0, :, 32:]))
  chex.assert_trees_all_close(out[1], jnp.zeros_like(out[1]))
  chex.assert_trees_all_close(dq[0, :, 32:], jnp.zeros_like(dq[0, :, 32:]))
  chex.assert_trees_all_close((dq[1], dk[1], dv[1]), (jnp.zeros_like(dq[1]),) * 3)
  chex.assert_trees_all_close((dk[0, :, 32:], dv[0, :, 32:]),
                              (jnp.zeros_like(dk[0, :, 32:]),) * 2)


def test_matches_splash_attention_on_a_static_mask():
  """Independent check against jax's splash attention (TPU kernel, interpreted)."""
  heads, seq, head_dim, block = 2, 256, 64, 128
  rng = np.random.default_rng(0)
  block_mask = rng.random((heads, seq // block, seq // block)) < 0.5
  block_mask |= np.eye(seq // block, dtype=bool)  # Splash needs no empty rows.
  element_mask = np.repeat(np.repeat(block_mask, block, 1), block, 2)
  q, k, v, _, cotangent = make_inputs(jax.random.key(3), batch=1, heads=heads,
                                      seq_q=seq, seq_k=seq, head_dim=head_dim,
                                      dtype=jnp.float32)
  splash_kernel = splash.make_splash_mha(
      splash.MultiHeadMask([splash.NumpyMask(m) for m in element_mask]),
      head_shards=1, q_seq_shards=1, interpret=True,
      block_sizes=splash.BlockSizes(*(block,) * 8))
  # Splash takes [heads, seq, head_dim] and does not scale q.
  theirs = lambda q, k, v: splash_kernel(q[0] * head_dim ** -0.5, k[0], v[0])[None]
  ours = lambda q, k, v: block_sparse_attention(
      q, k, v, jnp.asarray(block_mask)[None], block_sizes=BlockSizes(block, block),
      interpret=True)
  got, got_grads = value_and_grads(ours, q, k, v, cotangent)
  want, want_grads = value_and_grads(theirs, q, k, v, cotangent)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(got_grads, want_grads, atol=1e-4, rtol=1e-4)


def test_mask_computed_from_data_inside_jit():
  """A learned-style mask: tiles whose pooled query-key affinity is above the median."""
  q, k, v, _, _ = make_inputs(jax.random.key(4), batch=2, heads=2, seq_q=128,
                              seq_k=128, head_dim=32, dtype=jnp.float32)
  block_sizes = BlockSizes(32, 32)

  def perforated(attention_fn, q, k, v):
    pooled = lambda x: x.reshape(x.shape[:2] + (4, 32, x.shape[-1])).mean(axis=3)
    affinity = jnp.einsum("bhid,bhjd->bhij", pooled(q), pooled(k))
    mask = affinity >= jnp.median(affinity, axis=-1, keepdims=True)
    return attention_fn(q, k, v, mask, block_sizes=block_sizes)

  got = jax.jit(functools.partial(
      perforated, functools.partial(block_sparse_attention, interpret=True)))(q, k, v)
  want = perforated(block_sparse_attention_reference, q, k, v)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad", ["mask_shape", "kv_padding", "qkv"])
def test_rejects_bad_shapes(bad):
  q = k = v = jnp.zeros((1, 2, 64, 32))
  mask, kv_padding = jnp.ones((1, 2, 2, 2), jnp.bool_), None
  if bad == "mask_shape":
    mask = jnp.ones((1, 2, 4, 4), jnp.bool_)
  elif bad == "kv_padding":
    kv_padding = jnp.zeros((1, 63), jnp.bool_)
  else:
    v = jnp.zeros((1, 2, 64, 16))
  with pytest.raises(ValueError, match="must"):
    block_sparse_attention(q, k, v, mask, kv_padding=kv_padding,
                           block_sizes=BlockSizes(32, 32), interpret=True)


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
def test_lowers_for_accelerators(platform, custom_call):
  """Forward and backward kernels (bf16, causal, padding) lower for GPU and TPU.

  CI has neither, so this runs Pallas' Triton and Mosaic lowerings only (no device
  compile), which catches unsupported ops, layouts and block shapes.
  """
  q = jnp.zeros((2, 2, 256, 64), jnp.bfloat16)
  mask, kv_padding = jnp.ones((2, 2, 2, 2), jnp.bool_), jnp.zeros((2, 256), jnp.bool_)

  def loss(q, k, v):
    return block_sparse_attention(q, k, v, mask, causal=True, kv_padding=kv_padding,
                                  block_sizes=BlockSizes(128, 128)).sum()

  previous = jax.config.jax_pallas_use_mosaic_gpu
  jax.config.update("jax_pallas_use_mosaic_gpu", False)  # Triton, as on a GPU host.
  try:
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
        lowering_platforms=(platform,)).as_text()
  finally:
    jax.config.update("jax_pallas_use_mosaic_gpu", previous)
  assert text.count(custom_call) == 3  # forward, dq, dk/dv


def test_xla_path_without_fallback_is_exact_for_masks_within_the_bound():
  q, k, v, kv_padding, _ = make_inputs(jax.random.key(5), batch=2, heads=2, seq_q=96,
                                       seq_k=96, head_dim=16, dtype=jnp.float32,
                                       padding=True)
  sizes = BlockSizes(16, 16)
  # Exactly 2 active tiles per row: the diagonal and one random other.
  other = jax.random.randint(jax.random.key(6), (2, 2, 6), 0, 6)
  mask = jnp.eye(6, dtype=bool) | (jnp.arange(6) == other[..., None])
  got = block_sparse_attention_xla(q, k, v, mask, kv_padding=kv_padding, block_sizes=sizes,
                                   max_active_blocks=2, fallback=False)
  want = block_sparse_attention_reference(q, k, v, mask, kv_padding=kv_padding,
                                          block_sizes=sizes)
  chex.assert_trees_all_close(got, want, atol=2e-5)
