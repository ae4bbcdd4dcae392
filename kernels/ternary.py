"""Ternary spikes {-alpha, 0, +alpha}, their 2-bit packing, and ternary matmuls.

ASNN-Goose's spiking units emit ternary spikes with a learnable per-channel magnitude
(as in Guo et al. 2024, "Ternary Spike: Learning Ternary Spikes for Spiking Neural
Networks"):

  s = alpha * sign(x) * 1[|x| >= theta]          alpha, theta: per channel (last axis)

Surrogate gradient. For theta > 0 the spike equals `alpha * (H(x - theta) -
H(-x - theta))` with H the Heaviside step. The backward pass differentiates the same
expression with H replaced by the fast sigmoid whose derivative `(1 + |u|)^-2` is
SuperSpike's surrogate (Zenke & Ganguli 2018), with a slope k:

  H~(u)  = (1 + k u / (1 + k |u|)) / 2,        H~'(u) = k / (2 (1 + k |u|)^2)
  ds/dx     = alpha * (H~'(x - theta) + H~'(-x - theta))
  ds/dtheta = alpha * (H~'(-x - theta) - H~'(x - theta))
  ds/dalpha = sign(x) * 1[|x| >= theta]        (exact: s is linear in alpha)

i.e. the gradients of `surrogate_spike` below, which the tests check by finite
differences.

Packing. The codes t in {-1, 0, +1} are stored as 2-bit fields (0 -> 0, +1 -> 1,
-1 -> 2), four to a uint8 or sixteen to a uint32, so a packed tensor has 1/16 of the
bytes of its float32 form. The layout is planar along the last axis: with P codes per
word and W = ceil(n / P) words, element k lives in word `k % W` at bits
`2 * (k // W)`. Bit field j of every word then holds one contiguous slice of the
axis, so a matmul kernel decodes field j of a tile of words and multiplies it by the
matching contiguous rows of the weight, with no interleaving shuffle.

Matmul. `ternary_matmul` multiplies packed activations by float weights, or by packed
ternary weights, in a Pallas kernel (GPU via Triton, TPU via Mosaic, where uint32
words suit the 32-bit vector lanes; CPU via `interpret=True`): each output tile loops
over chunks of words, decodes each bit field in registers and accumulates one small
matmul per field in float32. `ternary_matmul_reference` unpacks and runs one dense
matmul, which is also the fast path on CPU. As for block-sparse attention, the kernel's
lowering (Triton or Mosaic TPU) is chosen for the platform the program is lowered
for, not from `jax.default_backend()` (`block_sparse_attention.pallas_per_platform`).
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
import numpy as np

from kernels.block_sparse_attention import (
    GPU_LOWERINGS, BlockSizeError, is_power_of_two, pallas_per_platform)

_PACKED_DTYPES = (jnp.uint8, jnp.uint32)
DEFAULT_SLOPE = 5.0  # Surrogate steepness k: H~' falls to 1/4 of its peak at |u| = 1/k.


def ternarize(x, theta):
  """Ternary codes `sign(x) * 1[|x| >= theta]` as int8 (no gradient)."""
  return (jnp.sign(x) * (jnp.abs(x) >= theta)).astype(jnp.int8)


def _fast_sigmoid(u, slope):
  return 0.5 * (1.0 + slope * u / (1.0 + slope * jnp.abs(u)))


def surrogate_spike(x, alpha, theta, slope=DEFAULT_SLOPE):
  """The smooth function whose gradient `ternary_spike` uses (module docstring)."""
  return alpha * (_fast_sigmoid(x - theta, slope) - _fast_sigmoid(-x - theta, slope))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def ternary_spike(x, alpha, theta, slope=DEFAULT_SLOPE):
  """Ternary spike `alpha * sign(x) * 1[|x| >= theta]` with a surrogate gradient.

  Args:
    x: `[..., channels]` membrane input.
    alpha: `[channels]` spike magnitude (learnable).
    theta: `[channels]` firing threshold (learnable; keep it positive, e.g. through
      a softplus, for the surrogate to match the step it replaces).
    slope: steepness k of the fast-sigmoid surrogate (static).

  Returns:
    Spikes in {-alpha, 0, +alpha}, x's shape and dtype. Gradients to x, alpha and
    theta are those of the module docstring (theta's and alpha's summed over the
    leading axes).
  """
  return (alpha * ternarize(x, theta)).astype(x.dtype)


def _ternary_spike_fwd(x, alpha, theta, slope):
  return ternary_spike(x, alpha, theta, slope), (x, alpha, theta)


def _ternary_spike_bwd(slope, residuals, g):
  x, alpha, theta = residuals
  d = lambda u: 0.5 * slope / (1.0 + slope * jnp.abs(u)) ** 2
  up, down = d(x - theta), d(-x - theta)
  lead = tuple(range(x.ndim - 1))
  return ((g * alpha * (up + down)).astype(x.dtype),
          jnp.sum(g * ternarize(x, theta), axis=lead).astype(alpha.dtype),
          jnp.sum(g * alpha * (down - up), axis=lead).astype(theta.dtype))


ternary_spike.defvjp(_ternary_spike_fwd, _ternary_spike_bwd)


def codes_per_word(dtype) -> int:
  """2-bit codes that fit one word of `dtype` (4 for uint8, 16 for uint32)."""
  if jnp.dtype(dtype) not in map(jnp.dtype, _PACKED_DTYPES):
    raise ValueError(f"packed dtype must be uint8 or uint32, got {jnp.dtype(dtype)}")
  return 4 * jnp.dtype(dtype).itemsize


def _decode(words, field, dtype):
  """Values in {-1, 0, 1} of 2-bit field `field` of every word: (c & 1) - (c >> 1)."""
  c = words >> (2 * field)
  return ((c & 1).astype(jnp.int32) - ((c >> 1) & 1).astype(jnp.int32)).astype(dtype)


def pack_ternary(codes, dtype=jnp.uint32):
  """Packs `[..., n]` codes in {-1, 0, 1} into `[..., ceil(n / P)]` words (planar)."""
  per = codes_per_word(dtype)
  n = codes.shape[-1]
  words = pl.cdiv(n, per)
  c = jnp.pad(codes.astype(jnp.int32), [(0, 0)] * (codes.ndim - 1) + [(0, per * words - n)])
  fields = jnp.where(c < 0, 2, c).astype(dtype).reshape(codes.shape[:-1] + (per, words))
  shifts = (2 * np.arange(per, dtype=np.uint32)).astype(dtype)[:, None]
  # The fields occupy disjoint bits, so their sum is their bitwise or.
  return jnp.sum(fields << shifts, axis=-2, dtype=dtype)


def unpack_ternary(packed, n, dtype=jnp.int8):
  """Inverse of `pack_ternary`: `[..., W]` words to `[..., n]` values in {-1, 0, 1}."""
  per = codes_per_word(packed.dtype)
  fields = [_decode(packed, j, dtype) for j in range(per)]
  return jnp.concatenate(fields, axis=-1)[..., :n]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of `ternary_matmul`: output tiles `[block_m, block_n]`, reduction steps of
  `block_words` packed words (`block_words * P` values of the contraction).

  What each platform's lowering needs (checked when the kernel is lowered for it; a
  violation raises `BlockSizeError`):

  * Triton (CUDA, ROCm): all three powers of two >= 16 (Triton tensor sizes are
    powers of two; `tl.dot` needs every dimension >= 16).
  * TPU (Mosaic): block_n and block_words multiples of 128 (the lane dimensions of
    the output, weight and word tiles) and block_m a multiple of 8 for uint32
    words, 32 for uint8 (rows per vector register of that width).

  The default 128 x 128 x 128 fits both. `gpu_lowering` is the Pallas lowering for
  GPUs, one of `GPU_LOWERINGS`; the kernel implements "triton" only.
  """
  block_m: int = 128
  block_n: int = 128
  block_words: int = 128
  gpu_lowering: str = "triton"

  def __post_init__(self):
    if min(self.block_m, self.block_n, self.block_words) < 1:
      raise BlockSizeError(f"block sizes must be positive, got {self}")
    if self.gpu_lowering not in GPU_LOWERINGS:
      raise BlockSizeError(
          f"gpu_lowering must be one of {GPU_LOWERINGS}, got {self.gpu_lowering!r}")

  def lowering_problem(self, platform: str, word_dtype) -> str | None:
    """Why the kernel cannot be lowered for `platform` ("cuda", "rocm", "tpu") with
    this tiling and packed `word_dtype`, or None if it can."""
    sizes = dict(block_m=self.block_m, block_n=self.block_n,
                 block_words=self.block_words)
    if platform in ("cuda", "rocm"):
      if self.gpu_lowering != "triton":
        return ("ternary_matmul has no Mosaic GPU lowering: Pallas' Mosaic GPU "
                "lowering implements no dot_general (jax 0.10). Use "
                "gpu_lowering='triton'.")
      bad = {k: n for k, n in sizes.items() if not (is_power_of_two(n) and n >= 16)}
      if bad:
        return (f"ternary_matmul on {platform} (Triton) needs block_m, block_n and "
                f"block_words to be powers of two >= 16; got {bad}. Choose BlockSizes "
                "such as BlockSizes(128, 128, 128) or BlockSizes(64, 64, 32).")
      return None
    if platform == "tpu":
      rows = 32 // jnp.dtype(word_dtype).itemsize  # 8 rows of 32 bits, 32 of 8.
      bad = {k: n for k, n in sizes.items()
             if n % (rows if k == "block_m" else 128)}
      if bad:
        return (f"ternary_matmul on TPU (Mosaic) needs block_n and block_words to be "
                f"multiples of 128 and block_m a multiple of {rows} for "
                f"{jnp.dtype(word_dtype).name} words; got {bad}. Choose BlockSizes "
                "such as BlockSizes(128, 128, 128).")
      return None
    return (f"ternary_matmul has no {platform} lowering: on CPU run it with "
            "interpret=True, or use ternary_matmul_reference "
            "(ponder.ops.ternary_matmul(impl='xla')).")

  def check_lowering(self, platform: str, word_dtype) -> None:
    """Raises `BlockSizeError` if `lowering_problem(platform, word_dtype)`."""
    problem = self.lowering_problem(platform, word_dtype)
    if problem:
      raise BlockSizeError(problem)


def _matmul_kernel(x_ref, w_ref, o_ref, *, rhs_packed):
  """One output tile: sum over word chunks c and bit fields j of decoded-x @ w-rows.

  Refs are chunk-major so a chunk is a dynamic index on a leading axis: x_ref
  `[chunks, block_m, block_words]`; w_ref `[P, chunks, block_words, block_n]` (float)
  or `[chunks, block_n, block_words]` (packed).
  """
  per = codes_per_word(x_ref.dtype)
  # Decoded codes are exact in bfloat16, the tensor-core/MXU input type.
  compute = jnp.bfloat16 if rhs_packed else w_ref.dtype

  def body(chunk, acc):
    xw = x_ref[chunk]
    ww = w_ref[chunk] if rhs_packed else None
    for j in range(per):
      xj = _decode(xw, j, compute)
      if rhs_packed:  # Both [rows, words]: contract the word axis of each.
        acc += lax.dot_general(xj, _decode(ww, j, compute), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
      else:  # Field j of word w multiplies row j * W + w of the weight.
        acc += jnp.dot(xj, w_ref[j, chunk], preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, x_ref.shape[0], body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _out_shape(shape, dtype, *operands):
  """An output type that varies over the mesh axes its operands vary over, as
  `shard_map` (with its default check_vma=True) requires of a kernel's outputs."""
  mats = [jax.typeof(x).mat for x in operands]
  varying = frozenset().union(*(mat.varying for mat in mats))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def _pad_to(x, axis, multiple):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, pad)


def check_matmul(x_packed, w):
  """Raises ValueError unless x is packed `[M, W]` and w fits it; returns rhs_packed."""
  per = codes_per_word(x_packed.dtype)
  if x_packed.ndim != 2 or w.ndim != 2:
    raise ValueError(f"ternary_matmul takes 2-D operands, got {x_packed.shape}, {w.shape}")
  words = x_packed.shape[1]
  rhs_packed = jnp.issubdtype(w.dtype, jnp.unsignedinteger)
  if rhs_packed:
    if w.dtype != x_packed.dtype or w.shape[1] != words:
      raise ValueError(
          f"a packed rhs must be [N, {words}] {x_packed.dtype} (the transposed weight "
          f"packed along K like x); got {w.shape} {w.dtype}")
  elif pl.cdiv(w.shape[0], per) != words:
    raise ValueError(
        f"w must be [K, N] with ceil(K / {per}) = {words} (x's packed words); "
        f"got {w.shape}")
  return rhs_packed


def _chunked(x, block_words):
  """`[rows, W]` words -> `[W // block_words, rows, block_words]` (chunk-major)."""
  rows, words = x.shape
  return x.reshape(rows, words // block_words, block_words).transpose(1, 0, 2)


def _matmul_forward(x_packed, w, block_sizes, interpret):
  rhs_packed = check_matmul(x_packed, w)
  per = codes_per_word(x_packed.dtype)
  bm, bn, bw = block_sizes.block_m, block_sizes.block_n, block_sizes.block_words
  m, words = x_packed.shape
  # Zero words decode to zeros, so padding the word axis changes nothing.
  x = _chunked(_pad_to(_pad_to(x_packed, 0, bm), 1, bw), bw)
  chunks = x.shape[0]
  if rhs_packed:
    n = w.shape[0]
    rhs = _chunked(_pad_to(_pad_to(w, 0, bn), 1, bw), bw)
    rhs_spec = pl.BlockSpec((chunks, bn, bw), lambda i, j: (0, j, 0))
    out_dtype, n_p = jnp.float32, rhs.shape[1]
  else:
    n = w.shape[1]
    # Rows of w in planar order: field f covers rows f*W .. f*W + W - 1.
    rhs = _pad_to(w, 0, per * words).reshape(per, words, n)
    rhs = _pad_to(_pad_to(rhs, 1, bw), 2, bn).reshape(per, chunks, bw, -1)
    rhs_spec = pl.BlockSpec((per, chunks, bw, bn), lambda i, j: (0, 0, 0, j))
    out_dtype, n_p = w.dtype, rhs.shape[3]
  grid = (x.shape[1] // bm, n_p // bn)

  def call(compiler_params, x, rhs):
    return pl.pallas_call(
        functools.partial(_matmul_kernel, rhs_packed=rhs_packed),
        grid=grid,
        in_specs=[pl.BlockSpec((chunks, bm, bw), lambda i, j: (0, i, 0)), rhs_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=_out_shape((x.shape[1], n_p), out_dtype, x, rhs),
        compiler_params=compiler_params, interpret=interpret, name="ternary_matmul",
    )(x, rhs)

  if interpret:
    out = call(None, x, rhs)
  else:
    out = pallas_per_platform(
        call, (x, rhs),
        # Every program writes only its own output tile.
        tpu_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        triton_params=pltriton.CompilerParams(),
        gpu_lowering=block_sizes.gpu_lowering,
        problem=lambda p: block_sizes.lowering_problem(p, x_packed.dtype))
  return out[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x_packed, w, block_sizes, interpret):
  return _matmul_forward(x_packed, w, block_sizes, interpret)


def _matmul_fwd(x_packed, w, block_sizes, interpret):
  return _matmul_forward(x_packed, w, block_sizes, interpret), (x_packed, w)


def _matmul_bwd(block_sizes, interpret, residuals, g):
  """Only a float w has a gradient: dW = T^T g with T the decoded activations."""
  del block_sizes, interpret
  x_packed, w = residuals
  if jnp.issubdtype(w.dtype, jnp.unsignedinteger):
    return None, None
  t = unpack_ternary(x_packed, w.shape[0], g.dtype)
  return None, jnp.dot(t.T, g, preferred_element_type=jnp.float32).astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def ternary_matmul(x_packed, w, *, block_sizes=None, interpret=False):
  """`T @ w` for packed ternary activations T (Pallas kernel).

  Args:
    x_packed: `[M, W]` uint8/uint32, the `[M, K]` codes packed by `pack_ternary`.
    w: float `[K, N]` weights (fold a per-channel alpha into its rows), or, for
      ternary x ternary, `[N, W]` codes of the `[K, N]` weight packed along K (i.e.
      `pack_ternary(codes.T)`, same dtype as x_packed).
    block_sizes: tiling, `BlockSizes()` by default (see it for what each platform
      needs).
    interpret: run in the Pallas interpreter (needed on CPU).

  Returns:
    `[M, N]`, in w's dtype for float w and float32 (exact integers) for ternary w.
    Differentiable with respect to a float w.

  Raises:
    ValueError: operands that do not fit together (at trace time).
    BlockSizeError: when lowered (not interpreted) for a platform whose lowering the
      tiling or `gpu_lowering` does not suit, or for CPU.
  """
  return _matmul(x_packed, w, block_sizes or BlockSizes(), interpret)


@jax.jit
def ternary_matmul_reference(x_packed, w):
  """`ternary_matmul` in jnp: unpack, then one dense matmul."""
  rhs_packed = check_matmul(x_packed, w)
  if rhs_packed:
    k = w.shape[1] * codes_per_word(w.dtype)
    t = unpack_ternary(x_packed, k, jnp.bfloat16)
    return jnp.dot(t, unpack_ternary(w, k, jnp.bfloat16).T,
                   preferred_element_type=jnp.float32)
  t = unpack_ternary(x_packed, w.shape[0], w.dtype)
  return jnp.dot(t, w, preferred_element_type=jnp.float32).astype(w.dtype)
