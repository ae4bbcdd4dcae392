"""PonderTTT's Phase-1 synthetic task: token streams with known per-token difficulty.

A sequence is a run of spans, each of one kind:
  RANDOM  tokens drawn uniformly from the vocabulary: unpredictable (difficulty 1).
  COPY    a copy of an earlier span of the same sequence (tokens[p + j] = tokens[q + j],
          q + len <= p): its first token is unpredictable (nothing in the context says
          a copy starts, or where from); every later token continues the copy at the
          same offset, so it is determined by the context (difficulty 0). This is the
          induction-head pattern that in-context learning (and a TTT layer's fast
          weights) can pick up.
  ARITH   an arithmetic progression mod the vocabulary size, a, a + d, a + 2d, ...
          with random a and stride d != 0: the first two tokens are unpredictable; from
          the third on x_t = 2 x_{t-1} - x_{t-2} (mod vocab), difficulty 0.

`difficulty[t]` is 1 when token t is a fresh uniform draw given everything before it and
0 when a span's rule determines it from earlier tokens; `kind[t]` is the span kind and
`source[t]` the copied position of a COPY token (-1 elsewhere). For next-token
prediction at position t (target t + 1), use difficulty[:, 1:].

RECALL (the "recall" task, `sample_recall`): associative recall whose sources lie far
outside an attention window. A row opens with a store of `num_pairs` (key, value) pairs,
then `length - 4 num_pairs` uniform filler tokens, then the same keys again in a random
order, each followed by its value. The keys of a row are distinct, so a queried value
(kind RECALL, difficulty 0, source = the stored value's position) is determined only by
the store, at least `length - 4 num_pairs` positions back; every other token is a fresh
draw (difficulty 1: store keys and values, filler, query keys). Keys, values and filler
use disjoint ranges of the vocabulary. Score recall with the accuracy of the next-token
argmax on the RECALL targets (train/tasks.py reports it as recall_acc).

Sources name a task in TASKS: the config string "synthetic:mixed". Batches are pure
functions of (seed, step) as in `ponder.data.text.lm_train_batch`; evaluation batches
come from a separate stream of the same seed.
"""

from typing import Iterator

import numpy as np

from ponder import errors

RANDOM, COPY, ARITH, RECALL = 0, 1, 2, 3
KINDS = {"random": RANDOM, "copy": COPY, "arith": ARITH}

TASKS = {
    # The default: half the tokens or so predictable, spans long enough to learn a rule.
    "mixed": dict(vocab_size=64, probs=dict(random=0.4, copy=0.3, arith=0.3),
                  min_span=8, max_span=32),
    "copy": dict(vocab_size=64, probs=dict(random=0.5, copy=0.5), min_span=8, max_span=32),
    "arith": dict(vocab_size=64, probs=dict(random=0.5, arith=0.5), min_span=8,
                  max_span=32),
    # Long-range recall: 4 pairs, the store at least 257 - 16 = 241 tokens before its
    # queries at the recall preset's seq_len 256 (configs/ttt_lm.py), far outside a
    # 32-token attention window. Keys [0, 16), values [16, 32), filler [32, 64). (16
    # pairs at 512 were learned by no model, full attention included, in 1,500-3,000
    # steps on 2 cores; 4 pairs are: WORKSPACE.md, PonderTTT round 2.)
    "recall": dict(sampler="recall", vocab_size=64, num_keys=16, num_values=16,
                   num_pairs=4),
}

_TRAIN_STREAM, _EVAL_STREAM, _TEST_STREAM = 0, 1, 2


def task_spec(source: str) -> dict:
  """The TASKS entry of "synthetic:NAME" (or a bare NAME)."""
  name = source.removeprefix("synthetic:")
  if name not in TASKS:
    raise errors.unknown_key("synthetic task", name, TASKS)
  return TASKS[name]


def vocab_size(source: str) -> int:
  return task_spec(source)["vocab_size"]


def has_recall(source: str) -> bool:
  """Whether the task's rows hold RECALL targets (the recall sampler)."""
  return task_spec(source).get("sampler") == "recall"


def sample_sequence(rng: np.random.Generator, length: int, *, vocab_size: int, probs: dict,
                    min_span: int, max_span: int) -> dict[str, np.ndarray]:
  """One sequence of `length` tokens: {"tokens", "difficulty", "kind", "source"}."""
  if min_span < 3 or max_span < min_span:
    raise errors.ConfigError(f"spans need 3 <= min_span <= max_span, got {min_span}, "
                             f"{max_span}.")
  names = sorted(probs)
  unknown = set(names) - set(KINDS)
  if unknown:
    raise errors.unknown_key("span kind", sorted(unknown)[0], KINDS)
  p = np.asarray([probs[n] for n in names], np.float64)
  tokens = np.zeros(length, np.int32)
  difficulty = np.ones(length, np.int8)
  kind = np.full(length, RANDOM, np.int8)
  source = np.full(length, -1, np.int32)
  pos = 0
  while pos < length:
    n = min(int(rng.integers(min_span, max_span + 1)), length - pos)
    k = KINDS[names[rng.choice(len(names), p=p / p.sum())]]
    if k == COPY and pos < min_span:
      k = RANDOM  # Too little history to copy from.
    if k == ARITH and n < 3:
      k = RANDOM  # A remnant at the end of the row.
    span = slice(pos, pos + n)
    if k == RANDOM:
      tokens[span] = rng.integers(0, vocab_size, n)
    elif k == COPY:
      n = min(n, pos)
      span = slice(pos, pos + n)
      q = int(rng.integers(0, pos - n + 1))
      tokens[span] = tokens[q:q + n]
      source[span] = np.arange(q, q + n)
      difficulty[pos + 1:pos + n] = 0
    else:
      a, d = rng.integers(0, vocab_size), rng.integers(1, vocab_size)
      tokens[span] = (a + d * np.arange(n)) % vocab_size
      difficulty[pos + 2:pos + n] = 0
    kind[span] = k
    pos += n
  return {"tokens": tokens, "difficulty": difficulty, "kind": kind, "source": source}


def sample_recall(rng: np.random.Generator, length: int, *, vocab_size: int, num_keys: int,
                  num_values: int, num_pairs: int) -> dict[str, np.ndarray]:
  """One associative-recall row of `length` tokens (module docstring), the same fields
  as `sample_sequence`; kind RECALL marks the queried values."""
  filler = vocab_size - num_keys - num_values
  gap = length - 4 * num_pairs
  if not 1 <= num_pairs <= num_keys or filler < 1 or gap < 1:
    raise errors.ConfigError(
        f"recall needs 1 <= num_pairs ({num_pairs}) <= num_keys ({num_keys}), filler "
        f"tokens (vocab_size {vocab_size} - keys - values = {filler} >= 1) and a gap "
        f"(length {length} - 4 num_pairs = {gap} >= 1): lengthen the sequence or "
        "store fewer pairs.")
  keys = rng.choice(num_keys, num_pairs, replace=False).astype(np.int32)
  values = rng.integers(num_keys, num_keys + num_values, num_pairs).astype(np.int32)
  order = rng.permutation(num_pairs)
  store = np.stack([keys, values], 1).ravel()
  queries = np.stack([keys[order], values[order]], 1).ravel()
  tokens = np.concatenate([store, rng.integers(num_keys + num_values, vocab_size, gap),
                           queries]).astype(np.int32)
  difficulty = np.ones(length, np.int8)
  kind = np.full(length, RANDOM, np.int8)
  source = np.full(length, -1, np.int32)
  answers = length - 2 * num_pairs + 1 + 2 * np.arange(num_pairs)
  difficulty[answers] = 0
  kind[answers] = RECALL
  source[answers] = 2 * order + 1  # The stored value's position.
  return {"tokens": tokens, "difficulty": difficulty, "kind": kind, "source": source}


SAMPLERS = {"spans": sample_sequence, "recall": sample_recall}


def _batch(source: str, rng: np.random.Generator, batch_size: int,
           length: int) -> dict[str, np.ndarray]:
  spec = dict(task_spec(source))
  sampler = SAMPLERS[spec.pop("sampler", "spans")]
  rows = [sampler(rng, length, **spec) for _ in range(batch_size)]
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def train_batch(source: str, *, seed: int, step: int, batch_size: int,
                seq_len: int) -> dict[str, np.ndarray]:
  """Step `step`'s batch: "tokens" int32 [batch, seq_len + 1] (the LM windows of
  `text.lm_train_batch`) with "difficulty", "kind", "source" of the same shape."""
  rng = np.random.default_rng([seed, _TRAIN_STREAM, step])
  return _batch(source, rng, batch_size, seq_len + 1)


def eval_batches(source: str, *, seed: int, batch_size: int, seq_len: int,
                 num_batches: int, split: str = "val") -> Iterator[dict[str, np.ndarray]]:
  """`num_batches` fixed evaluation batches of the "val" or "test" split (two streams
  disjoint from training's and from each other), each as `train_batch` plus "mask"
  float32 [batch, seq_len] of ones (every target is scored)."""
  streams = {"val": _EVAL_STREAM, "test": _TEST_STREAM}
  if split not in streams:
    raise errors.unknown_key("synthetic split", split, streams)
  for i in range(num_batches):
    batch = _batch(source, np.random.default_rng([seed, streams[split], i]), batch_size,
                   seq_len + 1)
    batch["mask"] = np.ones((batch_size, seq_len), np.float32)
    yield batch
