"""ponder.data.mlm: BERT's 15% / 80-10-10 masking, pure in (seed, step)."""

import numpy as np
import pytest

from ponder import errors
from ponder.data import mlm

IDS = dict(cls_id=2, sep_id=3, mask_id=4, vocab_size=1000)


def stream(n=50_000):
  return np.random.default_rng(0).integers(5, 1000, n).astype(np.uint16)


def test_masking_follows_bert():
  tokens = stream()
  b = mlm.train_batch(tokens, seed=1, step=3, batch_size=64, seq_len=130, **IDS)
  n = mlm.masked_count(130, 0.15)
  assert n == round(0.15 * 128) and b["positions"].shape == (64, n)
  assert (b["input_ids"][:, 0] == 2).all() and (b["input_ids"][:, -1] == 3).all()
  # Distinct inner positions; labels are the original tokens there.
  assert all(len(set(row)) == n for row in b["positions"])
  assert b["positions"].min() >= 1 and b["positions"].max() <= 128
  got = np.take_along_axis(b["input_ids"], b["positions"], 1)
  masked = got == 4
  kept = got == b["labels"]
  # 80% [MASK], 10% unchanged, 10% random (which is unchanged by chance 1 / 1000).
  assert abs(masked.mean() - 0.8) < 0.03
  assert abs(kept.mean() - 0.1) < 0.02
  assert abs((~masked & ~kept).mean() - 0.1) < 0.02
  # Outside the masked positions the window is the corpus as it is: [CLS] w [SEP] with
  # w a contiguous slice of the stream.
  inner = b["input_ids"][0, 1:-1].copy()
  inner[b["positions"][0] - 1] = b["labels"][0]
  start = np.flatnonzero(tokens == inner[0])
  assert any(np.array_equal(tokens[s:s + 128], inner) for s in start)


def test_batches_are_pure_functions_of_seed_and_step():
  tokens = stream()
  a = mlm.train_batch(tokens, seed=1, step=5, batch_size=4, seq_len=66, **IDS)
  b = mlm.train_batch(tokens, seed=1, step=5, batch_size=4, seq_len=66, **IDS)
  c = mlm.train_batch(tokens, seed=1, step=6, batch_size=4, seq_len=66, **IDS)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_eval_batches_cover_windows_in_order_with_padding_rows():
  tokens = stream(1000)
  batches = list(mlm.eval_batches(tokens, seed=0, batch_size=3, seq_len=66, **IDS))
  # 1000 // 64 = 15 windows in 5 batches of 3.
  assert sum(float(b["mask"].sum()) for b in batches) == 15 and len(batches) == 5
  first = batches[0]["input_ids"][1, 1:-1].copy()
  first[batches[0]["positions"][1] - 1] = batches[0]["labels"][1]
  np.testing.assert_array_equal(first, tokens[64:128])
  capped = list(mlm.eval_batches(tokens, seed=0, batch_size=4, seq_len=66, max_windows=5,
                                 **IDS))
  np.testing.assert_array_equal(capped[-1]["mask"], [1, 0, 0, 0])
  np.testing.assert_array_equal(capped[-1]["input_ids"][1], capped[-1]["input_ids"][0])
  again = list(mlm.eval_batches(tokens, seed=0, batch_size=4, seq_len=66, max_windows=5,
                                **IDS))
  np.testing.assert_array_equal(capped[0]["input_ids"], again[0]["input_ids"])


def test_bad_sizes_are_clear_errors():
  with pytest.raises(errors.ConfigError, match="between"):
    mlm.masked_count(2, 0.15)
  with pytest.raises(errors.ConfigError, match="0.15"):
    mlm.masked_count(64, 1.5)
  with pytest.raises(errors.ShapeError, match="seq_len"):
    next(mlm.eval_batches(stream(10), seed=0, batch_size=2, seq_len=66, **IDS))
