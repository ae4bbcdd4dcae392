"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

The architecture of Sec. 2.3: the GPT decoder (learned token and position embeddings,
causal multi-head self-attention, a 4x GELU MLP) with LayerNorm moved to the input of
each sub-block (pre-LN), a final LayerNorm after the last block, the residual
projections initialised with std 0.02 / sqrt(N) for N = 2 * n_layer residual layers, and
the output layer tied to the token embedding. GELU is the tanh approximation the
released code uses ("gelu_new" in Hugging Face).

Beyond the forward pass, what later experiments need:
  * `head_mask` [n_layer, n_head] multiplies each head's output (Hugging Face's
    head_mask semantics): gates for head importance and pruning (Michel et al. 2019).
  * `output_hidden_states` / `output_attentions` return every layer's hidden states and
    attention probabilities, for distillation and analysis.
  * A key/value cache (`init_cache`, `cache=`) for incremental decoding, and `generate`
    (greedy, temperature, top-k, top-p) as one jitted `lax.fori_loop`.
  * `from_hf` / `to_hf` read and write Hugging Face checkpoint directories (config.json
    + model.safetensors, PyTorch key names) without torch.
  * Structural head pruning (Michel et al. 2019, Sec. 4): `heads_per_layer` gives each
    layer its own number of heads (c_attn and c_proj shrink with it), `prune_heads`
    removes the heads a 0/1 mask turns off from the parameters, and `head_layout` tells
    `ponder.plasticity` where each head's q/k/v/output slices lie.

Parameter names follow Hugging Face's (wte, wpe, h_<i>/{ln_1, attn/{c_attn, c_proj},
ln_2, mlp/{c_fc, c_proj}}, ln_f), and Flax's Dense kernel is [in, out] like GPT-2's
Conv1D weight, so checkpoint conversion only renames.
"""

import dataclasses
import functools
import json
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
import optax
from flax import traverse_util
from jax import lax

from ponder import errors
from ponder import hf_checkpoint
from ponder import plasticity
from ponder.analysis import heads as heads_lib
from ponder.nn import dense as dense_lib


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Sizes and dropout rates, named as in Hugging Face's GPT2Config."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: Optional[int] = None  # MLP width; None = 4 * n_embd.
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  # Heads kept in each layer after structural pruning (0..n_head each); None = n_head in
  # every layer. head_dim stays n_embd // n_head, so a layer with h heads has c_attn
  # [n_embd, 3 h head_dim] and c_proj [h head_dim, n_embd].
  heads_per_layer: Optional[tuple] = None

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise errors.ConfigError(
          f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")
    if self.heads_per_layer is not None:
      heads = tuple(int(h) for h in self.heads_per_layer)  # config.json gives a list.
      if len(heads) != self.n_layer or not all(0 <= h <= self.n_head for h in heads):
        raise errors.ConfigError(
            f"heads_per_layer={self.heads_per_layer} must give n_layer={self.n_layer} "
            f"counts, each between 0 and n_head={self.n_head}.")
      object.__setattr__(self, "heads_per_layer", heads)

  def heads(self, layer: int) -> int:
    """The number of heads layer `layer` has."""
    return self.n_head if self.heads_per_layer is None else self.heads_per_layer[layer]

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def mlp_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


# Table 2 of the paper (117M is 124M once the tied embedding is counted once) plus two
# small sizes for tests and CPU runs.
PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
    "mini": dict(n_layer=4, n_embd=256, n_head=4, n_positions=512),
    "small": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "large": dict(n_layer=36, n_embd=1280, n_head=20),
    "xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def config(preset: str = "small", **overrides) -> GPT2Config:
  """A preset's config with fields overridden, e.g. config("tiny", vocab_size=65)."""
  if preset not in PRESETS:
    raise errors.unknown_key("GPT-2 preset", preset, PRESETS)
  return GPT2Config(**{**PRESETS[preset], **overrides})


@flax.struct.dataclass
class KVCache:
  """Keys and values of the positions decoded so far, per layer.

  keys[i], values[i]: [batch, max_len, heads of layer i, head_dim]; `length` (int32
  scalar) is the number of positions written, i.e. the position of the next token.
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  length: jax.Array


def init_cache(cfg: GPT2Config, batch_size: int, max_len: int,
               dtype: Any = jnp.float32) -> KVCache:
  """An empty cache for up to `max_len` positions."""
  if max_len > cfg.n_positions:
    raise errors.ShapeError(
        f"max_len {max_len} exceeds the {cfg.n_positions} learned positions.")
  zeros = tuple(jnp.zeros((batch_size, max_len, cfg.heads(i), cfg.head_dim), dtype)
                for i in range(cfg.n_layer))
  return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def _dense(features: int, name: str, dtype: Any, std: float = 0.02) -> nn.Dense:
  # ponder's Dense multiplies on [rows, features]: nn.Dense's parameters, without the
  # transposed copy XLA:CPU makes before each weight-gradient matmul on 3-D inputs.
  # `dtype` is the compute dtype of its matmul: bf16 operands accumulate in float32,
  # forward and backward (`dense_lib.matmul`), and the output is float32.
  return dense_lib.Dense(features, compute_dtype=dtype,
                         kernel_init=nn.initializers.normal(std), name=name)


def residual_std(cfg: GPT2Config) -> float:
  # Sec. 2.3: residual-layer weights scaled by 1/sqrt(N), N = 2 residual layers per block.
  return 0.02 / math.sqrt(2 * cfg.n_layer)


class Attention(nn.Module):
  """Causal multi-head self-attention, optionally reading and writing a KV cache."""
  config: GPT2Config
  dtype: Any = jnp.float32
  n_heads: Optional[int] = None  # Heads of this layer; None = config.n_head.

  @nn.compact
  def __call__(self, x, *, positions, gate, kv_cache, train: bool, return_probs: bool):
    cfg = self.config
    b, t, _ = x.shape
    h = cfg.n_head if self.n_heads is None else self.n_heads
    # c_attn's columns are [q | k | v], each head-major: [3, h, head_dim].
    qkv = _dense(3 * h * cfg.head_dim, "c_attn", self.dtype)(x)
    q, k, v = (y[:, :, 0] for y in jnp.split(
        qkv.reshape(b, t, 3, h, cfg.head_dim), 3, axis=2))
    if kv_cache is None:
      key_positions = positions
      new_cache = None
    else:
      # Write this chunk at its positions; unwritten slots lie in the future and are
      # hidden by the causal mask below.
      k = lax.dynamic_update_slice_in_dim(kv_cache[0], k.astype(kv_cache[0].dtype),
                                          positions[0], axis=1)
      v = lax.dynamic_update_slice_in_dim(kv_cache[1], v.astype(kv_cache[1].dtype),
                                          positions[0], axis=1)
      key_positions = jnp.arange(k.shape[1])
      new_cache = (k, v)
    causal = key_positions[None, :] <= positions[:, None]  # [q, k]
    if h == 0:  # Every head pruned: the sub-block adds only c_proj's bias.
      probs = jnp.zeros((b, 0, t, k.shape[1]), jnp.float32) if return_probs else None
      out = jnp.zeros((b, t, 0, cfg.head_dim), self.dtype)
    # Attention dropout needs the probabilities, so it takes the explicit path too.
    elif return_probs or (train and cfg.attn_pdrop > 0):
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
      scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1)
      dropped = nn.Dropout(cfg.attn_pdrop, deterministic=not train)(probs)
      out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v)
    else:
      probs = None
      out = jax.nn.dot_product_attention(q, k, v, mask=causal[None, None])
    if gate is not None:
      out = out * gate[None, None, :, None].astype(out.dtype)
    out = _dense(cfg.n_embd, "c_proj", self.dtype, residual_std(cfg))(
        out.reshape(b, t, h * cfg.head_dim))
    out = nn.Dropout(cfg.resid_pdrop, deterministic=not train)(out)
    return out, probs, new_cache


class Mlp(nn.Module):
  """Position-wise MLP: n_embd -> mlp_dim -> n_embd with tanh-approximate GELU."""
  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    cfg = self.config
    x = _dense(cfg.mlp_dim, "c_fc", self.dtype)(x)
    x = nn.gelu(x, approximate=True)
    x = _dense(cfg.n_embd, "c_proj", self.dtype, residual_std(cfg))(x)
    return nn.Dropout(cfg.resid_pdrop, deterministic=not train)(x)


class Block(nn.Module):
  """Pre-LN block (Sec. 2.3): x + Attn(LN(x)), then x + MLP(LN(x))."""
  config: GPT2Config
  dtype: Any = jnp.float32
  n_heads: Optional[int] = None  # Heads of the attention; None = config.n_head.

  @nn.compact
  def __call__(self, x, *, positions, gate, kv_cache, train: bool, return_probs: bool):
    eps = self.config.layer_norm_epsilon
    y, probs, new_cache = Attention(self.config, self.dtype, self.n_heads, name="attn")(
        nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x), positions=positions,
        gate=gate, kv_cache=kv_cache, train=train, return_probs=return_probs)
    x = x + y
    x = x + Mlp(self.config, self.dtype, name="mlp")(
        nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x), train=train)
    return x, probs, new_cache


class GPT2(nn.Module):
  """GPT-2 language model: token ids [batch, seq] -> logits [batch, seq, vocab]."""
  config: GPT2Config
  # Matmul operand dtype (dense layers and the tied output layer, with float32
  # accumulation in the forward and backward dots); parameters, embeddings, the
  # residual stream, attention, LayerNorm statistics and logits stay float32.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, *, train: bool = False, head_mask=None,
               cache: Optional[KVCache] = None, output_hidden_states: bool = False,
               output_attentions: bool = False):
    """Logits, or (logits, aux) when an extra output or a cache is asked for.

    Args:
      input_ids: int [batch, seq]. With a cache, the tokens at positions
        cache.length ... cache.length + seq - 1.
      train: enables dropout (needs rngs={"dropout": key}).
      head_mask: [n_layer, n_head] multipliers of each head's output (1 keeps a head,
        0 removes it; any real value, so gradients give head importance). With
        `heads_per_layer`, row i's first heads_per_layer[i] entries gate the layer's
        heads (in their order) and the rest are ignored.
      cache: a `KVCache` from `init_cache` or a previous call, with room for `seq`
        more positions.
      output_hidden_states: aux["hidden_states"] [n_layer + 1, batch, seq, n_embd]: the
        input of every block (the first is the embeddings), then the final output after
        ln_f (the order Hugging Face returns them in).
      output_attentions: aux["attentions"] [n_layer, batch, n_head, seq, keys]: softmax
        probabilities, before head_mask and dropout (the heads a layer lacks under
        `heads_per_layer` are all-zero rows).

    Returns:
      float32 logits [batch, seq, vocab_size]; with extras also aux (a dict with the
      requested entries, and "cache", the updated KVCache, when a cache was given).
    """
    cfg = self.config
    t = input_ids.shape[1]
    if cache is None and t > cfg.n_positions:
      raise errors.ShapeError(
          f"sequence length {t} exceeds the {cfg.n_positions} learned positions.")
    if head_mask is not None and head_mask.shape != (cfg.n_layer, cfg.n_head):
      raise errors.ShapeError(
          f"head_mask has shape {head_mask.shape}; expected (n_layer, n_head) = "
          f"{(cfg.n_layer, cfg.n_head)}.")
    start = 0 if cache is None else cache.length
    positions = start + jnp.arange(t)
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd,
                   embedding_init=nn.initializers.normal(0.02), name="wte")
    # The released GPT-2 code initialises positions with std 0.01, tokens with 0.02.
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd,
                   embedding_init=nn.initializers.normal(0.01), name="wpe")
    x = wte(input_ids) + wpe(positions)[None]
    x = nn.Dropout(cfg.embd_pdrop, deterministic=not train)(x)
    hidden, attentions, keys, values = [], [], [], []
    for i in range(cfg.n_layer):
      hidden.append(x)
      h = cfg.heads(i)
      x, probs, layer_cache = Block(cfg, self.dtype, None if h == cfg.n_head else h,
                                    name=f"h_{i}")(
          x, positions=positions, gate=None if head_mask is None else head_mask[i, :h],
          kv_cache=None if cache is None else (cache.keys[i], cache.values[i]),
          train=train, return_probs=output_attentions)
      if output_attentions and h < cfg.n_head:
        probs = jnp.pad(probs, ((0, 0), (0, cfg.n_head - h), (0, 0), (0, 0)))
      attentions.append(probs)
      if cache is not None:
        keys.append(layer_cache[0])
        values.append(layer_cache[1])
    x = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
    logits = dense_lib.attend(x, wte.embedding, self.dtype)  # Tied output layer.
    aux = {}
    if output_hidden_states:
      aux["hidden_states"] = jnp.stack(hidden + [x])
    if output_attentions:
      aux["attentions"] = jnp.stack(attentions)
    if cache is not None:
      aux["cache"] = KVCache(tuple(keys), tuple(values), cache.length + t)
    return (logits, aux) if aux else logits


# --- Generation --------------------------------------------------------------------------


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Draws one token id per row of `logits` [batch, vocab].

  temperature 0 is greedy (argmax). top_k > 0 keeps the k most likely tokens (Fan et al.
  2018); top_p < 1 keeps the smallest set of most likely tokens whose probability
  reaches top_p (nucleus sampling, Holtzman et al. 2020). Both filters apply after the
  temperature, in that order.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    # A token stays while the mass of the tokens before it is below top_p, so the most
    # likely token always stays.
    kept = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "use_cache"))
def _generate(model, params, prompt, key, *, max_new_tokens, temperature, top_k, top_p,
              eos_id, use_cache):
  b, p = prompt.shape
  variables = {"params": params}
  tokens = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)
  cache = None
  if use_cache:
    cache = init_cache(model.config, b, p + max_new_tokens, model.dtype)
    if p > 1:  # The last prompt token is fed by the first loop step.
      cache = model.apply(variables, prompt[:, :-1], cache=cache)[1]["cache"]

  def step(i, carry):
    tokens, cache, done = carry
    if use_cache:
      last = lax.dynamic_slice_in_dim(tokens, p - 1 + i, 1, axis=1)
      logits, aux = model.apply(variables, last, cache=cache)
      logits, cache = logits[:, 0], aux["cache"]
    else:  # Full recomputation: causality makes later (still zero) tokens irrelevant.
      logits = lax.dynamic_index_in_dim(model.apply(variables, tokens), p - 1 + i, axis=1,
                                        keepdims=False)
    new = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature,
                        top_k=top_k, top_p=top_p)
    if eos_id is not None:  # After end-of-text a row keeps emitting it.
      new = jnp.where(done, eos_id, new)
      done = done | (new == eos_id)
    return lax.dynamic_update_slice_in_dim(tokens, new[:, None], p + i, axis=1), cache, done

  tokens, _, _ = lax.fori_loop(0, max_new_tokens, step,
                               (tokens, cache, jnp.zeros((b,), bool)))
  return tokens


def generate(model: GPT2, params, prompt, *, key: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = None, use_cache: bool = True) -> jax.Array:
  """Continues `prompt` (int [batch, prompt_len], all rows the same length).

  Token i of the continuation is drawn with `fold_in(key, i)`, so the same key gives the
  same tokens, with or without the cache (`use_cache=False` recomputes the whole
  sequence at every step: the reference the cache is tested against).

  Returns:
    int32 [batch, prompt_len + max_new_tokens]: the prompt followed by new tokens.
  """
  prompt = check_prompt(prompt, max_new_tokens, model.config.n_positions)
  return _generate(model, params, prompt, key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   eos_id=eos_id, use_cache=use_cache)


def check_prompt(prompt, max_new_tokens: int, n_positions: int) -> jax.Array:
  """The prompt as int32 [batch, len >= 1], or a ShapeError if it and the tokens to
  generate do not fit the model's learned positions."""
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise errors.ShapeError(f"prompt must be [batch, len >= 1]; got {prompt.shape}.")
  if prompt.shape[1] + max_new_tokens > n_positions:
    raise errors.ShapeError(
        f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
        f"{n_positions} learned positions.")
  return prompt


# --- Hugging Face checkpoints ------------------------------------------------------------

_CONFIG_FILE = hf_checkpoint.CONFIG_FILE
_SAFETENSORS_FILE = hf_checkpoint.SAFETENSORS_FILE
_HF_PREFIX = "transformer."
# Causal-mask buffers that older PyTorch GPT-2 checkpoints store beside the weights.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF config values this implementation reproduces; any other value is refused.
_HF_REQUIRED = {
    "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,), "tie_word_embeddings": (True,),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
}


def _hf_name(path: tuple[str, ...]) -> str:
  """("h_0", "attn", "c_attn", "kernel") -> "h.0.attn.c_attn.weight"."""
  *modules, leaf = path
  modules = [re.sub(r"^h_(\d+)$", r"h.\1", m) for m in modules]
  return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _config_from_hf(hf: dict) -> GPT2Config:
  if hf.get("model_type", "gpt2") != "gpt2":
    raise errors.CheckpointError(f"model_type {hf['model_type']!r} is not 'gpt2'.")
  for key, allowed in _HF_REQUIRED.items():
    if key in hf and hf[key] not in allowed:
      raise errors.CheckpointError(
          f"config.json has {key}={hf[key]!r}; models/gpt2.py implements {allowed}.")
  names = {f.name for f in dataclasses.fields(GPT2Config)}
  return GPT2Config(**{k: v for k, v in hf.items() if k in names})


def from_hf(path: str | os.PathLike) -> tuple[GPT2, Any]:
  """Loads a Hugging Face GPT-2 checkpoint directory: returns (model, params).

  Reads config.json and model.safetensors (or pytorch_model.bin when torch is
  installed). Keys may carry the "transformer." prefix of GPT2LMHeadModel or not (as in
  the hub's `gpt2`); attention-mask buffers are skipped and a stored lm_head must equal
  the token embedding (tied). Missing, unexpected or misshapen weights raise a
  CheckpointError that names them.
  """
  directory = pathlib.Path(path)
  if not (directory / _CONFIG_FILE).is_file():
    raise errors.MissingDataError(f"no {_CONFIG_FILE} in {directory}.")
  cfg = _config_from_hf(json.loads((directory / _CONFIG_FILE).read_text()))
  model = GPT2(cfg)
  tensors, _ = hf_checkpoint.read_state_dict(directory, "GPT2LMHeadModel")
  state = {k.removeprefix(_HF_PREFIX): v for k, v in tensors.items()
           if not k.endswith(_BUFFER_SUFFIXES)}
  head = state.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, state.get("wte.weight", head)):
    raise errors.CheckpointError(
        "lm_head.weight differs from wte.weight: untied output layers are not supported.")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  expected = traverse_util.flatten_dict(shapes["params"])
  by_name = {_hf_name(p): p for p in expected}
  missing = sorted(by_name.keys() - state.keys())
  unexpected = sorted(state.keys() - by_name.keys())
  if missing or unexpected:
    raise errors.CheckpointError(
        f"{directory}: checkpoint does not fit GPT-2 {cfg}.\n  missing keys: {missing}\n"
        f"  unexpected keys: {unexpected}")
  flat = {}
  for name, p in by_name.items():
    if state[name].shape != expected[p].shape:
      raise errors.CheckpointError(
          f"{name}: shape {state[name].shape} in the checkpoint, {expected[p].shape} "
          "expected from config.json.")
    flat[p] = jnp.asarray(state[name], jnp.float32)
  return model, traverse_util.unflatten_dict(flat)


def to_hf(model: GPT2, params, path: str | os.PathLike) -> None:
  """Writes `params` as a Hugging Face GPT2LMHeadModel directory (config.json +
  model.safetensors with PyTorch key names), readable by `from_hf` and transformers."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  # A pruned model's heads_per_layer is written for from_hf; transformers ignores the
  # key, so it cannot read such a checkpoint. Unpruned configs leave it out.
  fields = {k: v for k, v in dataclasses.asdict(model.config).items()
            if not (k == "heads_per_layer" and v is None)}
  hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **fields,
               **{k: allowed[0] for k, allowed in _HF_REQUIRED.items()}}
  (directory / _CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
  tensors = {_HF_PREFIX + _hf_name(p): np.ascontiguousarray(np.asarray(v))
             for p, v in traverse_util.flatten_dict(params).items()}
  save_file(tensors, directory / _SAFETENSORS_FILE, metadata={"format": "pt"})


# --- Head pruning (Michel et al. 2019) ---------------------------------------------------


def head_layout(cfg: GPT2Config) -> plasticity.HeadLayout:
  """Where each layer's heads lie in the parameters: c_attn's columns [q | k | v] (each
  [heads, head_dim]) and c_proj's rows [heads, head_dim]. c_proj's bias is shared by
  the heads and stays."""
  def layer(i):
    attn = (f"h_{i}", "attn")
    return (plasticity.HeadSlice(attn + ("c_attn", "kernel"), axis=1, groups=3),
            plasticity.HeadSlice(attn + ("c_attn", "bias"), axis=0, groups=3),
            plasticity.HeadSlice(attn + ("c_proj", "kernel"), axis=0))
  return plasticity.HeadLayout(
      n_head=cfg.n_head, head_dim=cfg.head_dim,
      heads=tuple(cfg.heads(i) for i in range(cfg.n_layer)),
      slices=tuple(layer(i) for i in range(cfg.n_layer)))


def prune_heads(model: GPT2, params, mask) -> tuple[GPT2, Any]:
  """Removes the heads that the 0/1 `mask` [n_layer, n_head] turns off.

  Returns (model, params) with `heads_per_layer` set and c_attn / c_proj shrunk, whose
  outputs equal `model.apply(params, ..., head_mask=mask)`: a gated head contributes
  nothing, and c_proj's bias, which it does not own, is kept. A model pruned before
  takes a mask over its remaining heads (row i's first heads_per_layer[i] entries).
  """
  layout = head_layout(model.config)
  pruned = plasticity.prune_params(params, mask, layout)
  heads = plasticity.heads_after(mask, layout)
  return GPT2(dataclasses.replace(model.config, heads_per_layer=heads), model.dtype), pruned


def head_analysis_apply(model: GPT2):
  """`apply(params, batch, head_mask) -> (loss, attentions)` for
  `ponder.analysis.heads`: the mean next-token NLL of batch["tokens"] [batch, seq + 1]
  (weighted by batch["mask"] [batch, seq] when the batch has one, as evaluation batches
  do) and every layer's attention probabilities, in eval mode (no dropout)."""
  def apply(params, batch, head_mask):
    tokens = batch["tokens"]
    logits, aux = model.apply({"params": params}, tokens[:, :-1], head_mask=head_mask,
                              output_attentions=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return heads_lib.mean_loss(nll, batch.get("mask")), aux["attentions"]
  return apply
