"""A dense layer that multiplies on 2-D inputs, optionally in bfloat16 with float32
accumulation in the forward and the backward pass.

`Dense` is `flax.linen.Dense` with its inputs flattened to [rows, features] and the
output reshaped back. The parameters (`kernel` [in, out], `bias` [out]), their
initialisers and the values computed are `nn.Dense`'s, so a model can swap one for the
other without changing its parameter tree or checkpoints. The reason is the backward
pass on XLA:CPU: for a dense layer on [batch, tokens, features] inputs, the weight
gradient contracts the batch and token axes of the input and of the output gradient,
and XLA:CPU first copies the output gradient into a transposed layout before that
matmul, once per layer per step. On [rows, features] the contraction is a plain matmul
over rows and the copies go.

`compute_dtype=bfloat16` multiplies bf16 operands into float32 results (`matmul`) with
float32 parameters. `preferred_element_type=float32` alone is not enough: the transpose
of a dot in the backward pass takes the primal operand's dtype as its result type, so
the gradient matmuls would be bf16-in/bf16-out, which XLA runs on a slower kernel and
which rounds the accumulated gradient to 8 bits of mantissa. `matmul` is a custom_vjp
whose two backward dots ask for float32 results too. bf16 is faster only where the
hardware multiplies bf16 natively (GPU, TPU, CPUs with AVX512_BF16); on an AVX2 CPU
XLA converts to float32 and the bf16 step is slower than the float32 one.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ponder import errors

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: Any) -> jnp.dtype:
  """The matmul operand dtype named by a config ("float32" or "bfloat16")."""
  try:
    dtype = jnp.dtype(name)
  except TypeError:  # Not a dtype name at all.
    dtype = None
  if dtype is None or dtype.name not in COMPUTE_DTYPES:
    raise errors.ConfigError(f"compute_dtype={name!r} is not one of {COMPUTE_DTYPES}; "
                             "float32 runs everywhere, bfloat16 pays off on GPU/TPU and "
                             "CPUs with AVX512_BF16.")
  return dtype


def cpu_flags() -> set:
  """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f if line.startswith("flags")]
  except OSError:  # Not Linux.
    lines = []
  return set(lines[0].split(":", 1)[1].split()) if lines else set()


def bf16_matmul_hardware() -> bool:
  """Whether bfloat16 matmuls can beat float32 here: an accelerator, or a CPU with
  AVX512_BF16 (without it XLA:CPU converts bf16 to f32 and runs slower than f32)."""
  return jax.default_backend() != "cpu" or "avx512_bf16" in cpu_flags()


def default_compute_dtype() -> str:
  """The configs' default: bfloat16 on GPU and TPU, float32 on every CPU. (With
  AVX512_BF16 a CPU's bf16 matmul peak is higher, but no bf16 train step has been
  measured faster than float32 on one: WORKSPACE.md, "CPU speed".)"""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def slow_dtype_warning(name: Any) -> Optional[str]:
  """A sentence for the log when `name` asks for bf16 where it runs slower than
  float32 (a CPU without AVX512_BF16); None otherwise."""
  if compute_dtype(name) == jnp.float32 or bf16_matmul_hardware():
    return None
  return ("bfloat16 matmuls on this CPU (no AVX512_BF16) run slower than float32: "
          "XLA converts them; use compute dtype float32 for speed.")


def _dot(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
  """x [rows, in] @ w [in, out] with both operands cast to `dtype`, accumulated and
  returned in float32; the gradients' dots also accumulate in float32 (module doc)."""
  return _dot(x.astype(dtype), w.astype(dtype), ((1,), (0,)))


def _matmul_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  # The zero-size arrays carry the primal dtypes to the backward pass (a cotangent has
  # its primal's dtype) without keeping the float32 originals alive.
  return _dot(xc, wc, ((1,), (0,))), (xc, wc, jnp.zeros((0,), x.dtype),
                                      jnp.zeros((0,), w.dtype))


def _matmul_bwd(dtype, residuals, g):
  xc, wc, x_like, w_like = residuals
  g = g.astype(dtype)
  dx = _dot(g, wc, ((1,), (1,)))   # [rows, out] . [in, out]^T
  dw = _dot(xc, g, ((0,), (0,)))   # [rows, in]^T . [rows, out]
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_matmul(x: jax.Array, kernel: jax.Array, dtype: Optional[Any] = None) -> jax.Array:
  """x [..., in] @ kernel [in, out] -> [..., out], multiplied on [rows, in] (module doc):
  float32 when `dtype` is None or float32, else `matmul` in `dtype` (float32 result)."""
  lead = x.shape[:-1]
  # An explicit row count, not -1: a layer may have no input features (a GPT-2 layer
  # whose heads were all pruned), and reshape cannot infer -1 from a zero size.
  rows = x.reshape(math.prod(lead), x.shape[-1])
  if dtype is None or compute_dtype(dtype) == jnp.float32:
    y = rows @ kernel
  else:
    y = matmul(rows, kernel, compute_dtype(dtype))
  return y.reshape(*lead, kernel.shape[-1])


def dot_general(dtype: Optional[Any] = None):
  """A `dot_general` for `nn.DenseGeneral(dot_general=...)` with one input axis: x
  [..., in] against a kernel [in, *features], through `dense_matmul` in `dtype` (the
  layer keeps DenseGeneral's parameters; the matmul runs on [rows, in])."""

  def dot(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type  # dense_matmul's arithmetic (module doc).
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
      raise errors.ShapeError("dense.dot_general contracts the inputs' last axis with the "
                              f"kernel's first only; got {dimension_numbers}.")
    y = dense_matmul(x, kernel.reshape(kernel.shape[0], -1), dtype)
    return y.reshape(x.shape[:-1] + kernel.shape[1:])

  return dot


def attend(x: jax.Array, embedding: jax.Array, dtype: Optional[Any] = None) -> jax.Array:
  """A tied output layer: x [..., features] against embedding [vocab, features] ->
  logits [..., vocab], in `dense_matmul`'s arithmetic."""
  return dense_matmul(x, embedding.T, dtype)


class Dense(nn.Dense):
  """`nn.Dense` (same fields, same parameters) applied to `inputs` reshaped to
  [rows, in_features]; returns [..., features] with the inputs' leading axes.

  `compute_dtype` None (or float32) is nn.Dense's arithmetic; bfloat16 multiplies with
  `matmul` (float32 accumulation forward and backward) and returns float32.
  """
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, inputs):
    if self.compute_dtype is None or compute_dtype(self.compute_dtype) == jnp.float32:
      lead = inputs.shape[:-1]
      y = super().__call__(inputs.reshape(math.prod(lead), inputs.shape[-1]))
      return y.reshape(*lead, y.shape[-1])
    # nn.Dense's parameters (same names, shapes, initialisers), multiplied by `matmul`.
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    y = dense_matmul(inputs, kernel, self.compute_dtype)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return y


class FlaxDense(nn.Dense):
  """`nn.Dense` on the inputs' own rank: the form `Dense` replaced, for benchmarks and
  tests that set the two side by side. Takes `compute_dtype` (float32 only) so that it
  can stand in for `Dense` in every model."""
  compute_dtype: Optional[Any] = None

  def __call__(self, inputs):
    if self.compute_dtype is not None and compute_dtype(self.compute_dtype) != jnp.float32:
      raise errors.ConfigError("FlaxDense multiplies in float32 only; use Dense for "
                               f"compute_dtype={self.compute_dtype!r}.")
    return super().__call__(inputs)
