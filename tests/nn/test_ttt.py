"""TTT layers (ponder/nn/ttt.py) against a token-by-token reference written here from the
paper's rules, the dual form against the grad form, finite differences, causality, the
SKIP / switch / per-token step controls, and the analytic FLOP count against XLA's."""

import functools

import chex
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
  """grad_W l(W; x_s) for one token: l = ||f(theta_K x; W) - theta_V x||^2 (Sec. 2.3)."""
  return jax.grad(lambda w: jnp.sum(jnp.square(_f(w, k, scale, bias, kind) - v)))(w)


_f_jit = jax.jit(_f, static_argnames="kind")


def reference_ttt(inputs, token_steps, *, kind, mini_batch):
  """Token t of a mini-batch starting at t': W_t^(0) = W_t', and for j = 1..max k,
  W_t^(j) = W_t^(j-1) - sum_{t' < s <= t, k_s >= j} eta_s grad l(W_t^(j-1); x_s) (for
  j = 1 this is the paper's mini-batch rule, Sec. 2.4, one token's gradient at a time);
  z_t = f(theta_Q x_t; W_t^(k)) and the last token's W starts the next mini-batch.
  token_steps [batch, seq]. Returns z [batch, heads, seq, dim] and the final state."""
  state, xq, xk, xv, eta, ln_scale, ln_bias = jax.tree.map(np.asarray, inputs)
  batch, heads, seq, _ = xq.shape
  token_steps = np.asarray(token_steps)
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
                  update[n] += eta[i, h, s] * np.asarray(g[n], np.float64)
            w = {n: w[n] - update[n] for n in w}
          out[i, h, t] = _f_jit(w, xq[i, h, t], scale, bias, kind)
        start = w
      finals.append(start)
  final = {n: np.stack([f[n] for f in finals]).reshape(state[n].shape) for n in state}
  return out, final


def _steps_everywhere(k):
  return np.full((BATCH, SEQ), k)


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,form,steps", [
    ("linear", "dual", 1), ("linear", "dual", 2), ("linear", "grad", 2), ("mlp", "grad", 2)])
def test_matches_token_by_token_reference(kind, form, steps):
  inputs = make_inputs(kind)
  z, final = scan_static(*inputs, kind=kind, form=form, mini_batch=MB, steps=steps)
  z_ref, final_ref = reference_ttt(inputs, _steps_everywhere(steps), kind=kind, mini_batch=MB)
  chex.assert_trees_all_close(z, z_ref, atol=2e-5, rtol=1e-5)
  chex.assert_trees_all_close(final, final_ref, atol=2e-5, rtol=1e-5)
  # The inner loop did something: the outputs moved away from those of W_0.
  z_skip, _ = scan_static(*inputs, kind=kind, form=form, mini_batch=MB, steps=0)
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
# update (steps after the second).
@pytest.mark.parametrize("steps", [2, 4])
def test_grad_and_dual_forms_agree(steps):
  inputs = make_inputs("linear", seed=2)
  z_grad, w_grad = scan_static(*inputs, kind="linear", form="grad", mini_batch=MB, steps=steps)
  z_dual, w_dual = scan_static(*inputs, kind="linear", form="dual", mini_batch=MB, steps=steps)
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
    _, final = reference_ttt(inputs, np.full((BATCH, MB), j), kind=kind, mini_batch=MB)
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
  np.testing.assert_allclose(
      xk, (x @ params["wk"]["kernel"]).reshape(1, SEQ, 2, 4).transpose(0, 2, 1, 3),
      rtol=1e-5, atol=1e-6)


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
