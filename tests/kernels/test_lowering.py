"""Every public Pallas op lowers for GPU (Triton) and TPU (Mosaic), on any host.

`jax.export` with `platforms=[...]` lowers a program for a platform the host does not
have, so these tests run on a CPU-only CI: they export (trace and lower, no
compilation, no execution) the forward pass and the gradient of each op and read the
custom calls in the lowered StableHLO. A kernel lowered for CUDA must be exactly the
Triton call (`__gpu$xla.gpu.triton`; not Mosaic GPU's `mosaic_gpu_v2`, not the
interpreter's plain HLO), one for TPU exactly Mosaic's `tpu_custom_call`.

What this proves is that JAX's side of the lowering accepts the kernels (block
shapes, dtypes, primitives, the Triton/Mosaic IR they are turned into). The device
compilers (Triton's PTX backend, Mosaic's layout passes) still run only on a device;
`benchmarks/device_check.sh` runs the kernels there.

The block sizes each backend needs are checked too: a tiling a platform cannot take
raises `BlockSizeError` with the documented rule when lowering for that platform, and
leaves the other platforms alone.
"""

import collections
import re

import jax
from jax import export
import jax.numpy as jnp
import pytest

from kernels import block_sparse_attention as bsa
from kernels import ternary as tk

TRITON = "__gpu$xla.gpu.triton"
MOSAIC_TPU = "tpu_custom_call"
KERNEL_CALL = {"cuda": TRITON, "tpu": MOSAIC_TPU}
PLATFORMS = tuple(KERNEL_CALL)
# Triton's custom call has no compatibility guarantee, so export refuses it unless
# told; tpu_custom_call is on export's list of stable targets.
DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON)]


def lowered_text(fn, args, platforms):
  """The StableHLO text of `jit(fn)` lowered for `platforms` (nothing is run)."""
  exported = export.export(jax.jit(fn), platforms=list(platforms),
                           disabled_checks=DISABLED_CHECKS)(*args)
  return exported.mlir_module()


def custom_calls(text):
  """How many custom calls of each target the module makes."""
  return collections.Counter(re.findall(r"stablehlo\.custom_call @([^\s(]+)\(", text))


def assert_kernels(fn, args, platform, count):
  """fn lowers for `platform` to exactly `count` calls of its Pallas custom call
  and no other custom call (so no fallback lowering and no interpreter)."""
  calls = custom_calls(lowered_text(fn, args, [platform]))
  expected = collections.Counter({KERNEL_CALL[platform]: count} if count else {})
  assert calls == expected, f"{platform}: {dict(calls)}, expected {dict(expected)}"


def value_and_grads(fn, argnums):
  """fn's output sum and its gradient (value_and_grad keeps the forward kernel)."""
  return jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                            argnums=argnums)


# Block-sparse attention ---------------------------------------------------------------

ATTENTION_CASES = [
    # seq_q, seq_k, head_dim, block_sizes, causal, padding, per-head mask
    pytest.param(256, 256, 64, bsa.BlockSizes(), False, False, False, id="whole-blocks"),
    pytest.param(200, 200, 64, bsa.BlockSizes(), True, True, True,
                 id="causal-padded-ragged"),       # 200 % 128 != 0
    pytest.param(200, 328, 128, bsa.BlockSizes(), False, True, False,
                 id="padded-ragged-seq_q!=seq_k"),
    pytest.param(300, 300, 64, bsa.BlockSizes(256, 128), True, False, True,
                 id="causal-ragged-256x128"),
]


def attention_args(seq_q, seq_k, head_dim, block_sizes, dtype, per_head):
  batch, heads = 2, 2
  q = jax.ShapeDtypeStruct((batch, heads, seq_q, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, heads, seq_k, head_dim), dtype)
  mask = jax.ShapeDtypeStruct((batch, heads if per_head else 1)
                              + block_sizes.grid(seq_q, seq_k), jnp.bool_)
  padding = jax.ShapeDtypeStruct((batch, seq_k), jnp.bool_)
  return q, kv, kv, mask, padding


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "seq_q,seq_k,head_dim,block_sizes,causal,padding,per_head", ATTENTION_CASES)
def test_block_sparse_attention_lowers(platform, dtype, seq_q, seq_k, head_dim,
                                       block_sizes, causal, padding, per_head):
  args = attention_args(seq_q, seq_k, head_dim, block_sizes, dtype, per_head)

  def fn(q, k, v, mask, kv_padding):
    return bsa.block_sparse_attention(q, k, v, mask, causal=causal,
                                      kv_padding=kv_padding if padding else None,
                                      block_sizes=block_sizes)

  assert_kernels(fn, args, platform, 1)
  # Backward: the forward kernel (for lse), then the dq and the dk/dv kernels.
  assert_kernels(value_and_grads(fn, (0, 1, 2)), args, platform, 3)


# Ternary ops ------------------------------------------------------------------------

TERNARY_CASES = [
    # M, K, N, word dtype, rhs ("packed" or a float dtype), block sizes
    pytest.param(200, 3000, 300, jnp.uint32, jnp.float32, tk.BlockSizes(),
                 id="u32-x-f32"),
    pytest.param(200, 3000, 300, jnp.uint32, jnp.bfloat16, tk.BlockSizes(),
                 id="u32-x-bf16"),
    pytest.param(64, 1000, 200, jnp.uint8, jnp.float32, tk.BlockSizes(64, 128, 128),
                 id="u8-x-f32"),
    pytest.param(200, 3000, 300, jnp.uint32, "packed", tk.BlockSizes(),
                 id="u32-x-u32"),
    pytest.param(96, 1000, 130, jnp.uint8, "packed", tk.BlockSizes(32, 128, 128),
                 id="u8-x-u8"),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("m,k,n,word,rhs,block_sizes", TERNARY_CASES)
def test_ternary_matmul_lowers(platform, m, k, n, word, rhs, block_sizes):
  words = -(-k // tk.codes_per_word(word))
  x = jax.ShapeDtypeStruct((m, words), word)
  if rhs == "packed":
    w = jax.ShapeDtypeStruct((n, words), word)
  else:
    w = jax.ShapeDtypeStruct((k, n), rhs)
  fn = lambda x, w: tk.ternary_matmul(x, w, block_sizes=block_sizes)
  assert_kernels(fn, (x, w), platform, 1)
  if rhs != "packed":
    # dW = T^T g is one dense matmul (no kernel); the forward kernel stays.
    assert_kernels(value_and_grads(fn, 1), (x, w), platform, 1)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_ternary_spike_lowers_to_plain_hlo(platform, dtype):
  """The spike is elementwise jnp, no Pallas: plain StableHLO, no custom call."""
  x = jax.ShapeDtypeStruct((4, 33, 96), dtype)
  per_channel = jax.ShapeDtypeStruct((96,), dtype)
  args = (x, per_channel, per_channel)
  assert_kernels(tk.ternary_spike, args, platform, 0)
  assert_kernels(value_and_grads(tk.ternary_spike, (0, 1, 2)), args, platform, 0)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("word", [jnp.uint8, jnp.uint32], ids=["u8", "u32"])
def test_pack_unpack_lower_to_plain_hlo(platform, word):
  codes = jax.ShapeDtypeStruct((8, 1000), jnp.int8)
  words = jax.ShapeDtypeStruct((8, -(-1000 // tk.codes_per_word(word))), word)
  assert_kernels(lambda c: tk.pack_ternary(c, word), (codes,), platform, 0)
  assert_kernels(lambda w: tk.unpack_ternary(w, 1000, jnp.float32), (words,), platform,
                 0)


# Block sizes each backend needs --------------------------------------------------------

# (block_q, block_k, head_dim) -> platforms it lowers for.
ATTENTION_TILINGS = [
    ((128, 128, 64), {"cuda", "tpu"}),
    ((256, 128, 128), {"cuda", "tpu"}),
    ((128, 384, 64), {"tpu"}),     # 384: a multiple of 128, not a power of two.
    ((64, 64, 64), {"cuda"}),      # Triton's powers of two; under TPU's 128 lanes.
    ((16, 32, 16), {"cuda"}),
    ((128, 64, 64), {"cuda"}),
    ((128, 128, 48), {"tpu"}),     # head_dim 48: not a power of two for Triton.
    ((8, 128, 64), set()),         # Below Triton's 16, not TPU's 128.
    ((96, 96, 64), set()),
]


@pytest.mark.parametrize("tiling,lowers_for", ATTENTION_TILINGS,
                         ids=[str(t) for t, _ in ATTENTION_TILINGS])
def test_attention_block_size_rules(tiling, lowers_for):
  block_q, block_k, head_dim = tiling
  block_sizes = bsa.BlockSizes(block_q, block_k)
  args = attention_args(300, 300, head_dim, block_sizes, jnp.bfloat16, False)
  fn = lambda q, k, v, mask, _: bsa.block_sparse_attention(
      q, k, v, mask, causal=True, block_sizes=block_sizes)
  for platform in PLATFORMS:
    assert (block_sizes.lowering_problem(platform, head_dim) is None) == (
        platform in lowers_for)
    if platform in lowers_for:
      assert_kernels(value_and_grads(fn, (0, 1, 2)), args, platform, 3)
    else:
      rule = "multiples of 128" if platform == "tpu" else "powers of two >= 16"
      with pytest.raises(bsa.BlockSizeError, match=rule) as error:
        lowered_text(fn, args, [platform])
      assert "func.func" not in str(error.value)  # The rule, not an MLIR dump.
      with pytest.raises(bsa.BlockSizeError, match=rule):
        block_sizes.check_lowering(platform, head_dim)


# (block_m, block_n, block_words, word dtype) -> platforms it lowers for.
TERNARY_TILINGS = [
    ((128, 128, 128, jnp.uint32), {"cuda", "tpu"}),
    ((32, 128, 128, jnp.uint8), {"cuda", "tpu"}),
    ((8, 128, 256, jnp.uint32), {"tpu"}),      # block_m 8: TPU rows, under Triton's 16.
    ((16, 128, 128, jnp.uint8), {"cuda"}),     # 8-bit words need 32 rows on TPU.
    ((64, 64, 32, jnp.uint32), {"cuda"}),
    ((128, 384, 128, jnp.uint32), {"tpu"}),
    ((128, 128, 4, jnp.uint32), set()),
]


@pytest.mark.parametrize("tiling,lowers_for", TERNARY_TILINGS,
                         ids=[str(t[:3]) + jnp.dtype(t[3]).name for t, _ in TERNARY_TILINGS])
def test_ternary_block_size_rules(tiling, lowers_for):
  *sizes, word = tiling
  block_sizes = tk.BlockSizes(*sizes)
  words = -(-1000 // tk.codes_per_word(word))
  args = (jax.ShapeDtypeStruct((100, words), word),
          jax.ShapeDtypeStruct((1000, 200), jnp.bfloat16))
  fn = lambda x, w: tk.ternary_matmul(x, w, block_sizes=block_sizes)
  for platform in PLATFORMS:
    assert (block_sizes.lowering_problem(platform, word) is None) == (
        platform in lowers_for)
    if platform in lowers_for:
      assert_kernels(fn, args, platform, 1)
    else:
      rule = "multiples of 128" if platform == "tpu" else "powers of two >= 16"
      with pytest.raises(tk.BlockSizeError, match=rule) as error:
        lowered_text(fn, args, [platform])
      assert "func.func" not in str(error.value)


def test_gpu_lowering_is_an_explicit_choice():
  """Mosaic GPU is named but not implemented by these kernels: lowering for CUDA
  with it says so, TPU is unaffected, and an unknown name fails at construction."""
  args = attention_args(256, 256, 64, bsa.BlockSizes(), jnp.float32, False)
  mosaic = bsa.BlockSizes(gpu_lowering="mosaic_gpu")
  fn = lambda q, k, v, mask, _: bsa.block_sparse_attention(q, k, v, mask,
                                                           block_sizes=mosaic)
  with pytest.raises(bsa.BlockSizeError, match="no Mosaic GPU lowering"):
    lowered_text(fn, args, ["cuda"])
  assert_kernels(fn, args, "tpu", 1)

  x = jax.ShapeDtypeStruct((128, 64), jnp.uint32)
  w = jax.ShapeDtypeStruct((1024, 128), jnp.float32)
  matmul = lambda x, w: tk.ternary_matmul(
      x, w, block_sizes=tk.BlockSizes(gpu_lowering="mosaic_gpu"))
  with pytest.raises(tk.BlockSizeError, match="no Mosaic GPU lowering"):
    lowered_text(matmul, (x, w), ["cuda"])
  assert_kernels(matmul, (x, w), "tpu", 1)

  for block_sizes in (bsa.BlockSizes, tk.BlockSizes):
    with pytest.raises(ValueError, match="gpu_lowering must be one of"):
      block_sizes(gpu_lowering="cuda")


def test_compiled_kernel_on_cpu_says_to_interpret():
  """Without interpret=True there is no CPU lowering; the error says what to use."""
  args = attention_args(256, 256, 64, bsa.BlockSizes(), jnp.float32, False)
  fn = lambda q, k, v, mask, _: bsa.block_sparse_attention(q, k, v, mask)
  with pytest.raises(bsa.BlockSizeError, match="interpret=True"):
    lowered_text(fn, args, ["cpu"])
  x = jax.ShapeDtypeStruct((128, 64), jnp.uint32)
  w = jax.ShapeDtypeStruct((1024, 128), jnp.float32)
  with pytest.raises(tk.BlockSizeError, match="interpret=True"):
    lowered_text(lambda x, w: tk.ternary_matmul(x, w), (x, w), ["cpu"])


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_ops_reject_a_tiling_the_backend_cannot_lower(monkeypatch, backend, platform):
  """`ponder.ops` knows the backend it dispatches to, so it checks the rule before
  tracing and raises a ConfigError (the backend is faked: nothing is lowered)."""
  from ponder import errors, ops  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  x = jnp.zeros((1, 1, 64, 48))
  bad = bsa.BlockSizes(64, 64)  # Fine for Triton but for head_dim 48; not for TPU.
  with pytest.raises(errors.ConfigError, match="Triton" if platform == "cuda" else "TPU"):
    ops.attention(x, x, x, block_sizes=bad, impl="pallas")
  packed = jnp.zeros((16, 4), jnp.uint32)
  with pytest.raises(errors.ConfigError, match="powers of two|multiples of 128"):
    ops.ternary_matmul(packed, jnp.zeros((64, 8)), impl="pallas",
                       block_sizes=tk.BlockSizes(8, 8, 1))
