"""PerforatedAI dendrites: the layer, growth, the tracker and cascade correlation.

The published package (perforatedai 3.2.9, torch CPU) is the reference: its state dict
loaded into ponder gives the same outputs, and the same validation scores fed to its
tracker and to ponder's give the same decisions. It is configured non-interactively,
writes only under tmp_path and never reaches the network.
"""

import contextlib
import importlib
import io
import os

import chex
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ponder import errors
from ponder.analysis import dendrite_plots
from ponder.nn import perforated as P


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


class MLP(nn.Module):
  """Linear(4, 8) -> ReLU -> Linear(8, 3), the torch model of the parity tests."""
  num_dendrites: int = 0
  paths: tuple = ("fc*",)

  @nn.compact
  def __call__(self, x):
    spec = P.DendriteSpec(self.num_dendrites, self.paths)
    x = nn.relu(P.dense(self, 8, name="fc0", spec=spec)(x))
    return P.dense(self, 3, name="fc1", spec=spec)(x)


# --- cascade correlation ---------------------------------------------------------------


def test_cascade_correlation_hand_value():
  a = jnp.array([1.0, 2.0, 3.0, 4.0])
  e = jnp.array([[1.0, 3.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
  # a - mean = [-1.5, -0.5, 0.5, 1.5]; e - mean = [0, -1, 0, 1], [1.75, -.25, -.25, -1.25]
  # covariances 2.0 and -4.5: S = 2.0 + 4.5.
  np.testing.assert_allclose(P.cascade_correlation(a, e), 6.5, rtol=1e-6)
  # One candidate per output: channel 1's candidate [0, 1, 0, 2] (deviations
  # [-.75, .25, -.75, 1.25]) against its own error: covariance -2.75.
  a2 = jnp.stack([a, jnp.array([0.0, 1.0, 0.0, 2.0])], axis=-1)
  np.testing.assert_allclose(P.cascade_correlation(a2, e), 2.0 + 2.75, rtol=1e-6)
  # Pearson form: a perfectly (anti)correlated channel scores 1.
  np.testing.assert_allclose(
      P.cascade_correlation(a, jnp.stack([a, -2 * a + 1], -1), normalize=True), 2.0,
      rtol=1e-5)


def _s_numpy(a, e):
  da, de = a - a.mean(0), e - e.mean(0)
  return np.abs((da * de).sum(0)).sum()


def test_cascade_correlation_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  a, e = rng.normal(size=(6, 3)), rng.normal(size=(2, 3, 3))  # examples: 2 x 3 positions
  grad = np.asarray(jax.grad(P.cascade_correlation)(jnp.asarray(a, jnp.float32),
                                                    jnp.asarray(e, jnp.float32)))
  fd, eps, e2 = np.zeros_like(a), 1e-6, e.reshape(6, 3)
  for idx in np.ndindex(a.shape):
    hi, lo = a.copy(), a.copy()
    hi[idx] += eps
    lo[idx] -= eps
    fd[idx] = (_s_numpy(hi, e2) - _s_numpy(lo, e2)) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)


# --- the layer and growth --------------------------------------------------------------


def test_zero_dendrites_is_dense():
  x = _normal(0, (2, 5, 4))
  ref = nn.Dense(6)
  params = ref.init(jax.random.key(0), x)["params"]
  layer = P.DendriticDense(6)
  chex.assert_trees_all_equal_shapes(layer.init(jax.random.key(0), x)["params"], params)
  chex.assert_trees_all_close(layer.apply({"params": params}, x),
                              ref.apply({"params": params}, x), atol=0)


def _reference(params, x):
  """The module docstring's equations, dendrite by dendrite, in numpy."""
  sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x, np.float64)
  y = x @ p["kernel"] + p["bias"]
  acts = []
  for c in range(p["u"].shape[0]):
    z = x @ p[f"dendrite_{c}"]["kernel"] + p[f"dendrite_{c}"]["bias"]
    for j in range(c):
      z = z + p[f"v_{c}"][j] * acts[j]
    acts.append(sig(z))
  return y + sum(p["u"][c] * acts[c] for c in range(len(acts)))


def test_three_dendrites_match_equations():
  x = _normal(1, (3, 7, 5))
  layer = P.DendriticDense(4, num_dendrites=3)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: _normal(t.size, t.shape, 0.7), params)  # nonzero u, v
  np.testing.assert_allclose(jax.jit(layer.apply)({"params": params}, x), _reference(params, x),
                             atol=2e-6)


def test_grow_keeps_outputs_and_gives_u_a_gradient():
  x = _normal(2, (5, 4))
  params = jax.eval_shape(MLP(1).init, jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: _normal(t.size, t.shape, 0.5), params)
  grown = P.grow(params, ["fc*"], jax.random.key(1))
  assert P.dendrite_layers(grown) == {"fc0": 2, "fc1": 2}
  chex.assert_trees_all_equal_shapes(grown, MLP(2).init(jax.random.key(0), x)["params"])
  np.testing.assert_array_equal(jax.jit(MLP(2).apply)({"params": grown}, x),
                                jax.jit(MLP(1).apply)({"params": params}, x))
  new = grown["fc0"]["dendrite_1"]
  assert 0 < float(jnp.std(new["kernel"])) < 0.05 and float(jnp.std(new["bias"])) > 0
  assert not np.any(grown["fc0"]["u"][1]) and not np.any(grown["fc0"]["v_1"])

  loss = lambda p: jnp.sum(MLP(2).apply({"params": p}, x) ** 2)  # noqa: E731
  g = jax.jit(jax.grad(loss))(grown)
  for name in ("fc0", "fc1"):
    assert float(jnp.abs(g[name]["u"][1]).max()) > 1e-4
    # Through u = 0 nothing reaches the new dendrite until u has moved.
    assert not np.any(g[name]["dendrite_1"]["kernel"]) and not np.any(g[name]["v_1"])


def test_dense_helper_wraps_only_matching_paths():
  x = _normal(3, (2, 4))
  params = MLP(2, paths=("fc1",)).init(jax.random.key(0), x)["params"]
  assert P.dendrite_layers(params) == {"fc1": 2}
  assert set(params["fc0"]) == {"kernel", "bias"}
  with pytest.raises(errors.ConfigError, match="fc0"):
    P.grow(params, ["encoder/*"], jax.random.key(0))


# --- rule "cc": candidate training -----------------------------------------------------


def test_cc_step_trains_only_the_candidate_and_raises_correlation():
  x, target = _normal(4, (32, 4)), _normal(5, (32, 3))
  params = P.grow(jax.jit(MLP(1).init)(jax.random.key(0), x)["params"], ["fc*"],
                  jax.random.key(1))
  batch = {"x": x, "y": target}
  apply_fn = lambda v, b, mutable: MLP(2).apply(v, b["x"], mutable=mutable)  # noqa: E731
  loss_fn = lambda out, b: jnp.mean((out - b["y"]) ** 2)  # noqa: E731
  tx = optax.adamw(1e-2, weight_decay=0.1)  # decay must not move the frozen weights
  step = jax.jit(lambda p, s: P.dendrite_step(p, s, batch, rule="cc", apply_fn=apply_fn,
                                              loss_fn=loss_fn, tx=tx))
  state, new = tx.init(params), params
  history = []
  for _ in range(20):
    new, state, metrics = step(new, state)
    history.append(float(metrics["correlation"]))
  assert history[-1] > 2 * history[0]
  mask = P.candidate_mask(params)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), new, params)
  assert jax.tree.leaves(moved) == jax.tree.leaves(mask)
  # The candidate's u row is 0: the network still computes what it did.
  np.testing.assert_array_equal(MLP(2).apply({"params": new}, x),
                                MLP(2).apply({"params": params}, x))
  with pytest.raises(errors.ConfigError, match="gd"):
    P.dendrite_step(params, state, batch, rule="bp", apply_fn=apply_fn, loss_fn=loss_fn,
                    tx=tx)
  _, _, gd = P.dendrite_step(params, tx.init(params), batch, rule="gd", apply_fn=apply_fn,
                             loss_fn=loss_fn, tx=tx)
  np.testing.assert_allclose(gd["loss"], loss_fn(MLP(2).apply({"params": params}, x),
                                                 batch), rtol=1e-6)


# --- the published package -------------------------------------------------------------


@pytest.fixture
def pai(tmp_path, monkeypatch):
  """perforatedai configured for an unattended test run in tmp_path."""
  torch = pytest.importorskip("torch")
  with contextlib.redirect_stdout(io.StringIO()):
    gpa = pytest.importorskip("perforatedai.globals_perforatedai")
    upa = importlib.import_module("perforatedai.utils_perforatedai")
  import pdb  # pylint: disable=g-import-not-at-top

  def no_prompt(*_, **__):
    raise AssertionError("perforatedai asked for interactive input")

  monkeypatch.setattr("builtins.input", no_prompt)
  monkeypatch.setattr(pdb, "set_trace", no_prompt)
  try:
    import requests  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(requests, "post", no_prompt)
  except ImportError:
    pass
  monkeypatch.chdir(tmp_path)  # it writes PAI folders, configs and checkpoints in cwd
  monkeypatch.setattr(gpa, "pc", gpa.PAIConfig())  # fresh settings for every test
  pc = gpa.pc
  pc.set_unwrapped_modules_confirmed(True)  # no pdb stop over unwrapped modules
  pc.set_configuration_confirmed(True)  # skip the interactive target selection
  pc.set_testing_dendrite_capacity(False)  # its test mode switches every evaluation
  pc.set_find_best_lr(False)  # no learning-rate search after a switch
  pc.set_dashboard_events_enabled(False)
  pc.set_silent(True)
  pc.set_device(torch.device("cpu"))
  pc.set_use_cuda(False)
  yield torch, gpa, upa


def _torch_mlp(torch, upa, save_name):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
  with contextlib.redirect_stdout(io.StringIO()):
    return upa.perforate_model(model, save_name=save_name, making_graphs=False)


def _backward(torch, gpa, model):
  """One backward pass (the package learns its layers' shapes from the gradients)."""
  opt = torch.optim.SGD(model.parameters(), lr=0.0)
  gpa.pai_tracker.set_optimizer_instance(opt)
  opt.zero_grad()
  model(torch.randn(5, 4)).sum().backward()


def test_perforatedai_state_dict_gives_same_outputs(pai):
  torch, gpa, upa = pai
  model = _torch_mlp(torch, upa, "parity")
  _backward(torch, gpa, model)
  x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
  for k in (1, 2):
    before = model(x).detach().numpy()
    with contextlib.redirect_stdout(io.StringIO()):
      gpa.pai_tracker.set_dendrite_training()
      gpa.pai_tracker.set_neuron_training()
    # The package's growth leaves the function unchanged too, and so does ponder's.
    np.testing.assert_array_equal(model(x).detach().numpy(), before)
    rename = {"0": "fc0", "2": "fc1"}
    params = P.from_perforatedai_state_dict(model.state_dict(), rename=rename)
    assert P.dendrite_layers(params) == {"fc0": k, "fc1": k}
    ours = jax.eval_shape(MLP(k).init, jax.random.key(0), jnp.zeros((1, 4)))["params"]
    chex.assert_trees_all_equal_shapes(params, ours)
  # Random u, v and dendrites everywhere, so every term of the cascade matters.
  with torch.no_grad():
    for i, p in enumerate(model.parameters()):
      p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
  expected = model(x).detach().numpy()
  params = P.from_perforatedai_state_dict(model.state_dict(), rename=rename)
  got = np.asarray(MLP(2).apply({"params": params}, jnp.asarray(x.numpy())))
  err32 = float(np.abs(got - expected).max())
  # In float64 on both sides the two agree to rounding: the same function, not a fit.
  model = model.double()
  expected = model(x.double()).detach().numpy()
  with jax.enable_x64(True):
    params = P.from_perforatedai_state_dict(model.state_dict(), rename=rename)
    got = np.asarray(MLP(2).apply({"params": params}, jnp.asarray(x.double().numpy())))
  err64 = float(np.abs(got - expected).max())
  print(f"perforatedai parity, 2 dendrites, |y| <= {np.abs(expected).max():.2f}: "
        f"max |ponder - torch| = {err32:.3g} (float32), {err64:.3g} (float64)")
  assert err32 < 1e-6 and err64 < 1e-12


def _pai_run(pai, scores, settings, save_name):
  """(action, num_dendrites, tries, global best, epoch, saved best) per score."""
  torch, gpa, upa = pai
  for name, value in settings.items():
    getattr(gpa.pc, f"set_{name}")(value)
  model = _torch_mlp(torch, upa, save_name)
  best_file = os.path.join(save_name, "best_model.pt")
  out = []
  for score in scores:
    _backward(torch, gpa, model)
    before = os.stat(best_file).st_mtime_ns if os.path.exists(best_file) else None
    with contextlib.redirect_stdout(io.StringIO()):
      model, restructured, complete = gpa.pai_tracker.add_validation_score(score, model)
    saved = os.path.exists(best_file) and os.stat(best_file).st_mtime_ns != before
    mv = gpa.pai_tracker.member_vars
    action = "complete" if complete else ("switch" if restructured else "continue")
    out.append((action, mv["num_dendrites_added"], mv["num_dendrite_tries"],
                mv["global_best_validation_score"], mv["num_epochs_run"], saved))
    if complete:
      break
  return out


def _ponder_run(scores, cfg, split=None):
  state, out = P.init_tracker(cfg), []
  for i, score in enumerate(scores):
    if i == split:  # a run killed here resumes from its checkpointed tracker state
      state = flax.serialization.from_bytes(P.init_tracker(cfg),
                                            flax.serialization.to_bytes(state))
    state, d = P.update(state, score, cfg)
    action = {"restructure": "switch", "retry": "switch"}.get(d.action, d.action)
    out.append((action, state.num_dendrites, int(state.now.tries), state.best_score,
                int(state.now.epoch), d.save_best or d.save_grown))
    if d.action == "complete":
      break
  return out


def _walk_scores(seed, n, start=0.5, step=0.02, drift=0.0):
  rng = np.random.default_rng(seed)
  return [round(float(v), 4) for v in start + np.cumsum(rng.normal(drift, step, size=n))]


SCENARIOS = [
    # (name, scores, package settings): improve, fail -> retry, retry improves, fail -> done.
    ("retry_then_stop", [0.1, 0.3, 0.5, 0.5, 0.5, 0.5, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.3,
                         0.55, 0.6, 0.6, 0.6, 0.6] + [0.2] * 12,
     dict(n_epochs_to_switch=3)),
    ("max_dendrites", [0.1 + 0.01 * i for i in range(8)] + [0.18] * 4 + [0.2 + 0.01 * i
                       for i in range(5)] + [0.25] * 4 + [0.3] * 8,
     dict(n_epochs_to_switch=3, max_dendrites=2)),
    ("loss_minimised", _walk_scores(1, 60, start=2.0, step=0.05, drift=-0.01),
     dict(n_epochs_to_switch=4, maximizing_score=False)),
    ("random_walk", _walk_scores(2, 80, drift=0.002), dict(n_epochs_to_switch=5,
                                                           max_dendrite_tries=3)),
    ("thresholds", [0.9, 0.9, 0.9001, 0.90095, 0.9001, 0.9002, 0.9, 0.90091, 0.9013,
                    0.9014, 0.90141, 0.9015, 0.90152, 0.9015, 0.9016, 0.90161] * 2,
     dict(n_epochs_to_switch=2)),
    ("retain_all", _walk_scores(3, 40, drift=0.003), dict(n_epochs_to_switch=2,
                                                          retain_all_dendrites=True,
                                                          max_dendrites=3)),
    ("lookback", _walk_scores(4, 50, drift=0.003), dict(n_epochs_to_switch=2,
                                                        history_lookback=2,
                                                        initial_history_after_switches=1)),
    # Fixed switches (switch_mode 2 = DOING_FIXED_SWITCH) while the scores keep rising,
    # where history mode would never switch; a cycle that fails completes.
    ("fixed_switch", [0.5 + 0.01 * i for i in range(12)] + [0.3] * 8,
     dict(switch_mode=2, fixed_switch_num=3, max_dendrites=3)),
    ("fixed_first", _walk_scores(5, 40, drift=0.004),
     dict(switch_mode=2, fixed_switch_num=4, first_fixed_switch_num=9, max_dendrites=4)),
]


@pytest.mark.parametrize("name,scores,settings", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_tracker_matches_perforatedai(pai, name, scores, settings):
  names = dict(maximizing_score="maximize")
  modes = {1: "history", 2: "fixed"}  # the package's DOING_HISTORY, DOING_FIXED_SWITCH
  cfg = P.TrackerConfig(**{names.get(k, k): modes[v] if k == "switch_mode" else v
                           for k, v in settings.items()})
  theirs = _pai_run(pai, scores, settings, name)
  ours = _ponder_run(scores, cfg)
  assert [r[0] for r in theirs].count("switch") >= 1
  for i, (t, o) in enumerate(zip(theirs, ours)):
    assert t == o, f"evaluation {i} (score {scores[i]}): perforatedai {t}, ponder {o}"
  assert len(theirs) == len(ours)
  # A run interrupted half way and resumed from its serialised state decides the same.
  assert _ponder_run(scores, cfg, split=len(scores) // 2) == ours


def test_bad_switch_settings_say_what_to_use():
  with pytest.raises(ValueError, match="'history'.*'fixed'"):
    P.TrackerConfig(switch_mode="plateau")
  with pytest.raises(ValueError, match="at least 1"):
    P.TrackerConfig(switch_mode="fixed", fixed_switch_num=0)


def test_fixed_switch_ignores_a_rising_score():
  """History mode never switches on a score that rises at every evaluation; the fixed
  mode switches at the third (the MiniLM presets' setting) and then completes."""
  scores = [0.88, 0.90, 0.913, 0.916, 0.917]
  history = P.TrackerConfig(n_epochs_to_switch=2, max_dendrites=1)
  fixed = P.TrackerConfig(n_epochs_to_switch=2, max_dendrites=1, switch_mode="fixed",
                          fixed_switch_num=3)
  assert [r[0] for r in _ponder_run(scores, history)] == ["continue"] * 5
  assert [r[0] for r in _ponder_run(scores, fixed)] == ["continue", "continue", "switch",
                                                        "continue", "continue"]


def test_tracker_retry_and_complete():
  cfg = P.TrackerConfig(n_epochs_to_switch=2)
  scores = [0.1, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3]
  actions = [a[0] for a in _ponder_run(scores, cfg)]
  assert actions == ["continue", "continue", "continue", "switch", "continue", "continue",
                     "switch", "continue", "continue", "complete"]
  state = P.init_tracker(cfg)
  decisions = []
  for s in scores:
    state, d = P.update(state, s, cfg)
    decisions.append(d)
  assert [d.action for d in decisions][3::3] == ["restructure", "retry", "complete"]
  assert decisions[1].save_best and state.num_dendrites == 0 and state.best_score == 0.5
  # The package keeps the tries count of the saved tracker; the option resets it.
  reset = P.TrackerConfig(n_epochs_to_switch=3, reset_tries_on_success=True)
  ours = _ponder_run(SCENARIOS[0][1], reset)
  assert [r[0] for r in ours].count("switch") == 4


# --- the picture -----------------------------------------------------------------------


def test_dendrite_plot_writes_png(tmp_path):
  cfg = P.TrackerConfig(n_epochs_to_switch=3)
  state, history = P.init_tracker(cfg), []
  for i, score in enumerate(SCENARIOS[0][1]):
    k = state.num_dendrites
    state, d = P.update(state, score, cfg)
    history.append(dict(score=score, num_dendrites=k, params=67 + 78 * k, action=d.action))
    if d.action == "complete":
      break
  path = dendrite_plots.dendrite_history(history, str(tmp_path / "run"), title="fake")
  assert path == str(tmp_path / "run" / "dendrites.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 10_000
  assert dendrite_plots.best_per_architecture(history) == [(0, 67, 0.5), (1, 145, 0.6),
                                                              (2, 223, 0.2)]
