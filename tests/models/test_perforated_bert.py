"""models/bert.py with attention perforation (issue 20) and the masked-LM head: the masked
training path equals the kernel inference path, the jitted kernel path with a mask that
changes per input compiles once, and the tied MLM head."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import bert
from ponder import errors
from ponder.nn import perforation as P

SEQ, VOCAB = 48, 64


def tiny(mode="learned", **spec):
  spec = P.PerforationSpec(mode=mode, block=8, target_sparsity=0.5, bias_init=0.0, **spec)
  return bert.config("tiny", vocab_size=VOCAB, max_position_embeddings=64, perforation=spec)


def batch(seed, lengths=(SEQ, 30)):
  ids = jax.random.randint(jax.random.key(seed), (len(lengths), SEQ), 1, VOCAB)
  mask = (jnp.arange(SEQ)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)
  return ids, mask


@pytest.fixture(scope="module")
def perforated():
  model = bert.Bert(tiny())
  params = model.init(jax.random.key(0), *batch(0))
  # Spread the scores so that the hard mask keeps some free tiles and drops others.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, -0.8) if "log_tau" in str(path) else x, params)
  return model, params


@pytest.mark.parametrize("mode", ["learned", "bigbird", "learned_cls_row"])
def test_masked_training_path_equals_kernel_inference_path(perforated, mode):
  model, params = perforated
  if mode == "bigbird":
    model = bert.Bert(tiny(mode))
    params = model.init(jax.random.key(0), *batch(0))
  if mode == "learned_cls_row":  # The same parameters; query block 0 keeps every block.
    model = bert.Bert(tiny(keep_cls_row=True))
  ids, mask = batch(1)
  dense_path = P.control(0, model.config.perforation, impl="dense")
  masked, sown = model.apply(params, ids, mask, perforation=dense_path,
                             mutable=["intermediates"])
  kernel = model.apply(params, ids, mask)  # train=False, no control: ops.attention "auto"
  hard = P.collect(sown["intermediates"], "perforation_hard")
  density = float(hard.mean())
  assert 0.2 < density < 1.0, density  # Some tiles kept, some skipped.
  if mode == "learned_cls_row":
    spec, nb = model.config.perforation, SEQ // 8
    assert bool(hard[:, :, :, 0].all())  # [layers, b, heads, nq, nk]: row 0 is full,
    assert int(hard[:, :, :, 1:].sum(-1).max()) <= spec.row_budget(nb)  # the rest capped,
    assert spec.max_active(SEQ) == nb  # and the kernel's static bound covers row 0.
  chex.assert_trees_all_close(kernel.last_hidden_state, masked.last_hidden_state,
                              atol=2e-5, rtol=2e-5)


def test_kernel_path_under_jit_compiles_once_for_masks_that_change(perforated):
  model, params = perforated
  traces = []

  @jax.jit
  def forward(params, ids, mask):
    traces.append(1)  # Runs only while tracing: one entry per compilation.
    out, sown = model.apply(params, ids, mask, mutable=["intermediates"])
    return out.last_hidden_state, P.collect(sown["intermediates"], "perforation_hard")

  masks = []
  for seed in range(3):
    out, hard = forward(params, *batch(seed + 1, lengths=(SEQ, 20 + 9 * seed)))
    assert np.isfinite(np.asarray(out)).all()
    masks.append(np.asarray(hard))
  assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
  assert len(traces) == 1
  assert forward._cache_size() == 1  # pylint: disable=protected-access


def test_training_needs_the_control():
  model = bert.Bert(tiny())
  params = model.init(jax.random.key(0), *batch(0))
  with pytest.raises(errors.ConfigError, match="perforation=attention_perforation.control"):
    model.apply(params, *batch(1), train=True, rngs={"dropout": jax.random.key(1),
                                                    "perforation": jax.random.key(2)})


def test_perforated_training_applies_attention_dropout():
  # A fixed pattern (no scorer noise) and no hidden dropout: the only randomness left in
  # a training forward is the attention dropout, as on the dense path.
  def hidden(rate, seed):
    cfg = dataclasses.replace(tiny("bigbird"), hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=rate)
    model = bert.Bert(cfg)
    params = model.init(jax.random.key(0), *batch(0))
    return model.apply(params, *batch(1), train=True, perforation=P.control(0, cfg.perforation),
                       rngs={"dropout": jax.random.key(seed)}).last_hidden_state
  assert not np.allclose(hidden(0.5, 1), hidden(0.5, 2), atol=1e-3)
  chex.assert_trees_all_close(hidden(0.0, 1), hidden(0.0, 2))


def test_mlm_head_is_tied_and_scores_only_the_given_positions():
  cfg = bert.config("tiny", vocab_size=VOCAB, max_position_embeddings=64)
  model = bert.BertForMaskedLM(cfg)
  ids, mask = batch(2)
  params = model.init(jax.random.key(0), ids, mask)["params"]
  assert "decoder" not in str(jax.tree_util.tree_structure(params["mlm_head"]))
  positions = jnp.array([[3, 7, 11], [0, 5, 29]])
  got = model.apply({"params": params}, ids, mask, positions=positions)
  full = model.apply({"params": params}, ids, mask)
  chex.assert_trees_all_close(got, jnp.take_along_axis(full, positions[..., None], 1),
                              atol=1e-5)
  # The output layer is h W_e^T + b with W_e the word table (Press & Wolf 2017).
  h = bert.Bert(cfg).apply({"params": params["bert"]}, ids, mask).last_hidden_state
  head = params["mlm_head"]
  t = jax.nn.gelu(h @ head["transform"]["kernel"] + head["transform"]["bias"],
                  approximate=False)
  mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
  t = (t - mu) / jnp.sqrt(var + cfg.layer_norm_eps) * head["LayerNorm"]["scale"] + head[
      "LayerNorm"]["bias"]
  table = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  chex.assert_trees_all_close(full, t @ table.T + head["bias"], atol=1e-4)
