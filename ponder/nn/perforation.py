"""Learned attention perforation: an input-dependent block mask per (layer, head).

The second half of the DendriticBERT seed (its "technical writeup", Sec. 4.1 and 6.3.1):
each head's attention map is cut into `block x block` tiles, a cheap scorer rates every
tile from the data, a relaxed mask is trained with a sparsity objective, and at
inference the hard mask goes to the block-sparse kernel so skipped tiles cost nothing.

What each piece is, and where it departs from the seed's sketch:

* `block_scores` (the scorer). For a head with queries q and keys k `[b, h, t, d]`, the
  block features are the means of each block's q and k over its real (non-padding)
  tokens, q_bar, k_bar `[b, h, nb, d]`; the score of tile (i, j) is

      s_hij = (q_bar_hi . k_bar_hj) / sqrt(d) * exp(-log_tau_h) + beta_h      (1)

  with a learned per-head temperature tau_h and bias beta_h; a key block with no real
  token scores -1e9 (never kept: padded SST-2 batches would otherwise spend [CLS]'s
  row budget on padding tiles, which by (1) score beta_h). The seed's importance
  network (query/key projections of the hidden states times a [512, 512, h] positional
  table, then a threshold MLP) scores every token pair, which costs as much as the
  attention it is meant to skip; (1) scores tile pairs from the projections the
  attention already computes. Cost per head: pooling 2 t d adds, scores 2 nb^2 d
  multiply-adds, against 4 t^2 d for dense attention: a fraction
  (t d + nb^2 d) / (2 t^2 d) ~ 1 / (2 t) + 1 / (2 block^2), i.e. 0.1% at t = 512,
  block 64 (measured in benchmarks/perforation.py as compiled FLOPs).
* `relaxed_mask` (training). m = sigmoid((s + L) / T) with logistic noise
  L = log u - log(1 - u), u ~ U(0, 1) (the binary Concrete / Gumbel-sigmoid relaxation,
  Maddison et al. 2017 Eq. 5; Jang et al. 2017), T annealed geometrically to a floor
  (`temperature`). After `hard_after` steps the forward pass uses the hard mask
  1[s + L > 0] with the relaxation's gradient (straight-through, Bengio et al. 2013), so
  training sees the mask it will run with.
* `forced_tiles`: the diagonal tiles are always kept (every query keeps its own block,
  so no row is empty), and optionally the [CLS] column (key block 0, every query sees
  [CLS]) and row (query block 0 sees everything). A full row makes the CPU gathered path
  dense (its cost is set by the fullest row), so the row is off by default.
* `cap_rows`: at most `row_budget` tiles per query-block row (the highest-scoring),
  in training and at inference alike; forced tiles are kept beyond it (only the
  [CLS] row has more forced tiles than the budget). The static `max_active_blocks` of
  the XLA path (`max_active`: the budget, or every block with the [CLS] row) always
  holds, so the path never falls back to dense.
* `regulariser`: the seed's `SparsityRegularizationLoss` term by term (Sec. 6.3.1), each
  with its own weight; the target sparsity is ramped from `initial_sparsity` to
  `target_sparsity` over `sparsity_warmup_steps` (the issue's ramp; the seed instead
  multiplies the target term by min(step / total, 1)).
* Baselines at the same density (the seed's ablations): `fixed_pattern` (random,
  band + global, BigBird-like) and the "static" scorer, a learned
  per-head [nb, nb] score table with no input dependence.
"""

import dataclasses
import math
from typing import Callable, Optional

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ponder import errors

MODES = ("learned", "static", "random", "band_global", "bigbird")


@dataclasses.dataclass(frozen=True)
class PerforationSpec:
  """Static settings of the perforation of every attention layer."""
  mode: str = "learned"          # one of MODES
  block: int = 64                # tile side (query and key)
  target_sparsity: float = 0.5   # final share of tiles skipped
  initial_sparsity: float = 0.0  # start of the target ramp
  sparsity_warmup_steps: int = 1000  # steps of the linear target ramp
  temperature_init: float = 1.0  # T at step 0
  temperature_floor: float = 0.1  # T never goes below this
  anneal_steps: int = 1000       # steps over which T falls geometrically to the floor
  hard_after: int = 200          # straight-through hard mask from this step on
  keep_cls_column: bool = True   # every query keeps key block 0 ([CLS])
  keep_cls_row: bool = False     # query block 0 keeps every key block (dense CPU cost)
  bias_init: float = 2.0         # beta_h at init: sigmoid(2) = 0.88, start near dense
  lambda_sparse: float = 1.0     # weight of (achieved - target sparsity)^2
  lambda_l1: float = 0.0         # weight of mean |m| (seed: 0.001)
  lambda_entropy: float = 0.0    # weight of -H(m normalised per row) (seed: 0.0001)
  lambda_consistency: float = 0.0  # weight of the std of per-layer sparsity (seed: 0.001)
  seed: int = 0                  # fixed patterns (random, bigbird) are drawn from it

  def __post_init__(self):
    if self.mode not in MODES:
      raise errors.unknown_key("perforation mode", self.mode, MODES)
    if self.block < 1:
      raise errors.ConfigError(f"perforation block={self.block} must be >= 1.")
    for name in ("target_sparsity", "initial_sparsity"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise errors.ConfigError(f"perforation {name}={getattr(self, name)} must lie in "
                                 "[0, 1): the share of tiles skipped.")
    if not 0 < self.temperature_floor <= self.temperature_init:
      raise errors.ConfigError(
          f"perforation temperature_floor={self.temperature_floor} must be in "
          f"(0, temperature_init={self.temperature_init}].")

  def grid(self, seq_len: int) -> int:
    """Blocks per side for a sequence of seq_len tokens (the last one may be partial)."""
    return -(-seq_len // self.block)

  def row_budget(self, nb: int) -> int:
    """Kept tiles per row of an nb x nb mask: the target density's share of the row
    (rounded up), and at least the forced tiles (diagonal, [CLS] column)."""
    return int(min(nb, max(_forced_count(self, nb),
                           math.ceil((1.0 - self.target_sparsity) * nb - 1e-6))))

  def max_active(self, seq_len: int) -> int:
    """The static `max_active_blocks` of a sequence of seq_len tokens: the fullest
    row's tiles, `row_budget` (the cap that makes each row's sparsity at least the
    target's), or every block when the [CLS] row is kept."""
    nb = self.grid(seq_len)
    return nb if self.keep_cls_row else self.row_budget(nb)


def _forced_count(spec: PerforationSpec, nb: int) -> int:
  """Forced tiles in a row other than query block 0: the diagonal and [CLS] column."""
  return 1 + int(spec.keep_cls_column and nb > 1)


@flax.struct.dataclass
class Control:
  """The step-dependent part of the perforation, passed to the model at each call.

  temperature: T of the relaxation (scalar array). hard: 1.0 for the straight-through
  hard mask, 0.0 for the relaxed one (scalar array, so one compiled step serves both).
  target: the step's ramped target sparsity; training caps rows at its density.
  impl: the path at train=False: `ponder.ops.attention`'s "auto" | "pallas" | "xla", or
  "dense" for the masked dense attention of training.
  """
  temperature: jax.Array
  hard: jax.Array
  target: jax.Array  # The ramped target sparsity of this step (`target_sparsity`).
  impl: str = flax.struct.field(pytree_node=False, default="auto")


def temperature(step, spec: PerforationSpec):
  """T(step) = max(floor, T0 (floor / T0)^(step / anneal_steps)): geometric annealing."""
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(spec.anneal_steps, 1), 1.0)
  return spec.temperature_init * (spec.temperature_floor / spec.temperature_init) ** frac


def target_sparsity(step, spec: PerforationSpec):
  """The ramped target: initial + (final - initial) min(step / warmup, 1)."""
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(spec.sparsity_warmup_steps, 1),
                     1.0)
  return spec.initial_sparsity + (spec.target_sparsity - spec.initial_sparsity) * frac


IMPLS = ("auto", "pallas", "xla", "dense")


def control(step, spec: PerforationSpec, *, impl: str = "auto") -> Control:
  """The Control of step `step` (impl: see `Control`)."""
  if impl not in IMPLS:
    raise errors.unknown_key("perforation impl", impl, IMPLS)
  hard = (jnp.asarray(step) >= spec.hard_after).astype(jnp.float32)
  return Control(temperature(step, spec), hard, target_sparsity(step, spec), impl)


def pool_blocks(x, valid, block: int):
  """Mean of each block of x `[b, h, t, d]` over its valid tokens (`valid` [b, t]);
  `[b, h, nb, d]`, zeros for an all-padding block."""
  b, h, t, d = x.shape
  nb = -(-t // block)
  pad = nb * block - t
  x = jnp.pad(x * valid[:, None, :, None].astype(x.dtype), ((0, 0), (0, 0), (0, pad), (0, 0)))
  count = jnp.pad(valid.astype(x.dtype), ((0, 0), (0, pad))).reshape(b, nb, block).sum(-1)
  total = x.reshape(b, h, nb, block, d).sum(3)
  return total / jnp.maximum(count, 1.0)[:, None, :, None]


# The score of a key block with no real token: far below any real score and any
# logistic noise, so such a tile is never kept unless forced (sigmoid gives exactly 0).
PADDING_SCORE = -1e9


def block_scores(q, k, valid, *, block: int, log_tau, bias):
  """Eq. (1): scaled dot products of pooled q and k blocks, per-head temperature and
  bias. q, k `[b, h, t, d]`; log_tau, bias `[h]`; returns float32 `[b, h, nb, nb]`.
  Key blocks that are all padding score PADDING_SCORE: attention gives their keys no
  weight, so keeping such a tile would only spend the row's budget (by (1) alone its
  score would be beta_h, above every real tile with q_bar . k_bar < 0)."""
  qb = pool_blocks(q.astype(jnp.float32), valid, block)
  kb = pool_blocks(k.astype(jnp.float32), valid, block)
  s = jnp.einsum("bhid,bhjd->bhij", qb, kb) / math.sqrt(q.shape[-1])
  s = s * jnp.exp(-log_tau)[None, :, None, None] + bias[None, :, None, None]
  nb = kb.shape[2]
  real = jnp.pad(valid, ((0, 0), (0, nb * block - valid.shape[1]))).reshape(
      valid.shape[0], nb, block).any(-1)
  return jnp.where(real[:, None, None, :], s, PADDING_SCORE)


def forced_tiles(nb: int, *, cls_column: bool, cls_row: bool):
  """Boolean [nb, nb]: the tiles every mask keeps (diagonal, optional [CLS] col/row)."""
  forced = np.eye(nb, dtype=bool)
  if cls_column:
    forced[:, 0] = True
  if cls_row:
    forced[0, :] = True
  return forced  # numpy: a constant, also when called under jit (fixed_pattern reads it).


def cap_rows(keep, scores, forced, max_active):
  """keep (float `[..., nq, nk]`) limited to the `max_active` highest-ranked tiles of
  each row, forced tiles ranked first and kept even past the cap (the [CLS] row's).
  max_active may be a traced scalar (training ramps it with the target); a static one
  >= nk returns keep as it is."""
  nk = keep.shape[-1]
  if isinstance(max_active, int) and max_active >= nk:
    return keep
  rank_key = jnp.where(forced, jnp.inf, jax.lax.stop_gradient(scores))
  # The rank of each tile in its row (ties by column), so exactly max_active survive
  # even where scores tie (a static table starts with all its scores equal).
  order = jnp.argsort(-rank_key, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return keep * ((rank < max_active) | forced).astype(keep.dtype)


def logistic_noise(key, shape):
  """L = log u - log(1 - u), u ~ U(0, 1): the difference of two Gumbel variables."""
  u = jax.random.uniform(key, shape, minval=1e-6, maxval=1.0 - 1e-6)
  return jnp.log(u) - jnp.log1p(-u)


def relaxed_mask(scores, key, temperature, hard):
  """(forward mask, soft mask): soft = sigmoid((s + L) / T); the forward mask is soft
  when hard == 0 and the straight-through 1[s + L > 0] (gradient of soft) when 1."""
  logits = scores + logistic_noise(key, scores.shape)
  soft = jax.nn.sigmoid(logits / temperature)
  # hard + (soft - soft): exactly 0 or 1 forward, soft's gradient backward.
  straight = (logits > 0).astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))
  return hard * straight + (1.0 - hard) * soft, soft


def hard_mask(scores, forced, max_active: int):
  """The deterministic inference mask: 1[s > 0], forced tiles kept, rows capped."""
  keep = (scores > 0) | forced
  return cap_rows(keep.astype(jnp.float32), scores, forced, max_active) > 0


# --- Fixed baseline patterns (numpy: built once per shape, constants in the graph) -------
# Each pattern is a priority per tile; a row keeps its `row_budget` highest (forced tiles
# first), so every baseline has exactly the learned mask's row bound and density.


def _top_per_row(priority: np.ndarray, k: int) -> np.ndarray:
  order = np.argsort(-priority, axis=-1, kind="stable")[..., :k]
  m = np.zeros(priority.shape, bool)
  np.put_along_axis(m, order, True, axis=-1)
  return m


def band_global_priority(nb: int) -> np.ndarray:
  """A local band around the diagonal (nearest first) plus the first key block as a
  global column (the [CLS] block)."""
  i, j = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
  return -np.abs(i - j) + np.where(j == 0, 2 * nb, 0)


def bigbird_priority(nb: int, rng: np.random.Generator) -> np.ndarray:
  """BigBird-like (Zaheer et al. 2020, Sec. 2, ITC form): a global first block, a
  3-tile band, then random tiles."""
  i, j = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
  return np.where(j == 0, 3.0, np.where(np.abs(i - j) <= 1, 2.0, rng.random((nb, nb))))


def fixed_pattern(spec: PerforationSpec, nb: int, heads: int, layer: int) -> np.ndarray:
  """The [heads, nb, nb] mask of a fixed baseline mode (random, band_global, bigbird),
  one draw per (layer, head) from (spec.seed, layer), `spec.row_budget(nb)` per row."""
  rng = np.random.default_rng((spec.seed, layer))
  forced = forced_tiles(nb, cls_column=spec.keep_cls_column, cls_row=spec.keep_cls_row)
  if spec.mode == "band_global":
    priority = np.broadcast_to(band_global_priority(nb), (heads, nb, nb))
  elif spec.mode == "bigbird":
    priority = np.stack([bigbird_priority(nb, rng) for _ in range(heads)])
  else:
    priority = rng.random((heads, nb, nb))
  return _top_per_row(np.where(forced, np.inf, priority), spec.row_budget(nb)) | forced


class BlockScorer(nn.Module):
  """Scores `[b, h, nb, nb]` of one attention layer: Eq. (1) ("learned") or a learned
  per-head table ("static"). Parameters: log_tau, bias `[h]` or table `[h, nb, nb]`."""
  spec: PerforationSpec
  heads: int
  max_blocks: int  # table side of the static mode (max_position_embeddings / block)

  @nn.compact
  def __call__(self, q, k, valid):
    spec, h = self.spec, self.heads
    nb = spec.grid(q.shape[2])
    if spec.mode == "static":
      table = self.param("table", nn.initializers.constant(spec.bias_init),
                         (h, self.max_blocks, self.max_blocks))
      return jnp.broadcast_to(table[None, :, :nb, :nb], (q.shape[0], h, nb, nb))
    log_tau = self.param("log_tau", nn.initializers.zeros, (h,))
    bias = self.param("bias", nn.initializers.constant(spec.bias_init), (h,))
    return block_scores(q, k, valid, block=spec.block, log_tau=log_tau, bias=bias)


def layer_mask(scorer: Optional[nn.Module], spec: PerforationSpec, q, k, valid, *,
               layer: int, train: bool, ctrl: Optional[Control], key):
  """(forward mask float [b|1, h, nb, nb], soft mask or None, hard bool mask).

  Fixed patterns give the same constant for all three (no gradient, nothing to learn).
  Learned / static scores: in training the relaxed (or straight-through) mask, capped;
  out of training the deterministic hard mask.
  """
  nb, heads = spec.grid(q.shape[2]), q.shape[1]
  forced = forced_tiles(nb, cls_column=spec.keep_cls_column, cls_row=spec.keep_cls_row)
  if scorer is None:
    fixed = jnp.asarray(fixed_pattern(spec, nb, heads, layer))[None]
    return fixed.astype(jnp.float32), None, fixed
  scores = scorer(q, k, valid)
  hard = hard_mask(scores, forced, spec.row_budget(nb))
  if not train:
    return hard.astype(jnp.float32), None, hard
  # Training keeps the ramped target's share of each row (ceil, as `row_budget`), so the
  # mask tightens with the ramp; the regulariser sees the capped soft mask, the one run.
  budget = jnp.clip(jnp.ceil((1.0 - ctrl.target) * nb - 1e-6).astype(jnp.int32),
                    _forced_count(spec, nb), nb)
  mask, soft = relaxed_mask(scores, key, ctrl.temperature, ctrl.hard)
  mask = cap_rows(jnp.where(forced, 1.0, mask), scores, forced, budget)
  soft = cap_rows(jnp.where(forced, 1.0, soft), scores, forced, budget)
  return mask, soft, mask > 0.5


def masked_attention(q, k, v, block_mask, key_valid, *, block: int,
                     dropout: Optional[Callable] = None):
  """Softmax attention renormalised over the kept tiles (the kernel's semantics), with
  a real-valued block mask m so gradients reach it:
      P_ij = m_ij e^{s_ij} / sum_l m_il e^{s_il},  s = q k^T / sqrt(d), padding keys out.
  q, k, v `[b, h, t, d]`; block_mask `[b|1, h|1, nb, nb]`; key_valid `[b, t]`.
  Rows with nothing kept give zeros, as the kernel does. `dropout` (P -> P), applied
  to the probabilities before they weight v, is BERT's attention dropout: a perforated
  model then trains with the same regularisation as the dense one.

  Gradient to a dropped tile (m_T = 0): the secant from dropped to kept instead of the
  tangent at 0. Row i's output along m_T is o(m_T) = (A + m_T B) / (D + m_T W), with D
  the row's kept weight and W = sum_{k in T} e^{s_ik}; the tangent at 0 is
  (B - o W) / D, the secant o(1) - o(0) = (B - o W) / (D + W). When T holds the row's
  largest logits W / D is unbounded (e^80 under the cap below; grad_norm 6.6e10 was
  seen), while the secant is at most |v - o|: the straight-through step then asks
  "how much would keeping T change the output", not its first-order rate at 0. The
  forward value, and the gradient at kept or soft tiles (m > 0), are unchanged."""
  t = q.shape[2]
  nb = block_mask.shape[-1]
  m = jnp.repeat(jnp.repeat(block_mask, block, axis=2), block, axis=3)[:, :, :t, :t]
  valid = key_valid[:, None, None, :]
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  m = m.astype(jnp.float32)
  # Shift by the row's largest log-weight log m + s over kept real keys, so the largest
  # weight is exactly 1 and the denominator >= 1: no underflow when the kept tiles'
  # logits lie far below a dropped tile's (a hard mask on real attention does that), and
  # no 1 / den^2 blow-up in the gradient. Exponents are capped at 80 (e^80 < f32 max),
  # so a dropped tile's m = 0 multiplies a finite number; padding keys get exp(-inf) = 0.
  log_w = jnp.where(valid & (m > 0), s + jnp.log(jnp.maximum(m, 1e-30)), -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(log_w, -1, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.exp(jnp.where(valid, jnp.minimum(s - top, 80.0), -jnp.inf))
  # The secant factor D / (D + W_T) on the gradient of dropped tiles (docstring).
  m_fwd = jax.lax.stop_gradient(m)
  e_fwd = jax.lax.stop_gradient(e)
  kept_weight = jnp.sum(m_fwd * e_fwd, -1, keepdims=True)
  per_tile = jnp.pad(e_fwd, ((0, 0), (0, 0), (0, 0), (0, nb * block - t)))
  per_tile = per_tile.reshape(*e.shape[:3], nb, block).sum(-1)
  tile_weight = jnp.repeat(per_tile, block, axis=-1)[..., :t]
  secant = jnp.where(m_fwd > 0, 1.0,
                     kept_weight / jnp.maximum(kept_weight + tile_weight, 1e-30))
  m = m_fwd + (m - m_fwd) * secant
  w = m * e
  den = w.sum(-1, keepdims=True)
  p = w / jnp.where(den > 0, den, 1.0)
  if dropout is not None:
    p = dropout(p)
  return jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v)


# --- The seed's regulariser (Sec. 6.3.1), term by term -----------------------------------


def sparsity(masks):
  """Achieved sparsity 1 - mean(m) over every tile of `masks` (any shape)."""
  return 1.0 - jnp.mean(masks)


def target_term(masks, target):
  """(1 - mean(m) - target)^2: the seed's MSE between achieved and target sparsity."""
  return (sparsity(masks) - target) ** 2


def l1_term(masks):
  """mean |m| (the seed's "L1 regularization on importance scores", on the mask)."""
  return jnp.mean(jnp.abs(masks))


def entropy_term(masks, eps: float = 1e-8):
  """-mean_rows H(p), p = m / (sum_row m + eps): the seed maximises each row's entropy
  ("diverse patterns"), so the loss term is its negative."""
  p = masks / (masks.sum(-1, keepdims=True) + eps)
  return jnp.mean(jnp.sum(p * jnp.log(p + eps), axis=-1))


def consistency_term(masks):
  """std over layers of each layer's sparsity; masks `[layers, ...]`. torch's .std()
  (the seed's) is the unbiased one (ddof = 1); 0 for a single layer."""
  if masks.shape[0] < 2:
    return jnp.zeros((), jnp.float32)
  per_layer = 1.0 - masks.reshape(masks.shape[0], -1).mean(-1)
  return jnp.std(per_layer, ddof=1)


def regulariser(masks, step, spec: PerforationSpec):
  """(total, terms): the weighted sum of the four terms on `masks` [layers, b, h, nq, nk]
  (the soft masks, so every term has a gradient), and each term unweighted."""
  terms = {"target": target_term(masks, target_sparsity(step, spec)),
           "l1": l1_term(masks), "entropy": entropy_term(masks),
           "consistency": consistency_term(masks)}
  weights = {"target": spec.lambda_sparse, "l1": spec.lambda_l1,
             "entropy": spec.lambda_entropy, "consistency": spec.lambda_consistency}
  return sum(weights[n] * terms[n] for n in terms), terms


def collect(intermediates, name: str):
  """The sown `name` masks ("perforation_soft" | "perforation_hard") of every layer,
  stacked in layer order: [layers, b, h, nq, nk], or None when nothing was sown."""
  flat = traverse_util.flatten_dict(intermediates)
  found = {}
  for path, value in flat.items():
    if path[-1] == name:
      layer = next(int(p.removeprefix("layer_")) for p in path if p.startswith("layer_"))
      found[layer] = value[0]
  return jnp.stack([found[i] for i in sorted(found)]) if found else None
