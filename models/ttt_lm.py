"""A GPT-2-style language model with TTT layers (Sun et al. 2024, arXiv 2407.04620) at
chosen blocks, and PonderTTT's adaptive number of inner steps (the seed document).

The backbone is models/gpt2.py's (embeddings, pre-LN blocks, final LN, tied output
layer; its `Attention`, `Mlp` and `Block` are reused, not copied). Blocks whose index is
in `ttt_positions` carry a TTT layer (`ponder.nn.ttt.TTTLayer`, Sec. 2) in one of two ways:

  ttt_mode="replace"  x + TTT(LN_1(x)), then x + MLP(LN_2(x)): the TTT layer takes the
                      place of self-attention, as in the paper's Transformer backbone
                      and the public code (the default).
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
  ttt.ReconGate k per mini-batch chosen inside every TTT layer's scan from its own
                reconstruction loss (PonderTTT's cheap gate: no first pass);
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
                With ponder_gate="recon", "adaptive" is instead `recon_gate(cfg)`:
                ponder_thresholds (from `calibrate_recon_gate`) on the TTT layers'
                log reconstruction losses, one pass.

The TTT layer's options follow the public code (test-time-training/ttt-lm-jax) by
default, each with the paper's choice one field away (ponder/nn/ttt.py's docstring has
the per-mini-batch equations): ttt_token_idx "inverse" | "none", ttt_learnable_token_idx,
ttt_loss_scale 0.5 | 1, ttt_rope, ttt_backbone "T" | "M" (conv on Q/K and output gate),
ttt_base_lr with the code's warm-up for TTT-MLP (`ttt_lr_mult`, passed by the train step).

`attn_window` > 0 makes every attention layer sliding-window attention over the last
attn_window positions (`attention_mask`, `WindowAttention`), so a TTT branch beside it
("add") is what reaches further back; 0 is GPT-2's full causal attention.

Generation (`init_cache`, `generate`, and `__call__(cache=...)`) carries a recurrent
state: each TTT layer's W after the last full mini-batch plus the pending partial
mini-batch, and the KV cache of every attention layer; decoding equals full
recomputation token for token (tests/models/test_ttt_lm.py).

The sequence is padded on the right to a multiple of `ttt_mini_batch` inside the model;
every layer is causal, so padding never changes the outputs at real positions.
"""

import dataclasses
import functools
from typing import Any, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import gpt2
from ponder import errors
from ponder.nn import dense as dense_lib
from ponder.nn import ponder_alloc
from ponder.nn import ttt

MODES = ("replace", "add")
GRANULARITIES = ("batch", "example")
GATES = ("entropy", "recon")


@dataclasses.dataclass(frozen=True)
class TTTLMConfig(gpt2.GPT2Config):
  """GPT2Config's fields plus where and how the TTT layers run."""
  ttt_positions: tuple = (0,)  # Block indices that carry a TTT layer.
  ttt_mode: str = "replace"  # "replace" attention (paper, code) or "add" a branch beside it.
  ttt_kind: str = "linear"  # Inner model: "linear" (TTT-Linear) or "mlp" (TTT-MLP).
  ttt_form: str = "grad"  # "grad" (jax.grad, any kind) or "dual" (TTT-Linear only).
  ttt_mini_batch: int = 16  # b, tokens per inner mini-batch (Sec. 2.4).
  ttt_steps: Union[int, str] = 1  # Default k: an int >= 0 or "adaptive".
  ttt_heads: Optional[int] = None  # TTT heads; None = n_head.
  ttt_base_lr: float = 0.0  # eta_base (Sec. 2.7); 0 = the code's: linear 1.0, mlp 0.1.
  ttt_base_lr_init: float = -1.0  # Warm-up start; < 0 = the code's: mlp 0.01, linear none.
  ttt_base_lr_warmup: float = 0.1  # Warm-up length, fraction of training (code: 480/4800).
  ttt_token_idx: str = "inverse"  # Row scale tau_i: 1 / i (code) | "none" (paper's sum).
  ttt_learnable_token_idx: bool = True  # Learned offset on tau per position (code).
  ttt_loss_scale: float = ttt.LOSS_SCALE  # c of the inner c ||.||^2: 0.5 (code) | 1 (paper).
  ttt_rope: bool = True  # RoPE on TTT's Q/K views, positions mod mini-batch (code).
  ttt_backbone: str = "T"  # TTT layer of the "T" (Transformer) | "M" (Mamba) backbone.
  attn_window: int = 0  # Attention reads the last attn_window positions; 0 = all (causal).
  ttt_allowed_steps: tuple = ttt.ALLOWED_STEPS  # k values for array-valued steps.
  ponder_buckets: tuple = ponder_alloc.DEFAULT_BUCKETS  # Adaptive: k per bucket.
  ponder_target: tuple = ponder_alloc.DEFAULT_TARGET  # Adaptive: fraction per bucket.
  ponder_thresholds: tuple = ()  # Adaptive: fixed thresholds; () = calibrate per batch.
  ponder_budget: float = 0.0  # Adaptive: max mean k; 0 = no budget.
  ponder_granularity: str = "batch"  # Adaptive: "batch" or "example" (see above).
  ponder_causal: bool = True  # Adaptive: causal difficulty (ponder_alloc docstring).
  ponder_gate: str = "entropy"  # Adaptive signal: "entropy" (SKIP first pass) | "recon".

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
    if self.ttt_token_idx not in ttt.TOKEN_IDX:
      raise errors.unknown_key("ttt_token_idx", self.ttt_token_idx, ttt.TOKEN_IDX)
    if self.ttt_backbone not in ttt.BACKBONES:
      raise errors.unknown_key("ttt_backbone", self.ttt_backbone, ttt.BACKBONES)
    if self.attn_window < 0:
      raise errors.ConfigError(f"attn_window must be >= 0 (0 = full causal), got "
                               f"{self.attn_window}.")
    if self.ponder_gate not in GATES:
      raise errors.unknown_key("ponder_gate", self.ponder_gate, GATES)
    if self.ponder_gate == "recon" and not self.ponder_thresholds:
      raise errors.ConfigError(
          "ponder_gate='recon' needs ponder_thresholds on the log reconstruction loss: "
          "compute them with models.ttt_lm.calibrate_recon_gate(model, params, inputs) on "
          "calibration batches of a trained run.")
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

  @property
  def base_lr(self) -> float:
    """eta_base with the code's default per inner model for 0."""
    return self.ttt_base_lr or ttt.BASE_LR[self.ttt_kind]

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
BASE_LR_INIT = {"mlp": 0.01}  # The code's TTT-MLP runs warm ttt_base_lr up from 0.01.


def ttt_lr_mult(cfg: TTTLMConfig, step, total_steps: int):
  """The multiplier of eta_base at training step `step` (the code's make_get_ttt_lr_mult):
  linear from ttt_base_lr_init to ttt_base_lr over the first ttt_base_lr_warmup of
  `total_steps`, then 1; 1 throughout when the kind has no warm-up. Pass it to
  `TTTLM.__call__(ttt_lr_mult=...)` from the train step."""
  init = cfg.ttt_base_lr_init
  if init < 0:
    init = BASE_LR_INIT.get(cfg.ttt_kind, -1.0)
  warmup = cfg.ttt_base_lr_warmup * total_steps
  if init < 0 or warmup <= 0:
    return jnp.ones((), jnp.float32)
  frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)
  return (init + frac * (cfg.base_lr - init)) / cfg.base_lr


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


def attention_mask(q_positions, k_positions, window: int = 0):
  """[q, k] True where query q reads key k: k <= q (causal) and, for window > 0,
  q - k < window (sliding-window attention over the last `window` positions)."""
  mask = k_positions[None, :] <= q_positions[:, None]
  if window:
    mask &= k_positions[None, :] > q_positions[:, None] - window
  return mask


class WindowAttention(nn.Module):
  """GPT-2's causal self-attention (gpt2.Attention's parameters c_attn, c_proj and KV
  cache) under `attention_mask(..., config.attn_window)`. gpt2.Attention builds its
  causal mask inside; with a `window` argument there this module would go."""
  config: TTTLMConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, positions, kv_cache, train: bool):
    cfg = self.config
    b, t, _ = x.shape
    h, hd = cfg.n_head, cfg.head_dim
    dense = lambda n, name, std: dense_lib.Dense(n, compute_dtype=self.dtype, name=name,
                                                 kernel_init=nn.initializers.normal(std))
    qkv = dense(3 * h * hd, "c_attn", 0.02)(x)
    q, k, v = (y[:, :, 0] for y in jnp.split(qkv.reshape(b, t, 3, h, hd), 3, axis=2))
    key_positions, new_cache = positions, None
    if kv_cache is not None:  # As gpt2.Attention: write at the positions, mask the rest.
      k = jax.lax.dynamic_update_slice_in_dim(kv_cache[0], k.astype(kv_cache[0].dtype),
                                              positions[0], axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv_cache[1], v.astype(kv_cache[1].dtype),
                                              positions[0], axis=1)
      key_positions, new_cache = jnp.arange(k.shape[1]), (k, v)
    mask = attention_mask(positions, key_positions, cfg.attn_window)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = nn.Dropout(cfg.attn_pdrop, deterministic=not train)(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, t, h * hd)
    out = dense(cfg.n_embd, "c_proj", gpt2.residual_std(cfg))(out)
    return nn.Dropout(cfg.resid_pdrop, deterministic=not train)(out), new_cache


def _attention(cfg, dtype, x, *, positions, kv_cache, train):
  """Self-attention named "attn" in the calling block: GPT-2's, or windowed."""
  if cfg.attn_window:
    return WindowAttention(cfg, dtype, name="attn")(x, positions=positions,
                                                   kv_cache=kv_cache, train=train)
  y, _, new_cache = gpt2.Attention(cfg, dtype, name="attn")(
      x, positions=positions, gate=None, kv_cache=kv_cache, train=train,
      return_probs=False)
  return y, new_cache


def ttt_layer(cfg: TTTLMConfig, dtype: Any = jnp.float32, name: Optional[str] = "ttt"):
  """The TTT layer of a TTT block (unbound: `init_cache` reads its sizes)."""
  return ttt.TTTLayer(
      cfg.n_embd, cfg.ttt_heads or cfg.n_head, kind=cfg.ttt_kind,
      mini_batch=cfg.ttt_mini_batch, form=cfg.ttt_form, eta_base=cfg.base_lr,
      allowed_steps=cfg.ttt_allowed_steps, token_idx=cfg.ttt_token_idx,
      learnable_token_idx=cfg.ttt_learnable_token_idx, loss_scale=cfg.ttt_loss_scale,
      rope=cfg.ttt_rope, backbone=cfg.ttt_backbone,
      # Beside attention theta_O starts at 0, so the model starts as GPT-2 and learns
      # how much of the TTT branch to use; in attention's place it is scaled like
      # attention's c_proj. (A unit-scale branch at init swamps the 0.02-scale
      # residual stream: the synthetic preset then stayed near chance for 1500 steps.)
      out_init_std=0.0 if cfg.ttt_mode == "add" else gpt2.residual_std(cfg),
      dtype=dtype, name=name)


class TTTBlock(nn.Module):
  """A pre-LN block with a TTT layer replacing attention or beside it (module
  docstring); with has_ttt=False, GPT-2's block under `attention_mask` (attn_window).

  `cache` (decoding one token): {"kv": (keys, values)} for the attention and
  {"ttt": state} for the TTT layer; then returns (x, new_cache)."""
  config: TTTLMConfig
  dtype: Any = jnp.float32
  has_ttt: bool = True

  @nn.compact
  def __call__(self, x, *, positions, steps, train: bool, lr_mult=1.0, cache=None):
    cfg = self.config
    eps = cfg.layer_norm_epsilon
    dropout = nn.Dropout(cfg.resid_pdrop, deterministic=not train)
    norm = lambda name: nn.LayerNorm(eps, name=name)
    new_cache = {}

    def attend(h):
      y, kv = _attention(cfg, self.dtype, h, positions=positions,
                         kv_cache=None if cache is None else cache["kv"], train=train)
      if cache is not None:
        new_cache["kv"] = kv
      return y

    def ttt_branch(h):
      kw = dict(steps=steps, train=train, lr_mult=lr_mult)
      if cache is None:
        return dropout(ttt_layer(cfg, self.dtype)(h, **kw))
      y, new_cache["ttt"] = ttt_layer(cfg, self.dtype)(
          h, decode_state=cache["ttt"], position=positions[0], **kw)
      return dropout(y)

    if not self.has_ttt:
      x = x + attend(norm("ln_1")(x))
    elif cfg.ttt_mode == "replace":
      x = x + ttt_branch(norm("ln_1")(x))
    else:
      x = x + attend(norm("ln_1")(x)) + ttt_branch(norm("ln_ttt")(x))
    x = x + gpt2.Mlp(cfg, self.dtype, name="mlp")(norm("ln_2")(x), train=train)
    return x if cache is None else (x, new_cache)


@flax.struct.dataclass
class TTTLMCache:
  """The decoder's recurrent state: per block {"kv": (keys, values)} for attention
  ([batch, max_len, n_head, head_dim] each) and {"ttt": state} for a TTT layer
  (`ttt.init_decode_state`: W after the last full mini-batch, the pending mini-batch's
  views, the conv inputs); `length` (int32) is the next token's position."""
  layers: tuple
  length: jax.Array


def init_cache(model: "TTTLM", params, batch_size: int, max_len: int) -> TTTLMCache:
  """The empty state before a sequence: empty KV caches of `max_len` positions, and
  every TTT layer at its learned W_0 (read from `params`)."""
  cfg = model.config
  if max_len > cfg.n_positions:
    raise errors.ShapeError(f"max_len {max_len} exceeds the {cfg.n_positions} learned "
                            "positions.")
  layers = []
  for i in range(cfg.n_layer):
    layer = {}
    if i not in cfg.ttt_positions or cfg.ttt_mode == "add":
      kv = jnp.zeros((batch_size, max_len, cfg.n_head, cfg.head_dim), jnp.float32)
      layer["kv"] = (kv, kv)
    if i in cfg.ttt_positions:
      layer["ttt"] = ttt.init_decode_state(ttt_layer(cfg, model.dtype, None),
                                           params[f"h_{i}"]["ttt"], batch_size)
    layers.append(layer)
  return TTTLMCache(tuple(layers), jnp.zeros((), jnp.int32))


class TTTLM(nn.Module):
  """Token ids [batch, seq] -> logits [batch, seq, vocab]; parameter names as GPT-2's
  (wte, wpe, h_<i>, ln_f) plus h_<i>/ttt (and h_<i>/ln_ttt in "add" mode).

  `ttt_lr_mult` multiplies every TTT layer's eta_base (`ttt_lr_mult(cfg, step, total)`,
  the code's warm-up). With `cache` (a `TTTLMCache` from `init_cache` or a previous
  call) it decodes one token, input_ids [batch, 1] at position cache.length, with a
  static int k, and returns (logits [batch, 1, vocab], new cache); the logits equal the
  full sequence's at that position."""
  config: TTTLMConfig
  # Matmul operand dtype (float32 | bfloat16): dense layers, the TTT layers' projections
  # and the tied output layer multiply bf16 operands into float32 results
  # (`ponder.nn.dense`); parameters, embeddings, LayerNorms, softmax, the inner loop and
  # the caches stay float32.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, *, train: bool = False, steps=None, ttt_lr_mult=1.0,
               cache: Optional[TTTLMCache] = None):
    cfg = self.config
    t = input_ids.shape[1]
    if t > cfg.n_positions:
      raise errors.ShapeError(
          f"sequence length {t} exceeds the {cfg.n_positions} learned positions.")
    steps = cfg.ttt_steps if steps is None else steps
    if cache is not None:
      if t != 1 or not isinstance(steps, (int, np.integer)):
        raise errors.ConfigError(
            f"decoding with a cache takes one token and an int k; got seq={t}, steps="
            f"{steps!r} (pass steps=K for a model trained with 'adaptive').")
      ids, positions = input_ids, cache.length + jnp.arange(1)
    else:
      mb = cfg.ttt_mini_batch
      padded = -(-t // mb) * mb
      ids = jnp.pad(input_ids, ((0, 0), (0, padded - t)))
      positions = jnp.arange(padded)  # Attention's causal mask reads these.
      if isinstance(steps, str):
        _check_steps_value(steps)
      elif isinstance(steps, ttt.ReconGate):
        pass
      elif not isinstance(steps, (int, np.integer)) and jnp.ndim(steps) == 2:
        if jnp.shape(steps) != input_ids.shape:
          raise errors.ShapeError(f"per-token steps must be [batch, seq] = "
                                  f"{input_ids.shape}, got {jnp.shape(steps)}.")
        steps = jnp.pad(jnp.asarray(steps), ((0, 0), (0, padded - t)))

    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=nn.initializers.normal(0.02),
                   name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd,
                   embedding_init=nn.initializers.normal(0.01), name="wpe")
    embed_dropout = nn.Dropout(cfg.embd_pdrop)
    # Plain blocks are GPT-2's, or with a window TTTBlock(has_ttt=False): same names.
    blocks = [TTTBlock(cfg, self.dtype, name=f"h_{i}") if i in cfg.ttt_positions
              else TTTBlock(cfg, self.dtype, has_ttt=False, name=f"h_{i}")
              if cfg.attn_window or cache is not None
              else gpt2.Block(cfg, self.dtype, name=f"h_{i}") for i in range(cfg.n_layer)]
    ln_f = nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_f")

    def forward(steps, train, layer_caches=None):
      # The same module instances on every call: both passes of "adaptive" share weights.
      # Padded positions past the table reuse its last row: they only have to be finite.
      x = wte(ids) + wpe(jnp.minimum(positions, cfg.n_positions - 1))[None]
      x = embed_dropout(x, deterministic=not train)
      new_caches = []
      for i, block in enumerate(blocks):
        if layer_caches is not None:
          x, new = block(x, positions=positions, steps=steps, train=train,
                         lr_mult=ttt_lr_mult, cache=layer_caches[i])
          new_caches.append(new)
        elif isinstance(block, TTTBlock):
          x = block(x, positions=positions, steps=steps, train=train, lr_mult=ttt_lr_mult)
        else:
          x, _, _ = block(x, positions=positions, gate=None, kv_cache=None, train=train,
                          return_probs=False)
      # The tied output layer.
      return dense_lib.attend(ln_f(x), wte.embedding, self.dtype), new_caches

    if cache is not None:
      logits, layers = forward(steps, train, cache.layers)
      return logits, TTTLMCache(tuple(layers), cache.length + 1)
    if isinstance(steps, str) and cfg.ponder_gate == "recon":
      steps = recon_gate(cfg)
    elif isinstance(steps, str):  # "adaptive" with the entropy gate
      probe = jax.lax.stop_gradient(forward(0, False)[0])
      steps = adaptive_steps(cfg, probe)
    return forward(steps, train)[0][:, :t]


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "use_cache",
    "steps"))
def _generate(model, params, prompt, key, *, max_new_tokens, temperature, top_k, top_p,
              eos_id, use_cache, steps):
  b, p = prompt.shape
  variables = {"params": params}
  tokens = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)
  cache = None
  if use_cache:
    cache = init_cache(model, params, b, p + max_new_tokens)

    def feed(cache, token):  # The prompt but its last token, one at a time.
      return model.apply(variables, token[:, None], steps=steps, cache=cache)[1], None

    cache, _ = jax.lax.scan(feed, cache, prompt[:, :-1].T)

  def step(i, carry):
    tokens, cache, done = carry
    if use_cache:
      last = jax.lax.dynamic_slice_in_dim(tokens, p - 1 + i, 1, axis=1)
      logits, cache = model.apply(variables, last, steps=steps, cache=cache)
      logits = logits[:, 0]
    else:  # Full recomputation: causality makes later (still zero) tokens irrelevant.
      logits = jax.lax.dynamic_index_in_dim(model.apply(variables, tokens, steps=steps),
                                            p - 1 + i, axis=1, keepdims=False)
    new = gpt2.sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature,
                             top_k=top_k, top_p=top_p)
    if eos_id is not None:  # After end-of-text a row keeps emitting it.
      new = jnp.where(done, eos_id, new)
      done = done | (new == eos_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], p + i, axis=1)
    return tokens, cache, done

  tokens, _, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                   (tokens, cache, jnp.zeros((b,), bool)))
  return tokens


def generate(model: TTTLM, params, prompt, *, key: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = None, use_cache: bool = True,
             steps: Optional[int] = None) -> jax.Array:
  """`gpt2.generate` for TTT LMs: continues `prompt` (int [batch, prompt_len]) with the
  recurrent state (`init_cache`; `use_cache=False` recomputes the whole sequence at
  every step, the reference). `steps`: the int k of the inner loop; None = the config's,
  which must then be an int ("adaptive" calibrates over a whole batch of sequences and
  has no token-by-token form). Token i is drawn with fold_in(key, i).

  Returns int32 [batch, prompt_len + max_new_tokens]."""
  steps = model.config.ttt_steps if steps is None else steps
  if not isinstance(steps, (int, np.integer)):
    raise errors.ConfigError(f"generation needs an int number of inner steps, got "
                             f"{steps!r}; pass steps=K (e.g. the Fixed-K it matches).")
  prompt = gpt2.check_prompt(prompt, max_new_tokens, model.config.n_positions)
  return _generate(model, params, prompt, key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   eos_id=eos_id, use_cache=use_cache, steps=int(steps))


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


def recon_gate(cfg: TTTLMConfig) -> ttt.ReconGate:
  """The config's reconstruction-loss gate: ponder_thresholds over ponder_buckets at
  the ponder_target fractions' rate, one decision per mini-batch or per example."""
  return ttt.recon_gate(cfg.ponder_thresholds, cfg.ponder_buckets, cfg.ponder_target,
                        granularity=cfg.ponder_granularity)


@functools.partial(jax.jit, static_argnums=0)
def gate_decisions(model: "TTTLM", params, inputs, gate: ttt.ReconGate):
  """(logits, {block: (steps, signal)}) of a gated pass: every TTT layer's k and log
  reconstruction loss per mini-batch, [n, batch] each."""
  logits, aux = model.apply({"params": params}, inputs, train=False, steps=gate,
                            mutable=["intermediates"])
  return logits, {name: v["ttt"]["gate"][0] for name, v in aux["intermediates"].items()
                  if "gate" in v.get("ttt", {})}


def calibrate_recon_gate(model: "TTTLM", params, inputs, *, buckets=None, target=None,
                         granularity: Optional[str] = None) -> ttt.ReconGate:
  """A reconstruction-loss gate calibrated on calibration batches `inputs` (a sequence
  of [batch, seq] token arrays of one shape, from training data, not the evaluation
  set): the signals of the trajectory that gives every mini-batch max(buckets) steps,
  pooled over the batches and TTT layers, split at the percentiles of the `target`
  fractions (`ttt.calibrate_recon_gate`). Defaults: the config's ponder_buckets,
  ponder_target, ponder_granularity. `gate.thresholds` is what ponder_thresholds takes
  for ponder_gate="recon"."""
  cfg = model.config
  buckets = tuple(buckets or cfg.ponder_buckets)
  target = tuple(target or cfg.ponder_target)
  granularity = granularity or cfg.ponder_granularity
  top = ttt.always_top(buckets)
  signals = [signal for batch in inputs
             for _, signal in gate_decisions(model, params, batch, top)[1].values()]
  return ttt.calibrate_recon_gate(jnp.stack(signals), buckets, target, granularity)


def gate_flops_per_token(cfg: TTTLMConfig) -> int:
  """Analytic FLOPs per token of the reconstruction-loss signal in all TTT layers."""
  heads = cfg.ttt_heads or cfg.n_head
  return (ttt.recon_signal_flops_per_token(cfg.n_embd // heads, kind=cfg.ttt_kind)
          * heads * len(cfg.ttt_positions))


def ttt_flops_per_token(cfg: TTTLMConfig, steps: int) -> int:
  """Analytic FLOPs per token of the inner loops of all TTT layers at a static k
  (`ttt.inner_flops_per_token` times heads and layers; projections not included)."""
  heads = cfg.ttt_heads or cfg.n_head
  per_head = ttt.inner_flops_per_token(steps, cfg.n_embd // heads, kind=cfg.ttt_kind,
                                       form=cfg.ttt_form, mini_batch=cfg.ttt_mini_batch)
  return per_head * heads * len(cfg.ttt_positions)
