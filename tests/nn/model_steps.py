"""One small training loss per model family, for the tests that compare a model's
arithmetic forms (tests/nn/test_dense.py: 2-D dense against flax's; test_dense_mixed.py:
bfloat16 matmuls against float32).

`LOSSES[name](dtype)` returns `(loss, params, dense_layers)`: a pure `loss(params)` of
one training batch with dropout off (so that two forms see the same function), the
initial parameters moved off zero (zero-initialised projections would leave their
gradients and inputs zero), and how many dense layers the model has, a lower bound on
its matmuls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import dendritic_liquid_vit as dlv_config
from configs import gpt2_lm
from configs import vit as vit_config
from models import bert
from models import rwkv
from models import ttt_lm
from train import tasks


def normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _tokens(seed, shape, vocab):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _nonzero(params, seed=7):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape)
                         for p, k in zip(leaves, keys)])


def _next_token_loss(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _vision(config, arg, extra):
  def build(dtype):
    cfg = config.get_config(arg)
    cfg.model.compute_dtype = dtype
    model = tasks.build_model(cfg.model, num_classes=10)
    side = 4 * cfg.model.patch  # 16 patch tokens.
    batch = {"image": normal(5, (8, side, side, 1)), "label": jnp.arange(8) % 10}
    loss = lambda p: tasks.classification_loss(p, batch, jax.random.key(6), model=model,
                                               label_smoothing=0.0, train=True, **extra)[0]
    params = jax.jit(lambda k: model.init(k, batch["image"]))(jax.random.key(0))["params"]
    depth = cfg.model.depth
    return loss, _nonzero(params), 4 * depth + 1  # qkv, proj, fc1, fc2 per block; head.
  return build


def _gpt2(dtype):
  cfg = gpt2_lm.get_config("smoke")
  cfg.model.dtype = dtype
  model = tasks.build_lm_model(cfg, 96)
  batch = {"tokens": _tokens(8, (4, 17), 96)}
  loss = lambda p: tasks.lm_loss(p, batch, jax.random.key(9), model=model, train=True)[0]
  params = model.init(jax.random.key(0), batch["tokens"][:, :-1])["params"]
  return loss, _nonzero(params), 4 * cfg.model.n_layer + 1  # Tied output layer.


def _bert(dtype):
  # One dendrite on the classifier and the FFN outputs: PerforatedAI's DendriticDense too.
  cfg = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37,
                        max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0,
                        dendrites=bert.dendrite_spec(1, "classifier,ffn_output"))
  model = bert.BertForSequenceClassification(cfg, dtype=dtype)
  ids = _tokens(10, (4, 12), 99)
  mask = jnp.ones_like(ids).at[:2, 9:].set(0)  # Two padded rows.
  labels = jnp.arange(4) % 2
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, ids, mask, train=True), labels).mean()
  params = model.init(jax.random.key(0), ids, mask)["params"]
  # q, k, v, attention output, intermediate, output per layer; pooler, classifier; and
  # the three dendrites.
  return loss, _nonzero(params), 6 * 2 + 2 + 3


def _rwkv(spike):
  def build(dtype):
    cfg = rwkv.RWKVConfig(vocab_size=97, n_embd=32, n_layer=2, spike=spike)
    model = rwkv.RWKV(cfg, dtype=dtype)
    ids = _tokens(11, (2, 16), 97)
    loss = lambda p: _next_token_loss(model.apply({"params": p}, ids, train=True), ids)
    params = model.init(jax.random.key(0), ids)["params"]
    return loss, _nonzero(params), 7 * 2 + 1  # 4 time-mix and 3 channel-mix; the head.
  return build


def _ttt_lm(dtype):
  # A TTT layer in attention's place in block 1 (block 0 is GPT-2's).
  cfg = ttt_lm.TTTLMConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                           ttt_mini_batch=8, ttt_positions=(1,), embd_pdrop=0.0,
                           attn_pdrop=0.0, resid_pdrop=0.0)
  model = ttt_lm.TTTLM(cfg, dtype=dtype)
  ids = _tokens(12, (2, 16), 97)
  loss = lambda p: _next_token_loss(model.apply({"params": p}, ids, train=True), ids)
  params = model.init(jax.random.key(0), ids)["params"]
  # GPT-2's 4 in block 0; the TTT layer's wq, wk, wv, learnable_ttt_lr, wo and the MLP's
  # 2 in block 1; the tied output layer.
  return loss, _nonzero(params), 4 + 5 + 2 + 1


LOSSES = {
    "vit": _vision(vit_config, "smoke", {}),
    "dendritic_liquid_vit": _vision(dlv_config, "smoke,scratch", {"step": 50}),
    "dendritic_vit": _vision(dlv_config, "smoke,variant=dendritic_vit", {}),
    "gpt2": _gpt2,
    "bert": _bert,
    "rwkv": _rwkv("none"),
    # Ternary spikes at the default sites: SpikingDense's matmul.
    "rwkv_ternary": _rwkv("ternary"),
    "ttt_lm": _ttt_lm,
}
