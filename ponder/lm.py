"""Language-model loss and perplexity.

Perplexity is exp of the mean next-token negative log-likelihood over every token of a
split (the first token has no context and is not scored). `perplexity` evaluates a split
in windows from `ponder.data.text.lm_eval_batches`: non-overlapping, or with a stride
that gives each scored token more context, as in the Hugging Face perplexity guide.
The mean is per token of the tokenizer used: GPT-2's Table 3 normalises WikiText by its
word-level token count instead, so per-BPE-token perplexities are not comparable with it.
"""

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ponder import errors
from ponder.data import text
from ponder.nn import dense


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(target) per position: logits [..., vocab], targets [...] -> float32 [...].

  Computed in float32 whatever the logits' dtype: bf16 log-softmax loses the small
  probabilities that dominate a perplexity.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def tied_token_nll(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *,
                   chunk: int = 256, dtype: Optional[Any] = None) -> jax.Array:
  """`token_nll` of the tied output layer's logits, `hidden` [..., d] against
  `embedding` [vocab, d], without materialising the [tokens, vocab] logits.

  The tokens are taken `chunk` at a time (a `lax.map`); each chunk's logits are
  rematerialised in the backward pass (`jax.checkpoint`), so forward and backward hold
  [chunk, vocab] at a time instead of [tokens, vocab] (50,257 floats a token for
  GPT-2). `dtype` is the matmul's compute dtype (`ponder.nn.dense.attend`). Returns
  float32 [...] like `token_nll`.
  """
  if chunk < 1:
    raise errors.ConfigError(f"chunk={chunk}: the number of tokens per chunk must be >= 1.")
  lead = targets.shape
  rows = hidden.reshape(-1, hidden.shape[-1])
  labels = targets.reshape(-1)
  pad = -rows.shape[0] % chunk  # Padded rows are scored and dropped.
  rows = jnp.pad(rows, ((0, pad), (0, 0)))
  labels = jnp.pad(labels, (0, pad))

  @jax.checkpoint
  def one(args):
    x, t = args
    return token_nll(dense.attend(x, embedding, dtype), t)

  nll = jax.lax.map(one, (rows.reshape(-1, chunk, rows.shape[-1]), labels.reshape(-1, chunk)))
  return nll.reshape(-1)[:math.prod(lead)].reshape(lead)


def nll_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Summed NLL and token count under `mask` (sums add across batches and devices)."""
  mask = mask.astype(jnp.float32)
  return {"nll_sum": jnp.sum(token_nll(logits, targets) * mask), "count": jnp.sum(mask)}


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
  """{"nll": mean NLL in nats, "perplexity": exp(nll), "tokens": tokens scored}."""
  count = float(sums["count"])
  nll = float(sums["nll_sum"]) / max(count, 1.0)
  return {"nll": nll, "perplexity": math.exp(nll), "tokens": int(count)}


def perplexity(logits_fn: Callable[[Any, jax.Array], jax.Array], params, tokens: np.ndarray,
               *, seq_len: int, batch_size: int, stride: Optional[int] = None) -> dict:
  """Perplexity of a whole split; see `text.lm_eval_batches` for the windows.

  Args:
    logits_fn: (params, inputs int32 [batch, seq_len]) -> logits [batch, seq_len, vocab],
      e.g. `lambda p, x: model.apply({"params": p}, x)`.
    params: passed to logits_fn.
    tokens: the split's token ids.
    seq_len: window length (at most the model's context).
    batch_size: windows per forward pass.
    stride: None for non-overlapping windows; smaller for more context per token.
  """
  @jax.jit
  def batch_sums(params, batch):
    return nll_sums(logits_fn(params, batch["tokens"][:, :-1]), batch["tokens"][:, 1:],
                    batch["mask"])

  # Accumulated in float64 on the host: a split has millions of tokens.
  totals = {"nll_sum": 0.0, "count": 0.0}
  for batch in text.lm_eval_batches(tokens, batch_size=batch_size, seq_len=seq_len,
                                    stride=stride):
    for name, value in batch_sums(params, batch).items():
      totals[name] += float(value)
  return summarize(totals)
