"""Structural head pruning of BERT (Michel et al. 2019): the pruned model's outputs equal
the masked model's, with fewer parameters and FLOPs."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from models import bert
from ponder import analysis as ponder_analysis

# An empty layer and an uneven one: every path of `prune_params` and the 0-head layer.
MASK = [[0, 0, 0, 0], [1, 0, 1, 1]]
BERT_TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64,
                 initializer_range=0.2)  # Logits of order 1, so 1e-5 is a tight bound.


def _bert():
  model = bert.BertForSequenceClassification(bert.BertConfig(**BERT_TINY))
  rng = np.random.RandomState(0)
  ids = rng.randint(5, 99, (3, 12))
  lengths = np.array([12, 9, 6])
  attention = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  inputs = (jnp.asarray(np.where(attention, ids, 0)), jnp.asarray(attention),
            jnp.zeros((3, 12), jnp.int32))
  return model, bert.init_params(model, jax.random.key(0)), inputs


@functools.partial(jax.jit, static_argnames=("model", "output_attentions"))
def _apply(model, params, inputs, head_mask=None, output_attentions=False):
  out = model.apply({"params": params}, *inputs, head_mask=head_mask,
                    output_attentions=output_attentions)
  return out if output_attentions else (out, None)


def test_bert_structurally_pruned_equals_masked(tmp_path):
  """GPT-2's twin is tests/models/test_gpt2.py::test_structural_pruning_equals_masking_*."""
  model, params, inputs = _bert()
  mask = jnp.asarray(MASK, jnp.float32)
  small, small_params = bert.prune_heads(model, params, mask)
  assert small.config.heads_per_layer == (0, 3)
  masked, aux = _apply(model, params, inputs, head_mask=mask, output_attentions=True)
  pruned, small_aux = _apply(small, small_params, inputs, output_attentions=True)
  chex.assert_trees_all_close(pruned, masked, atol=1e-5, rtol=0)
  # The unpruned model differs: the mask matters, so the equality above is not vacuous.
  assert float(jnp.abs(_apply(model, params, inputs)[0] - masked).max()) > 1e-3
  for i, row in enumerate(np.asarray(mask)):  # Kept heads in order, absent heads zero.
    kept = np.flatnonzero(row)
    chex.assert_trees_all_close(small_aux["attentions"][i, :, :len(kept)],
                                aux["attentions"][i][:, kept], atol=1e-6)
    assert float(jnp.abs(small_aux["attentions"][i, :, len(kept):]).max(initial=0.0)) == 0.0
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  d, width = small.config.head_dim, BERT_TINY["hidden_size"]
  # Per head: q, k, v columns and biases plus the attention output dense's rows.
  assert count(params) - count(small_params) == 5 * (3 * (width * d + d) + d * width)
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs)
  flops = lambda m, p: ponder_analysis.compiled_flops(
      lambda p, *x: m.apply({"params": p}, *x), p, *shapes)
  assert flops(small, small_params) < flops(model, params)
  bert.to_hf(small, small_params, tmp_path)  # A pruned checkpoint reads back as pruned.
  back, back_params = bert.from_hf(tmp_path, classifier=True)
  assert back.config.heads_per_layer == (0, 3)
  chex.assert_trees_all_close(_apply(back, back_params, inputs)[0], pruned, atol=1e-6)
