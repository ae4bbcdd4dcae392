"""Spiking units placed at matmul inputs: ternary spikes, a binary LIF neuron, and a
"spiking dense" layer whose inference matmul runs on packed 2-bit spike codes.

Ternary spikes (the spike and its surrogate gradient are defined in `kernels.ternary`):

  s = alpha * sign(x) * 1[|x| >= theta]            alpha, theta: per channel (last axis)

`kernels.ternary.ternary_spike` is a custom_vjp whose backward pass already returns
gradients for all three inputs, so nothing is added here:

  ds/dx     = alpha * (H~'(x - theta) + H~'(-x - theta))
  ds/dtheta = alpha * (H~'(-x - theta) - H~'(x - theta))
  ds/dalpha = sign(x) * 1[|x| >= theta]                     (exact: s is linear in alpha)

with H~'(u) = k / (2 (1 + k |u|)^2) the fast-sigmoid (SuperSpike) surrogate of the step,
i.e. the exact gradients of `kernels.ternary.surrogate_spike` for x and theta.
`TernarySpike` holds alpha and theta as learnable per-channel parameters. The threshold
is causal: it is a parameter, not a statistic of the batch, of other sequences or of
future tokens, so a token's spike depends on that token's input alone. theta is used
as stored; keep it positive (the surrogate describes a step at +-theta, and a theta
<= 0 makes every nonzero input fire).

Binary LIF (SpikeGPT, Zhu et al. 2023, Sec. 3, after spikingjelly's `LIFNode` with
decay_input=True, v_reset=0, detach_reset=True), run along the token axis:

  h_t = v_{t-1} + (x_t - v_{t-1}) / tau           charge (leaky integration)
  s_t = H(h_t - v_th)                             fire (v_th = 1)
  v_t = h_t * (1 - s_t)                           hard reset to 0

The backward pass replaces H' by the arctan surrogate (spikingjelly's `ATan`), the
derivative of arctan(pi/2 * a * u) / pi + 1/2:

  H~'(u) = a / 2 / (1 + (pi/2 * a * u)^2)         (a = 2)

and treats s_t in the reset as a constant (detach_reset). The membrane potential of
the last token is the unit's recurrent state, so decoding token by token equals the
sequence form.

`SpikingDense` spikes its input and multiplies by its kernel. With
`matmul="packed"` (inference) the codes are packed 2 bits each (16 to a uint32) by
`ponder.ops.pack_ternary` and multiplied by `ponder.ops.ternary_matmul`, with alpha
folded into the kernel's rows: (alpha * t) @ W = t @ (diag(alpha) W).
"""

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kernels import ternary as tk
from ponder import errors
from ponder.nn import dense as dense_lib
import ponder.ops

SPIKES = ("ternary", "lif")
MATMULS = ("dense", "packed")


class TernarySpike(nn.Module):
  """`alpha * sign(x) * 1[|x| >= theta]` with learnable per-channel alpha and theta.

  Attributes:
    alpha_init: initial spike magnitude of every channel.
    theta_init: initial threshold of every channel.
    slope: steepness k of the fast-sigmoid surrogate (`kernels.ternary`).

  Parameters: alpha [channels], theta [channels] (float32).
  """
  alpha_init: float = 1.0
  theta_init: float = 0.5
  slope: float = tk.DEFAULT_SLOPE

  @nn.compact
  def __call__(self, x, *, return_codes: bool = False):
    """Spikes in {-alpha, 0, +alpha}, x's shape and dtype; with `return_codes`,
    (int8 codes in {-1, 0, 1}, alpha) such that the spike is alpha * codes (no
    gradient: the packed inference path)."""
    c = x.shape[-1]
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (c,),
                       jnp.float32)
    theta = self.param("theta", nn.initializers.constant(self.theta_init), (c,),
                       jnp.float32)
    if return_codes:
      return tk.ternarize(x, theta.astype(x.dtype)), alpha
    return tk.ternary_spike(x, alpha.astype(x.dtype), theta.astype(x.dtype), self.slope)


# --- LIF ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def heaviside_atan(u, alpha: float = 2.0):
  """H(u) = 1[u >= 0] forward; the arctan surrogate a/2 / (1 + (pi/2 a u)^2) backward."""
  u = jnp.asarray(u)
  return (u >= 0).astype(u.dtype)


def _heaviside_atan_fwd(u, alpha):
  return heaviside_atan(u, alpha), u


def _heaviside_atan_bwd(alpha, u, g):
  return (g * atan_surrogate_grad(u, alpha),)


heaviside_atan.defvjp(_heaviside_atan_fwd, _heaviside_atan_bwd)


def atan_surrogate(u, alpha: float = 2.0):
  """The smooth step arctan(pi/2 a u) / pi + 1/2 whose derivative the LIF uses."""
  return jnp.arctan(0.5 * math.pi * alpha * u) / math.pi + 0.5


def atan_surrogate_grad(u, alpha: float = 2.0):
  return 0.5 * alpha / (1.0 + (0.5 * math.pi * alpha * u) ** 2)


def lif(x, v0=None, *, tau: float = 2.0, threshold: float = 1.0, v_reset: float = 0.0,
        surrogate_alpha: float = 2.0, detach_reset: bool = True):
  """Binary LIF neurons over the token axis (SpikeGPT; module docstring).

  Args:
    x: `[..., tokens, channels]` input current.
    v0: `[..., channels]` membrane potential before the first token (zeros if None).
    tau: membrane time constant (> 1).
    threshold: firing threshold v_th.
    v_reset: potential after a spike (hard reset).
    surrogate_alpha: width parameter a of the arctan surrogate.
    detach_reset: no gradient through the reset (spikingjelly's detach_reset).

  Returns:
    (spikes in {0, 1} of x's shape and dtype, membrane potential after the last token
    `[..., channels]`).
  """
  if v0 is None:
    v0 = jnp.zeros(x.shape[:-2] + x.shape[-1:], x.dtype)
  xs = jnp.moveaxis(x, -2, 0)

  def step(v, xt):
    h = v + (xt - v) / tau
    s = heaviside_atan(h - threshold, surrogate_alpha)
    sr = lax.stop_gradient(s) if detach_reset else s
    return h * (1.0 - sr) + v_reset * sr, s

  v, spikes = lax.scan(step, v0.astype(x.dtype), xs)
  return jnp.moveaxis(spikes, 0, -2), v


class LIF(nn.Module):
  """`lif` as a module (no parameters): `(x, v0) -> (spikes, v)`."""
  tau: float = 2.0
  threshold: float = 1.0
  surrogate_alpha: float = 2.0

  def __call__(self, x, v0=None):
    return lif(x, v0, tau=self.tau, threshold=self.threshold,
               surrogate_alpha=self.surrogate_alpha)


# --- Spiking dense -----------------------------------------------------------------------


def packed_matmul(codes, w):
  """`codes @ w` for codes in {-1, 0, 1} `[..., K]` through `ponder.ops.ternary_matmul`
  on the 2-bit packed codes (Pallas on GPU/TPU, decode + one dense matmul on CPU)."""
  lead, k = codes.shape[:-1], codes.shape[-1]
  # uint32 words (16 codes each) are what the kernels tile for on GPU and TPU.
  packed = ponder.ops.pack_ternary(codes.reshape(-1, k), jnp.uint32)
  return ponder.ops.ternary_matmul(packed, w).reshape(lead + (w.shape[-1],))


class SpikingDense(nn.Module):
  """Spikes at the input, then `spikes @ kernel` (no bias): `(x, v) -> (y, v_new)`.

  Attributes:
    features: output width.
    spike: "ternary" (stateless; v is None) or "lif" (v: membrane potential
      `[..., in_features]` carried across calls; None = zeros).
    matmul: "dense" (training: float spikes @ kernel) or "packed" (inference:
      `ponder.ops.ternary_matmul` on packed codes; gradients reach only the kernel).
    kernel_init: initialiser of the `[in, out]` kernel.
    alpha_init, theta_init, slope: `TernarySpike`'s.
    lif_tau, lif_threshold, surrogate_alpha: `lif`'s.
    dtype: operand dtype of the "dense" matmul (float32 | bfloat16, float32 result:
      `ponder.nn.dense`); the input, spikes, membrane and parameters stay float32.

  Parameters: kernel [in, features]; spike/alpha and spike/theta for "ternary".
  The fraction of nonzero spikes is sown as intermediates "spike_rate" (apply with
  `mutable=["intermediates"]` to read it).
  """
  features: int
  spike: str = "ternary"
  matmul: str = "dense"
  kernel_init: Callable = nn.initializers.lecun_normal()
  alpha_init: float = 1.0
  theta_init: float = 0.5
  slope: float = tk.DEFAULT_SLOPE
  lif_tau: float = 2.0
  lif_threshold: float = 1.0
  surrogate_alpha: float = 2.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, v: Optional[jax.Array] = None):
    if self.spike not in SPIKES:
      raise errors.unknown_key("spike", self.spike, SPIKES)
    if self.matmul not in MATMULS:
      raise errors.unknown_key("spiking matmul", self.matmul, MATMULS)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        jnp.float32)
    if self.spike == "ternary":
      unit = TernarySpike(self.alpha_init, self.theta_init, self.slope, name="spike")
      if self.matmul == "packed":
        codes, alpha = unit(x, return_codes=True)
        y = packed_matmul(codes, alpha[:, None] * kernel)
      else:
        codes = None
        s = unit(x)
        y = dense_lib.dense_matmul(s, kernel, self.dtype)
      new_v = None
    else:
      s, new_v = lif(x, v, tau=self.lif_tau, threshold=self.lif_threshold,
                     surrogate_alpha=self.surrogate_alpha)
      codes = s.astype(jnp.int8) if self.matmul == "packed" else None
      y = (packed_matmul(codes, kernel) if codes is not None
           else dense_lib.dense_matmul(s, kernel, self.dtype))
    fired = (codes != 0) if codes is not None else (s != 0)
    self.sow("intermediates", "spike_rate", jnp.mean(fired.astype(jnp.float32)))
    return y, new_v
