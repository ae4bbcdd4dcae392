"""Parameter counts: the size of a model, as papers report it.

Text models are compared honestly by reporting the embedding tables apart from the
rest: a 30,522 x 384 word-embedding table is 11.7M of all-MiniLM-L6-v2's 22.7M
parameters but costs no FLOPs (a lookup), so "parameters" alone flatters a model that
only reads embeddings (a DAN) and hides what a dendritic block adds. `breakdown` gives
total / embedding / non-embedding, and `text_classifier_cost` adds the compiled FLOPs
per example (ponder.analysis.flops: what XLA compiles, not an analytic estimate).
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from ponder.analysis import flops as flops_lib

# Module names whose tables count as embeddings: BERT's three (Devlin et al. 2019,
# Fig. 2) and a DAN's word table, which reuses BERT's name.
EMBEDDING_NAMES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays.

  Works on abstract trees too (`jax.eval_shape(model.init, ...)`), so a large model can
  be counted without allocating it.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def breakdown(tree, embedding_names: Sequence[str] = EMBEDDING_NAMES) -> dict:
  """{"total", "embedding", "non_embedding"} scalars of a params tree (concrete or
  abstract). A leaf is an embedding when a module on its path is in `embedding_names`;
  total = embedding + non_embedding."""
  embedding = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if names & set(embedding_names):
      embedding += math.prod(leaf.shape)
  total = count_params(tree)
  return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def text_classifier_cost(model, params, *, seq_len: int, batch_size: int = 8) -> dict:
  """`breakdown(params)` plus "flops_per_example": the compiled FLOPs of one inference
  forward pass (`model.apply({"params": p}, input_ids, attention_mask)`, train=False)
  at [batch_size, seq_len], divided by batch_size, and "seq_len".

  params may be abstract (`jax.eval_shape`), so nothing is allocated or run. A DAN's
  FLOPs do not depend on how many of the seq_len positions are padding; BERT's
  attention does not skip padding either, so this is the cost of a padded bucket.
  """
  spec = lambda dtype: jax.ShapeDtypeStruct((batch_size, seq_len), dtype)  # noqa: E731
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  forward = lambda p, ids, mask: model.apply({"params": p}, ids, mask, train=False)  # noqa: E731
  total = flops_lib.compiled_flops(forward, shapes, spec(jnp.int32), spec(jnp.int32))
  return dict(breakdown(params), flops_per_example=total / batch_size, seq_len=seq_len)
