"""Closed-form continuous-time (CfC) cell, Hasani et al. 2022, Nature Machine Intelligence.

A liquid time-constant (LTC) neuron obeys (the paper's Eq. 1)

    dx/dt = -[w_tau + f(x, I; theta)] x(t) + A f(x, I; theta),

and the paper's Theorem 1 gives the approximate closed-form solution (Eq. 2)

    x(t) ~ (x_0 - A) exp(-[w_tau + f(x, I; theta)] t) f(-x, -I; theta) + A.

The CfC network (Eq. 10 of the Nature MI article) replaces the exponential by a sigmoid
gate that depends explicitly on time and lets two neural heads g and h stand for the
terms it interpolates between:

    x(t) = sigma(-f(x, I; theta_f) t) * g(x, I; theta_g)
           + [1 - sigma(-f(x, I; theta_f) t)] * h(x, I; theta_h).

f, g and h share a backbone. In the notation used here, with z = backbone([x, h]),

    sigma = sigmoid(W_a z * t + W_b z)     (W_a z plays -f; W_b z is an extra
                                            time-independent offset of the gate)
    h'    = tanh(W_1 z) * (1 - sigma) + sigma * tanh(W_2 z)        mode="default"
    h'    = tanh(W_1 z) + sigma * tanh(W_2 z)                      mode="no_gate"
    h'    = -A * exp(-t (|w_tau| + |W_1 z|)) * (W_1 z) + A          mode="pure"

so tanh(W_2 z) is the paper's g and tanh(W_1 z) its h. "no_gate" is the paper's "CfC
without the (1 - sigma) gate" ablation, and "pure" is the direct closed-form solution
of Eq. 2 ("Cf-S" in the paper's tables) with x_0 = 0 and f(-x, -I) approximated by the
same head f = W_1 z; the absolute values keep the decay rate w_tau + f positive, which
Theorem 1 needs. The sigmoid gate, the offset W_b and the pure-mode details follow the
authors' released implementation (raminmh/CfC), on which the paper's results rest.
Parameter names follow that code: ff1 = W_1, ff2 = W_2, time_a = W_a, time_b = W_b.

All biases start at 0.0 (neutral: sigma = 0.5 for a zero backbone output), unlike the
positive bias of the dendritic gate.

`t` is an input, not a parameter: the elapsed time over which the state evolves, e.g. a
normalised layer time t = (l + 1) / depth when the cell carries a token's state across
the blocks of a Transformer (models/dendritic_liquid_vit.py), or a learned per-token
time `[..., tokens, 1]`. It must be >= 0 and broadcast against `[..., features]`.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from ponder import errors
from ponder.nn import dense

MODES = ("default", "no_gate", "pure")


def lecun_tanh(x):
  """LeCun's scaled tanh, 1.7159 tanh(2x/3) (LeCun et al. 1998, "Efficient BackProp").

  The backbone activation of the CfC reference implementation; its slope at 0 is ~1.
  """
  return 1.7159 * jnp.tanh(0.666 * x)


class CfCCell(nn.Module):
  """One CfC update h' = CfC(x, h, t) (see the module docstring for the equations).

  Attributes:
    features: size of the state h (and of the output h').
    backbone_units: width of each backbone layer.
    backbone_layers: number of Dense + activation layers in the shared backbone.
    mode: "default" (the CfC of Eq. 10), "no_gate" or "pure" (Eq. 2).
    backbone_activation: the backbone nonlinearity (LeCun tanh, as in the paper's code).
    compute_dtype: operand dtype of the dense layers' matmuls (`ponder.nn.dense`;
      None = float32); the state update runs in float32.
  """
  features: int
  backbone_units: int = 128
  backbone_layers: int = 1
  mode: str = "default"
  backbone_activation: Callable = lecun_tanh
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, h, t):
    """Args: x `[..., in]`, h `[..., features]`, t >= 0 broadcastable to h.

    Returns h' `[..., features]`.
    """
    if self.mode not in MODES:
      raise errors.unknown_key("CfC mode", self.mode, MODES)
    if h.shape[-1] != self.features:
      raise errors.ShapeError(
          f"state h has {h.shape[-1]} features but the cell has features={self.features}")
    linear = functools.partial(dense.Dense, compute_dtype=self.compute_dtype)
    z = jnp.concatenate([x, h], axis=-1)
    for i in range(self.backbone_layers):
      z = self.backbone_activation(linear(self.backbone_units, name=f"backbone{i}")(z))
    ff1 = linear(self.features, name="ff1")(z)
    if self.mode == "pure":
      w_tau = self.param("w_tau", nn.initializers.zeros, (self.features,))
      a = self.param("A", nn.initializers.ones, (self.features,))
      # Eq. 2 with x_0 = 0: (0 - A) exp(-[w_tau + f] t) f + A, with f = W_1 z.
      return -a * jnp.exp(-t * (jnp.abs(w_tau) + jnp.abs(ff1))) * ff1 + a
    ff2 = linear(self.features, name="ff2")(z)
    time_a = linear(self.features, name="time_a")(z)
    time_b = linear(self.features, name="time_b")(z)
    sigma = nn.sigmoid(time_a * t + time_b)  # The time-continuous gate of Eq. 10.
    if self.mode == "no_gate":
      return jnp.tanh(ff1) + sigma * jnp.tanh(ff2)
    return jnp.tanh(ff1) * (1.0 - sigma) + sigma * jnp.tanh(ff2)
