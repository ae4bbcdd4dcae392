"""Plateau detection on the training-loss stream: when warm-up is over.

The rule (one test per `update`, once `window` losses have been seen; "steps" below are
calls of `update`, i.e. training steps when the trainer feeds every step's loss): fit a
least-squares line to the last `window` losses y_t,

    slope b = sum (t - t_bar)(y_t - y_bar) / S_tt,   S_tt = sum (t - t_bar)^2,
    se(b)   = sqrt(RSS / (window - 2) / S_tt),       RSS = residual sum of squares,

and call a plateau when the upper confidence bound of the slope does not show a
meaningful decrease:

    (b + z * se(b)) * (window - 1)  >  -rel_tol * |y_bar|.

In words: even the optimistic reading of the last window (its one-sided z-sigma bound,
z = 2 is 97.7%) predicts that the loss falls by less than `rel_tol` of its level over a
window. The z term makes noise alone look flat (a noisy constant is caught at the first
test); the rel_tol term catches a curve that still falls, but too slowly to matter (a
noiseless exponential tail never has slope 0). A curve falling by more than rel_tol per
window plus the noise's z-sigma bound is never called a plateau. The standard error
assumes independent noise; correlated noise makes the bound too tight, so raise z or
the window for it.

A hard cap remains: warm-up ends at `max_steps` losses whatever the slope, and the state
says which ended it (`reason`: "plateau" or "cap"). Once ended the state no longer
changes. The state is a `flax.struct.dataclass` of arrays updated by the pure
`update`, so it lives in the train state and the checkpoint, and `update` runs inside
or outside jit.

Measured with the defaults (window 100, z 2, rel_tol 0.01; seeds 0-49, the curves of
tests/test_plateau.py):
  * 2 + 3 exp(-t / 200) + N(0, 0.05^2): called 6 steps before to 126 steps after the
    knee (median 52), the knee being t95 = 200 ln 20 = 599, where 95% of the drop is
    done. Without noise it is called at step 907 (only rel_tol can end it then).
  * 3 + N(0, 0.1^2): called at the first test, step 100, in 50 of 50 seeds.
  * 5 - 0.002 t + N(0, 0.05^2): never called in 2,000 steps (the cap ends it), 50 of 50.
A true slope s per step is called a plateau with probability P(Z > (|s| - rel_tol |y| /
(window - 1)) / se - z) per test, se = sigma sqrt(12 / window^3) for noise sigma.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp

from ponder import errors

REASONS = ("running", "plateau", "cap")


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
  """Parameters of the rule (hashable: a static argument of jitted code)."""
  window: int = 100  # Losses in the least-squares fit; the first test is at this step.
  z: float = 2.0  # One-sided confidence multiplier of the slope's standard error.
  rel_tol: float = 0.01  # Decrease per window, relative to the loss, that still counts.
  max_steps: int = 10_000  # Hard cap: warm-up ends after this many losses.

  def __post_init__(self):
    if self.window < 3:
      raise errors.ConfigError(f"plateau window={self.window}; a slope's error needs >= 3.")
    if self.max_steps < 1 or self.z < 0 or self.rel_tol < 0:
      raise errors.ConfigError(f"invalid plateau config {self}: max_steps >= 1, z >= 0 and "
                               "rel_tol >= 0 are needed.")


@flax.struct.dataclass
class PlateauState:
  losses: jax.Array  # float32 [window]: the last losses, oldest first.
  count: jax.Array  # int32: losses seen.
  reason: jax.Array  # int32: index into REASONS; nonzero = warm-up has ended.
  end_step: jax.Array  # int32: losses seen when it ended (-1 while running).
  slope: jax.Array  # float32: last fitted slope per step (NaN before the first test).
  slope_ucb: jax.Array  # float32: its upper confidence bound.

  @property
  def ended(self) -> bool:
    return bool(self.reason != 0)

  @property
  def reason_name(self) -> str:
    return REASONS[int(self.reason)]


def init(cfg: PlateauConfig) -> PlateauState:
  nan = jnp.full((), jnp.nan, jnp.float32)
  return PlateauState(losses=jnp.zeros((cfg.window,), jnp.float32),
                      count=jnp.zeros((), jnp.int32), reason=jnp.zeros((), jnp.int32),
                      end_step=jnp.full((), -1, jnp.int32), slope=nan, slope_ucb=nan)


def slope_bound(losses: jax.Array, z: float):
  """Least-squares slope of `losses` [n] against 0..n-1 and its upper bound b + z se."""
  n = losses.shape[0]
  t = jnp.arange(n, dtype=jnp.float32) - (n - 1) / 2.0
  s_tt = jnp.sum(t * t)
  y = losses - jnp.mean(losses)
  b = jnp.sum(t * y) / s_tt
  rss = jnp.sum((y - b * t) ** 2)
  se = jnp.sqrt(rss / (n - 2) / s_tt)
  return b, b + z * se


def update(state: PlateauState, loss, cfg: PlateauConfig) -> PlateauState:
  """Takes one training loss; returns the new state (unchanged once ended)."""
  losses = jnp.roll(state.losses, -1).at[-1].set(jnp.asarray(loss, jnp.float32))
  count = state.count + 1
  b, ucb = slope_bound(losses, cfg.z)
  tested = count >= cfg.window
  flat = tested & (ucb * (cfg.window - 1) > -cfg.rel_tol * jnp.abs(jnp.mean(losses)))
  reason = jnp.where(flat, 1, jnp.where(count >= cfg.max_steps, 2, 0)).astype(jnp.int32)
  new = PlateauState(losses=losses, count=count, reason=reason,
                     end_step=jnp.where(reason != 0, count, -1).astype(jnp.int32),
                     slope=jnp.where(tested, b, jnp.nan),
                     slope_ucb=jnp.where(tested, ucb, jnp.nan))
  running = state.reason == 0
  return jax.tree.map(lambda n, o: jnp.where(running, n, o), new, state)


def run(losses, cfg: PlateauConfig) -> PlateauState:
  """`update` over a whole loss sequence (a `lax.scan`): for tests and offline curves."""
  def step(state, loss):
    return update(state, loss, cfg), None
  return jax.lax.scan(step, init(cfg), jnp.asarray(losses, jnp.float32))[0]
