"""A GPT-2-style language model with TTT layers (Sun et al. 2024, arXiv 2407.04620) at
chosen blocks, and PonderTTT's adaptive number of inner steps (the seed document).

The backbone is models/gpt2.py's (embeddings, pre-LN blocks, final LN, tied output
layer; its `Attention`, `Mlp` and `Block` are reused, not copied). Blocks whose index is
in `ttt_positions` carry a TTT layer (`ponder.nn.ttt.TTTLayer`, Sec. 2) in one of two ways:

  ttt_mode="replace"  x + TTT(LN_1(x)), then x + MLP(LN_2(x)): the TTT layer takes the
                      place of self-attention, as in the paper's Transformer backbone.
  ttt_mode="add"      x + Attn(LN_1(x)) + TTT(LN_ttt(x)), then x + MLP(LN_2(x)): the TTT
                      layer is an extra residual branch beside attention, reading the
                      same block input through its own LayerNorm. TTT's output
                      projection theta_O starts at 0, so at initialisation the block
                      is exactly GPT-2's.

Inner steps (`steps` of `__call__`, passed to every TTT layer):
  None          `config.ttt_steps`: an int k, or "adaptive";
  int k         k steps in every mini-batch (0 = SKIP: no update, W_0 only);
  [n] int       k per mini-batch, n = ceil(seq / ttt_mini_batch), shared by the batch
                (`lax.switch`: a mini-batch with fewer steps runs fewer ops);
  [batch, seq]  k per token (loss masking over max(ttt_allowed_steps) steps);
  "adaptive"    PonderTTT: a first pass with k = 0 gives next-token entropies, their
                mean per mini-batch is the difficulty, the thresholds are calibrated on
                the current batch (percentiles `ponder_target` -> `ponder_buckets`,
                scaled to `ponder_budget` if set), and a second pass runs the allocated
                k ("batch" granularity: difficulty averaged over the batch, one k per
                mini-batch; "example": one k per example and mini-batch, as per-token
                steps). Fixed `ponder_thresholds` replace the per-batch calibration
                (which sees the whole batch, so it is not causal; `adaptive_steps`).
                The first pass is a full SKIP forward pass: count its FLOPs
                (`ponder_alloc.adaptive_flops_per_token`). No gradient flows through it.

The sequence is padded on the right to a multiple of `ttt_mini_batch` inside the model;
every layer is causal, so padding never changes the outputs at real positions.
"""

import dataclasses
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import gpt2
from ponder import errors
from ponder.nn import ponder_alloc
from ponder.nn import ttt

MODES = ("replace", "add")
GRANULARITIES = ("batch", "example")


@dataclasses.dataclass(frozen=True)
class TTTLMConfig(gpt2.GPT2Config):
  """GPT2Config's fields plus where and how the TTT layers run."""
  ttt_positions: tuple = (0,)  # Block indices that carry a TTT layer.
  ttt_mode: str = "add"  # "replace" attention or "add" a branch beside it.
  ttt_kind: str = "linear"  # Inner model: "linear" (TTT-Linear) or "mlp" (TTT-MLP).
  ttt_form: str = "grad"  # "grad" (jax.grad, any kind) or "dual" (TTT-Linear only).
  ttt_mini_batch: int = 16  # b, tokens per inner mini-batch (Sec. 2.4).
  ttt_steps: Union[int, str] = 1  # Default k: an int >= 0 or "adaptive".
  ttt_heads: Optional[int] = None  # TTT heads; None = n_head.
  ttt_eta_base: float = 1.0  # eta_base of the inner learning rate (Sec. 2.7).
  ttt_allowed_steps: tuple = ttt.ALLOWED_STEPS  # k values for array-valued steps.
  ponder_buckets: tuple = ponder_alloc.DEFAULT_BUCKETS  # Adaptive: k per bucket.
  ponder_target: tuple = ponder_alloc.DEFAULT_TARGET  # Adaptive: fraction per bucket.
  ponder_thresholds: tuple = ()  # Adaptive: fixed thresholds; () = calibrate per batch.
  ponder_budget: float = 0.0  # Adaptive: max mean k; 0 = no budget.
  ponder_granularity: str = "batch"  # Adaptive: "batch" or "example" (see above).
  ponder_causal: bool = True  # Adaptive: causal difficulty (ponder_alloc docstring).

  def __post_init__(self):
    super().__post_init__()
    # Configs from ml_collections hold lists; the config must stay hashable.
    for name in ("ttt_positions", "ttt_allowed_steps", "ponder_buckets", "ponder_target",
                 "ponder_thresholds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    bad = [p for p in self.ttt_positions if not 0 <= p < self.n_layer]
    if bad or len(set(self.ttt_positions)) != len(self.ttt_positions):
      raise errors.ConfigError(f"ttt_positions {self.ttt_positions} must be distinct block "
                               f"indices in [0, n_layer = {self.n_layer}).")
    if self.ttt_mode not in MODES:
      raise errors.unknown_key("ttt_mode", self.ttt_mode, MODES)
    if self.ttt_kind not in ttt.KINDS:
      raise errors.unknown_key("ttt_kind", self.ttt_kind, ttt.KINDS)
    if self.ttt_form not in ttt.FORMS:
      raise errors.unknown_key("ttt_form", self.ttt_form, ttt.FORMS)
    if self.ttt_form == "dual" and self.ttt_kind != "linear":
      raise errors.ConfigError("ttt_form='dual' exists for ttt_kind='linear' only.")
    if self.n_embd % (self.ttt_heads or self.n_head):
      raise errors.ConfigError(f"n_embd={self.n_embd} is not divisible by ttt_heads="
                               f"{self.ttt_heads}.")
    _check_steps_value(self.ttt_steps)
    if self.ponder_granularity not in GRANULARITIES:
      raise errors.unknown_key("ponder_granularity", self.ponder_granularity, GRANULARITIES)
    if not set(self.ponder_buckets) <= set(self.ttt_allowed_steps):
      raise errors.ConfigError(f"ponder_buckets {self.ponder_buckets} must be among "
                               f"ttt_allowed_steps {self.ttt_allowed_steps}.")
    ponder_alloc.check_buckets(self.ponder_target, self.ponder_buckets)
    if self.ponder_thresholds and len(self.ponder_thresholds) != len(self.ponder_buckets) - 1:
      raise errors.ConfigError(f"ponder_thresholds {self.ponder_thresholds} must hold "
                               f"len(ponder_buckets) - 1 = {len(self.ponder_buckets) - 1} "
                               "values (from ponder_alloc.calibrate), or be empty.")

  def gpt2_config(self) -> gpt2.GPT2Config:
    """The backbone's own config (the fields GPT-2 has)."""
    names = {f.name for f in dataclasses.fields(gpt2.GPT2Config)}
    return gpt2.GPT2Config(**{n: getattr(self, n) for n in names})


def _check_steps_value(steps) -> None:
  if isinstance(steps, str):
    if steps != "adaptive":
      raise errors.ConfigError(f"steps {steps!r}: give an int >= 0 or 'adaptive'.")
  elif isinstance(steps, (int, np.integer)) and steps < 0:
    raise errors.ConfigError(f"steps must be >= 0, got {steps}.")


STEPS_MODES = ("fixed", "skip", "adaptive")


def config(preset: str = "small", *, steps_mode: str = "fixed", **overrides) -> TTTLMConfig:
  """A gpt2 preset's sizes with fields overridden, e.g. config("tiny", ttt_positions=(1,)).

  steps_mode: "fixed" keeps ttt_steps (k), "skip" sets it to 0, "adaptive" to "adaptive"
  (so a config file can keep ttt_steps an int and switch the mode by name).
  """
  if preset not in gpt2.PRESETS:
    raise errors.unknown_key("GPT-2 preset", preset, gpt2.PRESETS)
  if steps_mode not in STEPS_MODES:
    raise errors.unknown_key("steps_mode", steps_mode, STEPS_MODES)
  fields = {**gpt2.PRESETS[preset], **overrides}
  if steps_mode != "fixed":
    fields["ttt_steps"] = 0 if steps_mode == "skip" else "adaptive"
  return TTTLMConfig(**fields)


class TTTBlock(nn.Module):
  """A pre-LN block with a TTT layer replacing attention or beside it (module docstring)."""
  config: TTTLMConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, positions, steps, train: bool):
    cfg = self.config
    eps = cfg.layer_norm_epsilon
    layer = ttt.TTTLayer(
        cfg.n_embd, cfg.ttt_heads or cfg.n_head, kind=cfg.ttt_kind,
        mini_batch=cfg.ttt_mini_batch, form=cfg.ttt_form, eta_base=cfg.ttt_eta_base,
        allowed_steps=cfg.ttt_allowed_steps,
        # Beside attention theta_O starts at 0, so the model starts as GPT-2 and learns
        # how much of the TTT branch to use; in attention's place it is scaled like
        # attention's c_proj. (A unit-scale branch at init swamps the 0.02-scale
        # residual stream: the synthetic preset then stayed near chance for 1500 steps.)
        out_init_std=0.0 if cfg.ttt_mode == "add" else gpt2.residual_std(cfg),
        dtype=self.dtype, name="ttt")
    dropout = nn.Dropout(cfg.resid_pdrop, deterministic=not train)
    norm = lambda name: nn.LayerNorm(eps, dtype=self.dtype, name=name)
    if cfg.ttt_mode == "replace":
      x = x + dropout(layer(norm("ln_1")(x), steps=steps, train=train))
    else:
      y, _, _ = gpt2.Attention(cfg, self.dtype, name="attn")(
          norm("ln_1")(x), positions=positions, gate=None, kv_cache=None, train=train,
          return_probs=False)
      x = x + y + dropout(layer(norm("ln_ttt")(x), steps=steps, train=train))
    return x + gpt2.Mlp(cfg, self.dtype, name="mlp")(norm("ln_2")(x), train=train)


class TTTLM(nn.Module):
  """Token ids [batch, seq] -> logits [batch, seq, vocab]; parameter names as GPT-2's
  (wte, wpe, h_<i>, ln_f) plus h_<i>/ttt (and h_<i>/ln_ttt in "add" mode)."""
  config: TTTLMConfig
  dtype: Any = jnp.float32  # Computation dtype; parameters stay float32.

  @nn.compact
  def __call__(self, input_ids, *, train: bool = False, steps=None):
    cfg = self.config
    t = input_ids.shape[1]
    if t > cfg.n_positions:
      raise errors.ShapeError(
          f"sequence length {t} exceeds the {cfg.n_positions} learned positions.")
    mb = cfg.ttt_mini_batch
    padded = -(-t // mb) * mb
    ids = jnp.pad(input_ids, ((0, 0), (0, padded - t)))
    positions = jnp.arange(padded)  # Attention's causal mask reads these.
    steps = cfg.ttt_steps if steps is None else steps
    if isinstance(steps, str):
      _check_steps_value(steps)
    elif not isinstance(steps, (int, np.integer)) and jnp.ndim(steps) == 2:
      if jnp.shape(steps) != input_ids.shape:
        raise errors.ShapeError(f"per-token steps must be [batch, seq] = "
                                f"{input_ids.shape}, got {jnp.shape(steps)}.")
      steps = jnp.pad(jnp.asarray(steps), ((0, 0), (0, padded - t)))

    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype,
                   embedding_init=nn.initializers.normal(0.02), name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype,
                   embedding_init=nn.initializers.normal(0.01), name="wpe")
    embed_dropout = nn.Dropout(cfg.embd_pdrop)
    blocks = [TTTBlock(cfg, self.dtype, name=f"h_{i}") if i in cfg.ttt_positions
              else gpt2.Block(cfg, self.dtype, name=f"h_{i}") for i in range(cfg.n_layer)]
    ln_f = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")

    def forward(steps, train):
      # The same module instances on every call: both passes of "adaptive" share weights.
      # Padded positions past the table reuse its last row: they only have to be finite.
      x = wte(ids) + wpe(jnp.minimum(positions, cfg.n_positions - 1))[None]
      x = embed_dropout(x, deterministic=not train)
      for i, block in enumerate(blocks):
        if i in cfg.ttt_positions:
          x = block(x, positions=positions, steps=steps, train=train)
        else:
          x, _, _ = block(x, positions=positions, gate=None, kv_cache=None, train=train,
                          return_probs=False)
      return wte.attend(ln_f(x)).astype(jnp.float32)  # Tied output layer.

    if isinstance(steps, str):  # "adaptive"
      probe = jax.lax.stop_gradient(forward(0, False))
      steps = adaptive_steps(cfg, probe)
    return forward(steps, train)[:, :t]


def adaptive_steps(cfg: TTTLMConfig, probe_logits: jax.Array) -> jax.Array:
  """PonderTTT's allocation from the SKIP pass's logits [batch, seq, vocab] (seq a
  multiple of ttt_mini_batch): [seq / mini_batch] ("batch") or [batch, seq] ("example")
  steps, with `ponder_thresholds`, or thresholds calibrated on this batch when empty.

  Per-batch calibration (and the budget, which is also fitted to this batch) ranks each
  mini-batch among all mini-batches of the batch, later ones included, so a token's k
  then depends a little on the future: for strictly causal outputs fix the thresholds
  (`ponder_alloc.calibrate` over a calibration set, the document's procedure)."""
  difficulty = ponder_alloc.mini_batch_difficulty(probe_logits, cfg.ttt_mini_batch,
                                                  causal=cfg.ponder_causal)
  if cfg.ponder_granularity == "batch":
    difficulty = difficulty.mean(0)
  if cfg.ponder_thresholds:
    thresholds = jnp.asarray(cfg.ponder_thresholds, jnp.float32)
  else:
    thresholds = ponder_alloc.calibrate(difficulty, cfg.ponder_target, cfg.ponder_buckets)
  if cfg.ponder_budget:
    thresholds = ponder_alloc.budget_thresholds(difficulty, thresholds, cfg.ponder_buckets,
                                                budget=cfg.ponder_budget)
  steps = ponder_alloc.allocate(difficulty, thresholds, cfg.ponder_buckets)
  if cfg.ponder_granularity == "example":
    steps = jnp.repeat(steps, cfg.ttt_mini_batch, axis=1)
  return steps


def ttt_flops_per_token(cfg: TTTLMConfig, steps: int) -> int:
  """Analytic FLOPs per token of the inner loops of all TTT layers at a static k
  (`ttt.inner_flops_per_token` times heads and layers; projections not included)."""
  heads = cfg.ttt_heads or cfg.n_head
  per_head = ttt.inner_flops_per_token(steps, cfg.n_embd // heads, kind=cfg.ttt_kind,
                                       form=cfg.ttt_form, mini_batch=cfg.ttt_mini_batch)
  return per_head * heads * len(cfg.ttt_positions)
