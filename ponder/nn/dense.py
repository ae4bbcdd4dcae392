"""A dense layer that multiplies on 2-D inputs: `flax.linen.Dense` with its inputs
flattened to [rows, features] and the output reshaped back.

The parameters (`kernel` [in, out], `bias` [out]), their initialisers and the values
computed are `nn.Dense`'s, so a model can swap one for the other without changing its
parameter tree or checkpoints. The reason is the backward pass on XLA:CPU: for a dense
layer on [batch, tokens, features] inputs, the weight gradient contracts the batch and
token axes of the input and of the output gradient, and XLA:CPU first copies the output
gradient into a transposed layout before that matmul, once per layer per step. On
[rows, features] the contraction is a plain matmul over rows and the copies go.
"""

import math

import flax.linen as nn


class Dense(nn.Dense):
  """`nn.Dense` (same fields, same parameters) applied to `inputs` reshaped to
  [rows, in_features]; returns [..., features] with the inputs' leading axes."""

  def __call__(self, inputs):
    if inputs.ndim <= 2:
      return super().__call__(inputs)
    lead = inputs.shape[:-1]
    # An explicit row count, not -1: a layer may have no input features (a GPT-2 layer
    # whose heads were all pruned), and reshape cannot infer -1 from a zero size.
    y = super().__call__(inputs.reshape(math.prod(lead), inputs.shape[-1]))
    return y.reshape(*lead, y.shape[-1])
