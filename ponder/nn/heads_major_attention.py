"""Softmax attention computed heads-major, a CPU layout experiment.

`flax.linen.dot_product_attention` contracts `[batch, seq, heads, head_dim]` operands
directly ("bqhd,bkhd->bhqk" and "bhqk,bkhd->bqhd"). On XLA:CPU the second einsum is
written in a layout the next matmul cannot read, and the backward pass adds layout
copies around it (issue "CPU speed, round 2"). Here q, k and v are transposed once to
`[batch, heads, seq, head_dim]`, both einsums batch over (batch, heads) with the
contraction on the last axis, and the result is transposed back once, so every
matmul reads contiguous rows. Values are those of softmax(q k^T / sqrt(d)) v
(Vaswani et al. 2017, Eq. 1), softmax in float32.

Adopted in the models only where `benchmarks.cpu_forms` measures it faster.
"""

import jax
import jax.numpy as jnp


def dot_product_attention(query, key, value, *, dropout_rate: float = 0.0,
                          deterministic: bool = True, dropout_rng=None, **unused):
  """`flax.linen.dot_product_attention`'s values for `[batch, seq, heads, head_dim]`
  inputs without bias or mask, computed heads-major (module doc)."""
  if unused:
    raise TypeError(f"heads-major attention takes no {sorted(unused)}")
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))  # [b, h, n, d]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  if not deterministic and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)
