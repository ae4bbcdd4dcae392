"""Attention-head importance: entropy, gradient importance, a combined score, a control.

Model-agnostic: every function takes `apply(params, batch, head_mask) -> (loss,
attentions)`, where head_mask [n_layer, n_head] gates each head and attentions
[n_layer, batch, n_head, queries, keys] are the softmax probabilities (as
`models.gpt2.head_analysis_apply` returns them).

Entropy. For query q of head h, H = -sum_k p_k log p_k over the keys it attends, and
H / log n_q with n_q the number of keys it may attend (the causal prefix, minus padded
keys): 1 is uniform attention, 0 attention on one key. `entropy` is the mean of H over
real query positions; `normalized_entropy` the mean of H / log n_q over the real
queries with n_q >= 2 (a query with one key has no choice to make: 0 / 0).

Gradient importance (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than
One?", Eq. 2): with gates xi_h on the heads' outputs, I_h = E_x |dL(x)/dxi_h|, here
one `jax.grad` of the loss with respect to the whole gate array per batch, its
absolute value averaged over the batches (as their released code does, so x is a
batch; batches of one example give the per-example expectation). Sec. 4.1 normalises
per layer by the l2 norm; `importance` divides by the l2 norm over the layer's active
heads, and the masked heads' entries (their gradient at xi = 0, the regrowth signal of
`ponder.plasticity.regrow_heads`) by the same norm, so the two compare.

Michel et al. gate the head's output; Hugging Face's head_mask (and GPT-2's here)
multiplies the attention probabilities or the output. The output of head h is
probs_h @ V_h, linear in probs_h, so xi * probs_h @ V_h = xi * (probs_h @ V_h): both
gates give the same function of xi, hence the same gradient at any xi.

Combined score: `combined_score` averages two percentile ranks among the active
heads, r(importance) and r(1 - normalized_entropy), weighted `weight` and 1 - weight
(default 0.5 each): a head is kept when its gradient importance is high and its
attention is focused. Ranks make the two criteria commensurable without assuming
their scales. `random_scores` is the control.

Every score here: lower = less important = pruned first.
"""

import functools
from typing import Any, Callable, Iterable, Optional

import flax
import jax
import jax.numpy as jnp

from ponder import errors

Apply = Callable[[Any, Any, jax.Array], tuple]
METHODS = ("gradient", "entropy", "combined", "random")


def _entropy_sums(attentions, query_mask, key_mask, causal: bool):
  """Sums over batch and queries: (sum H, sum H / log n, #queries, #queries n >= 2)."""
  p = attentions.astype(jnp.float32)
  if p.ndim != 5:
    raise errors.ShapeError(f"attentions have shape {p.shape}; expected [n_layer, batch, "
                            "n_head, queries, keys].")
  _, b, _, nq, nk = p.shape
  qm = jnp.ones((b, nq)) if query_mask is None else jnp.asarray(query_mask, jnp.float32)
  km = jnp.ones((b, nk)) if key_mask is None else jnp.asarray(key_mask, jnp.float32)
  if qm.shape != (b, nq) or km.shape != (b, nk):
    raise errors.ShapeError(f"query_mask {qm.shape} / key_mask {km.shape} must be "
                            f"[batch, queries] = {(b, nq)} / [batch, keys] = {(b, nk)}.")
  allowed = jnp.broadcast_to(km[:, None, :], (b, nq, nk))
  if causal:  # Query i sits at key position i + nk - nq (nk > nq with a cache).
    allowed = allowed * (jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None] + nk - nq)
  n = allowed.sum(-1)  # [b, nq]
  h = -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)  # [l, b, heads, nq]
  with_choice = qm * (n >= 2)
  normalized = h / jnp.log(jnp.maximum(n, 2.0))[None, :, None, :]
  return (jnp.einsum("lbhq,bq->lh", h, qm), jnp.einsum("lbhq,bq->lh", normalized, with_choice),
          qm.sum(), with_choice.sum())


def attention_entropy(attentions, *, query_mask=None, key_mask=None, causal: bool = True):
  """(entropy, normalized_entropy), each [n_layer, n_head], of one batch's attention.

  Args:
    attentions: [n_layer, batch, n_head, queries, keys] probabilities.
    query_mask: [batch, queries], 1 at real query positions (None: all real).
    key_mask: [batch, keys], 1 at keys the model may attend (None: all). Give the
      model's own attention mask: GPT-2 here has none, so its padded keys count.
    causal: query i attends keys <= i (GPT-2); False for bidirectional (BERT).
  """
  h, hn, count, count_n = _entropy_sums(attentions, query_mask, key_mask, causal)
  return h / jnp.maximum(count, 1.0), hn / jnp.maximum(count_n, 1.0)


def normalize_per_layer(values, mask=None):
  """values / (l2 norm over the layer's active heads) (Michel et al. Sec. 4.1). Masked
  heads are divided by the same norm; a layer without active heads by its own norm."""
  values = jnp.asarray(values, jnp.float32)
  active = jnp.ones_like(values) if mask is None else (jnp.asarray(mask) != 0)
  norm_active = jnp.sqrt(jnp.sum(jnp.where(active, values**2, 0.0), -1, keepdims=True))
  norm_all = jnp.sqrt(jnp.sum(values**2, -1, keepdims=True))
  norm = jnp.where(jnp.any(active, -1, keepdims=True), norm_active, norm_all)
  return values / (norm + 1e-20)


@flax.struct.dataclass
class HeadStats:
  """What one pass over a data set gives, each [n_layer, n_head] unless said."""
  entropy: jax.Array  # Mean attention entropy in nats over real queries.
  normalized_entropy: jax.Array  # Mean of H / log(attended keys), in [0, 1].
  gradient: jax.Array  # I_h = mean over batches of |dL/dxi_h| at xi = head_mask.
  importance: jax.Array  # `gradient` normalised per layer (normalize_per_layer).
  mask: jax.Array  # The head_mask the pass ran with.
  loss: jax.Array  # Scalar: mean loss over the batches.
  batches: int = flax.struct.field(pytree_node=False, default=0)


@functools.partial(jax.jit, static_argnames=("apply", "causal"))
def _batch_stats(params, batch, head_mask, query_mask, key_mask, *, apply, causal):
  (loss, attentions), grad = jax.value_and_grad(
      lambda m: apply(params, batch, m), has_aux=True)(head_mask)
  return loss, jnp.abs(grad), _entropy_sums(attentions, query_mask, key_mask, causal)


def head_statistics(apply: Apply, params, batches: Iterable, *, head_mask=None,
                    n_layer: Optional[int] = None, n_head: Optional[int] = None,
                    causal: bool = True, query_mask_fn: Optional[Callable] = None,
                    key_mask_fn: Optional[Callable] = None) -> HeadStats:
  """Entropy and gradient importance over `batches`, one forward and backward pass each.

  Args:
    apply: `apply(params, batch, head_mask) -> (loss, attentions)`; hashable (it is a
      static argument of the jitted step: build it once and reuse it, so repeated
      calls reuse the compilation).
    params: the model's parameters (held fixed).
    batches: an iterable of batches `apply` takes.
    head_mask: the gates [n_layer, n_head] to evaluate at (the current pruning mask:
      active heads' gradients at 1, masked heads' at 0); None = all ones, which then
      needs n_layer and n_head.
    causal: as in `attention_entropy`.
    query_mask_fn / key_mask_fn: batch -> [batch, queries] / [batch, keys] masks (see
      `attention_entropy`); None = every position real.
  """
  if head_mask is None:
    if n_layer is None or n_head is None:
      raise errors.ConfigError("head_statistics needs head_mask or n_layer and n_head.")
    head_mask = jnp.ones((n_layer, n_head), jnp.float32)
  head_mask = jnp.asarray(head_mask, jnp.float32)
  total = None
  count = 0
  for batch in batches:
    qm = None if query_mask_fn is None else query_mask_fn(batch)
    km = None if key_mask_fn is None else key_mask_fn(batch)
    out = _batch_stats(params, batch, head_mask, qm, km, apply=apply, causal=causal)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
    count += 1
  if not count:
    raise errors.MissingDataError("head_statistics got no batches.")
  loss, grad, (h, hn, nq, nqn) = total
  gradient = grad / count
  return HeadStats(entropy=h / jnp.maximum(nq, 1.0),
                   normalized_entropy=hn / jnp.maximum(nqn, 1.0),
                   gradient=gradient, importance=normalize_per_layer(gradient, head_mask),
                   mask=head_mask, loss=loss / count, batches=count)


def mean_loss(losses, weights=None):
  """The mean of per-example (or per-token) `losses`, weighted by a batch's "mask" when
  it has one (evaluation batches pad with weight-0 rows), for `Apply` functions."""
  if weights is None:
    return losses.mean()
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _percentile_rank(values, active):
  """Rank among active heads scaled to [0, 1] (lowest 0); masked heads 0."""
  flat = jnp.where(active, values, jnp.inf).ravel()
  order = jnp.argsort(flat, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.float32).at[order].set(
      jnp.arange(flat.size, dtype=jnp.float32))
  n = jnp.sum(active)
  return jnp.where(active, ranks.reshape(values.shape) / jnp.maximum(n - 1, 1), 0.0)


def combined_score(importance, normalized_entropy, *, mask=None, weight: float = 0.5):
  """weight * r(importance) + (1 - weight) * r(1 - normalized_entropy), r = percentile
  rank among the active heads (0 lowest, 1 highest); masked heads score 0."""
  importance = jnp.asarray(importance, jnp.float32)
  active = jnp.ones(importance.shape, bool) if mask is None else (jnp.asarray(mask) != 0)
  focus = 1.0 - jnp.asarray(normalized_entropy, jnp.float32)
  score = (weight * _percentile_rank(importance, active)
           + (1.0 - weight) * _percentile_rank(focus, active))
  return jnp.where(active, score, 0.0)


def random_scores(key: jax.Array, shape) -> jax.Array:
  """The control: uniform scores, so pruning by them removes random heads."""
  return jax.random.uniform(key, tuple(shape))


def scores(stats: HeadStats, method: str, *, key: Optional[jax.Array] = None,
           weight: float = 0.5) -> jax.Array:
  """Pruning scores [n_layer, n_head] (lower = pruned first) by `method`:
  "gradient" (normalised gradient importance), "entropy" (1 - normalised entropy:
  diffuse heads go first), "combined" (`combined_score`), "random" (needs `key`)."""
  if method == "gradient":
    return stats.importance
  if method == "entropy":
    return 1.0 - stats.normalized_entropy
  if method == "combined":
    return combined_score(stats.importance, stats.normalized_entropy, mask=stats.mask,
                          weight=weight)
  if method == "random":
    if key is None:
      raise errors.ConfigError("scores(method='random') needs key=.")
    return random_scores(key, stats.importance.shape)
  raise errors.unknown_key("head score method", method, METHODS)
