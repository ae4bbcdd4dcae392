"""The synthetic PonderTTT task: deterministic batches and correct difficulty labels."""

import numpy as np
import pytest

from ponder import errors
from ponder.data import synthetic


def _batch(step=0, seed=0, source="synthetic:mixed"):
  return synthetic.train_batch(source, seed=seed, step=step, batch_size=8, seq_len=127)


def test_batches_are_pure_functions_of_seed_and_step():
  a, b = _batch(3), _batch(3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert a["tokens"].shape == (8, 128) and a["tokens"].dtype == np.int32
  assert not np.array_equal(a["tokens"], _batch(4)["tokens"])
  assert not np.array_equal(a["tokens"], _batch(3, seed=1)["tokens"])
  evals = list(synthetic.eval_batches("synthetic:mixed", seed=0, batch_size=8, seq_len=127,
                                      num_batches=2))
  assert len(evals) == 2 and evals[0]["mask"].shape == (8, 127)
  assert not any(np.array_equal(e["tokens"], _batch(s)["tokens"])
                 for e in evals for s in range(2))


@pytest.mark.parametrize("source", ["synthetic:mixed", "synthetic:copy", "synthetic:arith"])
def test_predictable_tokens_follow_their_rule(source):
  v = synthetic.vocab_size(source)
  checked = 0
  for step in range(3):
    batch = _batch(step, source=source)
    for tok, diff, kind, src in zip(batch["tokens"], batch["difficulty"], batch["kind"],
                                    batch["source"]):
      assert tok.min() >= 0 and tok.max() < v
      assert diff[0] == 1  # Nothing predicts the first token.
      for t in np.flatnonzero(diff == 0):
        if kind[t] == synthetic.COPY:
          # Copies an earlier token, continuing the previous token's copy at its offset.
          assert src[t] < t and tok[t] == tok[src[t]]
          assert kind[t - 1] == synthetic.COPY and src[t] == src[t - 1] + 1
        else:
          assert kind[t] == synthetic.ARITH
          assert tok[t] == (2 * int(tok[t - 1]) - int(tok[t - 2])) % v
        checked += 1
  assert checked > 3 * 8 * 128 * 0.25  # A good share of tokens is predictable.


def test_unpredictable_tokens_are_uniform_and_break_the_rules():
  batch = synthetic.train_batch("synthetic:mixed", seed=0, step=0, batch_size=64,
                                seq_len=255)
  tok, diff, kind = batch["tokens"], batch["difficulty"], batch["kind"]
  v = synthetic.vocab_size("synthetic:mixed")
  random = tok[(kind == synthetic.RANDOM)]
  counts = np.bincount(random, minlength=v)
  expected = len(random) / v
  assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # ~5 sigma.
  # The arithmetic rule holds by chance (1 / vocab) on random tokens, always on labelled ones.
  rule = (tok[:, 2:] == (2 * tok[:, 1:-1] - tok[:, :-2]) % v)
  hard_random = (kind[:, 2:] == synthetic.RANDOM) & (kind[:, :-2] == synthetic.RANDOM)
  assert rule[hard_random].mean() < 3.0 / v
  easy_arith = (diff[:, 2:] == 0) & (kind[:, 2:] == synthetic.ARITH)
  assert rule[easy_arith].all()


def test_unknown_task_is_a_clear_error():
  with pytest.raises(errors.ConfigError, match="valid: arith, copy, mixed"):
    synthetic.vocab_size("synthetic:nope")


def test_recall_queries_read_their_values_far_back_in_the_store():
  length = 257
  spec = dict(synthetic.TASKS["recall"])
  spec.pop("sampler")
  pairs = spec["num_pairs"]
  keys, values = spec["num_keys"], spec["num_values"]
  batch = synthetic.train_batch("synthetic:recall", seed=0, step=1, batch_size=8,
                                seq_len=length - 1)
  again = synthetic.train_batch("synthetic:recall", seed=0, step=1, batch_size=8,
                                seq_len=length - 1)
  for name in batch:
    np.testing.assert_array_equal(batch[name], again[name])
  for tok, diff, kind, src in zip(batch["tokens"], batch["difficulty"], batch["kind"],
                                  batch["source"]):
    store, queries = tok[:2 * pairs], tok[-2 * pairs:]
    assert len(set(store[::2])) == pairs and store[::2].max() < keys  # Distinct keys.
    assert ((store[1::2] >= keys) & (store[1::2] < keys + values)).all()
    assert (tok[2 * pairs:-2 * pairs] >= keys + values).all()  # Filler: its own range.
    # Queries ask every stored key once; each answer is the value stored after it.
    assert sorted(queries[::2]) == sorted(store[::2])
    lookup = dict(zip(store[::2], store[1::2]))
    assert [lookup[k] for k in queries[::2]] == list(queries[1::2])
    answers = np.flatnonzero(kind == synthetic.RECALL)
    np.testing.assert_array_equal(answers, length - 2 * pairs + 1 + 2 * np.arange(pairs))
    np.testing.assert_array_equal(np.flatnonzero(diff == 0), answers)
    assert (tok[src[answers]] == tok[answers]).all()
    assert (tok[src[answers] - 1] == tok[answers - 1]).all()  # Same key before it.
    assert (answers - src[answers]).min() > length - 4 * pairs  # Beyond any short window.
    assert (src[kind != synthetic.RECALL] == -1).all()


def test_recall_too_short_for_its_pairs_is_a_clear_error():
  with pytest.raises(errors.ConfigError, match="lengthen the sequence"):
    synthetic.train_batch("synthetic:recall", seed=0, step=0, batch_size=1, seq_len=4 * synthetic.TASKS["recall"]["num_pairs"] - 1)
