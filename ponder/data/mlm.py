"""Masked-LM batches (Devlin et al. 2019, Sec. 3.1 "Task #1: Masked LM") from a token stream.

A window is [CLS] + seq_len - 2 consecutive word pieces of the corpus + [SEP]. In each
window a fixed count n = round(rate * (seq_len - 2)) of the inner positions is chosen
(15% by default); of those, 80% become [MASK], 10% a uniformly random token and 10% stay
as they are; the loss is taken at the n positions only, against the original tokens.
A fixed count per window (instead of an independent 15% coin per token) gives the batch
static shapes, so the output layer is evaluated at exactly `positions` [batch, n]:
the 30,522-way head costs 15% of its price at every position.

Training windows are `ponder.data.text.lm_train_batch`'s (every window once per epoch,
random phase and order per epoch) and the masking is drawn from (seed, step): a batch is
a pure function of (seed, step). Evaluation windows are the split's non-overlapping
windows in order, masked from (seed, window index), so every evaluation scores the same
positions.
"""

from typing import Iterator

import numpy as np

from ponder import errors
from ponder.data import text


def masked_count(seq_len: int, rate: float) -> int:
  """Masked positions per window: round(rate * inner tokens), at least 1."""
  if seq_len < 3:
    raise errors.ConfigError(f"seq_len={seq_len} leaves no token between [CLS] and [SEP].")
  if not 0.0 < rate < 1.0:
    raise errors.ConfigError(f"mask rate {rate} must be in (0, 1); BERT uses 0.15.")
  return max(1, int(round(rate * (seq_len - 2))))


def mask_windows(inner: np.ndarray, rng: np.random.Generator, *, rate: float, cls_id: int,
                 sep_id: int, mask_id: int, vocab_size: int) -> dict[str, np.ndarray]:
  """BERT's 80/10/10 masking of windows `inner` [B, seq_len - 2] (no specials yet).

  Returns int32 {"input_ids", "attention_mask", "token_type_ids"} [B, seq_len] and
  {"positions", "labels"} [B, n] (positions index input_ids; labels are the originals).
  """
  b, inner_len = inner.shape
  seq_len = inner_len + 2
  n = masked_count(seq_len, rate)
  ids = np.concatenate([np.full((b, 1), cls_id), inner, np.full((b, 1), sep_id)], 1)
  ids = ids.astype(np.int32)
  # n distinct inner positions per row: the first n of a random permutation.
  positions = np.argsort(rng.random((b, inner_len)), axis=1)[:, :n] + 1
  labels = np.take_along_axis(ids, positions, axis=1)
  kind = rng.random((b, n))  # < 0.8: [MASK]; < 0.9: a random token; else unchanged.
  replaced = np.where(kind < 0.8, mask_id,
                      np.where(kind < 0.9, rng.integers(0, vocab_size, (b, n)), labels))
  np.put_along_axis(ids, positions, replaced.astype(np.int32), axis=1)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids), "positions": positions.astype(np.int32),
          "labels": labels.astype(np.int32)}


def train_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                seq_len: int, rate: float = 0.15, **ids) -> dict[str, np.ndarray]:
  """Masked-LM training batch `step` of the stream `tokens` (a pure function of
  (seed, step)); `ids`: cls_id, sep_id, mask_id, vocab_size (see `mask_windows`)."""
  # lm_train_batch returns seq_len + 1 tokens per row; ask for the inner length - 1.
  inner = text.lm_train_batch(tokens, seed=seed, step=step, batch_size=batch_size,
                              seq_len=seq_len - 3)["tokens"]
  rng = np.random.default_rng([seed, step, 1])
  return mask_windows(inner, rng, rate=rate, **ids)


def eval_batches(tokens: np.ndarray, *, seed: int, batch_size: int, seq_len: int,
                 rate: float = 0.15, max_windows: int = 0,
                 **ids) -> Iterator[dict[str, np.ndarray]]:
  """The split's non-overlapping windows in order (the first `max_windows` when > 0),
  masked from (seed, window index); each batch has "mask" [B] (0 for the rows padding
  the last batch)."""
  inner_len = seq_len - 2
  count = len(tokens) // inner_len
  if count < 1:
    raise errors.ShapeError(f"{len(tokens)} tokens hold no window of {seq_len}; lower "
                            "data.seq_len.")
  if max_windows > 0:
    count = min(count, max_windows)
  for start in range(0, count, batch_size):
    index = np.arange(start, min(start + batch_size, count))
    rows = [mask_windows(np.asarray(tokens[i * inner_len:(i + 1) * inner_len],
                                    np.int64)[None],
                         np.random.default_rng([seed, int(i), 2]), rate=rate, **ids)
            for i in index]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    pad = batch_size - len(index)
    # Padding rows repeat the last window (so no row is all padding), under mask 0.
    batch = {k: np.pad(v, ((0, pad), (0, 0)), mode="edge") for k, v in batch.items()}
    batch["mask"] = np.pad(np.ones(len(index), np.float32), (0, pad))
    yield batch
