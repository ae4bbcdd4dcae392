"""Test-Time Training layers: TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to
(Learn at Test Time): RNNs with Expressive Hidden States", arXiv 2407.04620).

The hidden state of the layer is the weight W of an inner model f, trained while the
sequence is read by gradient steps on a self-supervised loss. Per head, with the
paper's notation (row vectors here, so a linear map is x W):

  inner model   f(x; W) = x + LN(g(x; W))                               (Sec. 2.7)
                g = x W1 + b1 (TTT-Linear) or GELU(x W1 + b1) W2 + b2 (TTT-MLP,
                hidden width 4 x head_dim); LN has its own learned scale and bias,
                which are outer parameters: the inner loop never changes them.
  inner loss    l(W; x_t) = c || f(theta_K x_t; W) - theta_V x_t ||^2   (Sec. 2.3)
                the multi-view reconstruction loss that replaces the naive
                || f(x~_t; W) - x_t ||^2 of Eq. 2. Because f contains the residual,
                LN(g(theta_K x_t)) regresses theta_V x_t - theta_K x_t ("XV - XK" in
                the public code); the "grad" form below writes the loss with f and
                the residual, the "dual" form with that difference as the target.
                `loss_scale` c: 0.5 (default) is the public code, whose gradient is
                grad_l_wrt_ttt_norm_out = LN(.) - target, that of 1/2 ||.||^2; 1 is
                the paper's ||.||^2 (its dual form has 2 eta).
  output rule   z_t = f(theta_Q x_t; W_t)                                (Sec. 2.3)
                the query view through the inner model with the *updated* weights;
                f already contains the residual, so z_t = theta_Q x_t + LN(g(theta_Q
                x_t; W_t)) and theta_Q x_t is not added a second time.
  update rule   W_t = W_{t-1} - eta grad l(W_{t-1}; x_t)                 (Eq. 1)
  learning rate eta(x) = eta_base sigmoid(theta_lr . x + bias) / head_dim (Sec. 2.7;
                one theta_lr per head; the division by head_dim is the public code's).

Per mini-batch (tokens i = 1..b of a mini-batch starting at W_0 := the previous
mini-batch's last W; row vectors; G_s = grad_W l(W_0; x_s)):
  paper (Sec. 2.4, Eq. 6 and the dual form of Sec. 2.5):
      W_i = W_0 - eta sum_{s <= i} G_s,    z_i = f(theta_Q x_i; W_i)
  public code (TTTLinearBase.process_mini_batch, get_eta):
      eta[i, s] = ttt_base_lr * tau_i * sigmoid(theta_lr . x_s + bias) / head_dim,
      tau_i     = max(0, 1 / i + learnable_token_idx_i)        (token_idx, clipped)
      W_i       = W_0 - sum_{s <= i} eta[i, s] G_s      (G_s of 1/2 ||.||^2)
      so with learnable_token_idx = 0 token i uses the *mean* of its prefix's rates-
      weighted gradients; the next mini-batch starts from W_b (row i = b, tau_b = 1/b).
      Dual form, TTT-Linear, with Z_K = X_K W_0 + b_0 and D = dl/dZ_K (rows D_s):
        Z_Q = X_Q W_0 + b_0 - (eta o tril(X_Q X_K^T + 1)) D,
        W_b = W_0 - X_K^T (eta[b, :]^T o D),  b_b = b_0 - sum_s eta[b, s] D_s.
ponder implements the code's eta[i, s] = tau_i eta_s with
  `token_idx`            "inverse" (default: tau_i = 1 / i, the code) or "none" (tau_i = 1,
                         the paper's sum); the layer adds a learned offset per position
                         (`learnable_token_idx`, default on as in the code, init 0)
                         and clips tau at 0;
  `loss_scale`           c above, 0.5 (code) or 1 (paper).
With token_idx="none", loss_scale=1 this is the paper's rule (the previous ponder
default); the code's rule makes row i's step 1 / (2 i) times that one.

The paper's mini-batch rule is one gradient step. ponder adds k inner steps per
mini-batch (PonderTTT's Fixed-1/2/4 and its adaptive allocation), defined so that the
layer stays causal and k = 1 is exactly the rule above: token t's fast weights are W_t'
after k gradient steps on the causal prefix of the mini-batch's loss,

  W_t^(0) = W_t',   W_t^(j) = W_t^(j-1) - tau_t grad_W sum_{s=t'+1..t} eta_s^(j) l(W; x_s)
                                                      evaluated at W = W_t^(j-1),

  z_t = f(theta_Q x_t; W_t^(k)), and the next mini-batch starts from the last token's
W^(k): k full gradient steps on the mini-batch's loss, each at the current W. At j = 1
all W_t^(0) are equal, which is the rule above (G_s = grad l(W_t'; x_s)). k = 0 (SKIP)
makes no update: the outputs use W_t' and the state passes through unchanged.
Per-token steps k_s set eta_s^(j) = eta_s [j <= k_s]: a token's loss takes part in its
first k_s steps only. (tau_t is the row scale of `token_idx`; c of `loss_scale` sits in l.)

Two forms compute the same thing:
  "grad"  the reference (the paper's primal form): `jax.grad` of the inner loss, with
          one weight copy per token of the mini-batch (any inner model).
  "dual"  TTT-Linear only, the paper's dual form (Sec. 2.5): no per-token weight or
          gradient is materialised. With Delta the rows eta_s dl/dz_s,
          A = X_K X_K^T + 1 (the +1 carries the bias b1) and T = diag(tau),
            Z_Q = X_Q W + b1 - T mask(X_Q X_K^T + 1) Delta,
            W_b = W - tau_b X_K^T Delta,
          the paper's Z = W_0 X - 2 eta (W_0 X - X) mask(X^T X) with LN and bias. For
          k >= 2 the prefix trajectories differ per token; the dual form keeps
          Z[t, s] = x_s W_t^(j) + b_t^(j) ([b, b, head_dim]) and updates it with
          Z[t, s] -= sum_r A[s, r] Delta[t, r] (tau_t inside Delta[t, r]), so still no
          weight is copied per token.

The outer gradient flows through all inner updates (second order through `jax.grad`),
and train and eval run the same inner loop: the paper updates W at test time exactly
as in training. Three entry points choose the number of inner steps:
  `ttt_scan`            a static k for every mini-batch;
  `ttt_scan_switch`     k per mini-batch from a traced array, one `lax.switch` branch
                        per allowed k, so a mini-batch with fewer steps runs fewer ops;
  `ttt_scan_per_token`  k_t per token, as a mask on the loss of a fixed number of steps.
  `ttt_scan_gated`      k per mini-batch decided inside the scan by a `ReconGate` from
                        the layer's own reconstruction loss (PonderTTT's cheap gate).
`inner_flops_per_token` is their analytic FLOP count, tested against XLA's count
(`recon_signal_flops_per_token` the gate's).
`TTTLayer` is the flax.linen layer: projections theta_Q/K/V, eta, the inner loop per
head, a LayerNorm and the output projection, as the public TTT layer, with its options:
  rope=True            RoPE on theta_Q x and theta_K x per head, at positions modulo
                       the mini-batch (`apply_rope`; the code's get_ttt_inputs);
  backbone="T"|"M"     "T": the Transformer backbone's layer (TTTLinearBase/TTTMLPBase);
                       "M": the Mamba backbone's (TTTLinear/TTTMLP, the code's
                       `ttt_linear`): one shared projection x W_qk, then a causal
                       depthwise convolution of width 4 each for the Q and K views
                       (conv_q, conv_k), and the output gate gelu(x W_g) * post_norm(z)
                       before theta_O. (The code's M model also puts a residual
                       convolution block before the sequence block, `pre_conv`; that
                       is a block's, not the layer's, and is not here.)
  eta_base, lr_mult    ttt_base_lr and the training-step multiplier of its warm-up
                       (the code: TTT-MLP 0.1 from 0.01 over the first 10% of steps).
The layer also decodes one token at a time from a recurrent state (`init_decode_state`):
W after the last full mini-batch, the pending partial mini-batch's views and the last
conv_width - 1 rows the convolutions read; see `TTTLayer.__call__`.
"""

import functools
from typing import Any, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ponder import errors
from ponder.nn import dense as dense_lib
from ponder.nn import ponder_alloc

KINDS = ("linear", "mlp")
FORMS = ("grad", "dual")
ALLOWED_STEPS = (0, 1, 2, 4)  # PonderTTT's SKIP and Fixed-1/2/4.
LN_EPS = 1e-6  # The public TTT code's epsilon for the inner LayerNorm.
MLP_RATIO = 4  # TTT-MLP: hidden width 4 x head_dim, then GELU (Sec. 2.7).
TOKEN_IDX = ("inverse", "none")  # tau_i = 1 / i (the public code) or 1 (the paper).
BACKBONES = ("T", "M")  # The paper's Transformer and Mamba backbones' TTT layers.
LOSS_SCALE = 0.5  # The public code's 1/2 ||.||^2; the paper's ||.||^2 is 1.
ROPE_THETA = 10000.0  # The public code's rope_theta.
CONV_WIDTH = 4  # The public code's conv_width (M backbone).
BASE_LR = {"linear": 1.0, "mlp": 0.1}  # The public code's ttt_base_lr per inner model.


def token_scale(mini_batch: int, token_idx: str = "inverse", offset=None) -> jax.Array:
  """tau [mini_batch]: row i's multiplier of its prefix's summed update (module
  docstring): 1 / i ("inverse", the code) or 1 ("none", the paper), plus `offset` (the
  layer's learnable_token_idx), clipped at 0 as in the code."""
  if token_idx not in TOKEN_IDX:
    raise errors.unknown_key("token_idx", token_idx, TOKEN_IDX)
  tau = jnp.ones((mini_batch,), jnp.float32)
  if token_idx == "inverse":
    tau = 1.0 / jnp.arange(1, mini_batch + 1, dtype=jnp.float32)
  if offset is None:
    return tau
  return jnp.maximum(tau + offset, 0.0)


def apply_rope(x, positions, theta: float = ROPE_THETA):
  """RoPE (Su et al. 2021) on x [..., seq, head_dim] at integer positions [seq]: feature
  pairs (2m, 2m + 1) rotate by positions * theta^(-2m / head_dim), the public code's
  `apply_rotary_emb` (pairs as complex numbers) written with cos and sin."""
  dim = x.shape[-1]
  if dim % 2:
    raise errors.ShapeError(f"RoPE needs an even head_dim, got {dim}.")
  freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float32) / dim)
  angles = jnp.asarray(positions, jnp.float32)[:, None] * freqs
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  even, odd = x[..., 0::2], x[..., 1::2]
  return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)


def _layer_norm(z, scale, bias):
  mean = z.mean(-1, keepdims=True)
  var = jnp.square(z - mean).mean(-1, keepdims=True)
  return (z - mean) * lax.rsqrt(var + LN_EPS) * scale + bias


def _g(params, x, kind):
  """g(x; W): the inner model before LN and residual."""
  if kind == "linear":
    return x @ params["W1"] + params["b1"]
  hidden = jax.nn.gelu(x @ params["W1"] + params["b1"])
  return hidden @ params["W2"] + params["b2"]


def inner_model(params, x, ln_scale, ln_bias, *, kind: str):
  """f(x; W) = x + LN(g(x; W)) (Sec. 2.7) for x [..., head_dim] of one head."""
  return x + _layer_norm(_g(params, x, kind), ln_scale, ln_bias)


def inner_loss(params, xk, xv, weights, ln_scale, ln_bias, *, kind: str):
  """sum_s weights_s || f(theta_K x_s; W) - theta_V x_s ||^2 (Sec. 2.3) over tokens s."""
  err = inner_model(params, xk, ln_scale, ln_bias, kind=kind) - xv
  return jnp.sum(weights * jnp.sum(jnp.square(err), -1))


def init_inner_params(key, num_heads: int, head_dim: int, *, kind: str,
                      std: float = 0.02) -> dict:
  """Learnable initial weights W_0 (Sec. 2.7) for every head: W ~ N(0, std), b = 0."""
  if kind == "linear":
    shapes = {"W1": (head_dim, head_dim)}
  else:
    shapes = {"W1": (head_dim, MLP_RATIO * head_dim), "W2": (MLP_RATIO * head_dim, head_dim)}
  params = {}
  for i, (name, shape) in enumerate(shapes.items()):
    params[name] = std * jax.random.normal(jax.random.fold_in(key, i), (num_heads,) + shape)
    params["b" + name[1:]] = jnp.zeros((num_heads, shape[1]))
  return params


def _mini_batch_grad(state, xq, xk, xv, etas, tau, ln_scale, ln_bias, *, kind):
  """One head, one mini-batch, by `jax.grad` (the primal form). etas: [k, b], tau: [b]."""
  if etas.shape[0] == 0:  # SKIP: no update, the outputs read the mini-batch's start W.
    return inner_model(state, xq, ln_scale, ln_bias, kind=kind), state
  b = xk.shape[0]
  # [t, s] = tau_t where s <= t: row t's update is tau_t times its prefix's sum.
  causal = tau[:, None].astype(xk.dtype) * jnp.tril(jnp.ones((b, b), xk.dtype))
  # Row t is token t's fast weights W_t^(j); all start at W_t' (Sec. 2.4).
  per_token = jax.tree.map(lambda w: jnp.broadcast_to(w, (b,) + w.shape), state)
  prefix_grad = jax.vmap(jax.grad(functools.partial(inner_loss, kind=kind)),
                         in_axes=(0, None, None, 0, None, None))
  for j in range(etas.shape[0]):
    grads = prefix_grad(per_token, xk, xv, causal * etas[j], ln_scale, ln_bias)
    per_token = jax.tree.map(lambda w, g: w - g, per_token, grads)
  z = jax.vmap(functools.partial(inner_model, kind=kind), in_axes=(0, 0, None, None))(
      per_token, xq, ln_scale, ln_bias)
  return z, jax.tree.map(lambda w: w[-1], per_token)


def _mini_batch_dual(state, xq, xk, xv, etas, tau, ln_scale, ln_bias):
  """One head, one mini-batch of TTT-Linear in the dual form (Sec. 2.5). etas: [k, b],
  tau: [b]."""
  w, bias = state["W1"], state["b1"]
  zq = xq @ w + bias
  num_steps = etas.shape[0]
  if num_steps == 0:
    return xq + _layer_norm(zq, ln_scale, ln_bias), state
  b = xk.shape[0]
  tau = tau.astype(xk.dtype)
  causal = tau[:, None] * jnp.tril(jnp.ones((b, b), xk.dtype))  # tau_t [s <= t]
  target = xv - xk  # LN(g(theta_K x)) regresses theta_V x - theta_K x (residual in f).

  def weighted_dl_dz(z, weights):
    """Rows weights_s dl/dz_s: the only gradient the dual form needs, no dl/dW."""
    loss = lambda z: jnp.sum(weights * jnp.sum(
        jnp.square(_layer_norm(z, ln_scale, ln_bias) - target), -1))
    return jax.grad(loss)(z)

  z1 = xk @ w + bias
  delta = weighted_dl_dz(z1, etas[0])  # [b, d]: every token at the shared start W.
  aq = xq @ xk.T + 1.0
  zq = zq - (causal * aq) @ delta
  last = tau[-1] * delta  # Token b's accumulated update: the next mini-batch's state.
  if num_steps > 1:
    a = xk @ xk.T + 1.0
    # z[t, s] = x_s W_t^(1) + b_t^(1): token s's prediction under token t's weights.
    table = z1[None] - jnp.einsum("tr,sr,rd->tsd", causal, a, delta)
    for j in range(1, num_steps):
      delta = weighted_dl_dz(table, causal * etas[j])  # [t, r, d], zero for r > t.
      zq = zq - jnp.einsum("tr,trd->td", aq, delta)
      last = last + delta[-1]
      if j + 1 < num_steps:
        table = table - jnp.einsum("sr,trd->tsd", a, delta)
  new_state = {"W1": w - xk.T @ last, "b1": bias - last.sum(0)}
  return xq + _layer_norm(zq, ln_scale, ln_bias), new_state


def _check(xq, mini_batch, kind, form):
  if kind not in KINDS:
    raise errors.unknown_key("TTT inner model kind", kind, KINDS)
  if form not in FORMS:
    raise errors.unknown_key("TTT form", form, FORMS)
  if form == "dual" and kind != "linear":
    raise errors.ConfigError(
        f"form='dual' is implemented for kind='linear' only, got kind={kind!r}; use "
        "form='grad' for TTT-MLP.")
  if xq.ndim != 4:
    raise errors.ShapeError(f"expected [batch, heads, seq, head_dim], got shape {xq.shape}.")
  if xq.shape[2] % mini_batch:
    raise errors.ShapeError(
        f"sequence length {xq.shape[2]} is not a multiple of mini_batch={mini_batch}. "
        "Pad the sequence on the right to a multiple (the layer is causal, so padding "
        "after a token never changes its output) or choose another mini_batch.")


def _mini_batch_step(kind, form, num_steps, ln_scale, ln_bias, tau):
  """(state, (q, k, v, etas)) -> (state, z) over [batch, heads] for a static k.

  etas [batch, heads, 1 or k, b]: one learning rate per token, or one per step; tau [b]
  the row scales (`token_scale`), shared by the batch and the heads as in the code.
  """
  if form == "grad":
    core = functools.partial(_mini_batch_grad, kind=kind)
  else:
    core = _mini_batch_dual
  # Heads carry their own state, views and LN; the batch shares the LN parameters.
  per_head = jax.vmap(core, in_axes=(0, 0, 0, 0, 0, None, 0, 0))
  per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, None, None, None))

  def step(state, mb):
    q, k, v, etas = mb
    etas = jnp.broadcast_to(etas, etas.shape[:-2] + (num_steps, etas.shape[-1]))
    z, state = per_batch(state, q, k, v, etas, tau, ln_scale, ln_bias)
    return state, z

  return step


def _tau(token_idx, mini_batch):
  """token_idx: "inverse" | "none" | an array [mini_batch] of row scales tau."""
  if isinstance(token_idx, str):
    return token_scale(mini_batch, token_idx)
  tau = jnp.asarray(token_idx)
  if tau.shape != (mini_batch,):
    raise errors.ShapeError(f"token_idx as an array must be [mini_batch] = "
                            f"({mini_batch},), got {tau.shape}.")
  return tau


def _scan(step, state, xq, xk, xv, etas, mini_batch, index=None):
  """lax.scan of step(state, mini-batch) over the mini-batches of a sequence.

  etas [batch, heads, 1 or k, seq]; `index` [seq / mini_batch], when given, is scanned
  too and comes first in each mini-batch.
  """
  batch, heads, seq, dim = xq.shape
  n = seq // mini_batch

  def split(x, axis):  # [..., seq, ...] -> [n, ..., mini_batch, ...]
    x = x.reshape(x.shape[:axis] + (n, mini_batch) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  xs = (split(xq, 2), split(xk, 2), split(xv, 2), split(etas, 3))
  if index is not None:
    xs = (index, xs)
  final, ys = lax.scan(step, state, xs)
  z, aux = ys if isinstance(ys, tuple) else (ys, None)  # aux: per mini-batch, [n, ...].
  z = jnp.moveaxis(z, 0, 2).reshape(batch, heads, seq, dim)
  return (z, final) if aux is None else (z, final, aux)


def ttt_scan(state, xq, xk, xv, eta, ln_scale, ln_bias, *, kind: str = "linear",
             form: str = "grad", mini_batch: int = 16, steps: int = 1,
             token_idx: Union[str, jax.Array] = "inverse", loss_scale: float = LOSS_SCALE):
  """TTT over a sequence with a static number of inner steps per mini-batch.

  Args:
    state: the inner weights W_0 per sequence and head: {"W1", "b1"} (+ {"W2", "b2"}
      for TTT-MLP), each [batch, heads, ...] (`init_inner_params` broadcast to batch).
    xq, xk, xv: the views theta_Q x, theta_K x, theta_V x, [batch, heads, seq, head_dim],
      seq a multiple of mini_batch.
    eta: the token learning rates eta(x_t), [batch, heads, seq].
    ln_scale, ln_bias: the inner LayerNorm's parameters, [heads, head_dim].
    kind: "linear" or "mlp". form: "grad" (any kind) or "dual" (TTT-Linear).
    mini_batch: b, the tokens per inner mini-batch (Sec. 2.4).
    steps: k >= 0, the inner gradient steps per mini-batch (0 = SKIP).
    token_idx: the row scales tau of the module docstring: "inverse" (1 / i, the public
      code), "none" (1, the paper) or an array [mini_batch] (the layer's, with its
      learned offset).
    loss_scale: c of the inner loss c ||.||^2: 0.5 (the public code) or 1 (the paper).

  Returns:
    z [batch, heads, seq, head_dim] (the output rule) and the state after the last
    mini-batch.
  """
  _check(xq, mini_batch, kind, form)
  if not isinstance(steps, (int, np.integer)) or steps < 0:
    raise errors.ConfigError(f"steps must be a non-negative Python int, got {steps!r}; "
                             "use ttt_scan_switch or ttt_scan_per_token for arrays.")
  step = _mini_batch_step(kind, form, int(steps), ln_scale, ln_bias,
                          _tau(token_idx, mini_batch))
  # c ||.||^2 at rate eta steps as ||.||^2 at rate c eta: c goes into the rates.
  return _scan(step, state, xq, xk, xv, loss_scale * eta[:, :, None, :], mini_batch)


def inner_loss_by_step(state, xk, xv, eta, ln_scale, ln_bias, *, kind: str = "linear",
                       mini_batch: int = 16, max_steps: int = 4) -> jax.Array:
  """How well k inner steps fit the inner objective: a diagnostic of the inner loop.

  Every mini-batch starts from the learned W_0 and takes full steps on its whole loss,
  W^(j) = W^(j-1) - grad_W sum_s eta_s l(W; x_s) (the last token's trajectory of the
  update rule above). Returns [max_steps + 1]: the mean over batch, heads and
  mini-batches of L(W^(j)) / L(W_0), with L = sum_s l(W; x_s) the unweighted
  reconstruction loss of the mini-batch. Entry 0 is 1; if entry 1 is already close to
  entry max_steps, steps past the first barely change the fast weights' fit.

  Args: state W_0 per head ({"W1", "b1"}, ... each [heads, ...]: the layer's
  ttt_state); xk, xv [batch, heads, seq, head_dim] and eta [batch, heads, seq] (the
  layer's views: `TTTLayer` sows them as intermediates "views", with eta the weight
  c tau_b eta_s of each token's ||.||^2 in the last token's update, so that this
  follows the layer's token_idx and loss_scale); ln_scale, ln_bias [heads, head_dim].
  """
  batch, heads, seq, dim = xk.shape
  n = seq // mini_batch
  loss = functools.partial(inner_loss, kind=kind)

  def one(w, k, v, e, scale, bias):  # One head, one mini-batch.
    ones = jnp.ones_like(e)
    first = loss(w, k, v, ones, scale, bias)
    ratios = [jnp.ones_like(first)]
    for _ in range(max_steps):
      w = jax.tree.map(lambda a, g: a - g, w, jax.grad(loss)(w, k, v, e, scale, bias))
      ratios.append(loss(w, k, v, ones, scale, bias) / first)
    return jnp.stack(ratios)

  split = lambda x: x.reshape(batch, heads, n, mini_batch, *x.shape[3:])
  per_mb = jax.vmap(one, in_axes=(None, 0, 0, 0, None, None))  # mini-batches
  per_head = jax.vmap(per_mb, in_axes=(0, 0, 0, 0, 0, 0))
  per_row = jax.vmap(per_head, in_axes=(None, 0, 0, 0, None, None))
  return per_row(state, split(xk), split(xv), split(eta), ln_scale, ln_bias).mean((0, 1, 2))


def _concrete(x) -> Optional[np.ndarray]:
  """x as numpy when it is not traced (so its values can be checked), else None."""
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def ttt_scan_switch(state, xq, xk, xv, eta, ln_scale, ln_bias, steps, *,
                    kind: str = "linear", form: str = "grad", mini_batch: int = 16,
                    allowed_steps: Sequence[int] = ALLOWED_STEPS,
                    token_idx: Union[str, jax.Array] = "inverse",
                    loss_scale: float = LOSS_SCALE):
  """TTT with k chosen per mini-batch by a (traced) int array `steps` [seq / mini_batch].

  Each mini-batch runs `lax.switch` over one branch per value of `allowed_steps`, each
  a static-k step, so a mini-batch with k = 0 runs no update and k = 1 runs one step's
  ops. `steps` is shared by the batch: under a per-example index (vmap) a switch turns
  into a select that runs every branch; use `ttt_scan_per_token` for per-example k.
  Other arguments and the returns are those of `ttt_scan`.
  """
  _check(xq, mini_batch, kind, form)
  allowed = tuple(int(k) for k in allowed_steps)
  n = xq.shape[2] // mini_batch
  steps = jnp.asarray(steps)
  if steps.shape != (n,):
    raise errors.ShapeError(
        f"steps per mini-batch must have shape ({n},) for seq {xq.shape[2]} and "
        f"mini_batch {mini_batch}, got {steps.shape}.")
  values = _concrete(steps)
  if values is not None and not np.isin(values, allowed).all():
    raise errors.ConfigError(f"steps {values.tolist()} contain values outside "
                             f"allowed_steps {allowed}.")
  index = jnp.argmax(steps[:, None] == jnp.asarray(allowed)[None, :], axis=1)
  tau = _tau(token_idx, mini_batch)
  branches = [_mini_batch_step(kind, form, k, ln_scale, ln_bias, tau) for k in allowed]

  def step(state, mb):
    i, mb = mb
    return lax.switch(i, branches, state, mb)

  return _scan(step, state, xq, xk, xv, loss_scale * eta[:, :, None, :], mini_batch,
               index=index)


def ttt_scan_per_token(state, xq, xk, xv, eta, ln_scale, ln_bias, token_steps, *,
                       kind: str = "linear", form: str = "grad", mini_batch: int = 16,
                       max_steps: int = max(ALLOWED_STEPS),
                       token_idx: Union[str, jax.Array] = "inverse",
                       loss_scale: float = LOSS_SCALE):
  """TTT with k_t per token: `max_steps` steps per mini-batch, token t's loss masked out
  of every step after its first k_t = token_steps[batch, t] (in [0, max_steps]).

  Every mini-batch pays for `max_steps` steps (the mask saves no compute; count it with
  `inner_flops_per_token(max_steps, ...)`). Other arguments as in `ttt_scan`.
  """
  _check(xq, mini_batch, kind, form)
  token_steps = jnp.asarray(token_steps)
  if token_steps.shape != xq.shape[:1] + xq.shape[2:3]:
    raise errors.ShapeError(f"token_steps must be [batch, seq] = "
                            f"{xq.shape[:1] + xq.shape[2:3]}, got {token_steps.shape}.")
  values = _concrete(token_steps)
  if values is not None and ((values < 0) | (values > max_steps)).any():
    raise errors.ConfigError(f"token_steps must lie in [0, {max_steps}], got values in "
                             f"[{values.min()}, {values.max()}].")
  # eta_t^(j) = eta_t [j <= k_t] for steps j = 1..max_steps: [batch, heads, k, seq].
  active = token_steps[:, None, None, :] > jnp.arange(max_steps)[:, None]
  etas = loss_scale * eta[:, :, None, :] * active.astype(eta.dtype)
  step = _mini_batch_step(kind, form, max_steps, ln_scale, ln_bias,
                          _tau(token_idx, mini_batch))
  return _scan(step, state, xq, xk, xv, etas, mini_batch)


GATE_GRANULARITIES = ("batch", "example")


@flax.struct.dataclass
class ReconGate:
  """PonderTTT's cheap gate (deveworld/ponderTTT, arXiv 2601.00894): each mini-batch's
  number of inner steps from the TTT layer's own reconstruction loss, no second pass.

  Signal of mini-batch n: s_n = log L(W_{n-1}; x_{n-1}), the log of the previous
  mini-batch's unweighted inner loss sum_s ||f(theta_K x_s; W) - theta_V x_s||^2 / b at
  the W it started from (one X_K W + b and one LN; `recon_signal`). The anchor reads the
  loss at the start of the chunk it gates; reading the previous one keeps the layer
  causal (a mini-batch's own loss would let token i's k depend on tokens after i). The
  first mini-batch has no signal and takes the top bucket.
  Decision: bucket_n = #{j : s_n > thresholds_j + o_n}, k_n = buckets[bucket_n], with
  `thresholds` the percentiles of s over a calibration set for the target fractions
  (`calibrate_recon_gate`, ponder_alloc.calibrate) and o_n an offset that an EMA keeps
  on target: r_n = ema r_{n-1} + (1 - ema) k_n / k_max, o_{n+1} = o_n + gain (r_n -
  target_rate), r_0 = target_rate, o_0 = 0 (a realised rate above the target raises
  the thresholds). target_rate is the target mean k over k_max (the update rate for
  buckets (0, 1)).
  granularity "batch": s_n averaged over the batch, one k per mini-batch (`lax.switch`:
  a mini-batch with fewer steps runs fewer ops); "example": one k per row, run as
  max(buckets) masked steps (no time saved; count the FLOPs analytically).
  """
  # Arrays (traced, so one compiled program serves every calibration of a bucket set):
  thresholds: jax.Array  # [len(buckets) - 1] ascending, on the log signal.
  target_rate: jax.Array  # Target mean k / max(buckets).
  ema: jax.Array  # EMA decay of the realised rate.
  gain: jax.Array  # Offset change per unit of rate error (0: fixed thresholds).
  buckets: tuple = flax.struct.field(pytree_node=False, default=(0, 1))
  granularity: str = flax.struct.field(pytree_node=False, default="batch")


def recon_gate(thresholds, buckets: Sequence[int], target: Sequence[float], *,
               ema: float = 0.9, gain: float = 1.0, granularity: str = "batch") -> ReconGate:
  """A ReconGate whose target rate is the mean k of fractions `target` over `buckets`."""
  buckets = tuple(int(k) for k in buckets)
  if granularity not in GATE_GRANULARITIES:
    raise errors.unknown_key("gate granularity", granularity, GATE_GRANULARITIES)
  if len(target) != len(buckets) or sorted(buckets) != list(buckets) or buckets[-1] < 1:
    raise errors.ConfigError(f"gate buckets {buckets} must ascend to a k >= 1, one target "
                             f"fraction each (got {tuple(target)}).")
  thresholds = jnp.asarray(thresholds, jnp.float32)
  if thresholds.shape != (len(buckets) - 1,):
    raise errors.ShapeError(f"gate thresholds must be [len(buckets) - 1] = "
                            f"[{len(buckets) - 1}], got {thresholds.shape}.")
  rate = float(np.dot(target, buckets)) / buckets[-1]
  return ReconGate(thresholds, jnp.float32(rate), jnp.float32(ema), jnp.float32(gain),
                   buckets, granularity)


def always_top(buckets: Sequence[int]) -> ReconGate:
  """The gate that gives every mini-batch max(buckets) steps (thresholds -inf, no EMA):
  Fixed-k_max's trajectory, whose signals calibrate a gate."""
  n = len(buckets)
  return recon_gate(jnp.full((n - 1,), -jnp.inf), buckets, (0.0,) * (n - 1) + (1.0,),
                    gain=0.0)


def recon_signal(state, xk, xv, ln_scale, ln_bias, *, kind: str) -> jax.Array:
  """[batch]: log of the mean over heads and tokens of ||f(theta_K x_s; W) - theta_V
  x_s||^2 for one mini-batch's views [batch, heads, b, d] at the weights `state`
  ([batch, heads, ...])."""
  loss = lambda w, k, v, scale, bias: inner_loss(w, k, v, 1.0 / k.shape[0], scale, bias,
                                                 kind=kind)
  per_head = jax.vmap(loss, in_axes=(0, 0, 0, 0, 0))
  per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None, None))
  return jnp.log(per_row(state, xk, xv, ln_scale, ln_bias).mean(-1))


def ttt_scan_gated(state, xq, xk, xv, eta, ln_scale, ln_bias, gate: ReconGate, *,
                   kind: str = "linear", form: str = "grad", mini_batch: int = 16,
                   token_idx: Union[str, jax.Array] = "inverse",
                   loss_scale: float = LOSS_SCALE):
  """TTT with k per mini-batch chosen on the fly by `gate` (`ReconGate`'s rule).

  Returns z, the final state and (steps [n, batch], signal [n, batch]): each
  mini-batch's k and its own log reconstruction loss at its start (the next one's
  signal). Other arguments as in `ttt_scan`.
  """
  _check(xq, mini_batch, kind, form)
  batch = xq.shape[0]
  buckets, k_max = gate.buckets, max(gate.buckets)
  tau = _tau(token_idx, mini_batch)
  if gate.granularity == "batch":
    branches = [_mini_batch_step(kind, form, k, ln_scale, ln_bias, tau) for k in buckets]
  else:
    masked = _mini_batch_step(kind, form, k_max, ln_scale, ln_bias, tau)
  values = jnp.asarray(buckets, jnp.int32)

  def step(carry, mb):
    w, prev, offset, rate = carry
    q, k, v, etas = mb
    signal = prev.mean(keepdims=True) if gate.granularity == "batch" else prev
    bucket = jnp.sum(signal[:, None] > gate.thresholds[None] + offset[:, None], -1)
    bucket = jnp.broadcast_to(bucket, (batch,))
    own = recon_signal(w, k, v, ln_scale, ln_bias, kind=kind)
    if gate.granularity == "batch":
      w, z = lax.switch(bucket[0], branches, w, mb)
    else:  # Row r's loss takes part in its first k_r of k_max steps.
      active = values[bucket][:, None, None, None] > jnp.arange(k_max)[:, None]
      w, z = masked(w, (q, k, v, etas * active.astype(etas.dtype)))
    steps = values[bucket]
    rate = gate.ema * rate + (1.0 - gate.ema) * steps / k_max
    offset = offset + gate.gain * (rate - gate.target_rate)
    return (w, own, offset, rate), (z, (steps, own))

  carry = (state, jnp.full((batch,), jnp.inf), jnp.zeros((batch,)),
           jnp.full((batch,), gate.target_rate))
  z, (final, *_), aux = _scan(step, carry, xq, xk, xv, loss_scale * eta[:, :, None, :],
                              mini_batch)
  return z, final, aux


def calibrate_recon_gate(signals, buckets: Sequence[int], target: Sequence[float],
                         granularity: str = "batch", **kwargs) -> ReconGate:
  """A gate whose thresholds are the percentiles, at the cumulative `target` fractions
  (ponder_alloc.calibrate), of the decision signals in calibration `signals` [..., n,
  batch]: the per mini-batch log losses `ttt_scan_gated` returns (a run under
  `always_top`, Fixed-k_max's trajectory). A decision reads mini-batches 0..n-2 (the
  last one's signal has no successor), averaged over the batch for granularity "batch"."""
  signals = jnp.asarray(signals)[..., :-1, :]
  if granularity == "batch":
    signals = signals.mean(-1)
  thresholds = ponder_alloc.calibrate(signals, target, buckets)
  return recon_gate(thresholds, buckets, target, granularity=granularity, **kwargs)


# Elementwise FLOPs per element in XLA's convention (one FLOP per elementwise op and
# element; transcendentals such as rsqrt and tanh are not FLOPs), fitted once to XLA's
# count of these ops (jax 0.10.2): `_layer_norm` forward plus bias and residual, 12 per
# output feature; LN + squared error forward and backward, with the bias and the
# residual, 63 per feature of a prediction; the tanh GELU 8 forward, 26 with backward.
_OUT_ELEMENTWISE = 12
_LOSS_ELEMENTWISE = 63
_GELU_ELEMENTWISE = 8
_GELU_GRAD_ELEMENTWISE = 26
_DUAL_STEP_ELEMENTWISE = 10  # Masking, table and accumulator updates of a dual step.


def inner_flops_per_token(steps: int, head_dim: int, *, kind: str = "linear",
                          form: str = "grad", mini_batch: int = 16) -> int:
  """FLOPs per token and head of the inner loop with k = `steps` (TTT update + output
  rule; not the outer projections theta_Q/K/V/O, eta or the post-norm).

  Matmuls are exact (2 FLOPs per multiply-add); elementwise work uses the per-element
  constants above. With b = mini_batch, d = head_dim, h = 4 d (TTT-MLP):
    output rule      linear 2 d^2 + 12 d;  mlp 4 d h + 8 h + 12 d
    grad, per step   every token's prefix gradient at its own weights: b forward and
                     backward passes per token. linear 4 b d^2 + d^2 + 63 b d;
                     mlp 10 b d h + 2 d h + 26 b h + 63 b d
    dual, k >= 1     4 d^2 + 4 b d + 63 d (X_K W, X_K^T Delta, X_Q X_K^T, mask(.) Delta)
         k >= 2      + 2 b d (X_K X_K^T) + (k - 1) (2 b^2 d + 63 b d + 10 b d) for the
                     [b, b, d] prediction table of the per-token trajectories
  These match XLA's compiled count within a few percent (tests/nn/test_ttt.py).
  """
  if kind not in KINDS:
    raise errors.unknown_key("TTT inner model kind", kind, KINDS)
  if form not in FORMS or (form == "dual" and kind != "linear"):
    raise errors.ConfigError(f"no {form!r} form for kind={kind!r}; forms: grad (any), "
                             "dual (linear).")
  k, b, d = int(steps), mini_batch, head_dim
  h = MLP_RATIO * d
  if kind == "linear":
    output = 2 * d * d + _OUT_ELEMENTWISE * d
  else:
    output = 4 * d * h + _GELU_ELEMENTWISE * h + _OUT_ELEMENTWISE * d
  if form == "grad":
    if kind == "linear":
      step = 4 * b * d * d + d * d + _LOSS_ELEMENTWISE * b * d
    else:
      step = (10 * b * d * h + 2 * d * h + _GELU_GRAD_ELEMENTWISE * b * h
              + _LOSS_ELEMENTWISE * b * d)
    return output + k * step
  if k == 0:
    return output
  flops = output + 4 * d * d + 4 * b * d + _LOSS_ELEMENTWISE * d
  if k >= 2:
    flops += 2 * b * d + (k - 1) * (
        2 * b * b * d + (_LOSS_ELEMENTWISE + _DUAL_STEP_ELEMENTWISE) * b * d)
  return flops


def recon_signal_flops_per_token(head_dim: int, *, kind: str = "linear") -> int:
  """FLOPs per token and head of `recon_signal` (the gate's cost): f(theta_K x; W) at
  the mini-batch's start W (linear 2 d^2, mlp 4 d h + 8 h, plus 12 d of LN, bias and
  residual) and the squared error against theta_V x (3 d: difference, square, sum)."""
  d, h = head_dim, MLP_RATIO * head_dim
  g = 2 * d * d if kind == "linear" else 4 * d * h + _GELU_ELEMENTWISE * h
  return g + (_OUT_ELEMENTWISE + 3) * d


class CausalConv(nn.Module):
  """Causal depthwise convolution over the sequence (the code's nn.Conv with padding
  "CAUSAL" and feature_group_count = features, same parameter shapes and init):
  y_t = sum_{i < w} kernel[i] * x_{t - w + 1 + i} + bias, with `prefix` [batch, w - 1,
  features] the inputs before x (zeros at a sequence's start; a decoder's state)."""
  width: int = CONV_WIDTH

  @nn.compact
  def __call__(self, x, prefix=None):
    features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.width, 1, features))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    if prefix is None:
      prefix = jnp.zeros(x.shape[:1] + (self.width - 1, features), x.dtype)
    padded = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    t = x.shape[1]
    y = sum(padded[:, i:i + t] * kernel[i, 0].astype(x.dtype) for i in range(self.width))
    return y + bias.astype(x.dtype)


class TTTLayer(nn.Module):
  """A TTT layer (Sec. 2): [batch, seq, width] -> [batch, seq, width], causal.

  Per head of head_dim = width / num_heads: the views theta_Q x, theta_K x, theta_V x
  (RoPE on Q and K; with backbone "M" one shared projection, then conv_q and conv_k),
  the learning rate eta(x) = eta_base lr_mult sigmoid(theta_lr . x + bias) / head_dim,
  the row scales tau (`token_idx` + learnable_token_idx), the inner loop over
  mini-batches (`ttt_scan*`) from a learned W_0, then a LayerNorm over the concatenated
  heads (post_norm), the gate gelu(x W_g) * (.) for "M", and theta_O (wo). The sequence
  length must be a multiple of `mini_batch` (a ShapeError, a ValueError, says how to
  pad otherwise).

  `steps` in `__call__`: None uses `self.steps`; an int is a static k; a `ReconGate`
  picks k per mini-batch from the layer's own reconstruction loss (`ttt_scan_gated`;
  sows "gate": (steps, signal)); an int array
  [seq / mini_batch] picks k per mini-batch among `allowed_steps` (`lax.switch`, shared
  by the batch); an int array [batch, seq] gives k_t per token (loss masking over
  max(allowed_steps) steps). `train` changes nothing: the paper runs the same inner loop
  in training and evaluation; it is there so models pass it to every block alike.
  `lr_mult` multiplies eta_base (the code's ttt_lr_mult warm-up; a traced scalar is fine).

  Decoding: `decode_state` (from `init_decode_state`) and `position` (the int32 index of
  the token) with x [batch, 1, width] return (y, new_state). The token's views go into
  the pending mini-batch's slot position % mini_batch; the mini-batch step runs on the
  pending buffer from W (the state after the last full mini-batch; slots after the token
  hold stale or zero views, which the causal mini-batch rule never reads for this slot),
  and when the slot is the last, W becomes the mini-batch's final state. A static int k
  only; the outputs equal the full-sequence pass's.
  """
  width: int
  num_heads: int
  kind: str = "linear"
  mini_batch: int = 16
  form: str = "grad"
  eta_base: Optional[float] = None  # ttt_base_lr; None = BASE_LR[kind] (the code's).
  steps: int = 1
  allowed_steps: Sequence[int] = ALLOWED_STEPS
  token_idx: str = "inverse"  # tau_i = 1 / i (code) | "none": 1 (paper).
  learnable_token_idx: bool = True  # Learned offset on tau per position (code).
  loss_scale: float = LOSS_SCALE  # c of c ||.||^2: 0.5 (code) | 1 (paper).
  rope: bool = True  # RoPE on the Q and K views, positions modulo mini_batch (code).
  rope_theta: float = ROPE_THETA
  backbone: str = "T"  # "T" (Transformer) | "M" (Mamba: conv on Q/K, output gate).
  conv_width: int = CONV_WIDTH  # Width of conv_q / conv_k (backbone "M").
  init_std: float = 0.02  # N(0, std) for projections, theta_lr and W_0 (public code).
  # N(0, std) for theta_O. The post_norm before it makes z unit-scale, so at 0.02 the
  # branch starts ~0.02 sqrt(width) per unit, far above a GPT-2 residual stream's: models
  # pass their residual-branch scale (0 starts a branch beside attention switched off).
  out_init_std: float = 0.02
  # Operand dtype of the projections' matmuls (float32 | bfloat16, float32 results:
  # `ponder.nn.dense`); the views, the inner loop and post_norm run in float32.
  dtype: Any = jnp.float32

  def validate(self):
    if self.width % self.num_heads:
      raise errors.ConfigError(f"width={self.width} is not divisible by "
                               f"num_heads={self.num_heads}.")
    if self.token_idx not in TOKEN_IDX:
      raise errors.unknown_key("token_idx", self.token_idx, TOKEN_IDX)
    if self.backbone not in BACKBONES:
      raise errors.unknown_key("TTT backbone", self.backbone, BACKBONES)
    if self.rope and (self.width // self.num_heads) % 2:
      raise errors.ConfigError(f"rope=True needs an even head_dim, got "
                               f"{self.width // self.num_heads}; set rope=False.")

  @property
  def base_lr(self) -> float:
    return BASE_LR[self.kind] if self.eta_base is None else float(self.eta_base)

  @nn.compact
  def __call__(self, x, *, steps: Union[None, int, jax.Array] = None, train: bool,
               lr_mult=1.0, decode_state: Optional[dict] = None, position=None):
    del train  # The inner loop is the same in training and evaluation (see above).
    self.validate()
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise errors.ShapeError(f"expected [batch, seq, {self.width}], got {x.shape}.")
    batch, seq, _ = x.shape
    heads, head_dim, mb = self.num_heads, self.width // self.num_heads, self.mini_batch
    decoding = decode_state is not None
    if decoding and seq != 1:
      raise errors.ShapeError(f"decoding takes one token at a time, got seq={seq}.")
    init = nn.initializers.normal(self.init_std)
    dense = functools.partial(dense_lib.Dense, self.width, use_bias=False, kernel_init=init,
                              compute_dtype=self.dtype)

    def split_heads(y):  # [batch, seq, width] -> [batch, heads, seq, head_dim]
      return y.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    new_state = {}
    if self.backbone == "T":
      xq, xk = dense(name="wq")(x), dense(name="wk")(x)
    else:  # The code's TTTLinear/TTTMLP: conv_q and conv_k on one projection.
      xqk = dense(name="wq")(x)
      prefix = decode_state["conv"] if decoding else None
      conv = functools.partial(CausalConv, self.conv_width)
      xq, xk = conv(name="conv_q")(xqk, prefix), conv(name="conv_k")(xqk, prefix)
      if decoding:
        new_state["conv"] = jnp.concatenate([prefix, xqk.astype(prefix.dtype)],
                                            axis=1)[:, 1:]
    xq, xk, xv = split_heads(xq), split_heads(xk), split_heads(dense(name="wv")(x))
    slot = None if not decoding else jnp.asarray(position, jnp.int32) % mb
    if self.rope:  # Positions modulo the mini-batch, as the code's get_ttt_inputs.
      pos = jnp.arange(seq) % mb if not decoding else slot[None]
      xq, xk = (apply_rope(y, pos, self.rope_theta) for y in (xq, xk))
    lr = dense_lib.Dense(heads, kernel_init=init, compute_dtype=self.dtype,
                         name="learnable_ttt_lr")(x)
    eta = (self.base_lr * lr_mult / head_dim) * jax.nn.sigmoid(lr).transpose(0, 2, 1)
    offset = None
    if self.learnable_token_idx:
      offset = self.param("learnable_token_idx", nn.initializers.zeros, (mb,))
    tau = token_scale(mb, self.token_idx, offset)
    # For diagnostics (`inner_loss_by_step`, whose loss is ||.||^2 with weights eta):
    # each token's weight in its mini-batch's final update, c tau_b eta_s. Apply with
    # mutable=["intermediates"].
    if not decoding:
      self.sow("intermediates", "views", (xk, xv, self.loss_scale * tau[-1] * eta))
    inner = self.param("ttt_state", lambda key: init_inner_params(
        key, heads, head_dim, kind=self.kind, std=self.init_std))
    ln_scale = self.param("ttt_norm_scale", nn.initializers.ones, (heads, head_dim))
    ln_bias = self.param("ttt_norm_bias", nn.initializers.zeros, (heads, head_dim))
    common = dict(kind=self.kind, form=self.form, mini_batch=mb, token_idx=tau,
                  loss_scale=self.loss_scale)
    steps = self.steps if steps is None else steps
    if decoding:
      if not isinstance(steps, (int, np.integer)):
        raise errors.ConfigError("decoding takes a static int number of inner steps, got "
                                 f"{type(steps).__name__}.")
      write = lambda buf, y: lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype),
                                                             slot, axis=2)
      views = {n: write(decode_state[n], y) for n, y in
               (("q", xq), ("k", xk), ("v", xv), ("eta", eta))}
      state = decode_state["W"]
      z, final = ttt_scan(state, views["q"], views["k"], views["v"], views["eta"],
                          ln_scale, ln_bias, steps=int(steps), **common)
      z = lax.dynamic_slice_in_dim(z, slot, 1, axis=2)
      full = slot == mb - 1  # The mini-batch is complete: its final W starts the next.
      new_state.update(views, W=jax.tree.map(lambda a, b: jnp.where(full, a, b), final,
                                             state))
    else:
      state = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), inner)
      args = (state, xq, xk, xv, eta, ln_scale, ln_bias)
      if isinstance(steps, (int, np.integer)):
        z, _ = ttt_scan(*args, steps=int(steps), **common)
      elif isinstance(steps, ReconGate):
        z, _, (gate_steps, signal) = ttt_scan_gated(*args, steps, **common)
        # Each mini-batch's k and log reconstruction loss, [n, batch]: the realised
        # allocation and calibration signals (apply with mutable=["intermediates"]).
        self.sow("intermediates", "gate", (gate_steps, signal))
      elif jnp.ndim(steps) == 1:
        z, _ = ttt_scan_switch(*args, steps, allowed_steps=self.allowed_steps, **common)
      elif jnp.ndim(steps) == 2:
        z, _ = ttt_scan_per_token(*args, steps, max_steps=max(self.allowed_steps),
                                  **common)
      else:
        raise errors.ShapeError(
            f"steps must be None, an int, a ReconGate, [seq / mini_batch] or [batch, "
            "seq]; got shape "
            f"{jnp.shape(steps)}.")
    z = z.transpose(0, 2, 1, 3).reshape(batch, seq, self.width)
    z = nn.LayerNorm(name="post_norm")(z)
    if self.backbone == "M":  # The code's apply_gate: gelu(x W_g) * post_norm(z).
      z = nn.gelu(dense(name="wg")(x)) * z
    y = dense(name="wo", kernel_init=nn.initializers.normal(self.out_init_std))(z)
    return (y, new_state) if decoding else y


def init_decode_state(layer: TTTLayer, params, batch_size: int,
                      dtype: Any = jnp.float32) -> dict:
  """The recurrent state of `layer` (its params) before a sequence's first token: W_0
  per row, an empty pending mini-batch, and zero conv inputs ("M")."""
  heads, head_dim = layer.num_heads, layer.width // layer.num_heads
  views = (batch_size, heads, layer.mini_batch)
  state = {
      "W": jax.tree.map(lambda w: jnp.broadcast_to(w, (batch_size,) + w.shape),
                        params["ttt_state"]),
      "q": jnp.zeros(views + (head_dim,), dtype), "k": jnp.zeros(views + (head_dim,), dtype),
      "v": jnp.zeros(views + (head_dim,), dtype), "eta": jnp.zeros(views, dtype)}
  if layer.backbone == "M":
    state["conv"] = jnp.zeros((batch_size, layer.conv_width - 1, layer.width), dtype)
  return state
