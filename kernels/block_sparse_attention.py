"""Block-sparse attention whose block mask is computed at run time from data.

Softmax attention (Vaswani et al. 2017, eq. 1), `O = softmax(scale * Q K^T) V`,
restricted to the tiles of a `[ceil(seq_q / block_q), ceil(seq_k / block_k)]` block
mask per (batch, head). The mask is an ordinary array (for DendriticBERT, a learned perforation
of the attention map), so the tiles to visit are only known when the kernel runs.

Element `(i, j)` of the attention map of example `b`, head `h` takes part iff

  block_mask[b, h, i // block_q, j // block_k]          (the learned tile mask)
  and (not causal or j <= i)                             (autoregressive mask;
                                                          aligned at position 0)
  and not kv_padding[b, j]                               (padding keys)

A query row with no such key has an empty softmax. We define its output as zeros and
its gradients (to q, and its contribution to k and v) as zeros; nothing is NaN.

Three implementations share these semantics:

* `block_sparse_attention`: Pallas kernels (GPU via Triton, TPU via Mosaic, CPU via
  `interpret=True`). Which lowering a platform gets is decided when the program is
  lowered, for the platform it is lowered for (`jax.lax.platform_dependent`), not from
  `jax.default_backend()`: `jax.export(..., platforms=["cuda"])` on a CPU host
  produces the Triton custom call a GPU would run (see `pallas_per_platform`).
  The forward pass is FlashAttention's online softmax (Dao et al. 2022, Alg. 1; the
  loop order of FlashAttention-2, Dao 2023, Alg. 1): one program per query block loops
  over the *active* key blocks of its row of the mask only, so a tile whose mask bit is
  off is never loaded or multiplied. The backward pass is FlashAttention-2's Alg. 2
  split in two kernels so that no program writes another's output: dq loops over the
  active key blocks of a query block, dk/dv over the active query blocks of a key
  block (the transposed mask).
* `block_sparse_attention_xla`: plain XLA for CPU. Each query block gathers its active
  key/value blocks up to a static maximum per row, so the work falls with density.
* `block_sparse_attention_reference`: dense attention with the element mask above.

Layout is `[batch, heads, seq, head_dim]` throughout.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.extend import core as jex_core
from jax.interpreters import batching
from jax.interpreters import mlir
import numpy as np

# A finite stand-in for -inf: `exp(_MASK_VALUE - m)` underflows to 0 without the
# inf - inf = NaN that a true -inf gives when a whole row is masked.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class BlockSizeError(ValueError):
  """Block sizes or a GPU lowering that the target platform's Pallas lowering cannot
  take. Raised when the program is lowered for that platform (`jit`, `jax.export`)."""


# GPU lowerings a kernel may name. Pallas can lower a `pallas_call` for CUDA through
# Triton or through Mosaic GPU; these kernels need Triton (Mosaic GPU's `pallas_call`
# lowering has no `dot_general` in jax 0.10: it wants `plgpu.wgmma` kernels).
GPU_LOWERINGS = ("triton", "mosaic_gpu")
_NO_MOSAIC_GPU = (
    "has no Mosaic GPU lowering: Pallas' Mosaic GPU lowering implements no "
    "dot_general (jax 0.10; its matmuls are plgpu.wgmma kernels). Use "
    "gpu_lowering='triton'.")


def is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the attention map; the block mask has one bit per tile.

  What each platform's lowering needs (checked when the kernels are lowered for it,
  by `lowering_problem`; a violation raises `BlockSizeError`, not a compiler dump):

  * Triton (CUDA, ROCm): block_q, block_k and head_dim powers of two >= 16 (Triton
    tensors have power-of-two sizes; `tl.dot` needs every dimension >= 16).
  * TPU (Mosaic): block_q and block_k multiples of 128. block_k is the lane
    dimension of the logits tile and block_q that of its transpose in the dk/dv
    kernel; the vector lanes are 128 wide. head_dim may be anything (a block always
    spans all of it); multiples of 128 fill the MXU.

  The default 128 x 128 fits both.

  Attributes:
    block_q: query rows per tile (and per kernel program).
    block_k: key columns per tile.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages (GPU only).
    gpu_lowering: the Pallas lowering used when lowering for a GPU, one of
      `GPU_LOWERINGS`; only "triton" is implemented by these kernels (TPU always
      uses Mosaic TPU). Chosen per lowering platform, never from the default
      backend.
  """
  block_q: int = 128
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 2
  gpu_lowering: str = "triton"

  def __post_init__(self):
    if self.block_q < 1 or self.block_k < 1:
      raise BlockSizeError(f"block sizes must be positive, got {self}")
    if self.gpu_lowering not in GPU_LOWERINGS:
      raise BlockSizeError(
          f"gpu_lowering must be one of {GPU_LOWERINGS}, got {self.gpu_lowering!r}")

  def grid(self, seq_q: int, seq_k: int) -> tuple[int, int]:
    """The block-mask shape `(ceil(seq_q / block_q), ceil(seq_k / block_k))`."""
    return pl.cdiv(seq_q, self.block_q), pl.cdiv(seq_k, self.block_k)

  def lowering_problem(self, platform: str, head_dim: int) -> str | None:
    """Why the kernels cannot be lowered for `platform` ("cuda", "rocm", "tpu") with
    this tiling and `head_dim`, or None if they can."""
    if platform in ("cuda", "rocm"):
      if self.gpu_lowering != "triton":
        return f"block_sparse_attention {_NO_MOSAIC_GPU}"
      bad = {name: n for name, n in (("block_q", self.block_q),
                                     ("block_k", self.block_k), ("head_dim", head_dim))
             if not (is_power_of_two(n) and n >= 16)}
      if bad:
        return (f"block_sparse_attention on {platform} (Triton) needs block_q, block_k "
                f"and head_dim to be powers of two >= 16; got {bad}. Choose BlockSizes "
                "such as BlockSizes(64, 64) or BlockSizes(128, 128).")
      return None
    if platform == "tpu":
      bad = {name: n for name, n in (("block_q", self.block_q), ("block_k", self.block_k))
             if n % 128}
      if bad:
        return (f"block_sparse_attention on TPU (Mosaic) needs block_q and block_k to "
                f"be multiples of 128 (the lane width); got {bad}. Choose BlockSizes "
                "such as BlockSizes(128, 128) or BlockSizes(256, 128).")
      return None
    return (f"block_sparse_attention has no {platform} lowering: on CPU run it with "
            "interpret=True, or use block_sparse_attention_xla "
            "(ponder.ops.attention(impl='xla')).")

  def check_lowering(self, platform: str, head_dim: int) -> None:
    """Raises `BlockSizeError` if `lowering_problem(platform, head_dim)`."""
    problem = self.lowering_problem(platform, head_dim)
    if problem:
      raise BlockSizeError(problem)


# A primitive that is the identity on its operand and whose lowering raises: bound in
# the branch of `pallas_per_platform` for a platform the kernel cannot be lowered for,
# so that lowering for that platform (only) fails with our message. (Tracing builds
# every platform's branch, so the check cannot run at trace time.)
_lowering_guard_p = jex_core.Primitive("pallas_lowering_guard")
_lowering_guard_p.def_impl(lambda x, *, message: x)
_lowering_guard_p.def_abstract_eval(lambda x, *, message: x)


def _lowering_guard_rule(ctx, x, *, message):
  del ctx, x
  raise BlockSizeError(message)


mlir.register_lowering(_lowering_guard_p, _lowering_guard_rule)
batching.primitive_batchers[_lowering_guard_p] = (
    lambda args, dims, *, message: (_lowering_guard_p.bind(*args, message=message),
                                    dims[0]))

_GPU_PLATFORMS = ("cuda", "rocm")


def pallas_per_platform(call, operands, *, tpu_params, triton_params, gpu_lowering,
                        problem):
  """`call(compiler_params, *operands)` with the compiler parameters of the platform
  the program is lowered for.

  `pallas_call` takes one backend's parameters, and without Triton's it lowers for
  CUDA through Mosaic GPU; choosing them from `jax.default_backend()` is wrong under
  cross-platform lowering (`jax.export(..., platforms=[...])`) and for a program
  lowered on one host to run on another. `lax.platform_dependent` defers the choice
  to lowering, which keeps only the branch of the target platform. `problem(platform)`
  is None or why the kernel cannot be lowered for it; that branch then raises
  `BlockSizeError` with it when lowered, and other platforms are unaffected.

  Lower for one accelerator platform at a time: in a multi-platform lowering
  (`jax.export(..., platforms=["cuda", "tpu"])`) jax 0.10 lowers every kept branch for
  all the platforms, and Pallas refuses Triton parameters for TPU.
  """
  def branch(platform, params):
    message = problem(platform)

    def run(first, *rest):
      if message:
        first = _lowering_guard_p.bind(first, message=message)
      return call(params, first, *rest)
    return run

  if gpu_lowering != "triton":
    triton_params = None  # Never lowered: `problem` rejects the GPU platforms.
  return lax.platform_dependent(
      *operands, tpu=branch("tpu", tpu_params),
      **{p: branch(p, triton_params) for p in _GPU_PLATFORMS},
      default=branch("cpu", None))


def check_inputs(q, k, v, block_mask, kv_padding, block_sizes):
  """Raises ValueError naming the argument whose shape does not fit."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "q, k, v must be [batch, heads, seq, head_dim]; got shapes "
        f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(
        "k and v must have the same shape, and batch, heads and head_dim must agree "
        f"with q; got q {q.shape}, k {k.shape}, v {v.shape}")
  batch, heads, seq_q, _ = q.shape
  grid = block_sizes.grid(seq_q, k.shape[2])
  if (block_mask.ndim != 4 or block_mask.shape[2:] != grid
      or block_mask.shape[0] not in (1, batch) or block_mask.shape[1] not in (1, heads)):
    raise ValueError(
        f"block_mask must have shape [{batch} or 1, {heads} or 1, {grid[0]}, {grid[1]}] "
        f"(ceil(seq / block) for block_q={block_sizes.block_q}, "
        f"block_k={block_sizes.block_k}); got {block_mask.shape}. Pass block_sizes "
        "that match the mask's tiling.")
  if kv_padding is not None and kv_padding.shape != (batch, k.shape[2]):
    raise ValueError(
        f"kv_padding must be [batch, seq_k] = {(batch, k.shape[2])}, True at padding "
        f"keys; got {kv_padding.shape}")


def _prepare(q, k, v, block_mask, kv_padding, causal, block_sizes):
  """Pads seq to whole blocks and folds causality and padding into the block mask.

  Returns padded (q, k, v), the effective block mask ([batch, heads, nq, nk] bool)
  and `kv_valid` ([batch, seq_k_padded] int32, 1 at real keys). Dropping tiles that
  causality or padding empty entirely is exact and saves their work.
  """
  batch, heads, seq_q, _ = q.shape
  seq_k = k.shape[2]
  nq, nk = block_sizes.grid(seq_q, seq_k)
  pad_q, pad_k = nq * block_sizes.block_q - seq_q, nk * block_sizes.block_k - seq_k
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n), (0, 0)))
  q, k, v = pad(q, pad_q), pad(k, pad_k), pad(v, pad_k)
  kv_valid = jnp.ones((batch, seq_k), jnp.bool_)
  if kv_padding is not None:
    kv_valid = ~kv_padding.astype(jnp.bool_)
  kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad_k)))
  mask = jnp.broadcast_to(block_mask.astype(jnp.bool_), (batch, heads, nq, nk))
  mask &= jnp.any(kv_valid.reshape(batch, 1, 1, nk, block_sizes.block_k), axis=-1)
  if causal:
    # Tile (i, j) has some key <= some query iff its first key <= its last query.
    first_k = np.arange(nk) * block_sizes.block_k
    last_q = np.arange(1, nq + 1) * block_sizes.block_q - 1
    mask &= first_k[None, :] <= last_q[:, None]
  return q, k, v, mask, kv_valid.astype(jnp.int32)


def _active_blocks(mask):
  """Compacts each row of a boolean block mask into a list of its active columns.

  Returns `counts[..., r]`, the number of active blocks of row r, and
  `indices[..., r, :]`, their column indices in ascending order followed by the
  inactive ones (which a consumer never reads beyond `counts`).
  """
  indices = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  return jnp.sum(mask, axis=-1, dtype=jnp.int32), indices


def _dot(a, b, *, trans_a=False, trans_b=False):
  """`a @ b` (optionally transposed operands) accumulated in float32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile_logits(q, k, kv_valid, q_start, k_start, *, scale, causal):
  """Scaled logits of one `[block_q, block_k]` tile and which of them are real.

  `kv_valid` is the tile's `[1, block_k]` row of key validity. Positions come from
  2-D iotas: TPU kernels have no 1-D vector layout.
  """
  s = _dot(q, k, trans_b=True) * scale
  valid = jnp.broadcast_to(kv_valid != 0, s.shape)
  if causal:
    rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    valid &= cols <= rows
  return s, valid


def _tile_grads(q, k, v, do, lse, delta, kv_valid, q_start, k_start, *, scale, causal):
  """Probabilities P and logit gradients dS of one tile (FlashAttention-2, Alg. 2).

  `P = exp(S - lse)` restricted to real entries, `dS = P * (dO V^T - delta)` with
  `delta = rowsum(dO * O)` (`lse`, `delta`: `[block_q, 1]` columns); dS is the
  gradient with respect to the *scaled* logits.
  """
  s, valid = _tile_logits(q, k, kv_valid, q_start, k_start, scale=scale, causal=causal)
  p = jnp.where(valid, jnp.exp(s - lse), 0.0)
  ds = p * (_dot(do, v, trans_b=True) - delta)
  return p, ds


def _fold_active(counts_ref, indices_ref, body, init):
  """Runs `carry = body(block, carry)` over the active blocks of this program's row.

  The tables hold this (batch, head)'s compacted mask; the row is the program's
  block index. The loop length is read at run time, so a sparse row costs
  proportionally less.
  """
  row = pl.program_id(2)
  return lax.fori_loop(0, counts_ref[0, row],
                       lambda j, carry: body(indices_ref[row, j], carry), init)


# Kernel refs are blocked: a program's own block is `[block, last]` and a whole
# sequence is `[blocks, block, last]`, indexed by block on its leading axis (a dynamic
# index there is a plain offset for Triton and Mosaic alike). Row statistics are
# `[block_q, 1]` columns and key validity `[1, block_k]` rows.


def _fwd_kernel(counts_ref, indices_ref, q_ref, k_ref, v_ref, kv_valid_ref,
                o_ref, lse_ref, *, scale, causal):
  """One query block: online softmax over its active key blocks."""
  block_q, block_k = q_ref.shape[0], k_ref.shape[1]
  q_start = pl.program_id(2) * block_q
  q = q_ref[...]

  def body(kb, carry):
    m, l, acc = carry
    s, valid = _tile_logits(q, k_ref[kb], kv_valid_ref[kb], q_start, kb * block_k,
                            scale=scale, causal=causal)
    m_new = jnp.maximum(
        m, jnp.max(jnp.where(valid, s, _MASK_VALUE), axis=1, keepdims=True))
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    rescale = jnp.exp(m - m_new)
    acc = acc * rescale + _dot(p.astype(v_ref.dtype), v_ref[kb])
    return m_new, l * rescale + jnp.sum(p, axis=1, keepdims=True), acc

  init = (jnp.full((block_q, 1), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros(q_ref.shape, jnp.float32))
  m, l, acc = _fold_active(counts_ref, indices_ref, body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
  # An empty row's log-sum-exp would be -inf; +inf makes exp(s - lse) vanish in the
  # backward pass instead (its entries are also all masked there).
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l))


def _dq_kernel(counts_ref, indices_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               kv_valid_ref, dq_ref, *, scale, causal):
  """One query block: dQ = scale * sum over active key blocks of dS K."""
  block_k = k_ref.shape[1]
  q_start = pl.program_id(2) * q_ref.shape[0]
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(kb, dq):
    k = k_ref[kb]
    _, ds = _tile_grads(q, k, v_ref[kb], do, lse, delta, kv_valid_ref[kb], q_start,
                        kb * block_k, scale=scale, causal=causal)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _fold_active(counts_ref, indices_ref, body, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(counts_ref, indices_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, kv_valid_ref, dk_ref, dv_ref, *, scale, causal):
  """One key block: dV = sum P^T dO and dK = scale * sum dS^T Q over active q blocks."""
  block_q = q_ref.shape[1]
  k_start = pl.program_id(2) * k_ref.shape[0]
  k, v, kv_valid = k_ref[...], v_ref[...], kv_valid_ref[...]

  def body(qb, carry):
    dk, dv = carry
    q, do = q_ref[qb], do_ref[qb]
    p, ds = _tile_grads(q, k, v, do, lse_ref[qb], delta_ref[qb], kv_valid,
                        qb * block_q, k_start, scale=scale, causal=causal)
    return (dk + _dot(ds.astype(q.dtype), q, trans_a=True),
            dv + _dot(p.astype(do.dtype), do, trans_a=True))

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = _fold_active(counts_ref, indices_ref, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _out_shape(shape, dtype, *operands):
  """An output type that varies over the mesh axes its operands vary over, as
  `shard_map` (with its default check_vma=True) requires of a kernel's outputs."""
  mats = [jax.typeof(x).mat for x in operands]
  varying = frozenset().union(*(mat.varying for mat in mats))
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=mats[0].update(varying=varying))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable compile-time settings of one kernel call."""
  scale: float
  causal: bool
  block_sizes: BlockSizes
  interpret: bool


def _blocked(x, block):
  """`[b, h, seq, last]` -> `[b, h, seq // block, block, last]` (a free reshape)."""
  return x.reshape(x.shape[:2] + (x.shape[2] // block, block) + x.shape[3:])


def _spec(x, own):
  """BlockSpec of a blocked `[b, h or 1, n, block, last]` array for program
  (b, h, i): its block i (`own`) or all n blocks."""
  head = (lambda h: h) if x.shape[1] > 1 else (lambda h: 0)
  if own:
    return pl.BlockSpec((None, None, None) + x.shape[3:],
                        lambda b, h, i: (b, head(h), i, 0, 0))
  return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, i: (b, head(h), 0, 0, 0))


def _call(kernel, static, mask, arrays, own, outs):
  """Runs `kernel` on a (batch, heads, row) grid, one program per block-mask row.

  Each program gets its (batch, head)'s compacted mask in scalar memory, the blocked
  `arrays` (its own block where `own[i]`, else all blocks) and its own block of each
  output in `outs` ((shape, dtype) of blocked outputs).
  """
  counts, indices = _active_blocks(mask)
  counts = counts[:, :, None, :]  # A TPU block's last two dims must be whole or tiled.
  # TPU kernels read scalars from SMEM; other backends ignore the memory space.
  table = lambda t: pl.BlockSpec((None, None) + t.shape[2:],
                                 lambda b, h, i: (b, h) + (0,) * (t.ndim - 2),
                                 memory_space=pltpu.SMEM)
  out_shapes = [_out_shape(shape, dtype, mask, *arrays) for shape, dtype in outs]

  def call(compiler_params, *operands):
    return pl.pallas_call(
        functools.partial(kernel, scale=static.scale, causal=static.causal),
        grid=mask.shape[:3],
        in_specs=[table(counts), table(indices)]
        + [_spec(x, o) for x, o in zip(arrays, own)],
        out_specs=[_spec(o, True) for o in out_shapes],
        out_shape=out_shapes, compiler_params=compiler_params,
        interpret=static.interpret, name=kernel.__name__.strip("_"),
    )(*operands)

  operands = (counts, indices, *arrays)
  if static.interpret:
    return call(None, *operands)
  bs = static.block_sizes
  head_dim = arrays[0].shape[-1]
  return pallas_per_platform(
      call, operands,
      # Every program writes only its own output block.
      tpu_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
      triton_params=pltriton.CompilerParams(num_warps=bs.num_warps,
                                            num_stages=bs.num_stages),
      gpu_lowering=bs.gpu_lowering,
      problem=lambda platform: bs.lowering_problem(platform, head_dim))


def _kernel_layout(static, q, k, v, kv_valid):
  """Blocked q, k, v and `[b, 1, nk, 1, block_k]` key validity."""
  bs = static.block_sizes
  batch, seq_k = kv_valid.shape
  kv_valid = kv_valid.reshape(batch, 1, seq_k // bs.block_k, 1, bs.block_k)
  return _blocked(q, bs.block_q), _blocked(k, bs.block_k), _blocked(v, bs.block_k), \
      kv_valid


def _forward(static, q, k, v, mask, kv_valid):
  """Returns o `[b, h, seq_q, d]` and lse, blocked `[b, h, nq, block_q, 1]`."""
  qb, kb, vb, kv_valid = _kernel_layout(static, q, k, v, kv_valid)
  o, lse = _call(_fwd_kernel, static, mask, (qb, kb, vb, kv_valid),
                 own=(True, False, False, False),
                 outs=[(qb.shape, q.dtype), (qb.shape[:4] + (1,), jnp.float32)])
  return o.reshape(q.shape), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, mask, kv_valid):
  return _forward(static, q, k, v, mask, kv_valid)[0]


def _attention_fwd(static, q, k, v, mask, kv_valid):
  o, lse = _forward(static, q, k, v, mask, kv_valid)
  return o, (q, k, v, mask, kv_valid, o, lse)


def _attention_bwd(static, residuals, do):
  q, k, v, mask, kv_valid, o, lse = residuals
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1,
                  keepdims=True)
  qb, kb, vb, kv_valid = _kernel_layout(static, q, k, v, kv_valid)
  block_q = static.block_sizes.block_q
  arrays = (qb, kb, vb, _blocked(do, block_q), lse, _blocked(delta, block_q), kv_valid)
  # dq: one program per query block (mask rows), as in the forward pass.
  dq, = _call(_dq_kernel, static, mask, arrays,
              own=(True, False, False, True, True, True, False),
              outs=[(qb.shape, q.dtype)])
  # dk, dv: one program per key block (rows of the transposed mask).
  dk, dv = _call(_dkv_kernel, static, jnp.swapaxes(mask, 2, 3), arrays,
                 own=(False, True, True, False, False, False, True),
                 outs=[(kb.shape, k.dtype)] * 2)
  return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _default_scale(scale, head_dim):
  return float(head_dim) ** -0.5 if scale is None else float(scale)


@functools.partial(
    jax.jit, static_argnames=("causal", "block_sizes", "scale", "interpret"))
def block_sparse_attention(q, k, v, block_mask, *, causal=False, kv_padding=None,
                           block_sizes=None, scale=None, interpret=False):
  """Attention over the active tiles of a run-time block mask (Pallas kernels).

  Args:
    q, k, v: `[batch, heads, seq, head_dim]`, float32 or bfloat16 (k and v share
      seq_k, which may differ from seq_q).
    block_mask: boolean `[batch or 1, heads or 1, ceil(seq_q / block_q),
      ceil(seq_k / block_k)]`; tile (i, j) is computed iff it is True. It may be
      computed from data inside `jit`.
    causal: also mask keys after the query (j > i).
    kv_padding: optional boolean `[batch, seq_k]`, True at padding keys.
    block_sizes: tiling, `BlockSizes()` (128 x 128, Triton on GPU) by default.
      Sequences that are not whole blocks are zero-padded internally and the
      padding masked. See `BlockSizes` for what each platform needs.
    scale: logit scale, `head_dim ** -0.5` by default.
    interpret: run the kernels in the Pallas interpreter (needed on CPU).

  Returns:
    `[batch, heads, seq_q, head_dim]` in q's dtype; rows with no active key are 0.

  Raises:
    ValueError: shapes that do not fit together (at trace time).
    BlockSizeError: when lowered (not interpreted) for a platform whose lowering the
      tiling, head_dim or `gpu_lowering` does not suit, or for CPU.
  """
  block_sizes = block_sizes or BlockSizes()
  check_inputs(q, k, v, block_mask, kv_padding, block_sizes)
  static = _Static(_default_scale(scale, q.shape[-1]), causal, block_sizes, interpret)
  operands = _prepare(q, k, v, block_mask, kv_padding, causal, block_sizes)
  return _attention(static, *operands)[:, :, :q.shape[2]]


def _masked_attention(q, k, v, valid, scale):
  """softmax(scale * q k^T) v over the entries where `valid`, 0 for empty rows.

  Shapes are `[..., n_q, d]`, `[..., n_k, d]` and `valid` broadcastable to
  `[..., n_q, n_k]`. Masked logits are set to `_MASK_VALUE`, so their exp is exactly
  0 next to any real logit. In an empty row every logit is `_MASK_VALUE`: its
  probabilities come out uniform (finite, l >= 1) and the final select zeroes the row
  and its gradient, so nothing is inf or NaN.
  """
  s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(valid, s * scale, _MASK_VALUE)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m)
  o = jnp.einsum("...qk,...kd->...qd", p, v.astype(jnp.float32))
  o = o / jnp.sum(p, axis=-1, keepdims=True)
  return jnp.where(m > _MASK_VALUE, o, 0.0).astype(q.dtype)


def _element_mask(block_mask, kv_valid, causal, block_sizes, seq_q, seq_k):
  """The `[batch, heads, seq_q, seq_k]` mask of the module docstring.

  `block_mask` may cover more than `seq_q x seq_k` (partial last blocks);
  `kv_valid` is None or `[batch, seq_k]`, True at keys that may be attended.
  """
  valid = jnp.repeat(jnp.repeat(block_mask.astype(jnp.bool_), block_sizes.block_q,
                                axis=2), block_sizes.block_k, axis=3)
  valid = valid[:, :, :seq_q, :seq_k]
  if causal:
    valid &= np.tril(np.ones((seq_q, seq_k), np.bool_))
  if kv_valid is not None:
    valid &= kv_valid[:, None, None, :]
  return valid


@functools.partial(jax.jit, static_argnames=("causal", "block_sizes", "scale"))
def block_sparse_attention_reference(q, k, v, block_mask, *, causal=False,
                                     kv_padding=None, block_sizes=None, scale=None):
  """Dense attention with the same element mask as `block_sparse_attention`.

  Upsamples the block mask to `[seq_q, seq_k]` and computes the full attention map
  in float32; memory and time are quadratic in sequence length whatever the density.
  """
  block_sizes = block_sizes or BlockSizes()
  check_inputs(q, k, v, block_mask, kv_padding, block_sizes)
  kv_valid = None if kv_padding is None else ~kv_padding.astype(jnp.bool_)
  valid = _element_mask(block_mask, kv_valid, causal, block_sizes, q.shape[2],
                        k.shape[2])
  f32 = lambda x: x.astype(jnp.float32)
  o = _masked_attention(f32(q), f32(k), f32(v), valid,
                        _default_scale(scale, q.shape[-1]))
  return o.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_blocks(x, indices, num_blocks):
  """`x[b, h, indices[b, h, m]]` for x of shape `[b, h, num_blocks, ...]`."""
  batch, heads = x.shape[:2]
  # One gather of whole blocks from a flat [b * h * n, ...] view: take_along_axis
  # would broadcast the indices to every element and gather elementwise (slow on CPU).
  rows = indices + (np.arange(batch * heads) * num_blocks).reshape(batch, heads, 1)
  flat = x.reshape((-1,) + x.shape[3:])
  return jnp.take(flat, rows.reshape(-1), axis=0, mode="clip").reshape(
      indices.shape + x.shape[3:])


def _gather_blocks_fwd(x, indices, num_blocks):
  return _gather_blocks(x, indices, num_blocks), indices


def _gather_blocks_bwd(num_blocks, indices, g):
  # The transpose of a gather is a scatter-add, which XLA runs serially on CPU and
  # which made the backward pass slower than dense attention. A one-hot contraction
  # is the same sum as a matmul; it costs seq / (block_q * block_k) of the attention
  # matmuls, a few percent at the benchmarked sizes.
  one_hot = (indices[..., None] == np.arange(num_blocks)).astype(g.dtype)
  return jnp.einsum("bhmn,bhm...->bhn...", one_hot, g), None


_gather_blocks.defvjp(_gather_blocks_fwd, _gather_blocks_bwd)


def _gathered_attention(q, k, v, mask, kv_valid, *, max_active, scale, causal,
                        block_sizes):
  """Each query block attends to (at most `max_active`) gathered active key blocks."""
  batch, heads, _, head_dim = q.shape
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = mask.shape[2:]
  counts, indices = _active_blocks(mask)
  indices = indices[..., :max_active]  # [b, h, nq, A]
  gather = lambda x: _gather_blocks(
      x.reshape(batch, heads, nk, bk, head_dim),
      indices.reshape(batch, heads, nq * max_active), nk,
  ).reshape(batch, heads, nq, max_active * bk, head_dim)
  # [b, h, nq, A * bk]: the global position of every gathered key.
  k_pos = (indices[..., None] * bk + np.arange(bk)).reshape(batch, heads, nq, -1)
  valid = jnp.repeat(np.arange(max_active) < counts[..., None], bk, axis=-1)
  valid &= jax.vmap(lambda kv, pos: kv[pos])(kv_valid, k_pos) != 0
  valid = valid[..., None, :]  # [b, h, nq, 1, A * bk]
  if causal:
    q_pos = (np.arange(nq)[:, None] * bq + np.arange(bq))[..., None]
    valid &= k_pos[..., None, :] <= q_pos
  o = _masked_attention(q.reshape(batch, heads, nq, bq, head_dim), gather(k),
                        gather(v), valid, scale)
  return o.reshape(q.shape)


def _dense_attention(q, k, v, mask, kv_valid, *, scale, causal, block_sizes):
  """All keys for every query, with the block mask upsampled to elements."""
  valid = _element_mask(mask, kv_valid != 0, causal, block_sizes, q.shape[2],
                        k.shape[2])
  return _masked_attention(q, k, v, valid, scale)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "block_sizes", "scale", "max_active_blocks", "fallback"))
def block_sparse_attention_xla(q, k, v, block_mask, *, causal=False, kv_padding=None,
                               block_sizes=None, scale=None, max_active_blocks=None,
                               fallback=True):
  """Block-sparse attention in plain XLA whose cost falls with density (for CPU).

  Each query block gathers its active key/value blocks into a dense
  `[block_q, max_active_blocks * block_k]` problem, so time and memory scale with
  `max_active_blocks / (seq_k / block_k)`. `max_active_blocks` is static (XLA needs
  static shapes); a row with more active blocks than that makes the whole call fall
  back to dense masked attention (same result, dense cost) via `lax.cond`, so the
  result is always exact. `None` means no bound: the dense computation, always.
  Under `vmap` the cond becomes a select and both branches run.

  `fallback=False` drops the cond, for callers whose masks never exceed the bound
  (e.g. masks capped per row, as `ponder.nn.perforation` makes them): the program is the
  gathered one alone, so XLA's compiled cost analysis (which counts a cond's dearer
  branch) shows the sparse FLOPs. A row above the bound then keeps only its first
  `max_active_blocks` active tiles.

  Arguments and result are those of `block_sparse_attention`.
  """
  block_sizes = block_sizes or BlockSizes()
  check_inputs(q, k, v, block_mask, kv_padding, block_sizes)
  settings = dict(scale=_default_scale(scale, q.shape[-1]), causal=causal,
                  block_sizes=block_sizes)
  operands = _prepare(q, k, v, block_mask, kv_padding, causal, block_sizes)
  mask = operands[3]
  nk = mask.shape[3]
  dense = functools.partial(_dense_attention, **settings)
  if max_active_blocks is None or max_active_blocks >= nk:
    return dense(*operands)[:, :, :q.shape[2]]
  sparse = functools.partial(_gathered_attention, max_active=max(1, max_active_blocks),
                             **settings)
  if not fallback:
    o = sparse(*operands)
  else:
    # Under autodiff a cond keeps the residuals of both branches (zeros for the one
    # not taken); rematerialising the fallback keeps its quadratic ones out.
    o = lax.cond(jnp.max(jnp.sum(mask, axis=-1)) <= max_active_blocks, sparse,
                 jax.checkpoint(dense), *operands)
  return o[:, :, :q.shape[2]]
