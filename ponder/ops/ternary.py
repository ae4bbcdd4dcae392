"""Ternary spike ops, dispatched: the Pallas matmul on GPU/TPU, XLA elsewhere.

Definitions (spike, surrogate gradient, 2-bit planar packing) are in
`kernels.ternary`. The spike and the packing are elementwise jnp on every backend
(XLA fuses them); only the matmul has a kernel.
"""

from kernels import ternary as tk
from ponder import errors
import ponder.ops
from ponder.ops.attention import lowering_platform

BlockSizes = tk.BlockSizes
pack_ternary = tk.pack_ternary
unpack_ternary = tk.unpack_ternary
ternarize = tk.ternarize
ternary_spike = tk.ternary_spike


def ternary_matmul(x_packed, w, *, block_sizes=None, impl="auto"):
  """`T @ w` for packed ternary activations T; see `kernels.ternary.ternary_matmul`.

  Args:
    x_packed: `[M, W]` uint8/uint32 codes from `pack_ternary` of `[M, K]` values.
    w: float `[K, N]`, or packed `[N, W]` codes of a ternary `[K, N]` weight.
    block_sizes: kernel tiling (Pallas only).
    impl: "auto" | "pallas" | "xla" (see `ponder.ops`).

  Raises:
    ShapeError: the operands do not fit together.
    ConfigError: unknown impl, or (compiled kernel) block sizes that this backend's
      kernel lowering cannot take.
  """
  impl, interpret = ponder.ops.resolve_impl(impl)
  try:
    tk.check_matmul(x_packed, w)
  except ValueError as e:
    raise errors.ShapeError(str(e)) from e
  if impl == "pallas" and not interpret:
    problem = (block_sizes or BlockSizes()).lowering_problem(lowering_platform(),
                                                             x_packed.dtype)
    if problem:
      raise errors.ConfigError(problem)
  if impl == "pallas":
    return tk.ternary_matmul(x_packed, w, block_sizes=block_sizes, interpret=interpret)
  # On CPU an elementwise decode followed by one dense matmul beats the kernel's
  # per-field small matmuls.
  return tk.ternary_matmul_reference(x_packed, w)
