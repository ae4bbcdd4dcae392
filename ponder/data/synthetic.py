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

Sources name a task in TASKS: the config string "synthetic:mixed". Batches are pure
functions of (seed, step) as in `ponder.data.text.lm_train_batch`; evaluation batches
come from a separate stream of the same seed.
"""

from typing import Iterator

import numpy as np

from ponder import errors

RANDOM, COPY, ARITH = 0, 1, 2
KINDS = {"random": RANDOM, "copy": COPY, "arith": ARITH}

TASKS = {
    # The default: half the tokens or so predictable, spans long enough to learn a rule.
    "mixed": dict(vocab_size=64, probs=dict(random=0.4, copy=0.3, arith=0.3),
                  min_span=8, max_span=32),
    "copy": dict(vocab_size=64, probs=dict(random=0.5, copy=0.5), min_span=8, max_span=32),
    "arith": dict(vocab_size=64, probs=dict(random=0.5, arith=0.5), min_span=8,
                  max_span=32),
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


def _batch(source: str, rng: np.random.Generator, batch_size: int,
           length: int) -> dict[str, np.ndarray]:
  spec = dict(task_spec(source))
  rows = [sample_sequence(rng, length, **spec) for _ in range(batch_size)]
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
