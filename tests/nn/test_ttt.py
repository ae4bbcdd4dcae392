"""TTT layers (ponder/nn/ttt.py) against a token-by-token reference written here from the
paper's rules, the dual form against the grad form, finite differences, causality, the
SKIP / switch / per-token step controls, and the analytic FLOP count against XLA's."""

import functools

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ponder import errors
from ponder.analysis import cost_of
from ponder.nn import ttt

# Tiny shapes for 2 CPU cores: two mini-batches of 4 tokens, 2 sequences, 2 heads.
BATCH, HEADS, SEQ, DIM, MB = 2, 2, 8, 4, 4
# The tests' programs are tiny: LLVM's optimisation only costs compile time here, and it
# changes no HLO, so XLA's FLOP counts are the same as with the default level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.partial(_jit, static_argnames=("kind", "form", "mini_batch", "steps"))
def scan_static(*args, **kw):
  return ttt.ttt_scan(*args, **kw)


@functools.partial(_jit, static_argnames=("kind", "form", "mini_batch", "allowed_steps"))
def scan_switch(*args, **kw):
  return ttt.ttt_scan_switch(*args, **kw)


@functools.partial(_jit, static_argnames=("kind", "form", "mini_batch", "max_steps"))
def scan_per_token(*args, **kw):
  return ttt.ttt_scan_per_token(*args, **kw)


def make_inputs(kind, seed=0, dtype=np.float32, batch=BATCH, heads=HEADS, seq=SEQ,
                dim=DIM):
  """(state, xq, xk, xv, eta, ln_scale, ln_bias) with updates large enough to matter.

  Drawn with numpy: eager jax ops would each compile, which costs seconds here.
  """
  rng = np.random.RandomState(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
  views = [normal(batch, heads, seq, dim) for _ in range(3)]
  eta = 0.1 / (1.0 + np.exp(-normal(batch, heads, seq)))  # 0.1 sigmoid(.), as eta(x).
  hidden = dim if kind == "linear" else ttt.MLP_RATIO * dim
  inner = {"W1": 0.3 * normal(heads, dim, hidden), "b1": 0.1 * normal(heads, hidden)}
  if kind == "mlp":
    inner.update(W2=0.3 * normal(heads, hidden, dim), b2=0.1 * normal(heads, dim))
  state = {n: np.broadcast_to(w, (batch,) + w.shape) for n, w in inner.items()}
  ln_scale, ln_bias = 1.0 + 0.2 * normal(heads, dim), 0.2 * normal(heads, dim)
  return jax.tree.map(jnp.asarray, (state, *views, eta.astype(dtype), ln_scale, ln_bias))


# ---------------------------------------------------------------------------------------
# An independent reference: the paper's rules token by token, in plain loops.

def _ln(z, scale, bias):
  normed = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-6)
  return normed * scale + bias


def _f(w, x, scale, bias, kind):
  """f(x; W) = x + LN(g(x; W)) (Sec. 2.7)."""
  if kind == "linear":
    g = x @ w["W1"] + w["b1"]
  else:
    g = jax.nn.gelu(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]
  return x + _ln(g, scale, bias)


@functools.partial(jax.jit, static_argnames="kind")
def _token_grad(w, k, v, scale, bias, kind):
  """grad_W ||f(theta_K x; W) - theta_V x||^2 for one token (Sec. 2.3)."""
  return jax.grad(lambda w: jnp.sum(jnp.square(_f(w, k, scale, bias, kind) - v)))(w)


_f_jit = jax.jit(_f, static_argnames="kind")


# The row scales tau and loss scales c of the options: the public code's (tau_i = 1 / i,
# 1/2 ||.||^2), the paper's (1, ||.||^2), and the code's with a learned offset on tau
# (one entry clipped at 0).
OPTIONS = {"code": (1.0 / np.arange(1, MB + 1), 0.5), "paper": (np.ones(MB), 1.0),
           "learned": (np.maximum(1.0 / np.arange(1, MB + 1) + [0.3, -0.2, -0.5, 0.4], 0),
                       0.5)}


def reference_ttt(inputs, token_steps, *, kind, mini_batch, tau=None, loss_scale=0.5):
  """Token t (i = t - t' + 1 of its mini-batch, starting at t'): W_t^(0) = W_t', and for
  j = 1..max k, W_t^(j) = W_t^(j-1) - tau_i c sum_{t' < s <= t, k_s >= j} eta_s
  grad ||f(theta_K x_s; W) - theta_V x_s||^2 at W_t^(j-1) (for j = 1, the mini-batch
  rule, Sec. 2.4, one token's gradient at a time; tau_i = 1 / i by default, the code's);
  z_t = f(theta_Q x_t; W_t^(k)) and the last token's W starts the next mini-batch.
  token_steps [batch, seq]. Returns z [batch, heads, seq, dim] and the final state."""
  state, xq, xk, xv, eta, ln_scale, ln_bias = jax.tree.map(np.asarray, inputs)
  batch, heads, seq, _ = xq.shape
  token_steps = np.asarray(token_steps)
  tau = 1.0 / np.arange(1, mini_batch + 1) if tau is None else np.asarray(tau)
  out, finals = np.zeros(xq.shape), []
  for i in range(batch):
    for h in range(heads):
      scale, bias = ln_scale[h], ln_bias[h]
      start = {n: w[i, h].astype(np.float64) for n, w in state.items()}
      for t0 in range(0, seq, mini_batch):
        for t in range(t0, t0 + mini_batch):
          w = dict(start)
          for j in range(int(token_steps[i, t0:t + 1].max(initial=0))):
            update = {n: np.zeros_like(a) for n, a in w.items()}
            for s in range(t0, t + 1):
              if token_steps[i, s] > j:
                g = _token_grad(w, xk[i, h, s], xv[i, h, s], scale, bias, kind)
                for n in update:
                  update[n] += (tau[t - t0] * loss_scale * eta[i, h, s]
                                * np.asarray(g[n], np.float64))
            w = {n: w[n] - update[n] for n in w}
          out[i, h, t] = _f_jit(w, xq[i, h, t], scale, bias, kind)
        start = w
      finals.append(start)
  final = {n: np.stack([f[n] for f in finals]).reshape(state[n].shape) for n in state}
  return out, final


def _steps_everywhere(k):
  return np.full((BATCH, SEQ), k)


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,form,steps,option", [
    ("linear", "dual", 1, "code"), ("linear", "dual", 2, "paper"),
    ("linear", "dual", 2, "learned"), ("linear", "grad", 2, "learned"),
    ("mlp", "grad", 2, "code"), ("mlp", "grad", 1, "paper")])
def test_matches_token_by_token_reference(kind, form, steps, option):
  inputs = make_inputs(kind)
  tau, c = OPTIONS[option]
  # The code's options as the defaults; the others as an explicit tau and loss_scale.
  kw = {} if option == "code" else dict(token_idx=jnp.asarray(tau, jnp.float32),
                                        loss_scale=c)
  z, final = scan_static(*inputs, kind=kind, form=form, mini_batch=MB, steps=steps, **kw)
  z_ref, final_ref = reference_ttt(inputs, _steps_everywhere(steps), kind=kind,
                                   mini_batch=MB, tau=tau, loss_scale=c)
  chex.assert_trees_all_close(z, z_ref, atol=2e-5, rtol=1e-5)
  chex.assert_trees_all_close(final, final_ref, atol=2e-5, rtol=1e-5)
  # The inner loop did something: the outputs moved away from those of W_0.
  z_skip, _ = scan_static(*inputs, kind=kind, form=form, mini_batch=MB, steps=0, **kw)
  assert np.abs(np.asarray(z) - np.asarray(z_skip)).max() > 1e-2


@pytest.mark.parametrize("kind,form", [("linear", "dual"), ("linear", "grad")])
def test_per_token_steps_match_reference(kind, form):
  inputs = make_inputs(kind, seed=1)
  token_steps = np.array([[2, 0, 1, 4, 0, 2, 1, 4], [1, 4, 2, 0, 0, 0, 2, 1]])
  max_steps = 4 if form == "dual" else 2  # The programs other tests compile too.
  token_steps = np.minimum(token_steps, max_steps)
  z, final = scan_per_token(*inputs, token_steps, kind=kind, form=form, mini_batch=MB,
                            max_steps=max_steps)
  z_ref, final_ref = reference_ttt(inputs, token_steps, kind=kind, mini_batch=MB)
  chex.assert_trees_all_close(z, z_ref, atol=2e-5, rtol=1e-5)
  chex.assert_trees_all_close(final, final_ref, atol=2e-5, rtol=1e-5)


# k = 1 is checked against the reference above; k = 4 also runs the dual form's table
# update (steps after the second). Every option: tau and c enter both forms.
@pytest.mark.parametrize("steps,option", [(2, "paper"), (4, "code"), (4, "learned")])
def test_grad_and_dual_forms_agree(steps, option):
  inputs = make_inputs("linear", seed=2)
  tau, c = OPTIONS[option]
  kw = dict(token_idx=jnp.asarray(tau, jnp.float32), loss_scale=c)
  z_grad, w_grad = scan_static(*inputs, kind="linear", form="grad", mini_batch=MB,
                               steps=steps, **kw)
  z_dual, w_dual = scan_static(*inputs, kind="linear", form="dual", mini_batch=MB,
                               steps=steps, **kw)
  assert np.abs(np.asarray(z_grad) - np.asarray(z_dual)).max() <= 1e-5
  for name in ("W1", "b1"):
    assert np.abs(np.asarray(w_grad[name]) - np.asarray(w_dual[name])).max() <= 1e-5


def test_outer_gradient_finite_differences_and_forms_agree():
  """float64: d/d(every input) of a random projection of the outputs and final W, through
  the inner updates of two mini-batches, against central differences; the outer gradients
  of the grad and dual forms agree. (k = 1 keeps the compile short; k >= 2 repeats the
  same differentiable ops, checked in the forward pass above.)"""
  with jax.enable_x64(True):
    inputs = make_inputs("linear", seed=3, dtype=np.float64)
    probe = make_inputs("linear", seed=4, dtype=np.float64)

    def objective(inputs, form):
      z, final = ttt.ttt_scan(*inputs, kind="linear", form=form, mini_batch=MB, steps=1)
      return (jnp.sum(z * probe[1]) + jnp.sum(final["W1"] * probe[0]["W1"])
              + jnp.sum(final["b1"] * probe[0]["b1"]))

    # One compiled program per form gives the gradient and the values for differences.
    value_and_grad = _jit(jax.value_and_grad(objective), static_argnums=1)
    grads = {form: value_and_grad(inputs, form)[1] for form in ("grad", "dual")}
    chex.assert_trees_all_close(grads["grad"], grads["dual"], atol=1e-10, rtol=1e-9)
    leaves, treedef = jax.tree.flatten(inputs)
    for seed in range(3):
      rng = np.random.RandomState(100 + seed)
      direction = jax.tree.unflatten(treedef, [rng.standard_normal(x.shape) for x in leaves])
      eps = 1e-6
      shifted = lambda sign: jax.tree.map(lambda x, d: np.asarray(x) + sign * eps * d,
                                          inputs, direction)
      numeric = (value_and_grad(shifted(1), "dual")[0]
                 - value_and_grad(shifted(-1), "dual")[0]) / (2 * eps)
      analytic = sum(np.vdot(g, d) for g, d in zip(
          jax.tree.leaves(grads["dual"]), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("kind,form,steps", [("linear", "dual", 2), ("mlp", "grad", 2)])
def test_causal(kind, form, steps):
  """Changing the views or eta of tokens after t changes no output at or before t."""
  inputs = make_inputs(kind, seed=5)
  z, _ = scan_static(*inputs, kind=kind, form=form, mini_batch=MB, steps=steps)
  for t in (1, 4, 6):  # Inside the first mini-batch, its first token, inside the second.
    changed = [np.array(x) for x in inputs[1:5]]  # Copies of xq, xk, xv, eta.
    for x in changed[:3]:
      x[:, :, t + 1:] += 3.0
    changed[3][:, :, t + 1:] *= 2.0
    z2, _ = scan_static(inputs[0], *changed, *inputs[5:], kind=kind, form=form,
                        mini_batch=MB, steps=steps)
    z2, z = np.asarray(z2), np.asarray(z)
    np.testing.assert_array_equal(z2[:, :, :t + 1], z[:, :, :t + 1])
    assert np.abs(z2[:, :, t + 1:] - z[:, :, t + 1:]).max() > 1e-3


@pytest.mark.parametrize("kind,form", [
    ("linear", "grad"), ("linear", "dual"), ("mlp", "grad")])
def test_skip_keeps_state_and_reads_initial_weights(kind, form):
  inputs = make_inputs(kind, seed=6)
  state, xq, _, _, _, ln_scale, ln_bias = inputs
  z, final = scan_static(*inputs, kind=kind, form=form, mini_batch=MB, steps=0)
  chex.assert_trees_all_equal(final, state)
  per_head = jax.vmap(functools.partial(_f, kind=kind))  # Over heads, then the batch.
  expected = _jit(jax.vmap(per_head, in_axes=(0, 0, None, None)))(state, xq, ln_scale, ln_bias)
  chex.assert_trees_all_close(z, expected, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_switch_and_per_token_equal_static_steps(k):
  inputs = make_inputs("linear", seed=7)
  static = scan_static(*inputs, kind="linear", form="dual", mini_batch=MB, steps=k)
  switch = scan_switch(*inputs, np.full((SEQ // MB,), k), kind="linear", form="dual",
                       mini_batch=MB, allowed_steps=ttt.ALLOWED_STEPS)
  per_token = scan_per_token(*inputs, _steps_everywhere(k), kind="linear", form="dual",
                             mini_batch=MB, max_steps=4)
  chex.assert_trees_all_close(switch, static, atol=1e-6)
  chex.assert_trees_all_close(per_token, static, atol=1e-6)


def test_switch_with_mixed_steps_equals_per_token_steps():
  inputs = make_inputs("linear", seed=8)
  for pattern in ([4, 0], [0, 2], [1, 4]):
    switch = scan_switch(*inputs, np.array(pattern), kind="linear", form="dual",
                         mini_batch=MB, allowed_steps=ttt.ALLOWED_STEPS)
    per_token = scan_per_token(*inputs, np.repeat([pattern], BATCH, 0).repeat(MB, 1),
                               kind="linear", form="dual", mini_batch=MB, max_steps=4)
    chex.assert_trees_all_close(switch, per_token, atol=1e-6)


def test_inner_loss_by_step_follows_the_reference_update():
  # One mini-batch per row, so the reference's state after it is W^(j) of every row.
  kind, max_steps = "linear", 3
  state, _, xk, xv, eta, ln_scale, ln_bias = inputs = make_inputs(kind, seq=MB)
  w0 = jax.tree.map(lambda w: w[0], state)  # make_inputs broadcasts W_0 over the batch.
  got = jax.jit(functools.partial(ttt.inner_loss_by_step, mini_batch=MB,
                                  max_steps=max_steps))(w0, xk, xv, eta, ln_scale, ln_bias)
  loss = lambda w, i, h: sum(
      float(jnp.sum(jnp.square(_f_jit(w, xk[i, h, s], ln_scale[h], ln_bias[h], kind)
                               - xv[i, h, s]))) for s in range(MB))
  expected = [1.0]
  for j in range(1, max_steps + 1):
    _, final = reference_ttt(inputs, np.full((BATCH, MB), j), kind=kind, mini_batch=MB,
                             tau=np.ones(MB), loss_scale=1.0)  # Full steps, ||.||^2.
    expected.append(np.mean([
        loss({n: w[i, h] for n, w in final.items()}, i, h)
        / loss({n: w[h] for n, w in w0.items()}, i, h)
        for i in range(BATCH) for h in range(HEADS)]))
  chex.assert_shape(got, (max_steps + 1,))
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  assert got[1] < 1.0  # These learning rates do fit the inner objective.


def test_layer_sows_its_views_for_the_diagnostic():
  layer = ttt.TTTLayer(8, 2, mini_batch=MB)
  x = jax.random.normal(jax.random.key(0), (1, SEQ, 8))
  params = layer.init(jax.random.key(1), x, train=False)["params"]
  _, aux = layer.apply({"params": params}, x, train=False, mutable=["intermediates"])
  xk, xv, eta = aux["intermediates"]["views"][0]
  chex.assert_shape((xk, xv, eta), ((1, 2, SEQ, 4), (1, 2, SEQ, 4), (1, 2, SEQ)))
  heads = lambda y: y.reshape(1, SEQ, 2, 4).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(  # RoPE (default) at positions modulo the mini-batch.
      xk, ttt.apply_rope(heads(x @ params["wk"]["kernel"]), np.arange(SEQ) % MB),
      rtol=1e-5, atol=1e-6)
  # eta: each token's weight in its mini-batch's final update, c tau_b eta_s.
  lr = x @ params["learnable_ttt_lr"]["kernel"] + params["learnable_ttt_lr"]["bias"]
  np.testing.assert_allclose(eta, 0.5 / MB * jax.nn.sigmoid(lr).transpose(0, 2, 1) / 4,
                             rtol=1e-5)


def _count(jaxpr, name):
  """Equations of primitive `name` in a jaxpr, nested ones included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _count(sub, name)
  return total


@pytest.mark.parametrize("kind,form", [("linear", "dual"), ("mlp", "grad")])
def test_switch_branches_run_fewer_ops_for_fewer_steps(kind, form):
  inputs = make_inputs(kind)
  jaxpr = jax.make_jaxpr(functools.partial(
      ttt.ttt_scan_switch, kind=kind, form=form, mini_batch=MB))(*inputs, np.zeros(2, int))
  conds = []

  def find(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "cond":
        conds.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        find(sub)

  find(jaxpr.jaxpr)
  assert len(conds) == 1 and len(conds[0].params["branches"]) == len(ttt.ALLOWED_STEPS)
  dots = [_count(b.jaxpr, "dot_general") for b in conds[0].params["branches"]]
  assert dots[0] < dots[1] < dots[2] < dots[3], dots  # k = 0, 1, 2, 4


# TTT-MLP stops at k = 2: its k = 4 program only repeats the k = 2 step and costs the
# most compile time of all.
@pytest.mark.parametrize("kind,form,all_steps", [
    ("linear", "grad", ttt.ALLOWED_STEPS), ("linear", "dual", ttt.ALLOWED_STEPS),
    ("mlp", "grad", (0, 1, 2))])
def test_compiled_flops_grow_with_steps_and_match_analytic(kind, form, all_steps):
  """XLA's count for one mini-batch of one head (b = 16, head_dim = 32) against
  `inner_flops_per_token`. Its matmul terms are exact; its elementwise terms (LayerNorm,
  GELU, masks; a third to two thirds of the total at this small head_dim) use per-element
  constants fitted to XLA's count, which XLA's simplifier and fusion may shift between
  versions, hence 10% (within 4% at b in {8, 16}, head_dim in {32, 64}, jax 0.10.2)."""
  b, d = 16, 32
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      make_inputs(kind, batch=1, heads=1, seq=b, dim=d))
  compiled = []
  for k in all_steps:
    lowered = scan_static.lower(*args, kind=kind, form=form, mini_batch=b, steps=k)
    flops = cost_of(lowered.compile())["flops"] / b
    analytic = ttt.inner_flops_per_token(k, d, kind=kind, form=form, mini_batch=b)
    assert abs(flops - analytic) <= 0.1 * flops, (k, flops, analytic)
    compiled.append(flops)
  assert all(a < b for a, b in zip(compiled, compiled[1:])), compiled


# ---------------------------------------------------------------------------------------
# The flax layer.

WIDTH = HEADS * DIM


@functools.partial(_jit, static_argnames=("model", "train"))
def _apply(model, params, x, steps, train=False):
  return model.apply(params, x, steps=steps, train=train)


def test_layer_is_causal_with_per_token_steps():
  x = np.random.RandomState(9).standard_normal((BATCH, SEQ, WIDTH)).astype(np.float32)
  model = ttt.TTTLayer(WIDTH, HEADS, kind="linear", mini_batch=MB, form="dual",
                       eta_base=4.0, allowed_steps=(0, 1, 2))
  # Random parameters of the right shapes, without compiling `init`.
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
  steps = np.random.RandomState(0).choice(model.allowed_steps, (BATCH, SEQ))
  y = np.asarray(_apply(model, params, x, steps))
  assert y.shape == x.shape and np.isfinite(y).all()
  t = 5
  x2 = x.copy()
  x2[:, t + 1:] += 1.0
  y2 = np.asarray(_apply(model, params, x2, steps))
  np.testing.assert_array_equal(y2[:, :t + 1], y[:, :t + 1])
  assert np.abs(y2[:, t + 1:] - y[:, t + 1:]).max() > 1e-4


def test_layer_programs_for_each_kind_of_steps():
  """Traced only: train and eval give the same program; an int is static, a
  [seq / mini_batch] array switches per mini-batch, a [batch, seq] array masks tokens."""
  x = np.ones((BATCH, SEQ, WIDTH), np.float32)
  init = lambda model: jax.eval_shape(
      functools.partial(model.init, train=True), jax.random.key(0), x)
  inner = init(ttt.TTTLayer(WIDTH, HEADS, kind="mlp", mini_batch=MB))["params"]["ttt_state"]
  assert inner["W1"].shape == (HEADS, DIM, 4 * DIM)
  assert inner["W2"].shape == (HEADS, 4 * DIM, DIM)
  model = ttt.TTTLayer(WIDTH, HEADS, kind="linear", form="dual", mini_batch=MB)
  params = init(model)

  def program(steps, train=False):
    return jax.make_jaxpr(functools.partial(model.apply, steps=steps, train=train))(params, x)

  assert str(program(2, train=True)) == str(program(2, train=False))
  assert _count(program(2).jaxpr, "cond") == 0
  assert _count(program(np.array([0, 4])).jaxpr, "cond") == 1
  assert _count(program(np.full((BATCH, SEQ), 1)).jaxpr, "cond") == 0
  with pytest.raises(errors.ShapeError):
    program(np.zeros((1, 1, 1), int))


def test_bad_inputs_raise_clear_errors():
  inputs = make_inputs("linear")
  with pytest.raises(ValueError, match="multiple of mini_batch"):
    ttt.ttt_scan(*inputs, mini_batch=3)
  with pytest.raises(errors.ConfigError, match="linear"):
    ttt.ttt_scan(*make_inputs("mlp"), kind="mlp", form="dual", mini_batch=MB)
  with pytest.raises(errors.ConfigError, match="allowed_steps"):
    ttt.ttt_scan_switch(*inputs, np.array([1, 3]), mini_batch=MB)
  with pytest.raises(errors.ShapeError):
    ttt.ttt_scan_switch(*inputs, np.array([1, 1, 1]), mini_batch=MB)
  with pytest.raises(errors.ConfigError):
    ttt.ttt_scan_per_token(*inputs, _steps_everywhere(5), mini_batch=MB, max_steps=4)
  model = ttt.TTTLayer(WIDTH, HEADS, mini_batch=MB)
  with pytest.raises(ValueError, match="Pad the sequence"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   np.ones((1, SEQ + 1, WIDTH), np.float32))


def test_rope_is_the_codes_complex_rotation():
  """apply_rope against the public code's form: feature pairs as complex numbers times
  exp(i pos theta^(-2m / d)); scores then depend on relative positions only."""
  x = np.random.RandomState(10).standard_normal((2, 3, 6, 8)).astype(np.float32)
  pos = np.array([0, 1, 2, 3, 0, 5])
  freqs = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  rotated = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[:, None] * freqs)
  expected = np.stack([rotated.real, rotated.imag], -1).reshape(x.shape)
  np.testing.assert_allclose(ttt.apply_rope(x, pos), expected, rtol=1e-5, atol=1e-5)
  q, k = x[0, 0, 0], x[0, 0, 1]
  score = lambda m, n: float(ttt.apply_rope(q[None], np.array([m]))[0]
                             @ ttt.apply_rope(k[None], np.array([n]))[0])
  np.testing.assert_allclose(score(3, 1), score(5, 3), rtol=1e-4)


def test_causal_conv_matches_flax_causal_depthwise_conv():
  """CausalConv is the code's nn.Conv(padding="CAUSAL", feature_group_count=features),
  same parameters; a prefix of earlier inputs continues the sequence (decoding)."""
  x = np.random.RandomState(11).standard_normal((2, 7, 6)).astype(np.float32)
  conv = ttt.CausalConv(4)
  params = conv.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias.
  flax_conv = nn.Conv(6, (4,), padding="CAUSAL", feature_group_count=6)
  expected = flax_conv.apply(params, x)
  np.testing.assert_allclose(conv.apply(params, x), expected, rtol=1e-5, atol=1e-6)
  tail = conv.apply(params, x[:, 5:], x[:, 2:5])  # The last 2 outputs from 3 earlier rows.
  np.testing.assert_allclose(tail, expected[:, 5:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,form,steps,backbone", [
    ("linear", "dual", 2, "M"), ("mlp", "grad", 1, "T")])
def test_layer_decoding_token_by_token_equals_the_full_pass(kind, form, steps, backbone):
  """The recurrent state (W after the last full mini-batch, the pending mini-batch's
  views, the conv inputs) gives every token the full pass's output, over 2.5
  mini-batches."""
  seq = 2 * MB + 2
  x = np.random.RandomState(12).standard_normal((BATCH, 3 * MB, WIDTH)).astype(np.float32)
  model = ttt.TTTLayer(WIDTH, HEADS, kind=kind, mini_batch=MB, form=form, steps=steps,
                       backbone=backbone)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.RandomState(2)
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
  full = np.asarray(_jit(lambda p, x: model.apply(p, x, train=False))(params, x))

  @_jit
  def decode(params, x):
    def one(state, inputs):
      t, x_t = inputs
      y, state = model.apply(params, x_t[:, None], train=False, decode_state=state,
                             position=t)
      return state, y[:, 0]
    state = ttt.init_decode_state(model, params["params"], BATCH)
    final, ys = jax.lax.scan(one, state, (jnp.arange(seq), x[:, :seq].transpose(1, 0, 2)))
    return ys.transpose(1, 0, 2), final

  ys, final = decode(params, x)
  np.testing.assert_allclose(ys, full[:, :seq], atol=1e-5, rtol=1e-5)
  # Two full mini-batches moved W from W_0; the pending third did not finish.
  assert np.abs(np.asarray(final["W"]["W1"]) - np.asarray(params["params"]["ttt_state"]["W1"])
                ).max() > 1e-3
