"""Dispatch of ponder.ops: impl selection, errors, jit, and batch-sharded calls."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_sparse_attention import block_sparse_attention_reference
from ponder import errors, ops
from tests.conftest import ROOT, subprocess_env


def qkv(batch=2, heads=2, seq=96, head_dim=32):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (batch, heads, seq, head_dim)) for k in keys]


def test_resolve_impl_on_cpu():
  assert jax.default_backend() == "cpu"
  assert ops.resolve_impl("auto") == ("xla", False)
  assert ops.resolve_impl("xla") == ("xla", False)
  assert ops.resolve_impl("pallas") == ("pallas", True)  # Interpreted on CPU.
  with pytest.raises(errors.ConfigError, match="valid: auto, pallas, xla"):
    ops.resolve_impl("triton")


@pytest.mark.parametrize("impl", ["auto", "pallas", "xla"])
def test_attention_impls_agree_with_reference(impl):
  q, k, v = qkv()
  block_sizes = ops.AttentionBlockSizes(32, 32)
  mask = jax.random.uniform(jax.random.key(1), (2, 2, 3, 3)) < 0.5
  kv_padding = jnp.arange(96)[None, :] >= jnp.array([[96], [70]])
  kwargs = dict(causal=True, kv_padding=kv_padding, block_sizes=block_sizes)
  got = jax.jit(lambda q, k, v, m: ops.attention(
      q, k, v, m, impl=impl, max_active_blocks=2, **kwargs))(q, k, v, mask)
  want = block_sparse_attention_reference(q, k, v, mask, **kwargs)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_attention_without_mask_is_dense_attention():
  q, k, v = qkv(seq=64)
  got = ops.attention(q, k, v)
  bshd = lambda x: x.swapaxes(1, 2)
  want = bshd(jax.nn.dot_product_attention(bshd(q), bshd(k), bshd(v)))
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_attention_shape_errors():
  q, k, v = qkv()
  with pytest.raises(errors.ShapeError, match="block_mask must have shape"):
    ops.attention(q, k, v, jnp.ones((2, 2, 5, 5), jnp.bool_))
  with pytest.raises(errors.ConfigError):
    ops.attention(q, k, v, impl="cuda")


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_ternary_ops(impl):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(24, 48)), jnp.float32)
  alpha, theta = jnp.full((48,), 0.7), jnp.full((48,), 0.5)
  spikes = ops.ternary_spike(x, alpha, theta)
  codes = ops.ternarize(x, theta)
  chex.assert_trees_all_close(spikes, alpha * codes.astype(jnp.float32))
  packed = ops.pack_ternary(codes)
  w = jnp.asarray(rng.normal(size=(48, 16)), jnp.float32)
  got = ops.ternary_matmul(packed, w * alpha[:, None], impl=impl,
                           block_sizes=ops.TernaryBlockSizes(8, 8, 1))
  chex.assert_trees_all_close(got, spikes @ w, atol=1e-4, rtol=1e-5)
  with pytest.raises(errors.ShapeError):
    ops.ternary_matmul(packed, w[:30], impl=impl)  # ceil(30 / 16) != 3 words.


SHARDED_SCRIPT = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kernels.block_sparse_attention import (
        BlockSizes, block_sparse_attention, block_sparse_attention_reference)
    from kernels import ternary
    from ponder import ops

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = [jax.random.normal(kk, (8, 2, 64, 32)) for kk in keys[:3]]
    mask = jax.random.uniform(keys[3], (8, 2, 2, 2)) < 0.6
    kw = dict(causal=True, block_sizes=BlockSizes(32, 32))
    want = block_sparse_attention_reference(q, k, v, mask, **kw)
    args = [jax.device_put(x, batch) for x in (q, k, v, mask)]
    for impl in ("xla", "pallas"):
      # jit with batch-sharded operands: XLA partitions the call.
      fn = jax.jit(functools.partial(ops.attention, impl=impl, **kw),
                   out_shardings=batch)
      got = fn(*args)
      assert got.sharding.is_equivalent_to(batch, 4), got.sharding
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
      # shard_map: each device runs the op on its own examples. Pallas' CPU
      # interpreter does not track varying mesh axes, and jax asks for
      # check_vma=False there (the kernels declare them for compiled backends; the
      # cuda lowering below checks that).
      per_device = jax.shard_map(functools.partial(ops.attention, impl=impl, **kw),
                                 mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                 check_vma=impl == "xla")
      grad = jax.jit(jax.grad(lambda q, k, v, m: per_device(q, k, v, m).sum()))
      np.testing.assert_allclose(jax.jit(per_device)(*args), want, atol=2e-5,
                                 rtol=2e-5)
      want_grad = jax.grad(lambda q: block_sparse_attention_reference(
          q, k, v, mask, **kw).sum())(q)
      np.testing.assert_allclose(grad(*args), want_grad, atol=1e-4, rtol=1e-4)
    per_device = jax.shard_map(
        lambda q, k, v, m: block_sparse_attention(q, k, v, m, **kw),
        mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    lowered = jax.jit(jax.grad(lambda *a: per_device(*a).sum())).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    # Forward and dq: the gradient is to q only, so the dk/dv kernel is dead code.
    assert lowered.count("__gpu$xla.gpu.triton") == 2
    codes = jnp.asarray(np.random.default_rng(0).integers(-1, 2, (64, 48)), jnp.int8)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(48, 16)), jnp.float32)
    packed = jax.device_put(ternary.pack_ternary(codes), batch)
    got = jax.jit(functools.partial(ops.ternary_matmul, impl="pallas",
                                    block_sizes=ops.TernaryBlockSizes(8, 8, 1)))(packed, w)
    np.testing.assert_allclose(got, codes.astype(jnp.float32) @ w, atol=1e-4)
    print("sharded ok")
""")


def test_jit_and_batch_sharded_calls_on_8_devices():
  """In a subprocess: the device count must be set before jax is imported."""
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT],
                          env=subprocess_env(devices=8), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "sharded ok" in result.stdout
