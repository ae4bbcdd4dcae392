"""Test-Time Training layers: TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to
(Learn at Test Time): RNNs with Expressive Hidden States", arXiv 2407.04620).

The hidden state of the layer is the weight W of an inner model f, trained while the
sequence is read by gradient steps on a self-supervised loss. Per head, with the
paper's notation (row vectors here, so a linear map is x W):

  inner model   f(x; W) = x + LN(g(x; W))                               (Sec. 2.7)
                g = x W1 + b1 (TTT-Linear) or GELU(x W1 + b1) W2 + b2 (TTT-MLP,
                hidden width 4 x head_dim); LN has its own learned scale and bias,
                which are outer parameters: the inner loop never changes them.
  inner loss    l(W; x_t) = || f(theta_K x_t; W) - theta_V x_t ||^2     (Sec. 2.3)
                the multi-view reconstruction loss that replaces the naive
                || f(x~_t; W) - x_t ||^2 of Eq. 2. Because f contains the residual,
                LN(g(theta_K x_t)) regresses theta_V x_t - theta_K x_t ("XV - XK" in
                the public code); the "grad" form below writes the loss with f and
                the residual, the "dual" form with that difference as the target.
                The squared norm has no 1/2, as in the paper (its dual form has 2 eta).
  output rule   z_t = f(theta_Q x_t; W_t)                                (Sec. 2.3)
                the query view through the inner model with the *updated* weights;
                f already contains the residual, so z_t = theta_Q x_t + LN(g(theta_Q
                x_t; W_t)) and theta_Q x_t is not added a second time.
  update rule   W_t = W_{t-1} - eta grad l(W_{t-1}; x_t)                 (Eq. 1)
  mini-batch    G_t = grad l(W_t'; x_t),  t' = t - mod(t, b)             (Sec. 2.4)
                W_t = W_t' - sum_{s=t'+1..t} eta_s G_s: every token of a mini-batch
                of b tokens takes its gradient at the W of the mini-batch's start and
                sees the cumulative update of the tokens up to itself; the last
                token's W starts the next mini-batch.
  learning rate eta(x) = eta_base sigmoid(theta_lr . x + bias) / head_dim (Sec. 2.7;
                one theta_lr per head; the division by head_dim is the public code's).

The paper's mini-batch rule is one gradient step. ponder adds k inner steps per
mini-batch (PonderTTT's Fixed-1/2/4 and its adaptive allocation), defined so that the
layer stays causal and k = 1 is exactly the rule above: token t's fast weights are W_t'
after k gradient steps on the causal prefix of the mini-batch's loss,

  W_t^(0) = W_t',   W_t^(j) = W_t^(j-1) - grad_W sum_{s=t'+1..t} eta_s^(j) l(W; x_s)
                                                      evaluated at W = W_t^(j-1),

  z_t = f(theta_Q x_t; W_t^(k)), and the next mini-batch starts from the last token's
W^(k): k full gradient steps on the mini-batch's loss, each at the current W. At j = 1
all W_t^(0) are equal, which is the paper's G_s = grad l(W_t'; x_s). k = 0 (SKIP) makes
no update: the outputs use W_t' and the state passes through unchanged. Per-token
steps k_s set eta_s^(j) = eta_s [j <= k_s]: a token's loss takes part in its first k_s
steps only.

Two forms compute the same thing:
  "grad"  the reference (the paper's primal form): `jax.grad` of the inner loss, with
          one weight copy per token of the mini-batch (any inner model).
  "dual"  TTT-Linear only, the paper's dual form (Sec. 2.5): no per-token weight or
          gradient is materialised. With Delta the rows eta_s dl/dz_s and
          A = X_K X_K^T + 1 (the +1 carries the bias b1),
            Z_Q = X_Q W + b1 - mask(X_Q X_K^T + 1) Delta,   W_b = W - X_K^T Delta,
          the paper's Z = W_0 X - 2 eta (W_0 X - X) mask(X^T X) with LN and bias. For
          k >= 2 the prefix trajectories differ per token; the dual form keeps
          Z[t, s] = x_s W_t^(j) + b_t^(j) ([b, b, head_dim]) and updates it with
          Z[t, s] -= sum_r A[s, r] Delta[t, r], so still no weight is copied per token.

The outer gradient flows through all inner updates (second order through `jax.grad`),
and train and eval run the same inner loop: the paper updates W at test time exactly
as in training. Three entry points choose the number of inner steps:
  `ttt_scan`            a static k for every mini-batch;
  `ttt_scan_switch`     k per mini-batch from a traced array, one `lax.switch` branch
                        per allowed k, so a mini-batch with fewer steps runs fewer ops;
  `ttt_scan_per_token`  k_t per token, as a mask on the loss of a fixed number of steps.
`inner_flops_per_token` is their analytic FLOP count, tested against XLA's count.
`TTTLayer` is the flax.linen layer: projections theta_Q/K/V, eta, the inner loop per
head, a LayerNorm and the output projection, like the public TTT layer without the
Mamba-backbone extras (causal convolution, RoPE, output gate) that belong to a model.
"""

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ponder import errors

KINDS = ("linear", "mlp")
FORMS = ("grad", "dual")
ALLOWED_STEPS = (0, 1, 2, 4)  # PonderTTT's SKIP and Fixed-1/2/4.
LN_EPS = 1e-6  # The public TTT code's epsilon for the inner LayerNorm.
MLP_RATIO = 4  # TTT-MLP: hidden width 4 x head_dim, then GELU (Sec. 2.7).


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


def _mini_batch_grad(state, xq, xk, xv, etas, ln_scale, ln_bias, *, kind):
  """One head, one mini-batch, by `jax.grad` (the primal form). etas: [k, b]."""
  if etas.shape[0] == 0:  # SKIP: no update, the outputs read the mini-batch's start W.
    return inner_model(state, xq, ln_scale, ln_bias, kind=kind), state
  b = xk.shape[0]
  causal = jnp.tril(jnp.ones((b, b), xk.dtype))  # [t, s] = 1 where s <= t.
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


def _mini_batch_dual(state, xq, xk, xv, etas, ln_scale, ln_bias):
  """One head, one mini-batch of TTT-Linear in the dual form (Sec. 2.5). etas: [k, b]."""
  w, bias = state["W1"], state["b1"]
  zq = xq @ w + bias
  num_steps = etas.shape[0]
  if num_steps == 0:
    return xq + _layer_norm(zq, ln_scale, ln_bias), state
  b = xk.shape[0]
  causal = jnp.tril(jnp.ones((b, b), xk.dtype))
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
  last = delta  # Token b's accumulated update: the state for the next mini-batch.
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


def _mini_batch_step(kind, form, num_steps, ln_scale, ln_bias):
  """(state, (q, k, v, etas)) -> (state, z) over [batch, heads] for a static k.

  etas [batch, heads, 1 or k, b]: one learning rate per token, or one per step.
  """
  if form == "grad":
    core = functools.partial(_mini_batch_grad, kind=kind)
  else:
    core = _mini_batch_dual
  # Heads carry their own state, views and LN; the batch shares the LN parameters.
  per_batch = jax.vmap(jax.vmap(core), in_axes=(0, 0, 0, 0, 0, None, None))

  def step(state, mb):
    q, k, v, etas = mb
    etas = jnp.broadcast_to(etas, etas.shape[:-2] + (num_steps, etas.shape[-1]))
    z, state = per_batch(state, q, k, v, etas, ln_scale, ln_bias)
    return state, z

  return step


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
  final, z = lax.scan(step, state, xs)
  z = jnp.moveaxis(z, 0, 2).reshape(batch, heads, seq, dim)
  return z, final


def ttt_scan(state, xq, xk, xv, eta, ln_scale, ln_bias, *, kind: str = "linear",
             form: str = "grad", mini_batch: int = 16, steps: int = 1):
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

  Returns:
    z [batch, heads, seq, head_dim] (the output rule) and the state after the last
    mini-batch.
  """
  _check(xq, mini_batch, kind, form)
  if not isinstance(steps, (int, np.integer)) or steps < 0:
    raise errors.ConfigError(f"steps must be a non-negative Python int, got {steps!r}; "
                             "use ttt_scan_switch or ttt_scan_per_token for arrays.")
  step = _mini_batch_step(kind, form, int(steps), ln_scale, ln_bias)
  return _scan(step, state, xq, xk, xv, eta[:, :, None, :], mini_batch)


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
  layer's views: `TTTLayer` sows them as intermediates "views"); ln_scale, ln_bias
  [heads, head_dim].
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
                    allowed_steps: Sequence[int] = ALLOWED_STEPS):
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
  branches = [_mini_batch_step(kind, form, k, ln_scale, ln_bias) for k in allowed]

  def step(state, mb):
    i, mb = mb
    return lax.switch(i, branches, state, mb)

  return _scan(step, state, xq, xk, xv, eta[:, :, None, :], mini_batch, index=index)


def ttt_scan_per_token(state, xq, xk, xv, eta, ln_scale, ln_bias, token_steps, *,
                       kind: str = "linear", form: str = "grad", mini_batch: int = 16,
                       max_steps: int = max(ALLOWED_STEPS)):
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
  etas = eta[:, :, None, :] * active.astype(eta.dtype)
  step = _mini_batch_step(kind, form, max_steps, ln_scale, ln_bias)
  return _scan(step, state, xq, xk, xv, etas, mini_batch)


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


class TTTLayer(nn.Module):
  """A TTT layer (Sec. 2): [batch, seq, width] -> [batch, seq, width], causal.

  Per head of head_dim = width / num_heads: the views theta_Q x, theta_K x, theta_V x,
  the learning rate eta(x) = eta_base sigmoid(theta_lr . x + bias) / head_dim, the inner
  loop over mini-batches (`ttt_scan*`) from a learned W_0, then a LayerNorm over the
  concatenated heads and the output projection theta_O (the public layer's post_norm and
  wo). The sequence length must be a multiple of `mini_batch` (a ShapeError, a
  ValueError, says how to pad otherwise).

  `steps` in `__call__`: None uses `self.steps`; an int is a static k; an int array
  [seq / mini_batch] picks k per mini-batch among `allowed_steps` (`lax.switch`, shared
  by the batch); an int array [batch, seq] gives k_t per token (loss masking over
  max(allowed_steps) steps). `train` changes nothing: the paper runs the same inner loop
  in training and evaluation; it is there so models pass it to every block alike.
  """
  width: int
  num_heads: int
  kind: str = "linear"
  mini_batch: int = 16
  form: str = "grad"
  eta_base: float = 1.0
  steps: int = 1
  allowed_steps: Sequence[int] = ALLOWED_STEPS
  init_std: float = 0.02  # N(0, std) for projections, theta_lr and W_0 (public code).
  # N(0, std) for theta_O. The post_norm before it makes z unit-scale, so at 0.02 the
  # branch starts ~0.02 sqrt(width) per unit, far above a GPT-2 residual stream's: models
  # pass their residual-branch scale (0 starts a branch beside attention switched off).
  out_init_std: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, steps: Union[None, int, jax.Array] = None, train: bool):
    del train  # The inner loop is the same in training and evaluation (see above).
    if self.width % self.num_heads:
      raise errors.ConfigError(f"width={self.width} is not divisible by "
                               f"num_heads={self.num_heads}.")
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise errors.ShapeError(f"expected [batch, seq, {self.width}], got {x.shape}.")
    batch, seq, _ = x.shape
    heads, head_dim = self.num_heads, self.width // self.num_heads
    init = nn.initializers.normal(self.init_std)
    dense = functools.partial(nn.Dense, self.width, use_bias=False, kernel_init=init,
                              dtype=self.dtype)

    def split_heads(y):  # [batch, seq, width] -> [batch, heads, seq, head_dim]
      return y.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    xq, xk, xv = (split_heads(dense(name=n)(x)) for n in ("wq", "wk", "wv"))
    lr = nn.Dense(heads, kernel_init=init, dtype=self.dtype, name="learnable_ttt_lr")(x)
    eta = (self.eta_base / head_dim) * jax.nn.sigmoid(lr).transpose(0, 2, 1)
    # For diagnostics (`inner_loss_by_step`): apply with mutable=["intermediates"].
    self.sow("intermediates", "views", (xk, xv, eta))
    inner = self.param("ttt_state", lambda key: init_inner_params(
        key, heads, head_dim, kind=self.kind, std=self.init_std))
    state = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), inner)
    ln_scale = self.param("ttt_norm_scale", nn.initializers.ones, (heads, head_dim))
    ln_bias = self.param("ttt_norm_bias", nn.initializers.zeros, (heads, head_dim))
    args = (state, xq, xk, xv, eta, ln_scale, ln_bias)
    common = dict(kind=self.kind, form=self.form, mini_batch=self.mini_batch)
    steps = self.steps if steps is None else steps
    if isinstance(steps, (int, np.integer)):
      z, _ = ttt_scan(*args, steps=int(steps), **common)
    elif jnp.ndim(steps) == 1:
      z, _ = ttt_scan_switch(*args, steps, allowed_steps=self.allowed_steps, **common)
    elif jnp.ndim(steps) == 2:
      z, _ = ttt_scan_per_token(*args, steps, max_steps=max(self.allowed_steps), **common)
    else:
      raise errors.ShapeError(
          f"steps must be None, an int, [seq / mini_batch] or [batch, seq]; got shape "
          f"{jnp.shape(steps)}.")
    z = z.transpose(0, 2, 1, 3).reshape(batch, seq, self.width)
    z = nn.LayerNorm(dtype=self.dtype, name="post_norm")(z)
    return dense(name="wo", kernel_init=nn.initializers.normal(self.out_init_std))(z)
