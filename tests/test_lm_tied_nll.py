"""ponder.lm.tied_token_nll (chunked tied output layer + cross-entropy) against
`token_nll` of the full logits: values and gradients, any chunk size (padded tails
included), and no [tokens, vocab] array in the compiled program."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder import errors
from ponder import lm

VOCAB, WIDTH = 1000, 16


def _inputs(tokens=(3, 11)):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=tokens + (WIDTH,)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(VOCAB, WIDTH)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, VOCAB, tokens), jnp.int32)
  return hidden, table, targets


def _full(hidden, table, targets):
  return lm.token_nll(jnp.einsum("btd,vd->btv", hidden, table), targets)


@pytest.mark.parametrize("chunk", [11, 7, 64])  # 33 tokens: exact, padded, one chunk.
def test_values_and_gradients_equal_the_full_logits(chunk):
  hidden, table, targets = _inputs()
  chunked = jax.jit(lambda h, e: lm.tied_token_nll(h, e, targets, chunk=chunk))
  chex.assert_trees_all_close(chunked(hidden, table), _full(hidden, table, targets),
                              rtol=1e-5, atol=1e-5)
  weights = jnp.linspace(0.5, 1.5, targets.size).reshape(targets.shape)
  grads = lambda f: jax.jit(jax.grad(lambda h, e: jnp.sum(weights * f(h, e)), (0, 1)))(
      hidden, table)
  chex.assert_trees_all_close(grads(chunked), grads(lambda h, e: _full(h, e, targets)),
                              rtol=1e-5, atol=1e-6)


def test_no_tokens_by_vocab_array_is_materialised():
  hidden, table, targets = _inputs((4, 64))
  loss = lambda h, e: lm.tied_token_nll(h, e, targets, chunk=32).mean()
  hlo = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(hidden, table).compile().as_text()
  shapes = set(re.findall(r"f32\[([\d,]+)\]", hlo))
  assert "32,1000" in shapes  # One chunk's logits.
  assert not {"256,1000", "4,64,1000"} & shapes, sorted(shapes)


def test_chunk_must_be_positive():
  hidden, table, targets = _inputs()
  with pytest.raises(errors.ConfigError, match="chunk"):
    lm.tied_token_nll(hidden, table, targets, chunk=0)
