"""Difficulty-based allocation of TTT inner steps (PonderTTT's adaptive iterations).

PonderTTT ("Adaptive Iteration Allocation for Test-Time Training", the seed document)
gives each mini-batch of a TTT layer k in {1, 2, 4} inner steps instead of a fixed k:
  1. a cheap first pass scores how hard each mini-batch is: the entropy of the
     next-token distribution. Here that first pass is the same LM run with k = 0 (SKIP,
     `ttt.ttt_scan` with no update), so its FLOPs are one SKIP forward pass and must be
     counted in the adaptive model's cost (`adaptive_flops_per_token`);
  2. percentile calibration: thresholds at the cumulative target fractions (default
     30% / 40% / 30%) of the difficulties of a calibration set;
  3. allocation: a mini-batch with difficulty in [threshold_{j-1}, threshold_j) gets
     buckets[j] steps (harder -> more steps);
  4. optionally a total budget: the thresholds are scaled up until the mean number of
     steps is at most the budget.

All functions are pure and work on numpy or jax arrays (jit-able): `calibrate` and
`budget_thresholds` can run per batch inside a train step.

Causality. The PonderTTT document scores a mini-batch by the entropies at its own
positions. In a language model that leaks: the entropy at position s depends on token
s, which is the *target* of position s - 1, so a token's number of steps (and thus its
output) would depend on the token it has to predict. `mini_batch_difficulty(...,
causal=True)` (the default) scores mini-batch i by the mean entropy of the mini_batch
positions ending at its first position i * mini_batch, which every token of the
mini-batch already reads; `causal=False` is the document's rule, for comparison.
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ponder import errors

DEFAULT_BUCKETS = (1, 2, 4)  # PonderTTT's Fixed-1/2/4 as the adaptive choices.
DEFAULT_TARGET = (0.3, 0.4, 0.3)  # Fractions of mini-batches per bucket.


def token_entropy(logits: jax.Array) -> jax.Array:
  """H(p_t) = -sum_v p_t(v) log p_t(v) in nats, per position: [..., vocab] -> [...]."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def mini_batch_difficulty(logits: jax.Array, mini_batch: int, *,
                          causal: bool = True) -> jax.Array:
  """Mean next-token entropy per mini-batch: logits [batch, seq, vocab] -> [batch, seq /
  mini_batch] (seq a multiple of mini_batch).

  causal=True: mini-batch i is scored on positions max(0, i b - b + 1) .. i b (b =
  mini_batch), all visible to every token of the mini-batch (see the module docstring);
  causal=False: on its own positions i b .. i b + b - 1, as in the PonderTTT document.
  """
  ent = token_entropy(logits)
  batch, seq = ent.shape
  if seq % mini_batch:
    raise errors.ShapeError(f"sequence length {seq} is not a multiple of mini_batch="
                            f"{mini_batch}.")
  n = seq // mini_batch
  if not causal:
    return ent.reshape(batch, n, mini_batch).mean(-1)
  # C[j] = sum of entropies at positions < j; window (i b - b, i b] = C[ib+1] - C[ib-b+1].
  csum = jnp.concatenate([jnp.zeros((batch, 1), ent.dtype), jnp.cumsum(ent, axis=1)], 1)
  end = jnp.arange(n) * mini_batch + 1
  start = jnp.maximum(end - mini_batch, 0)
  return (csum[:, end] - csum[:, start]) / (end - start).astype(ent.dtype)


def check_buckets(target: Sequence[float], buckets: Sequence[int]) -> None:
  if len(target) != len(buckets) or not buckets:
    raise errors.ConfigError(f"target {tuple(target)} and buckets {tuple(buckets)} must "
                             "have the same (non-zero) length.")
  if any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise errors.ConfigError(f"buckets {tuple(buckets)} must be strictly increasing.")
  if min(target) < 0 or abs(sum(target) - 1.0) > 1e-6:
    raise errors.ConfigError(f"target fractions {tuple(target)} must be >= 0 and sum to 1.")


def calibrate(difficulties, target: Sequence[float] = DEFAULT_TARGET,
              buckets: Sequence[int] = DEFAULT_BUCKETS) -> jax.Array:
  """Percentile thresholds [len(buckets) - 1] (ascending) over a calibration set.

  Threshold j is the quantile of all `difficulties` (any shape) at the cumulative
  fraction target[0] + ... + target[j], so `allocate` puts about target[j] of the
  calibration set in bucket j (exactly, up to one element per threshold, when the
  difficulties are distinct).
  """
  check_buckets(target, buckets)
  cumulative = np.cumsum(np.asarray(target, np.float64))[:-1]
  flat = jnp.ravel(jnp.asarray(difficulties, jnp.float32))
  return jnp.quantile(flat, jnp.asarray(cumulative, jnp.float32))


def allocate(difficulty, thresholds, buckets: Sequence[int] = DEFAULT_BUCKETS) -> jax.Array:
  """Steps per element: buckets[j] where j = #{thresholds <= difficulty} (int32, same
  shape as `difficulty`)."""
  thresholds = jnp.asarray(thresholds)
  if thresholds.shape != (len(buckets) - 1,):
    raise errors.ShapeError(f"{len(buckets)} buckets need {len(buckets) - 1} thresholds, "
                            f"got shape {thresholds.shape}.")
  index = jnp.sum(jnp.asarray(difficulty)[..., None] >= thresholds, axis=-1)
  return jnp.asarray(buckets, jnp.int32)[index]


def budget_thresholds(difficulties, thresholds, buckets: Sequence[int] = DEFAULT_BUCKETS,
                      *, budget: float, iterations: int = 60) -> jax.Array:
  """Thresholds scaled by the smallest factor s >= 1 (to bisection precision) for
  which the mean of `allocate(difficulties, s * thresholds)` is at most `budget`.

  Scaling up moves elements to lower buckets only, so the mean falls with s; the
  difficulties and thresholds must be >= 0 (entropies are). A budget below
  min(buckets) cannot be met and raises ConfigError (when it is a Python number).
  """
  if budget < min(buckets):
    raise errors.ConfigError(f"budget {budget} is below the smallest bucket "
                             f"{min(buckets)}: no allocation can meet it.")
  d = jnp.asarray(difficulties, jnp.float32)
  t = jnp.asarray(thresholds, jnp.float32)
  # Integer totals against budget * n: a float32 mean of many steps can round past it.
  within = lambda s: jnp.sum(allocate(d, s * t, buckets)) <= budget * d.size
  # Past hi every positive threshold exceeds every difficulty (all in bucket 0 when the
  # thresholds are positive).
  positive = jnp.min(jnp.where(t > 0, t, jnp.inf))
  hi0 = jnp.where(jnp.isfinite(positive), 2.0 * jnp.max(d) / positive + 2.0, 1.0)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = within(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, iterations, body, (jnp.float32(1.0), hi0))
  scale = jnp.where(within(1.0), 1.0, hi)
  return scale * t


def adaptive_flops_per_token(steps, flops_per_token_by_k: Mapping[int, float]) -> float:
  """FLOPs per token of the adaptive model: one SKIP (k = 0) first pass for the
  difficulty plus the second pass at each mini-batch's k, averaged over `steps` (an
  array of allocated k, one per mini-batch or per token).

  `flops_per_token_by_k[k]` is the whole model's per-token FLOPs at a fixed k (e.g.
  compiled FLOPs of a forward pass / tokens), and must include k = 0.
  """
  steps = np.asarray(steps).ravel()
  missing = sorted({0, *steps.tolist()} - set(flops_per_token_by_k))
  if missing:
    raise errors.ConfigError(f"flops_per_token_by_k needs k = 0 (the first pass) and "
                             f"every allocated k; missing {missing}.")
  second = np.mean([flops_per_token_by_k[int(k)] for k in steps])
  return float(flops_per_token_by_k[0] + second)
