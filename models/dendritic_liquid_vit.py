"""DendriticLiquid-ViT: dendritic token importance, a CfC liquid state across depth, and
DynamicViT token pruning, on the ViT of `models/vit.py`.

Three published pieces, each a tested block in `ponder/nn/`:

  * dendritic gating (Chavlis & Poirazi 2025): `DendriticGate`, token importance
    a_n = sigmoid(max_k branch_k(x_n)) in (0, 1), branch biases +2 so a_n ~ 0.88 at init;
  * closed-form continuous-time cells (Hasani et al. 2022, Eq. 10 of the Nature MI
    article): `CfCCell`, h' = CfC(x, h, t);
  * DynamicViT (Rao et al. 2021): `TokenPredictor` (Eq. 1-5), `keep_decision`
    (Gumbel-softmax with straight-through gradient, Eq. 6), masked attention
    (Eq. 7-9, through `models.vit.SelfAttention(policy=...)`) and, at inference, a
    top-k gather of the kept tokens (`top_index`, Sec. 3.4).

Both models are a `vit.ViT` (same fields, its `embed_patches`, `encode` block loop and
`classify` head, so the same parameter names `embed`, `block{l}`, `ln_final`, `head`)
with a hook around each block: a ViT's parameters are a subset of theirs. The ViT's
`compute_dtype` reaches the gates, the predictors, the CfC cell and the liquid output
projections too: every dense matmul takes bf16 operands with float32 accumulation.

`DendriticViT` (the ablation: gates, no pruning). Before every block l a gate scores
the tokens, a^l = DendriticGate_l(z^{l-1}) [batch, n]. Nothing is pruned. The
importances are returned (`return_aux=True`) and, with `scale_residual=True`, scale
each token's residual update,

    z^l = z^{l-1} + a^l (Block_l(z^{l-1}) - z^{l-1})       (class token: a = 1),

so Block_l's two residual branches (ViT Eq. 2-3) are both weighted by a^l. With
`scale_residual=False` it computes exactly the ViT.

`DendriticLiquidViT`. Three additions to the ViT, at the blocks named in `stages`
(DynamicViT prunes before blocks 3, 6, 9 of 12):

  1. Keep score. At stage s, before block l = stages[s], the DynamicViT predictor gives
     two logits per token from its local and global features, pi = TokenPredictor(
     z^{l-1}, D^{s-1}) (Eq. 1-5), and the dendritic gate a raw somatic score
     u_n = max_k branch_k(z_n) (the log-odds of its importance a_n = sigmoid(u_n)). The
     two enter the keep decision as a tempered product of experts on the keep odds,
         pi'_{n,keep} = pi_{n,keep} + alpha u_n,   pi'_{n,drop} = pi_{n,drop},
     so P(keep_n) = sigmoid(pi_keep - pi_drop + alpha u_n) = sigmoid of the sum of the
     predictor's log-odds and alpha times the gate's: odds_pred x odds_gate^alpha.
     alpha (`gate_scale{s}`) is a learned scalar that starts small (`gate_scale_init`,
     0.1), so the gate first nudges the predictor's decision and the gradient of the
     keep logit decides how much it counts. u enters raw: log(a / (1 - a)) computed
     from a clipped sigmoid (the first version) is flat beyond |u| ~ 13.8, where 18%
     of the stage-2 tokens of a trained model sat with no gradient, and its gate
     log-odds (mean 8.2) swamped the predictor's (0.35). The predictor's keep logit
     starts with bias `keep_bias` (+1): with the gate's initial u ~ 2-3 every token
     starts with keep probability ~0.78, so pruning starts gently (which matters most
     when fine-tuning a trained ViT: DynamicViT's protocol).
  2. Training (train=True) samples D^s = GumbelSoftmax(pi')_keep * D^{s-1} (Eq. 6):
     a hard 0/1 mask with the straight-through gradient of the soft sample after
     `soft_warmup_steps`, the soft sample before (a soft warm-up); the Gumbel
     temperature anneals from `temperature_start` to `temperature_end` over
     `anneal_steps` (`gumbel_temperature`). The blocks from the stage on attend with the
     policy G_ij = 1 if i = j else D_j (Eq. 8-9): dropped tokens are ignored by the
     others, each token still attends to itself, the class token is always kept. With
     `step=None` the schedules are at their end (hard masks, final temperature). The
     Gumbel noise draws from the "dropout" rng stream.
     Inference (train=False) really removes tokens: it keeps the class token and the
     top ceil(keep_ratio x (n - 1)) tokens by keep score pi'_keep - pi'_drop
     (`token_pruning.top_index`), a static count, so every later block runs on fewer
     tokens and the compiled FLOPs fall. After S stages about keep_ratio^S of the patch
     tokens remain, the targets of the keep-ratio loss (Eq. 13, `keep_ratio_targets`).
  3. Liquid state across depth. One CfC cell (shared by all blocks, as a liquid network
     shares its cell across time) carries a per-token state h through depth:
         y^l = Block_l(z^{l-1}),   h^l = CfC(y^l, h^{l-1}, t_l),   z^l = y^l + W^l_out h^l,
     with h^0 = 0 and depth time t_l = (l + 1) / depth, the normalised layer time (the
     gate sigma(W_a z t + W_b z) opens further in later blocks); a per-token importance
     time would exist only at the pruning stages. W^l_out starts at zero, so at init
     (and with W_out forced to zero: the "neutral" gate) the liquid path adds nothing
     and the model is the pruned ViT; CfC parameters live under `cfc` (a lower learning
     rate, `optim.lr_scales`). Pruned tokens' states are gathered with the tokens. With
     liquid_blocks="stages" the update runs only after the blocks l in `stages`
     (elsewhere z^l = y^l and h is carried unchanged).

`__call__(images, *, train, step=None, return_aux=False)` returns logits, or
(logits, aux) with aux:
  "importance": per stage (DendriticViT: per block) [batch, n_stage] gate outputs;
  "keep_masks": per stage [batch, n] masks D^s (training; empty at inference);
  "kept_positions": per stage [batch, n_kept] input-token indices of the tokens kept
    (inference; empty in training), "importance"[s] scores the tokens at stage s's input;
  "keep_scores": per stage [batch, n_stage] the score inference ranked the tokens by
    (`keep_policy`'s; empty in training);
  "num_tokens": tokens (class token included) entering each stage's block;
  "final_tokens": [batch, n_final, width] after the final LayerNorm (token distillation,
    Eq. 11, in training where n_final = n).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import vit
from ponder import errors
from ponder.nn import cfc as cfc_lib
from ponder.nn import dense
from ponder.nn import dendrites
from ponder.nn import token_pruning

class DendriticViT(vit.ViT):
  """ViT with a `DendriticGate` before every block; nothing pruned (the ablation).

  Fields of `vit.ViT`, plus: num_branches, hidden_dim (of each gate), scale_residual
  (the importance scales each token's residual update; class token 1).
  """
  num_branches: int = 4
  hidden_dim: int = 64
  scale_residual: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, return_aux: bool = False):
    del step  # No schedule; accepted so every model of this file is called alike.
    importances = []

    def gated_block(l, x, block):
      a = dendrites.DendriticGate(self.num_branches, self.hidden_dim,
                                  compute_dtype=self.compute_dtype, name=f"gate{l}")(x)
      importances.append(a)
      y = block(x)
      if self.scale_residual:
        a = a.at[:, 0].set(1.0)  # The class token's update is never damped.
        y = x + a[..., None] * (y - x)
      return y

    x = self.encode(self.embed_patches(images, train=train), train=train, hook=gated_block)
    logits, final = self.classify(x)
    if not return_aux:
      return logits
    n = x.shape[1]
    return logits, {"importance": importances, "keep_masks": [], "kept_positions": [],
                    "keep_scores": [], "num_tokens": [n] * self.depth,
                    "final_tokens": final}


KEEP_POLICIES = ("learned", "inverted", "random", "pixel_variance")


def patch_variance(images, patch: int):
  """[batch, 1 + patches]: each patch's pixel variance (over its p x p x C values, in
  the order of `vit.PatchEmbed`'s tokens); the class token's entry is 0."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  var = jnp.var(x, axis=(2, 4, 5)).reshape(b, -1)
  return jnp.concatenate([jnp.zeros((b, 1), var.dtype), var], axis=1)


def policy_score(policy: str, learned, positions, variance, key):
  """The inference keep score of `policy` (KEEP_POLICIES) for the tokens at `positions`
  [batch, n] (input-token indices): `learned` [batch, n] is the model's own score,
  `variance` [batch, 1 + patches] `patch_variance`, `key` the random policy's."""
  if policy == "learned":
    return learned
  if policy == "inverted":
    return -learned
  if policy == "random":
    return jax.random.uniform(key, learned.shape, learned.dtype)
  return jnp.take_along_axis(variance, positions, axis=1)


class DendriticLiquidViT(vit.ViT):
  """Dendritic importance + DynamicViT pruning at `stages` + a CfC state across depth.

  Fields of `vit.ViT`, plus:
    num_branches, hidden_dim: each stage's `DendriticGate`.
    cfc_mode, cfc_backbone_units: the shared `CfCCell` ("default" | "no_gate" | "pure").
    liquid_blocks: "all" (the liquid state after every block) or "stages" (only after the
      blocks at `stages`: fewer CfC steps).
    stages: block indices before which tokens are pruned (0 <= s < depth, increasing).
    keep_ratio: rho, the fraction of the remaining patch tokens each stage keeps.
    anneal_steps: Gumbel temperature goes temperature_start -> temperature_end over these.
    soft_warmup_steps: steps of soft (relaxed) masks before hard straight-through ones.
    temperature_start, temperature_end: the Gumbel-softmax temperatures.
    gate_scale_init: the initial alpha, the weight of the gate's score in the keep
      log-odds (learned, one per stage).
    keep_bias: the initial keep log-odds bias of every stage's predictor.
    keep_policy: which tokens inference keeps, at the same counts (ablations, same
      weights): "learned" (the keep score), "inverted" (the lowest keep scores),
      "random" (scores drawn from `policy_seed`, independent of the image; one draw
      per stage and batch row), "pixel_variance" (a saliency heuristic: the patches
      whose input pixels vary most). Training always uses the learned decision.
    policy_seed: the seed of the "random" policy.
  """
  num_branches: int = 4
  hidden_dim: int = 64
  cfc_mode: str = "default"
  cfc_backbone_units: int = 128
  liquid_blocks: str = "all"
  stages: Sequence[int] = (1, 3, 5)
  keep_ratio: float = 0.7
  anneal_steps: int = 10_000
  soft_warmup_steps: int = 1_000
  temperature_start: float = 5.0
  temperature_end: float = 0.1
  gate_scale_init: float = 0.1
  keep_bias: float = 1.0
  keep_policy: str = "learned"
  policy_seed: int = 0

  def keep_ratio_targets(self) -> tuple:
    """Target kept fraction of the patch tokens after each stage (rho, rho^2, ...)."""
    return token_pruning.keep_ratio_targets(self.keep_ratio, len(self.stages))

  def _check(self):
    stages = tuple(self.stages)
    if list(stages) != sorted(set(stages)) or any(not 0 <= s < self.depth for s in stages):
      raise errors.ConfigError(
          f"stages {stages} must be increasing block indices in [0, depth={self.depth})")
    if self.liquid_blocks not in ("all", "stages"):
      raise errors.unknown_key("liquid_blocks", self.liquid_blocks, ("all", "stages"))
    if self.keep_policy not in KEEP_POLICIES:
      raise errors.unknown_key("keep_policy", self.keep_policy, KEEP_POLICIES)
    if not 0.0 < self.keep_ratio <= 1.0:
      raise errors.ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
    return stages

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, return_aux: bool = False):
    stages = self._check()
    if step is None:  # The trained model: schedules at their end.
      temperature, hard = self.temperature_end, True
    else:
      temperature = token_pruning.gumbel_temperature(
          step, anneal_steps=max(self.anneal_steps, 1), start=self.temperature_start,
          end=self.temperature_end)
      hard = token_pruning.use_hard_mask(step, soft_warmup_steps=self.soft_warmup_steps)
    x = self.embed_patches(images, train=train)
    b, n, _ = x.shape
    cell = cfc_lib.CfCCell(self.width, self.cfc_backbone_units, mode=self.cfc_mode,
                           compute_dtype=self.compute_dtype, name="cfc")
    mask = jnp.ones((b, n), x.dtype)  # D^0: everything kept.
    h = jnp.zeros_like(x)  # Liquid state h^0.
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))  # Each token's index in the input.
    importances, masks, num_tokens, kept_positions, keep_scores = [], [], [], [], []
    variance = patch_variance(images, self.patch) if self.keep_policy == "pixel_variance" \
        else None

    def liquid_block(l, x, block):
      nonlocal mask, h, positions
      if l in stages:
        s = stages.index(l)
        u = dendrites.DendriticGate(self.num_branches, self.hidden_dim,
                                    compute_dtype=self.compute_dtype, name=f"gate{s}")(
                                        x, score=True)
        importances.append(nn.sigmoid(u))
        pi = token_pruning.TokenPredictor(keep_bias=self.keep_bias,
                                          compute_dtype=self.compute_dtype,
                                          name=f"predictor{s}")(x, mask)  # Eq. 1-5.
        alpha = self.param(f"gate_scale{s}", nn.initializers.constant(self.gate_scale_init),
                           ())
        pi = pi.at[..., token_pruning.KEEP].add(alpha * u)  # Tempered odds product.
        if train:
          mask = token_pruning.keep_decision(pi, mask, self.make_rng("dropout"),
                                             temperature=temperature, hard=hard)  # Eq. 6.
          masks.append(mask)
        else:
          score = policy_score(
              self.keep_policy, pi[..., token_pruning.KEEP] - pi[..., 1 - token_pruning.KEEP],
              positions, variance, jax.random.fold_in(jax.random.key(self.policy_seed), s))
          keep_scores.append(score)
          idx = token_pruning.top_index(score, self.keep_ratio)
          x, h = (jnp.take_along_axis(z, idx[..., None], axis=1) for z in (x, h))
          positions = jnp.take_along_axis(positions, idx, axis=1)
          kept_positions.append(positions)
          mask = jnp.ones(x.shape[:2], x.dtype)
        num_tokens.append(x.shape[1])
      # Eq. 7-9 once anything can be dropped.
      y = block(x, policy=mask if train and masks else None)
      if self.liquid_blocks == "all" or l in stages:
        h = cell(y, h, (l + 1) / self.depth)
        y = y + dense.Dense(self.width, kernel_init=nn.initializers.zeros,
                            compute_dtype=self.compute_dtype, name=f"liquid_out{l}")(h)
      return y

    x = self.encode(x, train=train, hook=liquid_block)
    logits, final = self.classify(x)
    if not return_aux:
      return logits
    return logits, {"importance": importances, "keep_masks": masks,
                    "kept_positions": kept_positions, "keep_scores": keep_scores,
                    "num_tokens": num_tokens, "final_tokens": final}


def kept_tokens(num_tokens: int, keep_ratio: float, num_stages: int) -> list:
  """Tokens (class token included) left after each inference stage, as `top_index`
  counts them: a static function of the image size and the config."""
  out = []
  for _ in range(num_stages):
    num_tokens = 1 + token_pruning.num_kept(num_tokens, keep_ratio)
    out.append(num_tokens)
  return out


Model = DendriticLiquidViT
