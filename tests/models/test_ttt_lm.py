"""The TTT language model: shapes for every kind of steps, causality, the "add" branch
against plain GPT-2, the adaptive two-pass rule, FLOPs that fall with k, sliding-window
attention against a reference, the TTT-MLP learning-rate warm-up, and incremental
decoding against full recomputation."""

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
  with pytest.raises(errors.ConfigError, match="valid: inverse, none"):
    _config(ttt_token_idx="mean")
  with pytest.raises(errors.ConfigError, match="valid: M, T"):
    _config(ttt_backbone="S")
  with pytest.raises(errors.ConfigError, match="attn_window"):
    _config(attn_window=-1)
  cfg = ttt_lm.config("tiny", vocab_size=11, ttt_positions=[1])
  assert cfg.ttt_positions == (1,) and hash(cfg)


def test_attention_mask_is_causal_band():
  q = k = jnp.arange(9)
  for window in (0, 1, 3, 9, 20):
    ones = np.ones((9, 9), bool)
    expected = np.tril(ones) if window == 0 else np.tril(ones) & ~np.tril(ones, -window)
    np.testing.assert_array_equal(ttt_lm.attention_mask(q, k, window), expected)


def test_window_attention_matches_a_reference_and_full_attention():
  """Sliding-window attention against a numpy softmax over each query's last `window`
  keys; a window as long as the sequence is GPT-2's causal attention (same params)."""
  cfg = _config(attn_window=3)
  x = np.random.RandomState(3).standard_normal((2, 7, TINY["n_embd"])).astype(np.float32)
  pos = jnp.arange(7)
  attn = ttt_lm.WindowAttention(cfg)
  params = attn.init(jax.random.key(0), x, positions=pos, kv_cache=None, train=False)
  params = jax.tree.map(lambda p: p + 0.05, params)  # Non-zero biases.
  out, _ = attn.apply(params, x, positions=pos, kv_cache=None, train=False)
  p = params["params"]
  h, hd = cfg.n_head, cfg.head_dim
  qkv = (x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"]).reshape(2, 7, 3, h, hd)
  expected = np.zeros((2, 7, h, hd))
  for t in range(7):
    keys = slice(max(0, t - 2), t + 1)
    scores = np.einsum("bhd,bkhd->bhk", qkv[:, t, 0], qkv[:, keys, 1]) / np.sqrt(hd)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected[:, t] = np.einsum("bhk,bkhd->bhd", probs, qkv[:, keys, 2])
  expected = expected.reshape(2, 7, h * hd) @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  wide = ttt_lm.WindowAttention(dataclasses.replace(cfg, attn_window=7))
  full, _, _ = gpt2.Attention(cfg).apply(params, x, positions=pos, gate=None,
                                         kv_cache=None, train=False, return_probs=False)
  np.testing.assert_allclose(wide.apply(params, x, positions=pos, kv_cache=None,
                                        train=False)[0], full, atol=1e-5, rtol=1e-5)


# Decoding: 2.5 mini-batches of 4, TTT beside sliding-window attention with the Mamba
# backbone's layer, and TTT-MLP in attention's place.
DECODE = dict(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2,
              ttt_mini_batch=4, ttt_positions=(1,))


@pytest.mark.parametrize("overrides", [
    dict(ttt_mode="add", ttt_form="dual", ttt_steps=2, attn_window=5, ttt_backbone="M"),
    dict(ttt_mode="replace", ttt_kind="mlp", ttt_steps=1)])
def test_incremental_decoding_equals_full_recomputation(overrides):
  cfg = ttt_lm.TTTLMConfig(**{**DECODE, **overrides})
  model = ttt_lm.TTTLM(cfg)
  params = _params(model, seq=8)
  ids = np.random.RandomState(5).randint(0, 31, (2, 10)).astype(np.int32)
  full = _apply_static(model, params, ids)

  @jax.jit
  def decode(params, ids):
    def one(cache, token):
      logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
      return cache, logits[:, 0]
    cache = ttt_lm.init_cache(model, params, 2, 10)
    return jax.lax.scan(one, cache, ids.T)[1].transpose(1, 0, 2)

  np.testing.assert_allclose(decode(params, ids), full, atol=1e-5, rtol=1e-5)
  prompt = ids[:, :3]
  greedy = [np.asarray(ttt_lm.generate(model, params, prompt, key=jax.random.key(0),
                                       max_new_tokens=7, temperature=0.0, use_cache=c))
            for c in (True, False)]
  np.testing.assert_array_equal(greedy[0], greedy[1])
  assert len(set(greedy[0][:, 3:].ravel().tolist())) > 1  # Not a constant continuation.
  with pytest.raises(errors.ConfigError, match="steps"):
    ttt_lm.generate(ttt_lm.TTTLM(dataclasses.replace(cfg, ttt_steps="adaptive")), params,
                    prompt, key=jax.random.key(0), max_new_tokens=2)


def test_ttt_base_lr_warms_up_for_mlp_as_the_code():
  mlp = _config(ttt_kind="mlp")  # The code's TTT-MLP: 0.1, from 0.01 over 10% of steps.
  assert mlp.base_lr == 0.1 and _config().base_lr == 1.0
  mult = [float(ttt_lm.ttt_lr_mult(mlp, s, 1000)) for s in (0, 50, 100, 500)]
  np.testing.assert_allclose(mult, [0.1, 0.55, 1.0, 1.0], rtol=1e-6)
  assert float(ttt_lm.ttt_lr_mult(_config(), 0, 1000)) == 1.0  # TTT-Linear: none.
  # The multiplier scales eta: lr_mult 0 is SKIP's output.
  model = ttt_lm.TTTLM(_config(ttt_mode="replace"))
  params = _params(model)
  ids = _ids(1, 16)
  apply = jax.jit(lambda m: model.apply({"params": params}, ids, steps=1, ttt_lr_mult=m))
  np.testing.assert_allclose(apply(0.0), _apply_static(model, params, ids, steps=0),
                             atol=1e-6, rtol=1e-6)
