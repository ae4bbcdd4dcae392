"""RWKV-4: parity with the published `rwkv` package (sequence and token by token, logits
and recurrent states), the WKV forms against each other and against eq. 14 in float64,
initialisation, checkpoints, and the spiking student."""

import dataclasses
import functools
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from models import rwkv
from ponder import errors

V, C, L, F = 61, 32, 2, 80  # vocab, n_embd, n_layer, dim_ffn: small, all different.
STATE_NAMES = ("att_x", "aa", "bb", "pp", "ffn_x")  # The package's per-layer order.


def random_state_dict(seed=0, vocab=V, embd=C, layers=L, ffn=F):
  """A random RWKV-4 state dict in the published key format and shapes, written out
  independently of models/rwkv.py (torch Linear weights are [out, in])."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: scale * rng.normal(size=shape)
  sd = {"emb.weight": normal(vocab, embd),
        "blocks.0.ln0.weight": 1 + normal(embd, scale=0.1),
        "blocks.0.ln0.bias": normal(embd, scale=0.1)}
  for i in range(layers):
    b = f"blocks.{i}."
    for ln in ("ln1", "ln2"):
      sd[b + ln + ".weight"] = 1 + normal(embd, scale=0.1)
      sd[b + ln + ".bias"] = normal(embd, scale=0.1)
    for m in "kvr":
      sd[b + f"att.time_mix_{m}"] = rng.uniform(0, 1, (1, 1, embd))
    sd[b + "att.time_decay"] = rng.uniform(-3, 1.5, embd)
    sd[b + "att.time_first"] = normal(embd, scale=0.7)
    for n in ("key", "value", "receptance", "output"):
      sd[b + f"att.{n}.weight"] = normal(embd, embd, scale=embd ** -0.5)
    for m in "kr":
      sd[b + f"ffn.time_mix_{m}"] = rng.uniform(0, 1, (1, 1, embd))
    sd[b + "ffn.key.weight"] = normal(ffn, embd, scale=embd ** -0.5)
    sd[b + "ffn.value.weight"] = normal(embd, ffn, scale=ffn ** -0.5)
    sd[b + "ffn.receptance.weight"] = normal(embd, embd, scale=embd ** -0.5)
  sd["ln_out.weight"] = 1 + normal(embd, scale=0.1)
  sd["ln_out.bias"] = normal(embd, scale=0.1)
  sd["head.weight"] = normal(vocab, embd, scale=embd ** -0.5)
  return {k: v.astype(np.float32) for k, v in sd.items()}


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model, params, ids, state):
  return model.apply({"params": params}, ids, state=state)


def _run(model, params, ids, state=None):
  state = rwkv.init_state(model.config, ids.shape[0]) if state is None else state
  logits, aux = _apply(model, params, jnp.asarray(ids), state)
  return np.asarray(logits), aux["state"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch = pytest.importorskip("torch")
  path = tmp_path_factory.mktemp("rwkv") / "tiny.pth"
  torch.save({k: torch.from_numpy(v) for k, v in random_state_dict().items()}, path)
  return path


@pytest.fixture(scope="module")
def reference(checkpoint):
  """The `rwkv` package (pure-torch CPU path) on the checkpoint: a function
  tokens, state -> (logits, state) as `rwkv.model.RWKV.forward(full_output=True)`."""
  os.environ["RWKV_JIT_ON"] = "0"
  os.environ["RWKV_CUDA_ON"] = "0"
  package = pytest.importorskip("rwkv.model")
  model = package.RWKV(str(checkpoint), "cpu fp32", verbose=False)
  return lambda tokens, state=None: model.forward(list(tokens), state, full_output=True)


def _tokens(n, seed=1):
  return np.random.default_rng(seed).integers(0, V, n)


def _assert_state_matches(ours, theirs, batch_row=0):
  """Our stacked state vs the package's list [att_xx, aa, bb, pp, ffn_xx] per layer."""
  for i in range(L):
    for j, name in enumerate(STATE_NAMES):
      chex.assert_trees_all_close(np.asarray(getattr(ours, name)[i, batch_row]),
                                  theirs[5 * i + j].numpy(), atol=1e-5, rtol=1e-5)


def _max_state_error(ours, theirs):
  return max(float(np.abs(np.asarray(getattr(ours, n)[i, 0]) - theirs[5 * i + j].numpy()).max())
             for i in range(L) for j, n in enumerate(STATE_NAMES))


@pytest.mark.parametrize("wkv", ["scan", "chunked"])
def test_sequence_matches_rwkv_package(checkpoint, reference, wkv):
  """Two rows of 23 tokens at once; each row equals the package's sequence mode."""
  model, params = rwkv.from_pth(checkpoint, wkv=wkv, wkv_chunk=8)  # 23 = 8 + 8 + 7.
  ids = np.stack([_tokens(23, 1), _tokens(23, 2)])
  logits, state = _run(model, params, ids)
  for row in range(2):
    want_logits, want_state = reference(ids[row])
    chex.assert_trees_all_close(logits[row], want_logits.numpy(), atol=1e-5, rtol=1e-5)
    _assert_state_matches(state, want_state, row)
  print(f"{wkv}: max |logit error| {np.abs(logits[1] - want_logits.numpy()).max():.2e}, "
        f"max |state error| {_max_state_error(state, reference(ids[0])[1]):.2e}")


def test_token_by_token_matches_rwkv_package(checkpoint, reference):
  """Prefill 9 tokens as a sequence, then decode 8 one at a time (the recurrent step),
  against the package decoding every token one at a time."""
  model, params = rwkv.from_pth(checkpoint)
  tokens = _tokens(17, 3)
  theirs = None
  want = []
  for tok in tokens:
    out, theirs = reference([tok], theirs)
    want.append(out.numpy())
  logits, state = _run(model, params, tokens[None, :9])
  got = list(logits[0])
  for tok in tokens[9:]:
    step_logits, state = _run(model, params, np.array([[tok]]), state)
    got.append(step_logits[0, 0])
  chex.assert_trees_all_close(np.stack(got), np.stack(want), atol=1e-5, rtol=1e-5)
  _assert_state_matches(state, theirs)
  print(f"token by token: max |logit error| {np.abs(np.stack(got) - np.stack(want)).max():.2e}"
        f", max |state error| {_max_state_error(state, theirs):.2e}")


# --- WKV forms ---------------------------------------------------------------------------


def _wkv_inputs(seed, batch=2, t=13, dim=7, k_scale=2.0):
  rng = np.random.default_rng(seed)
  w = -np.exp(rng.uniform(-3, 1.5, dim))
  u = rng.normal(size=dim)
  k = k_scale * rng.normal(size=(batch, t, dim))
  v = rng.normal(size=(batch, t, dim))
  return w, u, k, v


def _empty(batch, dim, dtype=np.float32):
  return (np.zeros((batch, dim), dtype), np.zeros((batch, dim), dtype),
          np.full((batch, dim), rwkv.MIN_VALUE, dtype))


_chunked = jax.jit(rwkv.wkv_chunked, static_argnames="chunk")


def _naive_wkv(w, u, k, v):
  """Eq. 14 as written, float64 numpy (no running maximum)."""
  _, t, _ = k.shape
  y = np.zeros_like(v)
  for s in range(t):
    num = np.exp(u + k[:, s]) * v[:, s]
    den = np.exp(u + k[:, s])
    for i in range(s):
      weight = np.exp((s - 1 - i) * w + k[:, i])
      num, den = num + weight * v[:, i], den + weight
    y[:, s] = num / den
  return y


def test_stable_wkv_equals_naive_form_float64():
  w, u, k, v = _wkv_inputs(0, t=9, k_scale=10.0)  # exp(k) up to ~e^30: fine in float64.
  with jax.enable_x64(True):
    y, _ = jax.jit(rwkv.wkv_scan)(w, u, k, v, _empty(2, 7, np.float64))
    y_chunked, _ = _chunked(w, u, k, v, _empty(2, 7, np.float64), chunk=4)
  want = _naive_wkv(w, u, k, v)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(y_chunked), want, rtol=1e-10, atol=1e-12)


def test_stable_wkv_does_not_overflow_where_naive_float32_does():
  w, u, k, v = _wkv_inputs(1, t=6)
  k = k + 100.0  # e^100 overflows float32.
  with np.errstate(over="ignore", invalid="ignore"):
    naive32 = _naive_wkv(w.astype(np.float32), u.astype(np.float32), k.astype(np.float32),
                         v.astype(np.float32))
  assert not np.isfinite(naive32).all()
  y, _ = jax.jit(rwkv.wkv_scan)(*(jnp.float32(x) for x in (w, u, k, v)), _empty(2, 7))
  # WKV is invariant to adding a constant to every k, so float64 can check it.
  np.testing.assert_allclose(np.asarray(y), _naive_wkv(w, u, k - 100.0, v),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_parallel_wkv_equals_recurrent(chunk):
  """wkv_chunked (chunk >= T: fully parallel) == wkv_scan == a Python loop of the
  decoding step, outputs and states, from a nonzero initial state."""
  w, u, k, v = (jnp.float32(x) for x in _wkv_inputs(2))
  _, _, k0, v0 = (jnp.float32(x) for x in _wkv_inputs(3, t=5))
  scan = jax.jit(rwkv.wkv_scan)
  _, state0 = scan(w, u, k0, v0, _empty(2, 7))  # A state after 5 tokens.
  y_scan, s_scan = scan(w, u, k, v, state0)
  y_par, s_par = _chunked(w, u, k, v, state0, chunk=chunk)
  step = jax.jit(rwkv.wkv_step)
  state, ys = state0, []
  for t in range(k.shape[1]):
    y, state = step(w, u, k[:, t], v[:, t], state)
    ys.append(y)
  chex.assert_trees_all_close(y_scan, jnp.stack(ys, 1), atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(y_par, y_scan, atol=2e-6, rtol=2e-5)
  chex.assert_trees_all_close(s_par, s_scan, atol=2e-6, rtol=2e-5)
  chex.assert_trees_all_close(s_scan, state, atol=1e-6, rtol=1e-6)


def test_chunked_wkv_gradients_equal_scan():
  w, u, k, v = (jnp.float32(x) for x in _wkv_inputs(4, t=10))
  ct = jnp.float32(np.random.default_rng(5).normal(size=k.shape))

  def loss(form, w, u, k, v):
    y, (a, b, _) = form(w, u, k, v, _empty(2, 7))
    return jnp.sum(ct * y) + jnp.sum(a / b)

  grad = lambda form: jax.jit(jax.grad(functools.partial(loss, form), argnums=(0, 1, 2, 3)))
  grads = grad(rwkv.wkv_scan)(w, u, k, v)
  want = grad(functools.partial(rwkv.wkv_chunked, chunk=4))(w, u, k, v)
  chex.assert_trees_all_close(grads, want, atol=1e-4, rtol=1e-4)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# --- Initialisation, config, checkpoints ------------------------------------------------


def _init(cfg, seq=1):
  model = rwkv.RWKV(cfg)
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"]


def test_initialisation_follows_rwkv_v4neo():
  cfg = rwkv.RWKVConfig(vocab_size=V, n_embd=C, n_layer=3)
  _, params = _init(cfg)
  h = np.arange(C)
  for layer, (r01, r10) in enumerate([(0.0, 1.0), (0.5, 2 / 3), (1.0, 1 / 3)]):
    att = params[f"blocks_{layer}"]["att"]
    np.testing.assert_allclose(att["time_decay"], -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01),
                               rtol=1e-6)
    np.testing.assert_allclose(att["time_first"],
                               np.log(0.3) + 0.5 * ((h + 1) % 3 - 1), rtol=1e-6)
    np.testing.assert_allclose(att["time_mix_v"], (h / C) ** r10 + 0.3 * r01, rtol=1e-6)
    np.testing.assert_allclose(att["time_mix_r"], (h / C) ** (0.5 * r10), rtol=1e-6)
    ffn = params[f"blocks_{layer}"]["ffn"]
    for zero in (att["key"], att["receptance"], att["output"], ffn["receptance"],
                 ffn["value"]):
      assert not np.asarray(zero["kernel"]).any()
    value = np.asarray(att["value"]["kernel"])
    np.testing.assert_allclose(value.T @ value, np.eye(C), atol=1e-5)
  assert np.abs(np.asarray(params["emb"]["embedding"])).max() <= 1e-4


def test_config_errors():
  with pytest.raises(errors.ConfigError, match="wkv form"):
    rwkv.RWKVConfig(wkv="cuda")
  with pytest.raises(errors.ConfigError, match="spike site"):
    rwkv.RWKVConfig(spike="ternary", spike_sites=("att_q",))
  with pytest.raises(errors.ConfigError, match="preset"):
    rwkv.config("huge")
  assert rwkv.config("169m").n_layer == 12


def test_checkpoint_round_trip_and_student_from_teacher(checkpoint, tmp_path):
  model, params = rwkv.from_pth(checkpoint)
  rwkv.to_pth(params, tmp_path / "again.pth")
  _, again = rwkv.from_pth(tmp_path / "again.pth")
  chex.assert_trees_all_equal(params, again)
  student, sparams = rwkv.from_pth(checkpoint, spike="ternary")
  flat, sflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(sparams)
  for path, value in sflat.items():
    if "spike" in path:
      init = 1.0 if path[-1] == "alpha" else 0.5
      chex.assert_trees_all_equal(value, jnp.full(value.shape, init))
    else:
      chex.assert_trees_all_equal(value, flat[path])
  assert sum("spike" in p for p in sflat) == 2 * L * 5  # alpha, theta at 5 sites.
  rwkv.to_pth(sparams, tmp_path / "student.pth")  # Spike parameters round-trip too.
  chex.assert_trees_all_equal(rwkv.from_pth(tmp_path / "student.pth", spike="ternary")[1],
                              sparams)


def test_checkpoint_errors(checkpoint, monkeypatch, tmp_path):
  sd = random_state_dict(layers=1)
  with pytest.raises(errors.CheckpointError, match="not an RWKV-4"):
    rwkv.from_state_dict({**sd, "blocks.0.att.ln_x.weight": np.ones(C, np.float32)})
  with pytest.raises(errors.CheckpointError, match="missing keys.*time_first"):
    rwkv.from_state_dict({k: v for k, v in sd.items() if "time_first" not in k})
  with pytest.raises(errors.MissingDataError):
    rwkv.from_pth(tmp_path / "absent.pth")
  monkeypatch.setitem(sys.modules, "torch", None)  # As if torch were not installed.
  with pytest.raises(errors.CheckpointError, match="needs torch"):
    rwkv.from_pth(checkpoint)


def test_hidden_states_are_block_inputs_and_outputs(checkpoint):
  model, params = rwkv.from_pth(checkpoint)
  ids = jnp.asarray(_tokens(6)[None])
  logits, aux = jax.jit(functools.partial(model.apply, output_hidden_states=True))(
      {"params": params}, ids)
  hidden = aux["hidden_states"]
  chex.assert_shape(hidden, (L + 1, 1, 6, C))
  ln_out = params["ln_out"]
  x = hidden[-1]
  x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
  x = x * ln_out["scale"] + ln_out["bias"]
  chex.assert_trees_all_close(x @ params["head"]["kernel"], logits, atol=1e-4)


# --- The spiking student -----------------------------------------------------------------


@pytest.mark.parametrize("spike", ["ternary", "lif"])
def test_spiking_student_sequence_equals_token_by_token(spike):
  """The spiking student (LIF membranes in the state) decodes token by token exactly
  as it runs the sequence; the packed ternary_matmul path gives the same logits."""
  sd = random_state_dict(seed=4)
  for key in sd:  # Larger mixes of the input so that LIF neurons fire.
    if key.endswith(("key.weight", "value.weight", "receptance.weight")):
      sd[key] = 3 * sd[key]
  model, params = rwkv.from_state_dict(sd, spike=spike, spike_sites=rwkv.SPIKE_SITES)
  ids = np.stack([_tokens(5, 5), _tokens(5, 6)])
  logits, state = _run(model, params, ids)
  step_state, steps = rwkv.init_state(model.config, 2), []
  for t in range(ids.shape[1]):
    out, step_state = _run(model, params, ids[:, t:t + 1], step_state)
    steps.append(out[:, 0])
  chex.assert_trees_all_close(np.stack(steps, 1), logits, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(step_state, state, atol=1e-5, rtol=1e-5)
  packed = rwkv.RWKV(dataclasses.replace(model.config, spike_matmul="packed"))
  packed_logits, _ = _run(packed, params, ids)
  chex.assert_trees_all_close(packed_logits, logits, atol=1e-4, rtol=1e-5)
  _, inter = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
      {"params": params}, jnp.asarray(ids))
  rates = np.array(jax.tree.leaves(inter))
  assert rates.size == L * len(rwkv.SPIKE_SITES)
  assert (rates > 0).any() and (rates < 1).all()
  if spike == "lif":
    assert set(state.lif) == set(rwkv.SPIKE_SITES)


def test_spiking_student_is_causal():
  model, params = rwkv.from_state_dict(random_state_dict(seed=7), spike="lif")
  ids = _tokens(8, 8)[None]
  changed = ids.copy()
  changed[0, 5:] = (changed[0, 5:] + 1) % V
  a, _ = _run(model, params, ids)
  b, _ = _run(model, params, changed)
  chex.assert_trees_all_equal(a[:, :5], b[:, :5])
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 0


def test_spiking_student_gradients_reach_spike_parameters():
  model, params = rwkv.from_state_dict(random_state_dict(seed=9), spike="ternary")
  ids = jnp.asarray(_tokens(6, 10)[None])
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, ids).std()))(params)
  spike = [g for p, g in traverse_util.flatten_dict(grads).items() if "spike" in p]
  assert len(spike) == 2 * L * 5
  assert all(np.isfinite(np.asarray(g)).all() for g in spike)
  assert sum(float(np.abs(g).sum()) > 0 for g in spike) >= len(spike) - 2


# --- Generation --------------------------------------------------------------------------


def test_generate_with_state_equals_greedy_recomputation():
  """Greedy decoding through the recurrent state (WKV state and LIF membranes) picks,
  token for token, the argmax of the logits that a full forward pass over the sequence
  so far gives (a fixed zero-padded buffer: causality makes the padding irrelevant, and
  one compilation serves every step)."""
  sd = random_state_dict(seed=11)
  for key in sd:  # Larger mixes of the input so that LIF neurons fire.
    if key.endswith(("key.weight", "value.weight", "receptance.weight")):
      sd[key] = 3 * sd[key]
  model, params = rwkv.from_state_dict(sd, spike="lif")
  prompt = np.stack([_tokens(4, 12), _tokens(4, 13)])
  n = 7
  got = np.asarray(rwkv.generate(model, params, prompt, key=jax.random.key(0),
                                 max_new_tokens=n, temperature=0.0))
  np.testing.assert_array_equal(got[:, :4], prompt)
  full = jax.jit(lambda ids: model.apply({"params": params}, ids))
  want = np.zeros((2, 4 + n), np.int32)
  want[:, :4] = prompt
  for i in range(n):
    want[:, 4 + i] = np.argmax(np.asarray(full(jnp.asarray(want)))[:, 3 + i], axis=-1)
    np.testing.assert_array_equal(got[:, :5 + i], want[:, :5 + i], err_msg=f"token {i}")
  assert len(set(got[:, 4:].ravel().tolist())) > 1  # Not a constant continuation.
  with pytest.raises(errors.ShapeError, match="prompt"):
    rwkv.generate(model, params, prompt[0], key=jax.random.key(0), max_new_tokens=2)


def test_generate_sampling_with_state_equals_recomputation():
  """Sampling (temperature, top-k, top-p; token i drawn with fold_in(key, i)) gives the
  same tokens through the recurrent state as with full recomputation."""
  model, params = rwkv.from_state_dict(random_state_dict(seed=11))
  prompt = np.stack([_tokens(4, 12), _tokens(4, 13)])
  kw = dict(key=jax.random.key(3), max_new_tokens=7, temperature=1.0, top_k=10, top_p=0.9)
  sampled = rwkv.generate(model, params, prompt, **kw)
  np.testing.assert_array_equal(sampled,
                                rwkv.generate(model, params, prompt, use_state=False, **kw))
  assert not np.array_equal(sampled, rwkv.generate(model, params, prompt,
                                                   **{**kw, "key": jax.random.key(4)}))
