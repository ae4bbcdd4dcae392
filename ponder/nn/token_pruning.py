"""Token pruning as in DynamicViT (Rao et al. 2021, "DynamicViT: Efficient Vision
Transformers with Dynamic Token Sparsification", NeurIPS).

Conventions of this module: tokens are `[batch, n, dim]` with the class token at
index 0, and a keep mask `D` is `[batch, n]` over the same positions (1 = kept). The
class token is always kept and never counted as a patch token (ratios, aggregation and
token distillation are over positions 1..n-1, as in DynamicViT).

Training (Sec. 3.2-3.3 of the paper):
  * `TokenPredictor` is the prediction module of one pruning stage: local features
    z^local = MLP(x) (Eq. 1), a global feature z^global = Agg(MLP(x), D_hat) (Eq. 2),
    the mean of the same features over the tokens still kept (Eq. 3), their
    concatenation z_i = [z_i^local, z^global] (Eq. 4) and an MLP to two logits per
    token, pi = Softmax(MLP(z)) (Eq. 5), column 0 "drop" and column 1 "keep".
  * `keep_decision` samples D = Gumbel-Softmax(pi)_{*,1} * D_hat (Eq. 6): a hard
    one-hot sample with the straight-through gradient of the soft relaxation, so a
    dropped token stays dropped and the predictor still gets gradients. Annealing the
    Gumbel temperature (`gumbel_temperature`) and a soft warm-up (`use_hard_mask`)
    are not in DynamicViT, which samples at temperature 1 from the start.
  * Attention ignores dropped tokens but every token may attend to itself: with
    P = QK^T / sqrt(C), G_ij = 1 if i = j else D_j (Eq. 7-8) and
    P~_ij = exp(P_ij) G_ij / sum_k exp(P_ik) G_ik (Eq. 9): `attention_policy`,
    `masked_softmax`, `masked_attention`. Multiplying by G (not adding log G) keeps the
    straight-through gradient to D finite.
  * Losses (Eq. 10-14): `keep_ratio_loss` (Eq. 13), `distillation_kl` (Eq. 12, here
    with a Hinton temperature), `token_distillation_loss` (Eq. 11). The classification
    term is the task's cross-entropy; the paper weights them 2 (ratio), 0.5 (KL) and
    0.5 (token distillation).

Inference (Sec. 3.4): tokens are really removed. `top_index` gives the indices of the
class token and the top `ceil(keep_ratio * (n - 1))` patch tokens by score, a static
count, so the blocks after the gather compile to a smaller program.
"""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ponder import errors
from ponder.nn import dense

KEEP = 1  # Column of the keep logit (pi_{i,1}); column 0 is "drop" (pi_{i,0}).


class TokenPredictor(nn.Module):
  """DynamicViT prediction module (Eq. 1-5): keep/drop logits `[batch, n, 2]`.

  Attributes:
    features: C', the width of the projected features (the paper uses C / 2; None
      means half the token width).
    keep_bias: the initial bias of the keep logit (the drop logit's is 0), i.e. a prior
      keep log-odds: 0 is DynamicViT's unbiased start, > 0 starts by keeping most
      tokens, so a pretrained model is not cut abruptly (sigmoid(1) = 0.73).
    compute_dtype: operand dtype of the dense layers' matmuls (`ponder.nn.dense`;
      None = float32).
  """
  features: Optional[int] = None
  keep_bias: float = 0.0
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, keep_mask):
    """Args: tokens x `[batch, n, dim]` (class token first) and the current keep mask
    D_hat `[batch, n]`. Returns logits `[batch, n, 2]` (the class token's row is
    computed but unused: the class token is always kept)."""
    c = self.features or x.shape[-1] // 2
    gelu = functools.partial(nn.gelu, approximate=False)  # As in models.vit.
    linear = functools.partial(dense.Dense, compute_dtype=self.compute_dtype)
    z = nn.LayerNorm(epsilon=1e-6, name="ln")(x)
    z = gelu(linear(c, name="proj")(z))  # MLP(x), Eq. 1.
    # Agg (Eq. 3): the mean over kept patch tokens, weighted by D_hat.
    weights = keep_mask.at[:, 0].set(0.0)[..., None]
    z_global = jnp.sum(z * weights, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(weights, axis=1, keepdims=True), 1e-6)
    z = jnp.concatenate([z, jnp.broadcast_to(z_global, z.shape)], axis=-1)  # Eq. 4.
    z = gelu(linear(c, name="fc1")(z))
    z = gelu(linear(max(c // 2, 1), name="fc2")(z))
    bias_init = lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype).at[KEEP].set(
        self.keep_bias)
    return linear(2, bias_init=bias_init, name="logits")(z)  # Eq. 5 before the softmax.


def gumbel_temperature(step, *, anneal_steps: int, start: float = 5.0, end: float = 0.1,
                       schedule: str = "exponential"):
  """Gumbel-softmax temperature at `step`: `start` at 0, `end` from `anneal_steps` on.

  "exponential" interpolates geometrically, start * (end / start) ** (step / span),
  the usual Gumbel annealing (Jang et al. 2017); "linear" interpolates linearly.
  A pure function of the step, traceable under jit.
  """
  if anneal_steps <= 0:
    raise errors.ConfigError(f"anneal_steps must be positive, got {anneal_steps}")
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  if schedule == "exponential":
    return start * (end / start) ** frac
  if schedule == "linear":
    return start + (end - start) * frac
  raise errors.unknown_key("temperature schedule", schedule, ("exponential", "linear"))


def use_hard_mask(step, *, soft_warmup_steps: int):
  """Whether step `step` samples hard masks: False during the first
  `soft_warmup_steps` steps (soft Gumbel-softmax masks), True afterwards."""
  return jnp.asarray(step) >= soft_warmup_steps


def keep_ratio_targets(rho: float, num_stages: int = 3) -> tuple:
  """Target kept fraction of the original patch tokens after each stage:
  (rho, rho^2, rho^3) for three stages, as in DynamicViT."""
  return tuple(rho ** (s + 1) for s in range(num_stages))


def keep_decision(logits, prev_mask, key, *, temperature, hard=True):
  """Samples the keep mask of one stage, D = Gumbel-Softmax(pi)_{*,1} * D_hat (Eq. 6).

  Args:
    logits: `[batch, n, 2]` from `TokenPredictor`.
    prev_mask: D_hat `[batch, n]`, the mask before this stage (ones before the first).
    key: PRNG key for the Gumbel noise.
    temperature: Gumbel-softmax temperature (> 0), e.g. `gumbel_temperature(step)`.
    hard: True (or a traced boolean, e.g. `use_hard_mask(step)`) for a one-hot sample
      in the forward pass with the gradient of the soft sample (straight-through);
      False for the soft relaxed sample itself (the warm-up).

  Returns:
    `[batch, n]` keep mask in [0, 1] (exactly 0/1 when hard), class token set to 1.
  """
  gumbel = jax.random.gumbel(key, logits.shape, logits.dtype)
  soft = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
  one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
  straight_through = soft + jax.lax.stop_gradient(one_hot - soft)
  sample = jnp.where(hard, straight_through, soft)[..., KEEP]
  return (sample * prev_mask).at[:, 0].set(1.0)


def attention_policy(keep_mask):
  """G of Eq. 8: `[batch, 1, n, n]`, G_ij = 1 if i == j else D_j (differentiable in D)."""
  n = keep_mask.shape[-1]
  eye = jnp.eye(n, dtype=keep_mask.dtype)
  return (keep_mask[:, None, None, :] * (1.0 - eye) + eye).astype(keep_mask.dtype)


def masked_softmax(logits, keep_mask):
  """Eq. 9: softmax over keys weighted by G, P~_ij = e^{P_ij} G_ij / sum_k e^{P_ik} G_ik.

  Args:
    logits: attention logits P `[batch, heads, n, n]` (query, key).
    keep_mask: D `[batch, n]`, hard or soft.

  The row maximum subtracted for stability is taken over keys with G > 0 (the
  diagonal always qualifies), so a dropped key with a huge logit cannot underflow the
  row. Its own exponent is capped at e^80 (finite in float32), so G = 0 gives an
  exact 0 rather than inf * 0, while d/dD_j, which DynamicViT trains the predictor
  with, stays exact below the cap.
  """
  g = attention_policy(keep_mask)
  row_max = jnp.max(jnp.where(g > 0, logits, -jnp.inf), axis=-1, keepdims=True)
  shifted = jnp.minimum(logits - jax.lax.stop_gradient(row_max), 80.0)
  e = jnp.exp(shifted) * g
  return e / jnp.sum(e, axis=-1, keepdims=True)


def masked_attention(q, k, v, keep_mask):
  """Multi-head attention with DynamicViT's attention masking (Eq. 7-9).

  Args: q, k, v `[batch, n, heads, head_dim]` (the layout of `flax.linen`
  attention), keep_mask D `[batch, n]`. Returns `[batch, n, heads, head_dim]`.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # Eq. 7.
  return jnp.einsum("bhqk,bkhd->bqhd", masked_softmax(logits, keep_mask), v)


def num_kept(num_tokens: int, keep_ratio: float) -> int:
  """Patch tokens `top_index` keeps out of `num_tokens` (class token included):
  ceil(keep_ratio * (num_tokens - 1)), at least 1. A tolerance of 1e-6 keeps
  0.7 * 10 from rounding up to 8."""
  if not 0.0 < keep_ratio <= 1.0:
    raise errors.ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
  patches = num_tokens - 1
  return max(1, min(patches, math.ceil(keep_ratio * patches - 1e-6)))


def top_index(scores, keep_ratio: float):
  """Indices `[batch, 1 + k]` of the tokens inference keeps: 0 (the class token), then
  the `k = num_kept(n, keep_ratio)` top-scoring patch tokens in increasing order (their
  original order). `scores` is `[batch, n]`, higher = keep; the class token's score is
  ignored. Gather with `jnp.take_along_axis(x, idx[..., None], axis=1)`."""
  k = num_kept(scores.shape[1], keep_ratio)
  _, top = jax.lax.top_k(scores[:, 1:], k)
  idx = jnp.sort(top, axis=-1) + 1
  return jnp.concatenate([jnp.zeros((scores.shape[0], 1), idx.dtype), idx], axis=1)


def keep_ratio_loss(keep_masks: Sequence, targets: Sequence[float]):
  """Eq. 13: mean over stages s and images b of (rho^(s) - kept fraction of b)^2.

  Args:
    keep_masks: one `[batch, n]` mask per stage (class token first, not counted).
    targets: the target kept fraction per stage, e.g. `keep_ratio_targets(rho)`.
  """
  if len(keep_masks) != len(targets):
    raise errors.ShapeError(f"{len(keep_masks)} masks but {len(targets)} targets")
  losses = [jnp.mean((jnp.mean(mask[:, 1:], axis=1) - rho) ** 2)
            for mask, rho in zip(keep_masks, targets)]
  return sum(losses) / len(losses)


def distillation_kl(student_logits, teacher_logits, temperature: float = 1.0):
  """Eq. 12 with a temperature: T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T)).

  The teacher is not differentiated. T^2 keeps the gradient scale independent of T
  (Hinton et al. 2015); T = 1 is DynamicViT's KL term.
  """
  teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, -1)
  student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def token_distillation_loss(student_tokens, teacher_tokens, keep_mask):
  """Eq. 11: squared error to the teacher's final tokens, over the kept patch tokens.

  Args:
    student_tokens, teacher_tokens: `[batch, n, dim]` final-layer tokens (class token
      first, not counted); the teacher is not differentiated.
    keep_mask: the last stage's mask D^S `[batch, n]`.

  Returns sum_{b,i} D_i (t_i - t'_i)^2 / (dim * sum_{b,i} D_i), i.e. the mean over
  kept tokens and channels (the released code's normalisation); 0 if nothing is kept.
  """
  teacher = jax.lax.stop_gradient(teacher_tokens[:, 1:])
  err = jnp.mean((student_tokens[:, 1:] - teacher) ** 2, axis=-1)
  mask = keep_mask[:, 1:]
  return jnp.sum(mask * err) / jnp.maximum(jnp.sum(mask), 1e-6)
