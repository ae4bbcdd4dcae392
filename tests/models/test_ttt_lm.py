"""The TTT language model: shapes for every kind of steps, causality, the "add" branch
against plain GPT-2, the adaptive two-pass rule, and FLOPs that fall with k."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from models import gpt2
from models import ttt_lm
from ponder import errors
from ponder.analysis import flops as flops_lib
from ponder.nn import ponder_alloc

MB = 8
TINY = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            ttt_mini_batch=MB, ttt_positions=(1,))


def _config(**overrides):
  return ttt_lm.TTTLMConfig(**{**TINY, **overrides})


def _ids(batch, seq, seed=0):
  return np.random.RandomState(seed).randint(0, TINY["vocab_size"], (batch, seq)).astype(
      np.int32)


def _params(model, seq=32, seed=1, scale=0.3):
  """Random parameters of the right shapes, without compiling `init`."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, seq), jnp.int32))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape).astype(s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _apply_static(model, params, ids, steps=None):
  return model.apply({"params": params}, ids, steps=steps)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_array(model, params, ids, steps):
  return model.apply({"params": params}, ids, steps=steps)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_shapes_for_every_kind_of_steps(mode):
  model = ttt_lm.TTTLM(_config(ttt_mode=mode, ttt_form="dual"))
  params = _params(model)
  names = set(params["h_1"])
  assert "ttt" in names and ("attn" in names) == (mode == "add")
  assert ("ln_ttt" in names) == (mode == "add") and "ttt" not in params["h_0"]
  seq = 29  # Not a multiple of the mini-batch: padded inside.
  ids = _ids(2, seq)
  outs = [_apply_static(model, params, ids), _apply_static(model, params, ids, steps=0),
          _apply_array(model, params, ids, np.array([0, 1, 2, 4])),
          _apply_array(model, params, ids, np.random.RandomState(0).choice(4, (2, seq))),
          _apply_static(model, params, ids, steps="adaptive")]
  for out in outs:
    assert out.shape == (2, seq, TINY["vocab_size"]) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-5  # k matters.
  with pytest.raises(errors.ShapeError):
    _apply_array(model, params, ids, np.ones((2, seq + 1), np.int32))


def _assert_causal(fn, ids, t):
  base = np.asarray(fn(ids))
  changed = ids.copy()
  changed[:, t + 1:] = (changed[:, t + 1:] + 1) % TINY["vocab_size"]
  out = np.asarray(fn(changed))
  np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
  assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


def test_whole_lm_is_causal_for_fixed_and_adaptive_steps():
  cfg = _config(ttt_mode="replace", ttt_positions=(0, 1))
  model = ttt_lm.TTTLM(cfg)
  params = _params(model)
  ids = _ids(2, 32)
  for t in (5, 19):  # Inside the first and the third mini-batch.
    _assert_causal(lambda x: _apply_static(model, params, x, steps=2), ids, t)
    _assert_causal(lambda x: _apply_array(model, params, x, np.array([4, 0, 1, 2])), ids, t)
  # Adaptive with fixed thresholds (calibrated on this batch's SKIP pass): every token's
  # k reads only positions it sees.
  probe = _apply_static(model, params, ids, steps=0)
  difficulty = ponder_alloc.mini_batch_difficulty(probe, MB).mean(0)
  thresholds = tuple(float(x) for x in ponder_alloc.calibrate(difficulty, (0.25, 0.5, 0.25)))
  adaptive = ttt_lm.TTTLM(dataclasses.replace(cfg, ponder_thresholds=thresholds))
  steps = np.asarray(ttt_lm.adaptive_steps(adaptive.config, probe))
  assert len(set(steps.tolist())) > 1, steps  # A real mix of k.
  for t in (5, 19):
    _assert_causal(lambda x: _apply_static(adaptive, params, x, steps="adaptive"), ids, t)


@pytest.mark.parametrize("granularity", ["batch", "example"])
def test_adaptive_is_a_skip_pass_then_the_allocated_steps(granularity):
  cfg = _config(ttt_steps="adaptive", ponder_granularity=granularity)
  model = ttt_lm.TTTLM(cfg)
  params = _params(model)
  ids = _ids(3, 32, seed=4)
  probe = _apply_static(model, params, ids, steps=0)
  steps = ttt_lm.adaptive_steps(cfg, probe)
  assert steps.shape == ((4,) if granularity == "batch" else (3, 32))
  budgeted = ttt_lm.adaptive_steps(dataclasses.replace(cfg, ponder_budget=1.8), probe)
  assert float(np.mean(budgeted)) <= 1.8 < float(np.mean(steps))
  np.testing.assert_allclose(_apply_static(model, params, ids),  # steps=None -> adaptive
                             _apply_array(model, params, ids, steps), atol=1e-5, rtol=1e-5)
  # The SKIP pass sends no gradient: the loss gradient is that of the second pass alone.
  loss = lambda p, s: model.apply({"params": p}, ids, steps=s).mean()
  g_adaptive = jax.jit(lambda p: jax.grad(loss)(p, "adaptive"))(params)
  g_fixed = jax.jit(lambda p: jax.grad(loss)(p, steps))(params)
  for a, b in zip(jax.tree.leaves(g_adaptive), jax.tree.leaves(g_fixed)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_add_mode_with_zero_output_projection_is_plain_gpt2():
  cfg = _config(ttt_mode="add", ttt_positions=(0, 1))
  model = ttt_lm.TTTLM(cfg)
  params = traverse_util.flatten_dict(_params(model, scale=0.1))
  for i in cfg.ttt_positions:
    params[(f"h_{i}", "ttt", "wo", "kernel")] = np.zeros_like(
        params[(f"h_{i}", "ttt", "wo", "kernel")])
  reference = gpt2.GPT2(cfg.gpt2_config())
  gpt2_params = traverse_util.unflatten_dict(
      {k: v for k, v in params.items() if k[1] not in ("ttt", "ln_ttt")})
  params = traverse_util.unflatten_dict(params)
  ids = _ids(2, 32, seed=2)
  expected = jax.jit(lambda p, x: reference.apply({"params": p}, x))(gpt2_params, ids)
  for steps in (0, 2):
    np.testing.assert_allclose(_apply_static(model, params, ids, steps=steps), expected,
                               atol=1e-6, rtol=1e-6)


def test_initial_output_projection_keeps_the_residual_stream_gpt2_scaled():
  # Beside attention theta_O starts at 0 (the test above: the model starts as GPT-2); in
  # attention's place it has attention's c_proj std, not the unit-scale branch's 0.02.
  for mode, std in (("add", 0.0), ("replace", gpt2.residual_std(_config()))):
    model = ttt_lm.TTTLM(_config(ttt_mode=mode, n_embd=64))
    params = model.init(jax.random.key(0), jnp.zeros((1, MB), jnp.int32))["params"]
    wo = np.asarray(params["h_1"]["ttt"]["wo"]["kernel"])
    np.testing.assert_allclose(wo.std(), std, rtol=0.1, atol=1e-12)


def test_compiled_flops_fall_with_fewer_steps():
  # One TTT head of head_dim 32 and one mini-batch of 16: the shapes where ttt.py's
  # analytic count is tested against XLA's (whose cost analysis counts a loop body once,
  # hence a single mini-batch).
  cfg = _config(ttt_heads=1, ttt_mini_batch=16, ttt_positions=(0, 1), ttt_mode="replace")
  model = ttt_lm.TTTLM(cfg)
  batch, seq = 1, 16
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((batch, seq), jnp.int32))
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  counts = {k: flops_lib.compiled_flops(
      functools.partial(model.apply, steps=k), params, ids) for k in (4, 2, 1, 0)}
  assert counts[4] > counts[2] > counts[1] > counts[0], counts
  # The differences are the inner loops' extra steps (the rest of the model is shared).
  for k in (1, 2, 4):
    analytic = (ttt_lm.ttt_flops_per_token(cfg, k) - ttt_lm.ttt_flops_per_token(cfg, 0))
    measured = (counts[k] - counts[0]) / (batch * seq)
    assert abs(measured - analytic) <= 0.15 * measured, (k, measured, analytic)


def test_bad_configs_raise_clear_errors():
  with pytest.raises(errors.ConfigError, match="ttt_positions"):
    _config(ttt_positions=(2,))
  with pytest.raises(errors.ConfigError, match="valid: add, replace"):
    _config(ttt_mode="both")
  with pytest.raises(errors.ConfigError, match="linear"):
    _config(ttt_kind="mlp", ttt_form="dual")
  with pytest.raises(errors.ConfigError, match="adaptive"):
    _config(ttt_steps="sometimes")
  with pytest.raises(errors.ConfigError, match="ponder_thresholds"):
    _config(ponder_thresholds=(1.0,))
  cfg = ttt_lm.config("tiny", vocab_size=11, ttt_positions=[1])
  assert cfg.ttt_positions == (1,) and hash(cfg)
