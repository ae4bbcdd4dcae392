"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding").

The encoder of Sec. 3: the input representation is the sum of token (WordPiece),
learned position and segment (token-type) embeddings (Sec. 3.2, Fig. 2), followed by
LayerNorm and dropout; then L Transformer encoder blocks (Vaswani et al. 2017, Sec. 3.1)
with LayerNorm after each residual sum ("post-LN": LN(x + Sublayer(x))), bidirectional
multi-head self-attention over the non-padding positions, and a position-wise MLP with
the exact (erf) GELU of Hendrycks & Gimpel 2016. The pooler is the released code's
tanh dense layer on the final hidden vector of [CLS] (the "C" of Fig. 1), and the
sequence-classification head is dropout then a dense layer on the pooled vector
(Sec. 4.1: "the only new parameters ... are classification layer weights W").

Beyond the forward pass, what later experiments need (as models/gpt2.py):
  * `head_mask` [n_layer, n_head] multiplies each head's attention probabilities
    (Hugging Face's head_mask semantics): gates for head importance and pruning
    (Michel et al. 2019).
  * `output_hidden_states` / `output_attentions` return every layer's hidden states and
    attention probabilities, for distillation and analysis.
  * `dtype` is the matmul operand dtype (float32 | bfloat16): every dense layer and the
    masked-LM output layer multiply bf16 operands into float32 results forward and
    backward (`ponder.nn.dense`); parameters, embeddings, LayerNorm, softmax and the
    activations between layers stay float32.
  * `from_hf` / `to_hf` read and write Hugging Face checkpoint directories (config.json
    + model.safetensors, PyTorch or Flax key names, with or without the `bert.` prefix)
    without torch; a hub id is fetched with huggingface_hub when online.

Two additions for the DendriticBERT experiments (issue 15):
  * `BertConfig.dendrites`: a `perforated.DendriteSpec` whose module-path globs pick the
    Dense layers built as PerforatedAI `DendriticDense` (`dendrite_spec(k, "classifier,
    ffn_output")`: the classifier and every layer's FFN output). None (the default) is
    the plain model; k = 0 gives the same parameter tree, so a plain checkpoint loads.
  * `DAN` (alias `DSN`): the seed's "Dendritic Semantic Network", a Deep Averaging
    Network (Iyyer et al. 2015) on BERT's word embeddings with a dendritic block.

Sizes: `config(preset)` with the compact models of Turc et al. 2019 ("Well-Read Students
Learn Better": tiny 2x128, mini 4x256, small 4x512, medium 8x512), BERT-base (12x768)
and all-MiniLM-L6-v2 (6x384, 12 heads; Wang et al. 2020).

Parameter names follow Hugging Face's (embeddings/{word,position,token_type}_embeddings,
encoder/layer_<i>/{attention/{self/{query,key,value}, output/{dense,LayerNorm}},
intermediate/dense, output/{dense,LayerNorm}}, pooler/dense, classifier), so checkpoint
conversion renames, and transposes PyTorch's Linear weights [out, in] to kernels [in, out].
"""

import dataclasses
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

from ponder import errors
from ponder import hf_checkpoint
from ponder import plasticity
from ponder.analysis import heads as heads_lib
from ponder.nn import dense as dense_lib
from ponder.nn import perforated
from ponder.nn import perforation as attention_perforation
import ponder.ops

# Hugging Face's activation names -> functions. "gelu" is the exact erf form BERT uses
# (Hendrycks & Gimpel 2016, Eq. in Sec. 2: x * Phi(x)); the tanh forms are its approximation.
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes and dropout rates, named as in Hugging Face's BertConfig."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  num_labels: int = 2  # Classes of the sequence-classification head.
  classifier_dropout: Optional[float] = None  # None = hidden_dropout_prob.
  # Dense layers built with PerforatedAI dendrites (module-path globs; not an HF field).
  dendrites: Optional[perforated.DendriteSpec] = None
  # Heads kept in each layer after structural pruning (0..num_attention_heads each; not an
  # HF field); None = all in every layer. head_dim stays hidden / num_attention_heads, so
  # a layer with h heads has query/key/value [hidden, h * head_dim] (`prune_heads`).
  heads_per_layer: Optional[tuple] = None
  # Learned attention perforation (issue 20, ponder/nn/perforation.py; not an HF field):
  # None = dense attention.
  perforation: Optional[attention_perforation.PerforationSpec] = None

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise errors.ConfigError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}.")
    if self.hidden_act not in ACTIVATIONS:
      raise errors.unknown_key("hidden_act", self.hidden_act, ACTIVATIONS)
    if self.heads_per_layer is not None:
      heads = tuple(int(h) for h in self.heads_per_layer)  # config.json gives a list.
      if (len(heads) != self.num_hidden_layers
          or not all(0 <= h <= self.num_attention_heads for h in heads)):
        raise errors.ConfigError(
            f"heads_per_layer={self.heads_per_layer} must give num_hidden_layers="
            f"{self.num_hidden_layers} counts, each between 0 and num_attention_heads="
            f"{self.num_attention_heads}.")
      object.__setattr__(self, "heads_per_layer", heads)

  def heads(self, layer: int) -> int:
    """Heads present in `layer` (fewer than num_attention_heads after pruning)."""
    if self.heads_per_layer is None:
      return self.num_attention_heads
    return self.heads_per_layer[layer]

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def _sizes(layers: int, hidden: int, heads: int, mlp: Optional[int] = None) -> dict:
  return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
              intermediate_size=mlp or 4 * hidden)


# Turc et al. 2019 (google-research/bert's 24 compact models; heads = hidden / 64),
# Devlin et al. 2019 Sec. 3 (BERT-base), and all-MiniLM-L6-v2's config.json.
PRESETS = {
    "tiny": _sizes(2, 128, 2),
    "mini": _sizes(4, 256, 4),
    "small": _sizes(4, 512, 8),
    "medium": _sizes(8, 512, 8),
    "base": _sizes(12, 768, 12),
    "minilm_l6": _sizes(6, 384, 12, 1536),
}


def config(preset: str = "base", **overrides) -> BertConfig:
  """A preset's config with fields overridden, e.g. config("tiny", num_labels=3)."""
  if preset not in PRESETS:
    raise errors.unknown_key("BERT preset", preset, PRESETS)
  return BertConfig(**{**PRESETS[preset], **overrides})


@flax.struct.dataclass
class BertOutput:
  """What the encoder returns (Hugging Face's BaseModelOutputWithPooling fields).

  last_hidden_state: [batch, seq, hidden]. pooler_output: [batch, hidden].
  hidden_states: [n_layer + 1, batch, seq, hidden] (the embeddings, then every layer's
    output; the last equals last_hidden_state) or None.
  attentions: [n_layer, batch, n_head, seq, seq] or None.
  """
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: Optional[jax.Array] = None
  attentions: Optional[jax.Array] = None


# Named groups of Dense layers for `dendrite_spec`, as module-path globs. fnmatch's "*"
# crosses "/", so layer numbers are spelled with [0-9] (up to 100 layers) to keep a
# layer's attention output (".../attention/output/dense") out of its FFN output.
_LAYER = ("layer_[0-9]", "layer_[0-9][0-9]")
DENDRITE_TARGETS = {
    "classifier": ("classifier",),  # BertForSequenceClassification's and DAN's head
    "ffn_output": tuple(f"*encoder/{n}/output/dense" for n in _LAYER),
    "ffn_intermediate": tuple(f"*encoder/{n}/intermediate/dense" for n in _LAYER),
    "attention_output": tuple(f"*encoder/{n}/attention/output/dense" for n in _LAYER),
    "pooler": ("*pooler/dense",),
    "hidden": ("hidden_[0-9]", "hidden_[0-9][0-9]"),  # DAN's hidden layers
}


def dendrite_spec(num_dendrites: int, targets) -> perforated.DendriteSpec:
  """A DendriteSpec for named groups of `DENDRITE_TARGETS` and/or raw globs.

  targets: "classifier,ffn_output" or a sequence of names; an entry with "/" or "*"
  is a glob over '/'-joined module paths, used as it is.
  """
  names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
  paths = []
  for name in filter(None, names):
    if name in DENDRITE_TARGETS:
      paths.extend(DENDRITE_TARGETS[name])
    elif "/" in name or "*" in name:
      paths.append(name)
    else:
      raise errors.unknown_key("dendrite target", name, DENDRITE_TARGETS)
  if not paths:
    raise errors.ConfigError("dendrite_spec: no target layers given; valid names: "
                             + ", ".join(DENDRITE_TARGETS) + " (or module-path globs).")
  return perforated.DendriteSpec(int(num_dendrites), tuple(paths))


def _dense(parent: nn.Module, cfg: BertConfig, features: int, name: str,
           dtype: Any) -> nn.Module:
  """A Dense (matmul operands in `dtype`), or a DendriticDense where `cfg.dendrites`
  matches the layer's path."""
  return perforated.dense(parent, features, name=name, spec=cfg.dendrites, compute_dtype=dtype,
                          kernel_init=nn.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: BertConfig) -> nn.LayerNorm:
  return nn.LayerNorm(cfg.layer_norm_eps, name="LayerNorm")  # float32 (module doc)


class Embeddings(nn.Module):
  """Sec. 3.2 / Fig. 2: E = E_token + E_position + E_segment, then LayerNorm, dropout."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train: bool):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=init, name=name)
    positions = jnp.arange(input_ids.shape[1])
    x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, "position_embeddings")(positions)[None]
         + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = _layer_norm(cfg)(x)
    return nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)(x)


def _perforated_attention(module: nn.Module, q, k, v, key_mask, *, gate, train: bool,
                          ctrl, return_probs: bool):
  """Attention through `config.perforation`'s block mask (issue 20). q, k, v
  [batch, seq, heads, head_dim]; returns the same layout.

  Training: masked dense attention renormalised over the kept tiles, with the relaxed or
  straight-through mask (so gradients reach the scorer). Inference (train=False): the
  deterministic hard mask through `ponder.ops.attention` with a static
  max_active_blocks (kernel on GPU/TPU, gathered XLA on CPU), or the masked dense path
  when ctrl.impl == "dense". Sows "perforation_soft" (training, learned / static modes)
  and "perforation_hard" into "intermediates" for the regulariser and the metrics.
  Training applies the attention-probability dropout of the dense path to the
  renormalised probabilities, so a perforated model differs from the dense one only in
  its mask.
  """
  cfg = module.config
  spec = cfg.perforation
  if return_probs:
    raise errors.ConfigError("output_attentions is not available with perforation: the "
                             "inference path never forms the probabilities.")
  if train and ctrl is None:
    raise errors.ConfigError(
        "training a perforated BERT needs perforation=attention_perforation.control(step, "
        "spec) (the step's temperature and hard flag) and rngs={'perforation': key}.")
  qh, kh, vh = (x.swapaxes(1, 2) for x in (q, k, v))  # [batch, heads, seq, head_dim]
  scorer = None
  if spec.mode in ("learned", "static"):
    scorer = attention_perforation.BlockScorer(
        spec, qh.shape[1], spec.grid(cfg.max_position_embeddings), name="perforation")
  key = module.make_rng("perforation") if train and scorer is not None else None
  layer = int(re.search(r"layer_(\d+)", "/".join(module.scope.path)).group(1))
  mask, soft, hard = attention_perforation.layer_mask(
      scorer, spec, qh, kh, key_mask, layer=layer, train=train, ctrl=ctrl, key=key)
  if soft is not None:
    module.sow("intermediates", "perforation_soft", soft)
  module.sow("intermediates", "perforation_hard", hard)
  impl = "auto" if ctrl is None else ctrl.impl
  if train or impl == "dense":
    dropout = None
    if train and cfg.attention_probs_dropout_prob > 0:
      dropout = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=False)
    out = attention_perforation.masked_attention(qh, kh, vh, mask, key_mask,
                                                 block=spec.block, dropout=dropout)
  else:
    out = ponder.ops.attention(
        qh, kh, vh, hard, kv_padding=~key_mask, impl=impl,
        block_sizes=ponder.ops.AttentionBlockSizes(spec.block, spec.block),
        # Rows are capped at max_active (perforation.cap_rows): no dense fallback.
        max_active_blocks=spec.max_active(qh.shape[2]), fallback=False)
  if gate is not None:
    out = out * gate[None, :, None, None].astype(out.dtype)
  return out.swapaxes(1, 2).astype(v.dtype)


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product attention (Vaswani et al. 2017, Eq. 1 and Sec. 3.2.2):
  softmax(Q K^T / sqrt(d_k) + M) V per head, M = -inf at padding keys.

  Returns the heads' outputs concatenated [batch, seq, n_heads * head_dim] and the
  probabilities (None unless asked for). `gate` [n_heads] multiplies the probabilities
  after dropout, as Hugging Face's head_mask does.
  """
  config: BertConfig
  dtype: Any = jnp.float32
  n_heads: Optional[int] = None  # Heads of this layer; None = config.num_attention_heads.

  @nn.compact
  def __call__(self, x, key_mask, *, gate, train: bool, return_probs: bool,
               perforation=None):
    cfg = self.config
    b, t, _ = x.shape
    n = cfg.num_attention_heads if self.n_heads is None else self.n_heads
    heads = lambda name: _dense(self, cfg, n * cfg.head_dim, name, self.dtype)(x).reshape(
        b, t, n, cfg.head_dim)
    q, k, v = heads("query"), heads("key"), heads("value")
    if cfg.perforation is not None and n:
      out = _perforated_attention(self, q, k, v, key_mask, gate=gate, train=train,
                                  ctrl=perforation, return_probs=return_probs)
      return out.reshape(b, t, n * cfg.head_dim), None
    mask = key_mask[:, None, None, :]  # [batch, 1 (heads), 1 (queries), keys]
    dropout = train and cfg.attention_probs_dropout_prob > 0
    if n == 0:  # Every head pruned: the sub-block adds only its output dense's bias.
      probs = jnp.zeros((b, 0, t, t), jnp.float32)
      out = jnp.zeros((b, t, 0, cfg.head_dim), jnp.float32)
    elif return_probs or dropout:
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
      scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1)
      # "Dropping out entire tokens to attend to", as the released code does.
      probs = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=not train)(probs)
      if gate is not None:
        probs = probs * gate[None, :, None, None].astype(probs.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      probs = None
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
      if gate is not None:  # (g P) V = g (P V): the same gate on the head's output.
        out = out * gate[None, None, :, None].astype(out.dtype)
    return out.reshape(b, t, n * cfg.head_dim), (probs if return_probs else None)


class DenseResidualNorm(nn.Module):
  """LN(x + Dropout(Dense(h))): the post-LN residual sum of Vaswani et al. Sec. 3.1 (and
  Sec. 5.4's residual dropout). Named `output` in both sub-blocks, as in Hugging Face."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, residual, *, train: bool):
    cfg = self.config
    h = _dense(self, cfg, cfg.hidden_size, "dense", self.dtype)(h)
    h = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)(h)
    return _layer_norm(cfg)(h + residual)


class Attention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  n_heads: Optional[int] = None  # As SelfAttention's.

  @nn.compact
  def __call__(self, x, key_mask, *, gate, train: bool, return_probs: bool,
               perforation=None):
    h, probs = SelfAttention(self.config, self.dtype, self.n_heads, name="self")(
        x, key_mask, gate=gate, train=train, return_probs=return_probs,
        perforation=perforation)
    return DenseResidualNorm(self.config, self.dtype, name="output")(h, x, train=train), probs


class Intermediate(nn.Module):
  """The FFN's first layer and GELU (Vaswani et al. Eq. 2 with GELU for ReLU)."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return ACTIVATIONS[cfg.hidden_act](
        _dense(self, cfg, cfg.intermediate_size, "dense", self.dtype)(x))


class Layer(nn.Module):
  """One encoder block: x = LN(x + MHA(x)); x = LN(x + FFN(x))."""
  config: BertConfig
  dtype: Any = jnp.float32
  n_heads: Optional[int] = None  # As SelfAttention's.

  @nn.compact
  def __call__(self, x, key_mask, *, gate, train: bool, return_probs: bool,
               perforation=None):
    x, probs = Attention(self.config, self.dtype, self.n_heads, name="attention")(
        x, key_mask, gate=gate, train=train, return_probs=return_probs,
        perforation=perforation)
    h = Intermediate(self.config, self.dtype, name="intermediate")(x)
    return DenseResidualNorm(self.config, self.dtype, name="output")(h, x, train=train), probs


class Encoder(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask, *, head_mask, train: bool, return_probs: bool,
               perforation=None):
    cfg = self.config
    hidden, attentions = [x], []
    for i in range(cfg.num_hidden_layers):
      h = cfg.heads(i)
      x, probs = Layer(cfg, self.dtype, None if h == cfg.num_attention_heads else h,
                       name=f"layer_{i}")(
          x, key_mask, gate=None if head_mask is None else head_mask[i, :h], train=train,
          return_probs=return_probs, perforation=perforation)
      if return_probs and h < cfg.num_attention_heads:  # Absent heads: all-zero rows.
        probs = jnp.pad(probs, ((0, 0), (0, cfg.num_attention_heads - h), (0, 0), (0, 0)))
      hidden.append(x)
      attentions.append(probs)
    return x, hidden, attentions


class Pooler(nn.Module):
  """tanh(W h_[CLS] + b): the released code's pooler for sentence-level tasks."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(self, self.config, self.config.hidden_size, "dense",
                           self.dtype)(x[:, 0]))


def _check_inputs(cfg: BertConfig, input_ids, head_mask) -> None:
  if input_ids.ndim != 2:
    raise errors.ShapeError(f"input_ids must be [batch, seq]; got {input_ids.shape}.")
  if input_ids.shape[1] > cfg.max_position_embeddings:
    raise errors.ShapeError(
        f"sequence length {input_ids.shape[1]} exceeds the "
        f"{cfg.max_position_embeddings} learned positions.")
  expected = (cfg.num_hidden_layers, cfg.num_attention_heads)
  if head_mask is not None and head_mask.shape != expected:
    raise errors.ShapeError(
        f"head_mask has shape {head_mask.shape}; expected (n_layer, n_head) = {expected}.")


class Bert(nn.Module):
  """The BERT encoder and pooler (Hugging Face's BertModel): token ids -> BertOutput."""
  config: BertConfig
  dtype: Any = jnp.float32  # Computation dtype; parameters stay float32.

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               train: bool = False, head_mask=None, output_hidden_states: bool = False,
               output_attentions: bool = False, perforation=None) -> BertOutput:
    """Encodes a padded batch.

    Args:
      input_ids: int [batch, seq], starting with [CLS].
      attention_mask: [batch, seq], 1 at real tokens and 0 at padding (None: all 1).
        Padding keys get no attention; padding positions still get hidden states
        (computed from the real tokens), as in Hugging Face.
      token_type_ids: int [batch, seq], the segment of each token (None: all 0).
      train: enables dropout (needs rngs={"dropout": key}).
      head_mask: [n_layer, n_head] multipliers of each head's attention probabilities
        (1 keeps a head, 0 removes it; any real value, so gradients give head importance).
      output_hidden_states: also return every layer's hidden states.
      output_attentions: also return every layer's attention probabilities, after
        dropout and head_mask (what Hugging Face returns).
      perforation: with `config.perforation`, the step's
        `attention_perforation.Control` (temperature, hard flag, inference path);
        needed in training (which also needs rngs={"perforation": key}).
    """
    cfg = self.config
    _check_inputs(cfg, input_ids, head_mask)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, train=train)
    x, hidden, attentions = Encoder(cfg, self.dtype, name="encoder")(
        x, attention_mask.astype(bool), head_mask=head_mask, train=train,
        return_probs=output_attentions, perforation=perforation)
    return BertOutput(
        last_hidden_state=x, pooler_output=Pooler(cfg, self.dtype, name="pooler")(x),
        hidden_states=jnp.stack(hidden) if output_hidden_states else None,
        attentions=jnp.stack(attentions) if output_attentions else None)


class BertForSequenceClassification(nn.Module):
  """BERT with the Sec. 4.1 classification head: logits = W Dropout(pooled) + b."""
  config: BertConfig
  dtype: Any = jnp.float32  # Computation dtype; parameters stay float32.

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               train: bool = False, head_mask=None, output_hidden_states: bool = False,
               output_attentions: bool = False, perforation=None):
    """float32 logits [batch, num_labels], or (logits, aux) when extras are asked for.

    Arguments as `Bert`. aux holds "pooled" [batch, hidden] and the requested
    "hidden_states" / "attentions" (shapes as in `BertOutput`).
    """
    cfg = self.config
    out = Bert(cfg, self.dtype, name="bert")(
        input_ids, attention_mask, token_type_ids, train=train, head_mask=head_mask,
        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        perforation=perforation)
    rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    pooled = nn.Dropout(rate, deterministic=not train)(out.pooler_output)
    logits = _dense(self, cfg, cfg.num_labels, "classifier", self.dtype)(pooled).astype(
        jnp.float32)
    if not (output_hidden_states or output_attentions):
      return logits
    aux = {"pooled": out.pooler_output}
    if output_hidden_states:
      aux["hidden_states"] = out.hidden_states
    if output_attentions:
      aux["attentions"] = out.attentions
    return logits, aux


class MaskedLMHead(nn.Module):
  """Sec. 3.1 Task #1 (masked LM), as the released code: a dense + GELU + LayerNorm
  transform, then the output layer tied to the word embeddings (Press & Wolf 2017) plus
  a per-token bias. Hugging Face's cls/predictions/{transform, bias}."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, word_table):
    cfg = self.config
    h = ACTIVATIONS[cfg.hidden_act](_dense(self, cfg, cfg.hidden_size, "transform", self.dtype)(h))
    h = _layer_norm(cfg)(h)
    bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
    return dense_lib.attend(h, word_table, self.dtype) + bias


class BertForMaskedLM(nn.Module):
  """BERT with the masked-LM head: logits [batch, n, vocab] at `positions` [batch, n]
  only (every position when None), so the vocabulary-wide output layer costs what the
  masked share of the tokens needs (15%), as BERT's pre-training does."""
  config: BertConfig
  dtype: Any = jnp.float32  # Computation dtype; parameters stay float32.

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               positions=None, train: bool = False, perforation=None):
    encoder = Bert(self.config, self.dtype, name="bert")
    h = encoder(input_ids, attention_mask, token_type_ids, train=train,
                perforation=perforation).last_hidden_state
    if positions is not None:
      h = jnp.take_along_axis(h, positions[..., None], axis=1)
    table = encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    return MaskedLMHead(self.config, self.dtype, name="mlm_head")(h, table)


# --- The Deep Averaging Network ("DSN") -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DANConfig:
  """Sizes of a Deep Averaging Network; `hidden_size` is the width the parameter-matched
  wide baseline raises."""
  vocab_size: int = 30522
  embed_dim: int = 384  # Word-embedding width (MiniLM's hidden_size when loaded from it).
  hidden_size: int = 384  # Width of every hidden layer.
  num_hidden_layers: int = 2  # Hidden layers between the average and the classifier.
  hidden_act: str = "relu"  # Nonlinearity f of Eq. 3 (Iyyer et al. use ReLU / tanh).
  dropout: float = 0.1  # Dropout on the average and on each hidden layer's output.
  word_dropout: float = 0.0  # Sec. 3.1: each real token is left out of the average w.p. p.
  num_labels: int = 2
  freeze_embeddings: bool = False  # No gradient into the table (see `DAN`).
  initializer_range: float = 0.02  # N(0, .) for a randomly initialised table.
  dendrites: Optional[perforated.DendriteSpec] = None  # e.g. dendrite_spec(1, "hidden,classifier")

  def __post_init__(self):
    if self.hidden_act not in DAN_ACTIVATIONS:
      raise errors.unknown_key("hidden_act", self.hidden_act, DAN_ACTIVATIONS)
    if not 0 <= self.word_dropout < 1:
      raise errors.ConfigError(f"word_dropout={self.word_dropout} is not in [0, 1).")


DAN_ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "gelu": ACTIVATIONS["gelu"]}


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x [batch, seq, d] over the positions where mask [batch, seq] is nonzero; a
  row with no such position averages to 0."""
  m = mask.astype(x.dtype)[..., None]
  return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)


class DAN(nn.Module):
  """Deep Averaging Network (Iyyer et al. 2015, "Deep Unordered Composition Rivals
  Syntactic Methods for Text Classification"), with PerforatedAI dendrites.

  This is the seed's "Dendritic Semantic Network" (DSN): no encoder layers at all.
    z_0 = (1 / |X|) sum_{w in X} v_w              (Eq. 1: average of word embeddings)
    z_i = f(W_i z_{i-1} + b_i),  i = 1..n          (Eq. 3: the hidden layers)
    y   = softmax(W_s z_n + b_s)                   (Eq. 4; logits are returned)
  X is the sentence's REAL tokens: attention_mask excludes padding (the seed's code
  averaged the padding embeddings in, so its sentence vector moved with the batch's
  padded length). [CLS] and [SEP] are real tokens here, as BERT's tokenizer emits them:
  two constant terms in every average. Word dropout (Sec. 3.1) drops each real token
  from X with probability `word_dropout` while training.

  The hidden layers (`hidden_<i>`) and the classifier are `perforated.dense` layers, so
  `config.dendrites` (globs over those names) gives them k dendrites each. The table is
  named `word_embeddings` as BERT's (its checkpoint's table loads into it); with
  `freeze_embeddings` no gradient reaches it (give it optim lr scale 0 as well, or
  AdamW's weight decay still shrinks it).

  Called as the BERT classifier: (input_ids, attention_mask, token_type_ids; train)
  -> float32 logits [batch, num_labels]; token types are ignored.
  """
  config: DANConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               train: bool = False):
    del token_type_ids  # An average has no segments.
    cfg = self.config
    if input_ids.ndim != 2:
      raise errors.ShapeError(f"input_ids must be [batch, seq]; got {input_ids.shape}.")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    table = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=nn.initializers.normal(cfg.initializer_range),
                     name="word_embeddings")
    x = table(input_ids)
    if cfg.freeze_embeddings:
      x = jax.lax.stop_gradient(x)
    mask = attention_mask.astype(bool)
    if train and cfg.word_dropout > 0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - cfg.word_dropout, mask.shape)
      mask = mask & keep
    z = masked_mean(x, mask)
    act = DAN_ACTIVATIONS[cfg.hidden_act]
    for i in range(cfg.num_hidden_layers):
      z = nn.Dropout(cfg.dropout, deterministic=not train)(z)
      z = act(perforated.dense(self, cfg.hidden_size, name=f"hidden_{i}", spec=cfg.dendrites,
                               compute_dtype=self.dtype)(z))
    z = nn.Dropout(cfg.dropout, deterministic=not train)(z)
    return perforated.dense(self, cfg.num_labels, name="classifier", spec=cfg.dendrites,
                            compute_dtype=self.dtype)(z)


DSN = DAN  # The seed's name.


def load_into(fresh, loaded, *, where: str = "params"):
  """`fresh` with every leaf that `loaded` has replaced by it (same path, same shape):
  pretrained weights into a model that adds parameters (a new head, dendrites).

  Works inside jit (the shapes are checked at trace time). A leaf of `loaded` that
  `fresh` lacks, or a shape that differs, is a CheckpointError naming it.
  """
  flat_fresh = traverse_util.flatten_dict(fresh)
  flat_loaded = traverse_util.flatten_dict(loaded)
  unknown = sorted("/".join(k) for k in flat_loaded.keys() - flat_fresh.keys())
  if unknown:
    raise errors.CheckpointError(f"{where}: the model has no parameters {unknown}.")
  for k, v in flat_loaded.items():
    if tuple(v.shape) != tuple(flat_fresh[k].shape):
      raise errors.CheckpointError(
          f"{where}: {'/'.join(k)} has shape {tuple(v.shape)} in the checkpoint and "
          f"{tuple(flat_fresh[k].shape)} in the model.")
    flat_fresh[k] = jnp.asarray(v, flat_fresh[k].dtype)
  return traverse_util.unflatten_dict(flat_fresh)


def config_from_checkpoint(path: str | os.PathLike, **overrides) -> BertConfig:
  """The BertConfig of a checkpoint's config.json (a directory or hub id), with fields
  overridden (num_labels, dropout rates, dendrites); reads no weights."""
  directory = resolve_checkpoint(path)
  hf = json.loads((directory / _CONFIG_FILE).read_text())
  return dataclasses.replace(_config_from_hf(hf), **overrides)


def init_params(model: nn.Module, key: jax.Array, seq_len: int = 8):
  """Fresh float32 parameters (normal(initializer_range) weights, zero biases)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(model.init)(key, ids)["params"]


# --- Hugging Face checkpoints ------------------------------------------------------------

_CONFIG_FILE = hf_checkpoint.CONFIG_FILE
_SAFETENSORS_FILE = hf_checkpoint.SAFETENSORS_FILE
_TORCH_FILE = hf_checkpoint.TORCH_FILE
_HF_PREFIX = "bert."
# Buffers PyTorch checkpoints store beside the weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Heads this file does not implement: BertForPreTraining's masked-LM and next-sentence
# heads (the hub's bert-base-uncased and prajjwal1/bert-tiny carry them).
_IGNORED_PREFIXES = ("cls.",)
# HF config values this implementation reproduces; any other value is refused.
_HF_REQUIRED = {"position_embedding_type": ("absolute",), "is_decoder": (False,),
                "add_cross_attention": (False,)}
# Flax Dense/Embed/LayerNorm leaves -> PyTorch names (Linear and LayerNorm weights are
# "weight"; checkpoints converted from the original TensorFlow code say gamma/beta).
_PT_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_OLD_LAYER_NORM = {".gamma": ".weight", ".beta": ".bias"}
# Files a hub snapshot needs (the model and its tokenizer).
_HUB_FILES = [_CONFIG_FILE, "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"]


def _hf_name(path: tuple[str, ...], flax_names: bool) -> str:
  """("encoder", "layer_0", "attention", "self", "query", "kernel") ->
  "encoder.layer.0.attention.self.query.weight" (".kernel" with Flax names)."""
  *modules, leaf = path
  modules = [re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in modules]
  return ".".join(modules + [leaf if flax_names else _PT_LEAF[leaf]])


def _config_from_hf(hf: dict) -> BertConfig:
  if hf.get("model_type", "bert") != "bert":
    raise errors.CheckpointError(f"model_type {hf['model_type']!r} is not 'bert'.")
  for key, allowed in _HF_REQUIRED.items():
    if key in hf and hf[key] not in allowed:
      raise errors.CheckpointError(
          f"config.json has {key}={hf[key]!r}; models/bert.py implements {allowed}.")
  if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
    raise errors.CheckpointError(
        f"config.json has hidden_act={hf['hidden_act']!r}; models/bert.py implements "
        f"{sorted(ACTIVATIONS)}.")
  names = {f.name for f in dataclasses.fields(BertConfig)}
  fields = {k: v for k, v in hf.items() if k in names}
  if "id2label" in hf and "num_labels" not in hf:  # How transformers stores num_labels.
    fields["num_labels"] = len(hf["id2label"])
  return BertConfig(**fields)


def _looks_like_hub_id(path: str) -> bool:
  return (not path.startswith((".", "/", "~")) and path.count("/") <= 1
          and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None)


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
  """A local checkpoint directory, or a hub id (`bert-base-uncased`,
  `prajjwal1/bert-tiny`) downloaded with huggingface_hub into its cache."""
  directory = pathlib.Path(path).expanduser()
  if directory.is_dir() or not _looks_like_hub_id(str(path)):
    if not (directory / _CONFIG_FILE).is_file():
      raise errors.MissingDataError(
          f"no {_CONFIG_FILE} in {directory}: give a Hugging Face BERT checkpoint directory "
          f"(config.json + {_SAFETENSORS_FILE} or {_TORCH_FILE}) or a hub id such as "
          "'bert-base-uncased'.")
    return directory
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    local = pathlib.Path(snapshot_download(str(path), allow_patterns=_HUB_FILES + [
        _SAFETENSORS_FILE]))
    if not (local / _SAFETENSORS_FILE).is_file():  # Older repos have only the pickle.
      local = pathlib.Path(snapshot_download(str(path), allow_patterns=_HUB_FILES + [
          _TORCH_FILE]))
  except Exception as e:  # ImportError, offline, unknown repo: one answer for all.
    raise errors.MissingDataError(
        f"{str(path)!r} is not a local directory and could not be fetched from the "
        f"Hugging Face hub ({type(e).__name__}: {e}). Offline, download it once where "
        "the hub is reachable (huggingface-cli download ID --local-dir DIR) and pass DIR; "
        "huggingface_hub must be installed (pip install huggingface_hub).") from e
  if not (local / _CONFIG_FILE).is_file():
    raise errors.MissingDataError(f"hub repo {str(path)!r} has no {_CONFIG_FILE}.")
  return local


def _read_state_dict(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], bool]:
  """The tensors and whether they carry Flax names (FlaxBertModel.save_pretrained)."""
  state, fmt = hf_checkpoint.read_state_dict(directory, "BertModel")
  flax_names = fmt == "flax" if fmt else any(
      k.endswith((".kernel", ".embedding", ".scale")) for k in state)
  return state, flax_names


def _normalise_key(key: str) -> str:
  key = key.removeprefix(_HF_PREFIX)
  for old, new in _OLD_LAYER_NORM.items():
    if key.endswith(old) and "LayerNorm" in key:
      key = key.removesuffix(old) + new
  return key


def from_hf(path: str | os.PathLike, *, classifier: bool = False,
            num_labels: Optional[int] = None, key: Optional[jax.Array] = None,
            dtype: Any = jnp.float32) -> tuple[nn.Module, Any]:
  """Loads a Hugging Face BERT checkpoint: returns (model, float32 params).

  Args:
    path: a directory with config.json and model.safetensors (PyTorch names, or the Flax
      names FlaxBertModel.save_pretrained writes) or pytorch_model.bin (needs torch); or
      a hub id such as "bert-base-uncased" (needs huggingface_hub and the network on
      first use). Keys may carry the "bert." prefix (BertFor* checkpoints) or not
      (BertModel, sentence-transformers); position-id buffers and the pre-training
      heads ("cls.*") are skipped.
    classifier: False returns a `Bert` (encoder + pooler; a stored classifier is
      skipped). True returns a `BertForSequenceClassification`: its head is read from
      the checkpoint when the checkpoint has one, else initialised from `key`
      (normal(initializer_range) kernel, zero bias), as for fine-tuning a pre-trained
      encoder.
    num_labels: the head's classes (default: the checkpoint's, else config.json's).
    key: PRNG key for a new head (default jax.random.key(0)).
    dtype: the model's computation dtype.

  Raises:
    MissingDataError: no checkpoint at `path`. CheckpointError: a config this file does
      not implement, or weights that do not fit it (missing, unexpected and misshapen
      keys are named).
  """
  directory = resolve_checkpoint(path)
  hf_config = json.loads((directory / _CONFIG_FILE).read_text())
  raw, flax_names = _read_state_dict(directory)
  state = {_normalise_key(k): v for k, v in raw.items()
           if _normalise_key(k) not in _BUFFERS}
  state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
  head = {k: state.pop(k) for k in [k for k in state if k.startswith("classifier.")]}
  kernel_name = "classifier." + ("kernel" if flax_names else "weight")
  if classifier and head and kernel_name in head:
    stored = head[kernel_name].shape[-1 if flax_names else 0]
    if num_labels is not None and num_labels != stored:
      raise errors.CheckpointError(
          f"{directory}: the stored classifier has {stored} labels, num_labels={num_labels} "
          "was asked for; pass num_labels=None, or load with classifier=False and add a head.")
    hf_config["num_labels"] = stored
  elif num_labels is not None:
    hf_config["num_labels"] = num_labels
  cfg = _config_from_hf(hf_config)
  encoder = Bert(cfg, dtype)
  expected = traverse_util.flatten_dict(jax.eval_shape(
      lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])
  by_name = {_hf_name(p, flax_names): p for p in expected}
  missing = sorted(by_name.keys() - state.keys())
  unexpected = sorted(state.keys() - by_name.keys())
  if missing or unexpected:
    raise errors.CheckpointError(
        f"{directory}: checkpoint does not fit BERT {cfg}.\n  missing keys: {missing}\n"
        f"  unexpected keys: {unexpected}")
  flat = {}
  for name, p in by_name.items():
    value = state[name]
    if p[-1] == "kernel" and not flax_names:
      value = value.T  # PyTorch Linear weight [out, in] -> kernel [in, out].
    if value.shape != expected[p].shape:
      raise errors.CheckpointError(
          f"{name}: shape {state[name].shape} in the checkpoint does not fit "
          f"{expected[p].shape} expected from config.json.")
    flat[p] = jnp.asarray(value, jnp.float32)
  params = traverse_util.unflatten_dict(flat)
  if not classifier:
    return encoder, params
  model = BertForSequenceClassification(cfg, dtype)
  if head:
    names = {"classifier." + ("kernel" if flax_names else "weight"), "classifier.bias"}
    if head.keys() != names:
      raise errors.CheckpointError(
          f"{directory}: classifier keys {sorted(head)}; expected {sorted(names)}.")
    kernel = head[kernel_name] if flax_names else head[kernel_name].T
    new_head = {"kernel": jnp.asarray(kernel, jnp.float32),
                "bias": jnp.asarray(head["classifier.bias"], jnp.float32)}
  else:
    key = jax.random.key(0) if key is None else key
    new_head = {"kernel": cfg.initializer_range * jax.random.normal(
        key, (cfg.hidden_size, cfg.num_labels), jnp.float32),
                "bias": jnp.zeros((cfg.num_labels,), jnp.float32)}
  return model, {"bert": params, "classifier": new_head}


def to_hf(model: nn.Module, params, path: str | os.PathLike) -> None:
  """Writes `params` as a Hugging Face checkpoint directory (config.json +
  model.safetensors with PyTorch key names): a BertModel for `Bert`, a
  BertForSequenceClassification ("bert." prefix + classifier) for the classifier.
  Readable by `from_hf` and by transformers."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  cfg = model.config
  grown = perforated.dendrite_layers(params)
  if grown:
    raise errors.ConfigError(
        f"to_hf writes plain BERT checkpoints; these params have dendrites in {grown}, "
        "which a Hugging Face BertModel cannot hold. Save them with ponder's checkpoints.")
  is_classifier = isinstance(model, BertForSequenceClassification)
  # A pruned model's heads_per_layer is written for from_hf; transformers ignores it.
  fields = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k != "dendrites" and not (k == "heads_per_layer" and v is None)}
  hf_config = {"architectures": ["BertForSequenceClassification" if is_classifier
                                 else "BertModel"], "model_type": "bert", **fields,
               **{k: allowed[0] for k, allowed in _HF_REQUIRED.items()}}
  if is_classifier:  # transformers derives num_labels from id2label.
    hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    hf_config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
  if hf_config["classifier_dropout"] is None:
    del hf_config["classifier_dropout"]
  (directory / _CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
  prefix, encoder = (_HF_PREFIX, params["bert"]) if is_classifier else ("", params)
  tensors = {}
  for p, v in traverse_util.flatten_dict(encoder).items():
    v = np.asarray(v)
    tensors[prefix + _hf_name(p, False)] = np.ascontiguousarray(
        v.T if p[-1] == "kernel" else v)
  if is_classifier:
    tensors["classifier.weight"] = np.ascontiguousarray(np.asarray(params["classifier"]["kernel"]).T)
    tensors["classifier.bias"] = np.asarray(params["classifier"]["bias"])
  save_file(tensors, directory / _SAFETENSORS_FILE, metadata={"format": "pt"})


# --- Head pruning (Michel et al. 2019) ---------------------------------------------------


def _encoder_prefix(model: nn.Module) -> tuple:
  if isinstance(model, BertForSequenceClassification):
    return ("bert", "encoder")
  if isinstance(model, Bert):
    return ("encoder",)
  raise errors.ConfigError(f"head pruning takes a Bert or BertForSequenceClassification, "
                           f"not {type(model).__name__}.")


def head_layout(model: nn.Module) -> plasticity.HeadLayout:
  """Where each layer's heads lie in `model`'s parameters: the query / key / value
  columns [heads, head_dim] and the attention output dense's rows [heads, head_dim]. The
  output dense's bias and LayerNorm are shared by the heads and stay. Dendrites on these
  layers (model.config.dendrites) are not laid out: prune a plain attention."""
  cfg = model.config
  prefix = _encoder_prefix(model)

  def layer(i):
    attn = prefix + (f"layer_{i}", "attention")
    qkv = [plasticity.HeadSlice(attn + ("self", name, leaf), axis=1 if leaf == "kernel" else 0)
           for name in ("query", "key", "value") for leaf in ("kernel", "bias")]
    return tuple(qkv) + (plasticity.HeadSlice(attn + ("output", "dense", "kernel"), axis=0),)

  return plasticity.HeadLayout(
      n_head=cfg.num_attention_heads, head_dim=cfg.head_dim,
      heads=tuple(cfg.heads(i) for i in range(cfg.num_hidden_layers)),
      slices=tuple(layer(i) for i in range(cfg.num_hidden_layers)))


def prune_heads(model: nn.Module, params, mask) -> tuple[nn.Module, Any]:
  """Removes the heads that the 0/1 `mask` [n_layer, n_head] turns off (Bert or
  BertForSequenceClassification).

  Returns (model, params) with `heads_per_layer` set and query / key / value / attention
  output shrunk, whose outputs equal `model.apply(params, ..., head_mask=mask)`: a gated
  head's probabilities are 0, so it adds nothing to the output dense. A model pruned
  before takes a mask over its remaining heads (row i's first heads_per_layer[i] entries).
  """
  layout = head_layout(model)
  pruned = plasticity.prune_params(params, mask, layout)
  heads = plasticity.heads_after(mask, layout)
  return type(model)(dataclasses.replace(model.config, heads_per_layer=heads),
                     model.dtype), pruned


def head_analysis_apply(model: nn.Module):
  """`apply(params, batch, head_mask) -> (loss, attentions)` for `ponder.analysis.heads`
  on a BertForSequenceClassification: the mean cross-entropy of batch["label"] (weighted
  by batch["mask"] when the batch has one, as evaluation batches do) and every layer's
  attention probabilities, in eval mode. Give the heads functions causal=False and the
  batch's attention_mask as query and key mask."""
  def apply(params, batch, head_mask):
    logits, aux = model.apply({"params": params}, batch["input_ids"],
                              batch["attention_mask"], batch["token_type_ids"],
                              head_mask=head_mask, output_attentions=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return heads_lib.mean_loss(nll, batch.get("mask")), aux["attentions"]
  return apply
