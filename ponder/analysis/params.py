"""Parameter counts: the size of a model, as papers report it."""

import math

import jax


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays.

  Works on abstract trees too (`jax.eval_shape(model.init, ...)`), so a large model can
  be counted without allocating it.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
