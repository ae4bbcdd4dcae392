"""RWKV-4 (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"), and the
spiking RWKV student of ASNN-Goose.

Equations (Sec. 4 of the paper; numbers are the paper's):

  Token shift (eqs. 11-13 and 16-17), mu per channel:
    r_t = W_r (mu_r * x_t + (1 - mu_r) * x_{t-1})            likewise k_t, v_t
  WKV (eq. 14), per channel, w = -exp(time_decay) < 0, u = time_first (the "bonus"):
    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})
  Time-mixing output (eq. 15):      o_t = W_o (sigmoid(r_t) * wkv_t)
  Channel mixing (eqs. 16-18):      o'_t = sigmoid(r'_t) * W_v' max(k'_t, 0)^2
  Blocks are pre-LN residual (Fig. 2): x += TimeMix(LN1(x)); x += ChannelMix(LN2(x)),
  with an extra LayerNorm `ln0` after the embedding (Sec. 3.4, "small init embedding")
  and `ln_out` before the head.

WKV is computed in the numerically stable form of the official CUDA kernel
(RWKV-LM `wkv_cuda.cu`): the running sums are stored divided by e^{p}, p the largest
exponent seen so far, so no exponential ever overflows. With state (a, b, p) such that
a e^p = sum_{i<t} e^{(t-1-i) w + k_i} v_i and b e^p the matching denominator:

    q = max(p, u + k_t)
    wkv_t = (e^{p-q} a + e^{u+k_t-q} v_t) / (e^{p-q} b + e^{u+k_t-q})
    p' = max(p + w, k_t);  a' = e^{p+w-p'} a + e^{k_t-p'} v_t;  b' = e^{p+w-p'} b + e^{k_t-p'}

`wkv_step` is that recurrence for one token (decoding: O(1) state per token),
`wkv_scan` runs it over a sequence with `lax.scan` (the default training form), and
`wkv_chunked` is a parallel form: inside a chunk of L tokens every output is one
masked, max-shifted sum over the chunk's L positions plus the carried state, and
only the chunk boundaries are sequential. The three agree to float rounding (tests).

The recurrent state of a layer is (att_x, a, b, p, ffn_x): the LN outputs of the last
token for the two token shifts, and the WKV state; `init_state` makes it, `__call__`
takes and returns it, so a prompt can be prefilled as a sequence and continued token by
token. Parameter names follow the published checkpoints (emb, blocks.N.{ln0, ln1, ln2,
att.{time_mix_k, time_mix_v, time_mix_r, time_decay, time_first, key, value, receptance,
output}, ffn.{time_mix_k, time_mix_r, key, receptance, value}}, ln_out, head), so
`from_pth` / `to_pth` only rename and transpose (torch Linear weights are [out, in]).

Initialisation follows RWKV-LM's RWKV-v4neo (`RWKV_TimeMix.__init__`,
`RWKV_ChannelMix.__init__`, `generate_init_weight`): per layer l of L and channel h,
time_decay = -5 + 8 (h / (A-1))^(0.7 + 1.3 l/(L-1)), time_first = log 0.3 + 0.5 *
zigzag(h), mixes (h/C)^(1 - l/L) (v: + 0.3 l/(L-1); r: exponent halved); the
embedding uniform(+-1e-4); att.key, att.receptance, att.output, ffn.receptance and
ffn.value zero; other matrices orthogonal with gain sqrt(out/in) when out > in (the
head 0.5 times that).

The spiking student (`spike="ternary"|"lif"`): the inputs of the projections named in
`spike_sites` go through a spiking unit (`ponder.nn.spiking.SpikingDense`), ternary
spikes with learnable per-channel alpha and theta, or binary LIF neurons whose
membrane potentials join the recurrent state. `spike_matmul="packed"` makes those
matmuls `ponder.ops.ternary_matmul` on 2-bit codes (inference). The spike parameters
sit under each projection (`.../key/spike/{alpha, theta}`), so a teacher's checkpoint
initialises a student: `from_pth(path, spike="ternary")`.

`generate` decodes with the recurrent state: the prompt is prefilled as a sequence,
then every new token costs one `wkv_step` per layer (O(1) in the length), with the
sampling of `models.gpt2.sample_logits` (temperature, top-k, top-p).
"""

import dataclasses
import functools
import math
import os
import pathlib
import re
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from models import gpt2
from ponder import errors
from ponder.nn import dense as dense_lib
from ponder.nn import spiking

MIN_VALUE = -1e38  # The CUDA kernel's initial p: e^{p - anything} = 0.
WKV_FORMS = ("scan", "chunked")
SPIKES = ("none",) + spiking.SPIKES
# Spiking sites: the input of which projection is spiked.
SPIKE_SITES = ("att_k", "att_v", "att_r", "att_o", "ffn_k", "ffn_v", "ffn_r")
DEFAULT_SPIKE_SITES = ("att_k", "att_v", "att_r", "ffn_k", "ffn_v")


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
  """Sizes, the WKV form and the spiking options."""
  vocab_size: int = 50277
  n_embd: int = 768
  n_layer: int = 12
  dim_att: Optional[int] = None  # Width of k, v, r and WKV; None = n_embd.
  dim_ffn: Optional[int] = None  # Channel-mix hidden width; None = 4 * n_embd.
  layer_norm_epsilon: float = 1e-5
  emb_init_scale: float = 1e-4  # Embedding ~ uniform(-s, s) (v4neo: lr_init).
  wkv: str = "scan"  # Sequence form of WKV: "scan" | "chunked".
  wkv_chunk: int = 16  # Chunk length of the chunked form.
  spike: str = "none"  # "none" | "ternary" | "lif".
  spike_sites: tuple[str, ...] = DEFAULT_SPIKE_SITES  # Inputs that spike.
  spike_matmul: str = "dense"  # "dense" (training) | "packed" (ternary_matmul).
  spike_alpha_init: float = 1.0  # Ternary spike magnitude at init.
  spike_theta_init: float = 0.5  # Ternary threshold at init.
  spike_slope: float = 5.0  # Fast-sigmoid surrogate steepness (kernels.ternary).
  lif_tau: float = 2.0  # LIF membrane time constant.
  lif_threshold: float = 1.0  # LIF firing threshold.
  lif_surrogate_alpha: float = 2.0  # Arctan surrogate width.

  def __post_init__(self):
    # A list (e.g. from a ConfigDict) would make the config unhashable for jit.
    object.__setattr__(self, "spike_sites", tuple(self.spike_sites))
    if self.wkv not in WKV_FORMS:
      raise errors.unknown_key("wkv form", self.wkv, WKV_FORMS)
    if self.spike not in SPIKES:
      raise errors.unknown_key("spike", self.spike, SPIKES)
    if self.spike_matmul not in spiking.MATMULS:
      raise errors.unknown_key("spike_matmul", self.spike_matmul, spiking.MATMULS)
    for site in self.spike_sites:
      if site not in SPIKE_SITES:
        raise errors.unknown_key("spike site", site, SPIKE_SITES)
    if self.wkv_chunk < 1:
      raise errors.ConfigError(f"wkv_chunk must be >= 1; got {self.wkv_chunk}.")

  @property
  def att_dim(self) -> int:
    return self.dim_att or self.n_embd

  @property
  def ffn_dim(self) -> int:
    return self.dim_ffn or 4 * self.n_embd

  @property
  def spiked_sites(self) -> tuple[str, ...]:
    return () if self.spike == "none" else tuple(self.spike_sites)

  def site_width(self, site: str) -> int:
    """Input width of a spiking site's projection."""
    return {"att_o": self.att_dim, "ffn_v": self.ffn_dim}.get(site, self.n_embd)


# The released RWKV-4 Pile models (vocab 50277, the GPT-NeoX tokenizer) plus two small
# sizes for tests and CPU runs.
PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64),
    "mini": dict(n_layer=4, n_embd=256),
    "169m": dict(n_layer=12, n_embd=768),
    "430m": dict(n_layer=24, n_embd=1024),
    "1b5": dict(n_layer=24, n_embd=2048),
    "3b": dict(n_layer=32, n_embd=2560),
    "7b": dict(n_layer=32, n_embd=4096),
    "14b": dict(n_layer=40, n_embd=5120),
}


def config(preset: str = "169m", **overrides) -> RWKVConfig:
  """A preset's config with fields overridden, e.g. config("tiny", vocab_size=65)."""
  if preset not in PRESETS:
    raise errors.unknown_key("RWKV preset", preset, PRESETS)
  return RWKVConfig(**{**PRESETS[preset], **overrides})


@flax.struct.dataclass
class RWKVState:
  """Recurrent state after the tokens seen so far, stacked over layers.

  att_x, ffn_x: [n_layer, batch, n_embd], LN1 / LN2 outputs of the last token (the
  token shifts' x_{t-1}); aa, bb, pp: [n_layer, batch, dim_att], the WKV state (a, b, p)
  of the module docstring (the `rwkv` package's att_aa, att_bb, att_pp); lif: site ->
  [n_layer, batch, width] LIF membrane potentials (empty unless spike="lif").
  """
  att_x: jax.Array
  aa: jax.Array
  bb: jax.Array
  pp: jax.Array
  ffn_x: jax.Array
  lif: dict


def init_state(cfg: RWKVConfig, batch_size: int) -> RWKVState:
  """The state before the first token (shift inputs zero, WKV sums empty), float32."""
  l, c, a = cfg.n_layer, cfg.n_embd, cfg.att_dim
  zeros = jnp.zeros((l, batch_size, a), jnp.float32)
  lif = {}
  if cfg.spike == "lif":
    lif = {s: jnp.zeros((l, batch_size, cfg.site_width(s)), jnp.float32)
           for s in cfg.spike_sites}
  return RWKVState(att_x=jnp.zeros((l, batch_size, c), jnp.float32), aa=zeros, bb=zeros,
                   pp=jnp.full((l, batch_size, a), MIN_VALUE, jnp.float32),
                   ffn_x=jnp.zeros((l, batch_size, c), jnp.float32), lif=lif)


# --- WKV ---------------------------------------------------------------------------------


def wkv_step(w, u, k, v, state):
  """One token of the stable WKV recurrence (module docstring; the CUDA kernel's loop).

  Args:
    w: [A] decay, already -exp(time_decay). u: [A] bonus (time_first).
    k, v: [..., A] this token's key and value (float32).
    state: (a, b, p), each [..., A].

  Returns:
    (wkv [..., A], new state).
  """
  a, b, p = state
  uk = u + k
  q = jnp.maximum(p, uk)
  e1, e2 = jnp.exp(p - q), jnp.exp(uk - q)
  y = (e1 * a + e2 * v) / (e1 * b + e2)
  pw = p + w
  q = jnp.maximum(pw, k)
  e1, e2 = jnp.exp(pw - q), jnp.exp(k - q)
  return y, (e1 * a + e2 * v, e1 * b + e2, q)


def wkv_scan(w, u, k, v, state):
  """`wkv_step` over the token axis: k, v [batch, T, A] -> (wkv [batch, T, A], state)."""
  def step(carry, kv):
    y, carry = wkv_step(w, u, kv[0], kv[1], carry)
    return carry, y

  state, y = lax.scan(step, state, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
  return jnp.swapaxes(y, 0, 1), state


def _wkv_chunk(w, u, k, v, state):
  """One chunk in parallel: k, v [batch, L, A], state (a, b, p) [batch, A].

  Output j has terms e^{(j-1-i) w + k_i} v_i (i < j), e^{u + k_j} v_j (i = j) and the
  carried e^{j w + p} a; each row is shifted by its largest exponent. The new p is the
  largest exponent of the chunk-end sums, as the recurrence's running max is.
  """
  a, b, p = state
  n = k.shape[1]
  j = jnp.arange(n)[:, None]
  i = jnp.arange(n)[None, :]
  dist = (j - 1 - i).astype(k.dtype)[None, :, :, None]  # [1, L(j), L(i), 1]
  kk = k[:, None, :, :]  # k_i
  logits = jnp.where((i < j)[None, :, :, None], dist * w + kk,
                     jnp.where((i == j)[None, :, :, None], u + kk, MIN_VALUE))
  carry = jnp.arange(n, dtype=k.dtype)[None, :, None] * w + p[:, None, :]  # [B, L, A]
  m = jnp.maximum(jnp.max(logits, axis=2), carry)
  e = jnp.exp(logits - m[:, :, None, :])
  ec = jnp.exp(carry - m)
  num = jnp.einsum("bjia,bia->bja", e, v) + ec * a[:, None, :]
  den = jnp.sum(e, axis=2) + ec * b[:, None, :]
  # Chunk end: terms e^{(L-1-i) w + k_i} and the carried e^{L w + p}.
  last = (n - 1 - jnp.arange(n, dtype=k.dtype))[None, :, None] * w + k
  carry_end = n * w + p
  p_new = jnp.maximum(jnp.max(last, axis=1), carry_end)
  el, ece = jnp.exp(last - p_new[:, None, :]), jnp.exp(carry_end - p_new)
  return num / den, (jnp.sum(el * v, axis=1) + ece * a, jnp.sum(el, axis=1) + ece * b,
                     p_new)


def wkv_chunked(w, u, k, v, state, chunk: int = 16):
  """WKV in chunks of `chunk` tokens, each computed in parallel (`_wkv_chunk`), the
  chunks chained by `lax.scan`; a shorter last chunk is computed on its own. With
  chunk >= T it is the fully parallel form. Same arguments and result as `wkv_scan`."""
  bsz, t, dim = k.shape
  full = t // chunk
  ys = []
  if full:
    def step(carry, kv):
      y, carry = _wkv_chunk(w, u, kv[0], kv[1], carry)
      return carry, y

    split = lambda x: jnp.swapaxes(x[:, :full * chunk].reshape(bsz, full, chunk, dim), 0, 1)
    state, y = lax.scan(step, state, (split(k), split(v)))
    ys.append(jnp.swapaxes(y, 0, 1).reshape(bsz, full * chunk, dim))
  if t % chunk:
    y, state = _wkv_chunk(w, u, k[:, full * chunk:], v[:, full * chunk:], state)
    ys.append(y)
  return jnp.concatenate(ys, axis=1), state


# --- Model -------------------------------------------------------------------------------


def _layer_ratios(cfg: RWKVConfig, layer_id: int) -> tuple[float, float]:
  """v4neo's ratio_0_to_1 = l / (L - 1) and ratio_1_to_almost0 = 1 - l / L."""
  return layer_id / max(cfg.n_layer - 1, 1), 1.0 - layer_id / cfg.n_layer


def _const_init(values: np.ndarray):
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(values, dtype).reshape(shape)


def _orthogonal(fan_in: int, fan_out: int, scale: float = 1.0):
  # v4neo: gain sqrt(out / in) when the torch weight [out, in] has more rows.
  gain = math.sqrt(fan_out / fan_in) if fan_out > fan_in else 1.0
  return nn.initializers.orthogonal(scale * gain)


class _Projections(nn.Module):
  """Holds a layer's projections: dense, or spiking at the configured sites."""
  config: RWKVConfig
  dtype: Any

  def project(self, site, name, x, features, init, lif):
    """`x @ W_name` (no bias), spiking x first when `site` is spiked; returns (y, lif)."""
    cfg = self.config
    if site not in cfg.spiked_sites:
      return dense_lib.Dense(features, use_bias=False, compute_dtype=self.dtype,
                             kernel_init=init, name=name)(x), lif
    layer = spiking.SpikingDense(
        features, spike=cfg.spike, matmul=cfg.spike_matmul, kernel_init=init,
        alpha_init=cfg.spike_alpha_init, theta_init=cfg.spike_theta_init,
        slope=cfg.spike_slope, lif_tau=cfg.lif_tau, lif_threshold=cfg.lif_threshold,
        surrogate_alpha=cfg.lif_surrogate_alpha, dtype=self.dtype, name=name)
    y, v = layer(x, lif.get(site))
    if v is not None:
      lif = {**lif, site: v}
    return y, lif


def _shift(x, prev):
  """x_{t-1} for every t: [batch, T, C] with `prev` [batch, C] before the first."""
  return jnp.concatenate([prev[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)


class TimeMix(_Projections):
  """Time mixing (eqs. 11-15): token shift, WKV, sigmoid(r) gate, output projection."""
  layer_id: int = 0

  @nn.compact
  def __call__(self, x, prev, wkv_state, lif):
    cfg = self.config
    c, a = cfg.n_embd, cfg.att_dim
    r01, r10 = _layer_ratios(cfg, self.layer_id)
    ramp = np.arange(c) / c
    h = np.arange(a) / max(a - 1, 1)
    mix_k = self.param("time_mix_k", _const_init(ramp ** r10), (c,))
    mix_v = self.param("time_mix_v", _const_init(ramp ** r10 + 0.3 * r01), (c,))
    mix_r = self.param("time_mix_r", _const_init(ramp ** (0.5 * r10)), (c,))
    time_decay = self.param("time_decay", _const_init(-5 + 8 * h ** (0.7 + 1.3 * r01)), (a,))
    zigzag = 0.5 * (((np.arange(a) + 1) % 3) - 1)
    time_first = self.param("time_first", _const_init(math.log(0.3) + zigzag), (a,))

    xx = _shift(x, prev)
    mix = lambda m: x * m.astype(x.dtype) + xx * (1 - m.astype(x.dtype))
    zeros = nn.initializers.zeros
    k, lif = self.project("att_k", "key", mix(mix_k), a, zeros, lif)
    v, lif = self.project("att_v", "value", mix(mix_v), a, _orthogonal(c, a), lif)
    r, lif = self.project("att_r", "receptance", mix(mix_r), a, zeros, lif)
    w = -jnp.exp(time_decay)  # Eq. 14's decay; the loader of `rwkv` folds this too.
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    if x.shape[1] == 1:  # Decoding: the O(1) recurrent step.
      y, wkv_state = wkv_step(w, time_first, k[:, 0], v[:, 0], wkv_state)
      y = y[:, None]
    elif cfg.wkv == "chunked":
      y, wkv_state = wkv_chunked(w, time_first, k, v, wkv_state, cfg.wkv_chunk)
    else:
      y, wkv_state = wkv_scan(w, time_first, k, v, wkv_state)
    out, lif = self.project("att_o", "output", jax.nn.sigmoid(r) * y.astype(r.dtype), c,
                            zeros, lif)
    return out, x[:, -1], wkv_state, lif


class ChannelMix(_Projections):
  """Channel mixing (eqs. 16-18): sigmoid(W_r x_r) * W_v relu(W_k x_k)^2."""
  layer_id: int = 0

  @nn.compact
  def __call__(self, x, prev, lif):
    cfg = self.config
    c, f = cfg.n_embd, cfg.ffn_dim
    _, r10 = _layer_ratios(cfg, self.layer_id)
    ramp = np.arange(c) / c
    mix_k = self.param("time_mix_k", _const_init(ramp ** r10), (c,))
    mix_r = self.param("time_mix_r", _const_init(ramp ** r10), (c,))
    xx = _shift(x, prev)
    mix = lambda m: x * m.astype(x.dtype) + xx * (1 - m.astype(x.dtype))
    zeros = nn.initializers.zeros
    k, lif = self.project("ffn_k", "key", mix(mix_k), f, _orthogonal(c, f), lif)
    kv, lif = self.project("ffn_v", "value", jnp.square(jax.nn.relu(k)), c, zeros, lif)
    r, lif = self.project("ffn_r", "receptance", mix(mix_r), c, zeros, lif)
    return jax.nn.sigmoid(r) * kv, x[:, -1], lif


class Block(nn.Module):
  """Pre-LN block (Fig. 2): x += TimeMix(LN1(x)); x += ChannelMix(LN2(x)); block 0
  first applies ln0 to the embeddings."""
  config: RWKVConfig
  layer_id: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, state):
    """state: (att_x, (a, b, p), ffn_x, lif) of this layer; returns (x, new state,
    the block's input after ln0)."""
    cfg = self.config
    eps = cfg.layer_norm_epsilon
    att_x, wkv_state, ffn_x, lif = state
    if self.layer_id == 0:
      x = nn.LayerNorm(eps, name="ln0")(x)
    dx, att_x, wkv_state, lif = TimeMix(cfg, self.dtype, self.layer_id, name="att")(
        nn.LayerNorm(eps, name="ln1")(x), att_x, wkv_state, lif)
    x_in, x = x, x + dx
    dx, ffn_x, lif = ChannelMix(cfg, self.dtype, self.layer_id, name="ffn")(
        nn.LayerNorm(eps, name="ln2")(x), ffn_x, lif)
    return x + dx, (att_x, wkv_state, ffn_x, lif), x_in


class RWKV(nn.Module):
  """RWKV-4 language model: token ids [batch, seq] -> logits [batch, seq, vocab]."""
  config: RWKVConfig
  # Matmul operand dtype (float32 | bfloat16): the projections and the head multiply
  # bf16 operands into float32 results (`ponder.nn.dense`); parameters, embeddings,
  # LayerNorms, WKV, spikes and the state stay float32.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, *, state: Optional[RWKVState] = None,
               output_hidden_states: bool = False, train: bool = False):
    """Logits, or (logits, aux) when the state or hidden states are asked for.

    Args:
      input_ids: int [batch, seq]: with a state, the tokens that follow it.
      state: an `RWKVState` (from `init_state` or a previous call); aux["state"] is
        then the state after these tokens. None starts from `init_state`.
      output_hidden_states: aux["hidden_states"] [n_layer + 1, batch, seq, n_embd]:
        the embeddings after ln0, then every block's output (before ln_out), so
        consecutive differences are the blocks' residual updates.
      train: accepted for the shared LM interface; RWKV-4 has no dropout.

    Returns:
      float32 logits [batch, seq, vocab_size]; with extras also aux.
    """
    del train
    cfg = self.config
    b = input_ids.shape[0]
    given = state is not None
    if state is None:
      state = init_state(cfg, b)
    if state.att_x.shape[:2] != (cfg.n_layer, b):
      raise errors.ShapeError(
          f"state is for {state.att_x.shape[:2]} (layers, batch); input needs "
          f"{(cfg.n_layer, b)}.")
    scale = cfg.emb_init_scale
    x = nn.Embed(cfg.vocab_size, cfg.n_embd, name="emb",
                 embedding_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                     key, shape, dtype, -scale, scale))(input_ids)
    hidden, new = [], {k: [] for k in ("att_x", "aa", "bb", "pp", "ffn_x")}
    new_lif = {s: [] for s in state.lif}
    for i in range(cfg.n_layer):
      layer_state = (state.att_x[i], (state.aa[i], state.bb[i], state.pp[i]),
                     state.ffn_x[i], {s: v[i] for s, v in state.lif.items()})
      x, (att_x, (aa, bb, pp), ffn_x, lif), x_in = Block(
          cfg, i, self.dtype, name=f"blocks_{i}")(x, layer_state)
      if i == 0:
        hidden.append(x_in)
      hidden.append(x)
      for name, value in zip(new, (att_x, aa, bb, pp, ffn_x)):
        new[name].append(value)
      for s in new_lif:
        new_lif[s].append(lif[s])
    logits = dense_lib.Dense(cfg.vocab_size, use_bias=False, compute_dtype=self.dtype,
                             name="head",
                             kernel_init=_orthogonal(cfg.n_embd, cfg.vocab_size, 0.5))(
        nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_out")(x))
    aux = {}
    if output_hidden_states:
      aux["hidden_states"] = jnp.stack(hidden)
    if given:
      aux["state"] = RWKVState(
          att_x=jnp.stack(new["att_x"]).astype(state.att_x.dtype),
          aa=jnp.stack(new["aa"]), bb=jnp.stack(new["bb"]), pp=jnp.stack(new["pp"]),
          ffn_x=jnp.stack(new["ffn_x"]).astype(state.ffn_x.dtype),
          lif={s: jnp.stack(v).astype(state.lif[s].dtype) for s, v in new_lif.items()})
    logits = logits.astype(jnp.float32)
    return (logits, aux) if aux else logits


# --- Generation --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "use_state"))
def _generate(model, params, prompt, key, *, max_new_tokens, temperature, top_k, top_p,
              eos_id, use_state):
  b, p = prompt.shape
  variables = {"params": params}
  tokens = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)
  state = None
  if use_state:
    state = init_state(model.config, b)
    if p > 1:  # The last prompt token is fed by the first loop step.
      state = model.apply(variables, prompt[:, :-1], state=state)[1]["state"]

  def step(i, carry):
    tokens, state, done = carry
    if use_state:  # One recurrent step (x.shape[1] == 1 takes wkv_step).
      last = lax.dynamic_slice_in_dim(tokens, p - 1 + i, 1, axis=1)
      logits, aux = model.apply(variables, last, state=state)
      logits, state = logits[:, 0], aux["state"]
    else:  # Full recomputation: causality makes later (still zero) tokens irrelevant.
      logits = lax.dynamic_index_in_dim(model.apply(variables, tokens), p - 1 + i, axis=1,
                                        keepdims=False)
    new = gpt2.sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature,
                             top_k=top_k, top_p=top_p)
    if eos_id is not None:  # After end-of-text a row keeps emitting it.
      new = jnp.where(done, eos_id, new)
      done = done | (new == eos_id)
    return lax.dynamic_update_slice_in_dim(tokens, new[:, None], p + i, axis=1), state, done

  tokens, _, _ = lax.fori_loop(0, max_new_tokens, step,
                               (tokens, state, jnp.zeros((b,), bool)))
  return tokens


def generate(model: RWKV, params, prompt, *, key: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = None, use_state: bool = True) -> jax.Array:
  """Continues `prompt` (int [batch, prompt_len], all rows the same length); the API of
  `models.gpt2.generate`, with the recurrent state in place of the KV cache.

  The prompt but its last token is prefilled as one sequence; then each step feeds one
  token through the recurrent step and draws the next with
  `gpt2.sample_logits(..., fold_in(key, i))` (temperature 0 = greedy), so the same key
  gives the same tokens with or without the state (`use_state=False` recomputes the
  whole sequence at every step: the reference the state is tested against). There is
  no length limit (no learned positions). A spiking student decodes the same way (LIF
  membranes are part of the state).

  Returns:
    int32 [batch, prompt_len + max_new_tokens]: the prompt followed by new tokens.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise errors.ShapeError(f"prompt must be [batch, len >= 1]; got {prompt.shape}.")
  return _generate(model, params, prompt, key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   eos_id=eos_id, use_state=use_state)


# --- Checkpoints in the published key format ---------------------------------------------

# Keys of later RWKV versions or of RWKV-LM training options this file does not
# implement (v5: ln_x, gate; v6: time_maa, time_faaaa; v7: r_k; tiny attention, ...).
_UNSUPPORTED = ("ln_x", "gate.weight", "time_maa", "time_faaaa", "att.r_k", "att.x_r",
                "pos_emb", "head_q", "head_k", "ffnPre", "tiny_", "time_state")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_name(path: tuple[str, ...]) -> str:
  """("blocks_0", "att", "key", "kernel") -> "blocks.0.att.key.weight"."""
  *modules, leaf = path
  modules = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in modules]
  return ".".join(modules + [_LEAF_NAMES.get(leaf, leaf)])


def _param_shapes(model: RWKV) -> dict:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return traverse_util.flatten_dict(shapes["params"])


def _config_from_state_dict(state: dict, overrides: dict) -> RWKVConfig:
  if "_strategy" in state:
    raise errors.CheckpointError(
        "this .pth was converted by the rwkv package for one strategy; load the "
        "original checkpoint instead.")
  unsupported = sorted(k for k in state if any(s in k for s in _UNSUPPORTED))
  if unsupported:
    raise errors.CheckpointError(
        f"not an RWKV-4 checkpoint (or it uses options models/rwkv.py does not "
        f"implement): {unsupported[:6]}")
  for key in ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
    if key not in state:
      raise errors.CheckpointError(f"checkpoint has no {key}; is it an RWKV-4 state dict?")
  vocab, n_embd = state["emb.weight"].shape
  n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
  inferred = dict(vocab_size=int(vocab), n_embd=int(n_embd), n_layer=n_layer,
                  dim_att=int(state["blocks.0.att.key.weight"].shape[0]),
                  dim_ffn=int(state["blocks.0.ffn.key.weight"].shape[0]))
  return RWKVConfig(**{**inferred, **overrides})


def from_state_dict(state: dict, **overrides) -> tuple[RWKV, Any]:
  """(model, params) from a state dict {key: array} in the published key format.

  `overrides` are RWKVConfig fields (e.g. spike="ternary", wkv="chunked"); sizes come
  from the tensors. Spike parameters missing from the dict (a teacher's checkpoint
  loaded into a spiking student) start at their initial values. Missing, unexpected or
  misshapen tensors raise a CheckpointError naming them.
  """
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  cfg = _config_from_state_dict(state, overrides)
  model = RWKV(cfg)
  expected = _param_shapes(model)
  by_name = {_torch_name(p): p for p in expected}
  spike_names = {n for n, p in by_name.items() if "spike" in p}
  missing = sorted(by_name.keys() - state.keys() - spike_names)
  unexpected = sorted(state.keys() - by_name.keys())
  if missing or unexpected:
    raise errors.CheckpointError(
        f"checkpoint does not fit RWKV {cfg}.\n  missing keys: {missing}\n"
        f"  unexpected keys: {unexpected}")
  flat = {}
  for name, p in by_name.items():
    shape = expected[p].shape
    if name not in state:  # A spike parameter: its initial value.
      init = cfg.spike_alpha_init if p[-1] == "alpha" else cfg.spike_theta_init
      flat[p] = jnp.full(shape, init, jnp.float32)
      continue
    value = state[name]
    if p[-1] == "kernel":  # torch Linear weight [out, in] -> Flax kernel [in, out].
      value = value.T
    elif p[-1].startswith("time_") or p[-1] in ("alpha", "theta"):
      # time_mix is stored [1, 1, C], time_decay / time_first [A] (or [A, 1]).
      value = value.reshape(-1) if value.size == int(np.prod(shape)) else value
    if value.shape != shape:
      raise errors.CheckpointError(
          f"{name}: shape {state[name].shape} in the checkpoint, {shape} expected for "
          f"{cfg}.")
    flat[p] = jnp.asarray(value, jnp.float32)
  return model, traverse_util.unflatten_dict(flat)


def to_state_dict(params) -> dict[str, np.ndarray]:
  """params -> {key: float32 array} in the published format (time_mix [1, 1, C],
  Linear weights [out, in]); a spiking student's spike parameters are extra keys
  (`...key.spike.alpha`) that `from_state_dict` reads back and `rwkv` ignores."""
  out = {}
  for p, v in traverse_util.flatten_dict(params).items():
    v = np.asarray(v, np.float32)
    if p[-1] == "kernel":
      v = v.T
    elif p[-1].startswith("time_mix"):
      v = v.reshape(1, 1, -1)
    out[_torch_name(p)] = np.ascontiguousarray(v)
  return out


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.CheckpointError(
        "reading or writing an RWKV .pth needs torch (`pip install torch`, the CPU build "
        "is enough); or convert the checkpoint once where torch is installed with "
        "`to_state_dict(from_pth(path)[1])` and safetensors.numpy.save_file.") from e
  return torch


def from_pth(path: str | os.PathLike, **overrides) -> tuple[RWKV, Any]:
  """Loads an RWKV-4 checkpoint (`.pth`, as released, e.g. RWKV-4-Pile-169M; or a
  `.safetensors` file with the same keys): returns (model, params). `overrides` as
  `from_state_dict`. torch is needed only for `.pth`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingDataError(f"no RWKV checkpoint at {path}.")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return from_state_dict(load_file(path), **overrides)
  torch = _torch()
  state = torch.load(path, map_location="cpu", weights_only=True)
  return from_state_dict({k: v.float().numpy() for k, v in state.items()
                          if hasattr(v, "float")}, **overrides)


def to_pth(params, path: str | os.PathLike) -> None:
  """Writes `params` as a .pth state dict that `rwkv.model.RWKV` and `from_pth` read."""
  torch = _torch()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  torch.save({k: torch.from_numpy(v.copy()) for k, v in to_state_dict(params).items()}, path)
