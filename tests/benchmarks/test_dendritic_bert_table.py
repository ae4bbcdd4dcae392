"""benchmarks/dendritic_bert_table.py: run configs per budget and the goals' arithmetic."""

import json
import os

import chex
import pytest

from benchmarks import dendritic_bert_table as dbt


def _row(mean, std, flops=1e6, seeds=3):
  return dict(dev_accuracy=dict(mean=mean, std=std), flops_per_example=flops, seeds=seeds)


def test_goals_compare_means_against_the_seed_spread():
  rows = {"minilm": _row(0.91, 0.0, flops=1.44e9, seeds=1), "minilm_gd": _row(0.905, 0.0),
          "dsn_gd": _row(0.862, 0.004), "dsn_cc": _row(0.85, 0.002),
          "dsn_wide": _row(0.855, 0.003)}
  goals = dbt.check_goals(rows)
  assert goals["dsn_86_at_1pct_flops"]["met"]  # dsn_gd: 86.2% at 0.07% of the FLOPs
  assert goals["dsn_gd_beats_wide"]["met"]  # +0.7 points > 0.4 spread
  assert not goals["dsn_cc_beats_wide"]["met"]  # -0.5 points
  assert not goals["minilm_gd_at_least_minilm"]["met"]
  assert "minilm_cc_at_least_minilm" not in goals  # not built: not judged
  rows["dsn_gd"] = _row(0.862, 0.009)  # the same margin within a wider spread
  assert not dbt.check_goals(rows)["dsn_gd_beats_wide"]["met"]
  # A tracker row that never switched is the plain model: no verdict, even where equal.
  rows["minilm_gd"] = dict(_row(0.91, 0.0, seeds=1), dendrites_per_layer=[{}])
  rows["dsn_gd"] = dict(_row(0.862, 0.004), dendrites_per_layer=[{}, {"h0": 1}, {}])
  goals = dbt.check_goals(rows)
  assert goals["minilm_gd_at_least_minilm"]["met"] is None
  assert "no dendrite" in goals["minilm_gd_at_least_minilm"]["detail"]
  assert goals["dsn_gd_beats_wide"]["met"]  # one seed added one: judged


def test_row_configs_follow_the_budget():
  short = dbt.BUDGETS["short"]
  cfg = dbt.row_config("minilm_cc", short, seed=0, data="local:/data/sst-2")
  assert cfg.trainer.total_steps == 60 and cfg.trainer.eval_every == 20
  assert cfg.data.valid_fraction == 0.01 and cfg.policy.candidate_steps == 20
  # A switch at evaluation 2 of 3: the dendrite trains before the run ends.
  assert cfg.policy.switch_mode == "fixed" and cfg.policy.fixed_switch_num == 2
  assert cfg.data.source == "local:/data/sst-2"
  cfg = dbt.row_config("dsn_wide", dbt.BUDGETS["full"], seed=2, data="x", match_k=2)
  assert cfg.seed == 2 and cfg.model.width == 770 and cfg.trainer.total_steps == 2000
  assert list(dbt.seeds("minilm", dbt.BUDGETS["full"])) == [0]
  assert list(dbt.seeds("dsn_cc", dbt.BUDGETS["full"])) == [0, 1, 2]


def test_training_time_sums_train_rows_only(tmp_path):
  rows = [{"step": 50, "split": "train", "steps_per_s": 10.0},
          {"step": 50, "split": "eval", "accuracy": 0.5},
          {"step": 100, "split": "train", "steps_per_s": 5.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert dbt.train_seconds(str(tmp_path)) == pytest.approx(5.0 + 10.0)


def test_more_minilm_seeds_reuse_the_finished_ones(tmp_path):
  """--minilm_seeds=2 on a table built with one seed trains seed 1 only: seed 0's run
  (its checkpoint and metrics) is reused as it was."""
  one = dbt.table("smoke", str(tmp_path), "sample:sst2", rows=("minilm",))
  chex.assert_equal(one["rows"]["minilm"]["seeds"], 1)
  first = os.path.join(one["rows"]["minilm"]["runs"][0]["workdir"], "metrics.jsonl")
  before = open(first).read()
  two = dbt.table("smoke", str(tmp_path), "sample:sst2", rows=("minilm",), minilm_seeds=2)
  row = two["rows"]["minilm"]
  assert [r["seed"] for r in row["runs"]] == [0, 1]
  assert open(first).read() == before
  assert len(row["dev_accuracy"]["values"]) == 2


def test_pictures_of_every_tracker_row_that_drew_one(tmp_path):
  rows = {}
  for row, drew in (("dsn", True), ("dsn_gd", True), ("minilm_gd", True), ("minilm_cc", False)):
    run = tmp_path / "runs" / row
    run.mkdir(parents=True)
    if drew:
      (run / "dendrites.png").write_bytes(row.encode())
    rows[row] = dict(runs=[dict(workdir=str(run))])
  out = tmp_path / "out"
  out.mkdir()
  assert dbt.copy_pictures(dict(rows=rows), str(out)) == ["dsn_gd_dendrites.png",
                                                          "minilm_gd_dendrites.png"]
  assert (out / "minilm_gd_dendrites.png").read_bytes() == b"minilm_gd"
