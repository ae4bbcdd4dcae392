"""Backend dispatch: Pallas kernels on GPU/TPU, plain XLA elsewhere.

Every op takes `impl="auto" | "pallas" | "xla"`. "auto" picks the Pallas kernel on an
accelerator and the XLA path on CPU; "pallas" on CPU runs the kernel in the Pallas
interpreter (slow; for tests); "xla" is plain XLA everywhere.
"""

import jax

from ponder import errors

IMPLS = ("auto", "pallas", "xla")
# Backends whose Pallas lowering the kernels target ("gpu" covers CUDA and ROCm).
_ACCELERATORS = ("gpu", "tpu")


def resolve_impl(impl: str) -> tuple[str, bool]:
  """Maps an `impl=` argument to ("pallas" | "xla", interpret) for this backend."""
  if impl not in IMPLS:
    raise errors.unknown_key("impl", impl, IMPLS)
  accelerated = jax.default_backend() in _ACCELERATORS
  if impl == "auto":
    impl = "pallas" if accelerated else "xla"
  return impl, impl == "pallas" and not accelerated


# The op modules use resolve_impl, so they are imported after it is defined. Their
# functions shadow the module names: `ponder.ops.attention(...)` is the op.
from ponder.ops.attention import (  # noqa: E402  pylint: disable=g-import-not-at-top
    BlockSizes as AttentionBlockSizes, attention)
from ponder.ops.ternary import (  # noqa: E402  pylint: disable=g-import-not-at-top
    BlockSizes as TernaryBlockSizes, pack_ternary, ternarize, ternary_matmul,
    ternary_spike, unpack_ternary)
