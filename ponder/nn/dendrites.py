"""Dendritic token gating, after the dendritic ANNs of Chavlis & Poirazi (2025).

Chavlis & Poirazi ("Dendrites endow artificial neural networks with accurate, robust and
parameter-efficient learning", Nature Communications 2025) give each unit several
dendritic branches, each a small nonlinear subunit, whose outputs a soma combines.
Here the idea scores tokens: every branch is an MLP `dim -> hidden_dim -> 1` over the
token, the soma takes the max over branches (a token is important when any branch finds
it so), and a sigmoid turns that into an importance in (0, 1):

    importance_n = sigmoid(max_k [w_k . act(W_k x_n + b_k) + c_k])

The branch output biases c_k start at `bias_init` (+2.0). Since max_k(a_k + 2) =
max_k(a_k) + 2, this is a bias of +2 after the max: at initialisation every token
scores about sigmoid(2) = 0.88 or a little more (the max of several zero-mean branches
is positive on average), so a gate that prunes starts by keeping nearly everything.
Keeping that bias inside the branches, not as one extra scalar after the max, gives
num_branches x (dim x hidden_dim + hidden_dim + hidden_dim + 1) parameters.

Where this differs from the dendritic ANNs of the paper: their branches see restricted,
sparse receptive fields of the input and feed a learned somatic layer; here every
branch sees the whole token and the soma is a fixed max. The hidden nonlinearity is the
ViT's exact GELU unless `activation` says otherwise.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from ponder.nn import dense


class DendriticGate(nn.Module):
  """Token importance in (0, 1) from `num_branches` dendritic MLP branches.

  Attributes:
    num_branches: dendritic branches per layer.
    hidden_dim: width of each branch's hidden layer.
    bias_init: initial value of every branch's output bias, i.e. of the bias added
      after the max (+2.0: importance about 0.88 at initialisation).
    activation: the branch nonlinearity (exact GELU, as in `models.vit.MlpBlock`).
    compute_dtype: operand dtype of the hidden layers' matmul (`ponder.nn.dense`;
      None = float32); the somatic sum and max run in float32.

  Parameters (all branches stored together, one matmul for the hidden layers):
    dendrites/kernel [dim, num_branches, hidden_dim], dendrites/bias [num_branches,
    hidden_dim], soma_kernel [num_branches, hidden_dim], soma_bias [num_branches].
  """
  num_branches: int = 4
  hidden_dim: int = 64
  bias_init: float = 2.0
  activation: Callable = functools.partial(nn.gelu, approximate=False)
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, *, score: bool = False):
    """Maps tokens `[..., tokens, dim]` to importance `[..., tokens]` in (0, 1), or with
    `score=True` to the raw somatic score u = max_k branch_k(x) whose sigmoid it is (the
    importance's log-odds, unbounded: a caller that needs log-odds uses u itself rather
    than log(a / (1 - a)), which saturates in float32 beyond |u| ~ 17)."""
    hidden = nn.DenseGeneral((self.num_branches, self.hidden_dim),
                             dot_general=dense.dot_general(self.compute_dtype),
                             name="dendrites")(x)
    hidden = self.activation(hidden)
    # One output unit per branch: fan-in is the branch's hidden width (in_axis=-1).
    soma_kernel = self.param(
        "soma_kernel", nn.initializers.lecun_normal(in_axis=-1, out_axis=-2),
        (self.num_branches, self.hidden_dim))
    soma_bias = self.param("soma_bias", nn.initializers.constant(self.bias_init),
                           (self.num_branches,))
    branches = jnp.einsum("...kh,kh->...k", hidden, soma_kernel) + soma_bias
    u = jnp.max(branches, axis=-1)
    return u if score else nn.sigmoid(u)
