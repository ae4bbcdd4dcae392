"""`attention`: block-sparse softmax attention, dispatched to a kernel or XLA.

The semantics (element mask, empty rows give zeros, padding) are those of
`kernels.block_sparse_attention`; this module only picks the implementation and turns
shape mistakes into `ponder.errors.ShapeError`, and a tiling the backend's kernel
lowering cannot take (see `BlockSizes`) into `ponder.errors.ConfigError` before
anything is traced.
"""

import jax
import jax.numpy as jnp

from kernels import block_sparse_attention as bsa
from ponder import errors
import ponder.ops

BlockSizes = bsa.BlockSizes


def lowering_platform() -> str:
  """The Pallas lowering platform of the default backend. "gpu" may be CUDA or ROCm;
  both lower through Triton, with the same block-size rules."""
  backend = jax.default_backend()
  return "cuda" if backend == "gpu" else backend


def attention(q, k, v, block_mask=None, *, causal=False, kv_padding=None,
              block_sizes=None, scale=None, max_active_blocks=None, fallback=True,
              impl="auto"):
  """Softmax attention restricted to the active tiles of `block_mask`.

  Args:
    q, k, v: `[batch, heads, seq, head_dim]` (note: heads before seq).
    block_mask: boolean `[batch or 1, heads or 1, ceil(seq_q / block_q),
      ceil(seq_k / block_k)]`, computed at run time if need be; None means all
      tiles (dense attention).
    causal: mask keys after their query.
    kv_padding: optional boolean `[batch, seq_k]`, True at padding keys.
    block_sizes: `BlockSizes` tiling, 128 x 128 by default.
    scale: logit scale, `head_dim ** -0.5` by default.
    max_active_blocks: static bound on active tiles per query-block row for the XLA
      path (its cost is proportional to it; a row above it falls back to dense
      cost, still exact). Ignored by the kernel, which reads the counts at run time.
    fallback: XLA path only; False promises no row exceeds max_active_blocks and
      drops the dense fallback (see `block_sparse_attention_xla`).
    impl: "auto" (kernel on GPU/TPU, XLA on CPU), "pallas" (interpreted on CPU) or
      "xla".

  Returns:
    `[batch, heads, seq_q, head_dim]`; query rows with no attended key are zeros.

  Raises:
    ShapeError: the shapes do not fit together or the mask does not match the tiling.
    ConfigError: unknown impl, or (compiled kernel) block sizes or a head_dim that
      this backend's kernel lowering cannot take.
  """
  impl, interpret = ponder.ops.resolve_impl(impl)
  block_sizes = block_sizes or BlockSizes()
  if block_mask is None:
    block_mask = jnp.ones((1, 1) + block_sizes.grid(q.shape[2], k.shape[2]), jnp.bool_)
  try:
    bsa.check_inputs(q, k, v, block_mask, kv_padding, block_sizes)
  except ValueError as e:
    raise errors.ShapeError(str(e)) from e
  kwargs = dict(causal=causal, kv_padding=kv_padding, block_sizes=block_sizes,
                scale=scale)
  if impl == "pallas" and not interpret:
    problem = block_sizes.lowering_problem(lowering_platform(), q.shape[-1])
    if problem:
      raise errors.ConfigError(problem)
  if impl == "pallas":
    return bsa.block_sparse_attention(q, k, v, block_mask, interpret=interpret,
                                      **kwargs)
  return bsa.block_sparse_attention_xla(q, k, v, block_mask,
                                        max_active_blocks=max_active_blocks,
                                        fallback=fallback, **kwargs)
