"""benchmarks/ponder_pareto.py's gate bookkeeping on hand examples: oracle recovery,
the oracle's per mini-batch ranking, and the Fixed-1 against SKIP check."""

import numpy as np
import pytest

from benchmarks import ponder_pareto


def test_oracle_recovery_on_a_hand_example():
  # Updating everything where it helps most lowers the NLL from 4.0 to 3.0 (the
  # oracle's gain, 1.0); the gate reaches 3.6: 40% of that gain.
  assert ponder_pareto.oracle_recovery(4.0, 3.6, 3.0) == pytest.approx(0.4)
  assert ponder_pareto.oracle_recovery(4.0, 3.0, 3.0) == pytest.approx(1.0)
  assert ponder_pareto.oracle_recovery(4.0, 4.2, 3.0) == pytest.approx(-0.2)  # Worse.
  assert ponder_pareto.oracle_recovery(4.0, 3.9, 4.0) is None  # Nothing to recover.


def test_mini_batch_score_is_the_masked_mean_gain():
  low = np.array([[3.0, 3.0, 1.0, 1.0], [5.0, 1.0, 2.0, 2.0]])
  high = np.array([[1.0, 2.0, 1.0, 1.0], [5.0, 1.0, 0.0, 9.0]])
  mask = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
  # Mini-batch 0: gains 2, 1, 0, 0 -> 3 / 4; mini-batch 1: 0, 0, 2 (one masked) -> 2 / 3.
  np.testing.assert_allclose(ponder_pareto._mini_batch_score(low, high, mask, 2),
                             [0.75, 2.0 / 3.0])


def test_fixed1_against_skip_by_perplexity_or_recall():
  rows = lambda f1, skip, **acc: {
      "fixed1": dict(valid_ppl=f1, **{k: v[0] for k, v in acc.items()}),
      "skip": dict(valid_ppl=skip, **{k: v[1] for k, v in acc.items()})}
  assert ponder_pareto.fixed1_vs_skip(rows(9.4, 10.0))["passed"]
  assert not ponder_pareto.fixed1_vs_skip(rows(9.6, 10.0))["passed"]
  check = ponder_pareto.fixed1_vs_skip(rows(9.9, 10.0, recall_acc=(0.30, 0.15)))
  assert check["passed"] and check["recall_gain"] == pytest.approx(0.15)
  assert not ponder_pareto.fixed1_vs_skip(rows(9.9, 10.0, recall_acc=(0.2, 0.15)))["passed"]
