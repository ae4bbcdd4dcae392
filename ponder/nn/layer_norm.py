"""LayerNorm (Ba et al. 2016, Eq. 4) with a closed-form backward pass.

`LayerNorm` has `flax.linen.LayerNorm`'s parameters (`scale`, `bias` [features]) and
values. Autodiff of nn.LayerNorm differentiates through mean, variance and the
broadcasts between them, and XLA:CPU writes several full-size [rows, features] arrays
per layer for it. The closed form, with x_hat = (x - mean) * rstd and g' = g * scale,

  dx = rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)),

needs two row reductions and one elementwise pass; the parameter gradients are column
sums of g * x_hat and g. Statistics are float32 whatever the input dtype.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x, epsilon):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon), jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, in float32."""
  return _stats(x, epsilon)[0] * scale + bias


def _fwd(x, scale, bias, epsilon):
  x_hat, rstd = _stats(x, epsilon)
  return x_hat * scale + bias, (x_hat, rstd, scale, jnp.zeros((0,), x.dtype))


def _bwd(epsilon, residuals, g):
  del epsilon
  x_hat, rstd, scale, x_like = residuals
  g = g.astype(jnp.float32)
  gs = g * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - x_hat * jnp.mean(gs * x_hat, axis=-1, keepdims=True))
  axes = tuple(range(g.ndim - 1))
  return (dx.astype(x_like.dtype), jnp.sum(g * x_hat, axis=axes).astype(scale.dtype),
          jnp.sum(g, axis=axes).astype(scale.dtype))


layer_norm.defvjp(_fwd, _bwd)


class LayerNorm(nn.Module):
  """`nn.LayerNorm`'s parameters (`scale` ones, `bias` zeros) over the last axis,
  computed by `layer_norm`; returns float32."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon)
