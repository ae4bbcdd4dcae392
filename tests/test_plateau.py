"""Plateau detection on synthetic loss curves with noise (the rule: ponder/plateau.py)."""

import jax
import numpy as np
import pytest

from ponder import errors, plateau

CFG = plateau.PlateauConfig(window=100, z=2.0, rel_tol=0.01, max_steps=2000)
T = np.arange(2000)
SEEDS = range(10)
_run = jax.jit(plateau.run, static_argnums=1)


def _noise(seed, sigma):
  return sigma * np.random.RandomState(seed).randn(len(T))


def test_exponential_decay_is_caught_soon_after_the_knee():
  tau = 200.0
  knee = tau * np.log(20.0)  # 95% of the drop is done.
  for seed in SEEDS:
    state = _run(2.0 + 3.0 * np.exp(-T / tau) + _noise(seed, 0.05), CFG)
    assert state.reason_name == "plateau", seed
    # Measured over seeds 0-49: -6 ... +126 steps from the knee.
    assert knee - 50 <= int(state.end_step) <= knee + 150, (seed, int(state.end_step))


def test_steady_decrease_is_never_a_plateau():
  for seed in SEEDS:
    state = _run(5.0 - 0.002 * T + _noise(seed, 0.05), CFG)
    assert state.reason_name == "cap" and int(state.end_step) == CFG.max_steps, seed


def test_noise_around_a_constant_is_a_plateau_at_the_first_test():
  for seed in SEEDS:
    state = _run(3.0 + _noise(seed, 0.1), CFG)
    assert state.reason_name == "plateau" and int(state.end_step) == CFG.window, seed


def test_cap_fires_and_the_ended_state_stays():
  cfg = plateau.PlateauConfig(max_steps=300)
  update = jax.jit(plateau.update, static_argnums=2)
  state = plateau.init(cfg)
  for i, loss in enumerate(5.0 - 0.002 * T[:310]):
    state = update(state, loss, cfg)
    assert state.ended == (i + 1 >= 300)
  assert state.reason_name == "cap" and int(state.end_step) == 300
  assert int(state.count) == 300 and float(state.slope) == pytest.approx(-0.002, rel=1e-3)
  # The state is a pytree of arrays: it round-trips through a checkpoint's flattening.
  leaves, treedef = jax.tree.flatten(state)
  assert jax.tree.unflatten(treedef, leaves).reason_name == "cap"


def test_bad_config_is_refused():
  with pytest.raises(errors.ConfigError, match="window"):
    plateau.PlateauConfig(window=2)
