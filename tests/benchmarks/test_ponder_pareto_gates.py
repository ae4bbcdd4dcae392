"""benchmarks/ponder_pareto.py's gate bookkeeping on hand examples: oracle recovery,
the oracle's counterfactual per mini-batch ranking, the Fixed-1 against SKIP check, and the runs it
trains."""

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


def test_mini_batch_score_is_the_counterfactual_gain():
  # A hand model of a store: updating mini-batch 0 (k = 1) lowers the NLL of the query
  # at the last position by 2; updating mini-batch 1 lowers its own first position by
  # 0.5; mini-batch 2 is filler whose update overwrites the store (+1 at the query).
  def nll_of_steps(steps):
    nll = np.full((2, 6), 3.0)
    nll[:, 5] -= 2.0 * steps[0] - 1.0 * steps[2]
    nll[:, 2] -= 0.5 * steps[1]
    return nll
  mask = np.array([[0, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]], np.float32)
  score = ponder_pareto._mini_batch_score(nll_of_steps, mask, 3, 0, 1)
  # All updated: (2.5 + 2) / 2 = 2.25. Dropping j changes it by +2/2, +0.5/2, -1/2.
  np.testing.assert_allclose(score, [1.0, 0.25, -0.5])
  # The local difference at mini-batch 0 has no scored target there: it would be 0.


def test_fixed1_against_skip_by_perplexity_or_recall():
  rows = lambda f1, skip, **acc: {
      "fixed1": dict(valid_ppl=f1, **{k: v[0] for k, v in acc.items()}),
      "skip": dict(valid_ppl=skip, **{k: v[1] for k, v in acc.items()})}
  assert ponder_pareto.fixed1_vs_skip(rows(9.4, 10.0))["passed"]
  assert not ponder_pareto.fixed1_vs_skip(rows(9.6, 10.0))["passed"]
  check = ponder_pareto.fixed1_vs_skip(rows(9.9, 10.0, recall_acc=(0.30, 0.15)))
  assert check["passed"] and check["recall_gain"] == pytest.approx(0.15)
  assert not ponder_pareto.fixed1_vs_skip(rows(9.9, 10.0, recall_acc=(0.2, 0.15)))["passed"]


def test_training_runs_are_every_variant_and_the_seed_spread(tmp_path):
  budget = ponder_pareto.BUDGETS["short"]
  runs = ponder_pareto.training_runs("recall", budget, "", str(tmp_path), seeds=2)
  names = [v.name for v in ponder_pareto.variants(budget)]
  spread = ["skip", "fixed1", "fixed2", "fixed4"]  # Adaptive rows have one seed.
  assert list(runs) == ([str(tmp_path / n) for n in names]
                        + [str(tmp_path / f"{n}_s1") for n in spread])
  for workdir, cfg in runs.items():
    assert cfg.seed == (1 if workdir.endswith("_s1") else 0)
    assert cfg.trainer.total_steps == budget.total_steps["recall"]
  # The same configs `run` trains one by one, so a parallel run is reused there.
  for variant in ponder_pareto.variants(budget):
    assert runs[str(tmp_path / variant.name)] == ponder_pareto.variant_config(
        "recall", budget, variant)
