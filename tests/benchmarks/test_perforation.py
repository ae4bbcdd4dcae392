"""benchmarks/perforation.py: the goals are read off the records, and the sweep plot is
drawn from them (the runs themselves are the notebook's smoke cell)."""

from benchmarks import perforation


def records(learned_50=4.0, speedup=1.5, sst2=(0.90, 0.897)):
  mlm = [dict(run="mlm_dense", task="mlm", mode="none", target_sparsity=0.0,
              achieved_sparsity=0.0, mlm_loss=4.0)]
  mlm += [dict(run=f"mlm_perforated_{int(s * 100)}", task="mlm", mode="learned",
               target_sparsity=s, achieved_sparsity=s + 0.01,
               mlm_loss=learned_50 if s == 0.5 else 4.0 + s) for s in (0.3, 0.5)]
  mlm += [dict(run=f"mlm_{m}_50", task="mlm", mode=m, target_sparsity=0.5,
               achieved_sparsity=0.5, mlm_loss=4.1) for m in ("random", "bigbird", "static")]
  sst = [dict(run="sst2_dense", task="sst2", dev_accuracy=sst2[0]),
         dict(run="sst2_perforated_50", task="sst2", dev_accuracy=sst2[1])]
  speed = [dict(part="model", seq=2048, target_sparsity=0.5, speedup=speedup),
           dict(part="model", seq=512, target_sparsity=0.5, speedup=9.0)]
  return speed, mlm + sst


def test_goals_met_and_missed():
  got = perforation.goals(*records())
  assert got["mlm_50_within_2pct_of_dense"] and got["mlm_50_beats_every_fixed_pattern"]
  assert got["model_2048_at_least_1.4x"] and got["sst2_within_0.5_points"]
  assert abs(got["sst2_points_below_dense"] - 0.3) < 1e-9
  # 4.1 / 4.0 is 2.5% above dense and no better than the random / BigBird baselines;
  # the static mask is learned, not a fixed pattern, so it is not in that comparison.
  missed = perforation.goals(*records(learned_50=4.1, speedup=1.3, sst2=(0.90, 0.89)))
  assert not missed["mlm_50_within_2pct_of_dense"]
  assert not missed["mlm_50_beats_every_fixed_pattern"]
  assert not missed["model_2048_at_least_1.4x"] and not missed["sst2_within_0.5_points"]


def test_sst2_goal_of_the_cls_row_variant_is_its_own():
  speed, quality = records(sst2=(0.90, 0.88))
  quality += [dict(run="sst2_perforated_50_cls_row", task="sst2", dev_accuracy=0.898)]
  got = perforation.goals(speed, quality)
  assert abs(got["sst2_points_below_dense"] - 2.0) < 1e-9 and not got["sst2_within_0.5_points"]
  assert abs(got["sst2_cls_row_points_below_dense"] - 0.2) < 1e-9
  assert got["sst2_cls_row_within_0.5_points"]
  assert perforation.goals(*records())["sst2_cls_row_within_0.5_points"] is None


def test_sst2_cls_row_run_keeps_query_block_0_whole():
  budget = perforation.BUDGETS["smoke"]
  cfg = perforation.sst2_config(True, budget, "", cls_row=True)
  assert cfg.perforation.keep_cls_row
  assert not perforation.sst2_config(True, budget, "").perforation.keep_cls_row


def test_sweep_plot_is_written(tmp_path):
  _, quality = records()
  perforation.sweep_plot(quality, str(tmp_path / "sweep.png"))
  assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_gradient_groups_split_scorers_query_key_and_the_rest():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import perforation_gradients  # pylint: disable=g-import-not-at-top
  grads = {"layer_0": {"attention": {"query": {"kernel": jnp.full((2, 2), 1.0)},
                                     "key": {"bias": jnp.array([3.0, 4.0])},
                                     "value": {"kernel": jnp.array([[6.0, 8.0]])}},
                       "perforation_0": {"bias": jnp.array([0.0, 5.0])}},
           "mlm_head": {"bias": jnp.array([0.0])}}
  got = perforation_gradients.group_norms(grads)
  assert got == {"query_key": (4.0 + 25.0) ** 0.5, "rest": 10.0, "scorer": 5.0}


def test_goals_use_the_mean_over_seeds_and_tolerate_missing_sst2():
  speed, quality = records(learned_50=4.15)
  mlm = [r for r in quality if r["task"] == "mlm"]
  # A second seed: dense 4.2 (mean 4.1), learned 4.15 again; random 4.3 (mean 4.2).
  mlm += [dict(mlm[0], seed=1, mlm_loss=4.2),
          dict(next(r for r in mlm if r["run"] == "mlm_perforated_50"), seed=1),
          dict(next(r for r in mlm if r["run"] == "mlm_random_50"), seed=1, mlm_loss=4.3)]
  got = perforation.goals(speed, mlm)
  assert abs(got["mlm_50_loss_ratio_to_dense"] - 4.15 / 4.1) < 1e-9
  assert got["mlm_50_within_2pct_of_dense"]
  # BigBird's single seed (4.1) is below the learned 4.15: not every pattern is beaten.
  assert not got["mlm_50_beats_every_fixed_pattern"]
  # No SST-2 runs and no speed records (--skip_speed): not measured, not missed.
  assert got["sst2_points_below_dense"] is None and got["sst2_within_0.5_points"] is None
  no_speed = perforation.goals([], mlm)
  assert no_speed["model_2048_speedup_at_50"] is None
  assert no_speed["model_2048_at_least_1.4x"] is None
  only_two = [r for r in mlm if r["run"] in ("mlm_dense", "mlm_perforated_50")]
  assert perforation.goals(speed, only_two)["mlm_50_beats_every_fixed_pattern"] is None
  assert perforation.goals(speed, [])["mlm_50_within_2pct_of_dense"] is None


def test_goals_compare_runs_only_on_the_seeds_both_have():
  speed, quality = records(learned_50=4.05)
  mlm = [r for r in quality if r["task"] == "mlm"]
  # Seed 1 is an easier draw for every run: dense 3.8, learned 3.85; the random baseline
  # has only seed 0 (4.1). Against the mean over all of learned's seeds (3.95) random
  # would look beaten by chance; on the shared seed 0 it is 4.05 against 4.1, beaten
  # honestly, and a worse learned seed 0 (4.15) is not.
  mlm += [dict(mlm[0], seed=1, mlm_loss=3.8),
          dict(next(r for r in mlm if r["run"] == "mlm_perforated_50"), seed=1,
               mlm_loss=3.85)]
  mlm = [r for r in mlm if r["run"] in ("mlm_dense", "mlm_perforated_50", "mlm_random_50")]
  got = perforation.goals(speed, mlm)
  assert abs(got["mlm_50_loss_ratio_to_dense"] - (4.05 + 3.85) / (4.0 + 3.8)) < 1e-9
  assert got["mlm_50_beats_every_fixed_pattern"]
  worse = [dict(r, mlm_loss=4.15) if r["run"] == "mlm_perforated_50" and "seed" not in r
           else r for r in mlm]
  assert not perforation.goals(speed, worse)["mlm_50_beats_every_fixed_pattern"]


def test_sweep_plot_draws_runs_with_a_seed_dense_lacks(tmp_path):
  _, quality = records()
  quality += [dict(quality[1], seed=3)]  # No dense seed 3: left out, not an error.
  perforation.sweep_plot(quality, str(tmp_path / "sweep.png"))
  assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_reused_records_stand_in_for_missing_runs_of_the_same_budget(tmp_path, monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  budget = perforation.BUDGETS["smoke"]
  settings = {k: v for k, v in budget.items() if k != "speed_seqs"}
  earlier = [dict(run="mlm_dense", task="mlm", seed=0, mlm_loss=5.3),
             dict(run="sst2_dense", task="sst2", seed=0, dev_accuracy=0.9),
             dict(run="mlm_dense", task="mlm", seed=1, mlm_loss=5.4)]
  path = tmp_path / "earlier.json"
  path.write_text(json.dumps(dict(budget_settings=settings, quality=earlier)))
  reuse = perforation.reusable_records(str(path), settings)
  assert all(r["reused_from"] == str(path) for r in reuse)
  saved = []
  # `only` names no run, so nothing trains; the reused seed-0 runs are still reported,
  # in the benchmark's order (MLM before SST-2), and saved as they are read.
  got = perforation.quality_records(str(tmp_path / "out"), budget, saved.append,
                                    seeds=(0,), only=("none",), reuse=reuse)
  assert [(r["run"], r["seed"]) for r in got] == [("mlm_dense", 0), ("sst2_dense", 0)]
  assert saved[-1] == got and got[0]["mlm_loss"] == 5.3
  # A run that `only` names is trained again (after a code change), not reused.
  trained = []
  fake_cfg = ml_collections.ConfigDict(dict(
      seed=0, trainer=dict(total_steps=2, batch_size=2), perforation=dict(mode="none"),
      data=dict(seq_len=32)))
  monkeypatch.setattr(perforation, "FLAGS", types.SimpleNamespace(wikitext="", sst2=""))
  monkeypatch.setattr(perforation, "mlm_config", lambda *args: fake_cfg)
  monkeypatch.setattr(perforation, "run_once", lambda cfg, workdir: trained.append(
      workdir) or dict(mlm_loss=1.0, accuracy=0.5))
  got = perforation.quality_records(str(tmp_path / "out"), budget, saved.append,
                                    seeds=(0,), only=("mlm_dense",), reuse=reuse)
  assert [os.path.basename(w) for w in trained] == ["mlm_dense"]
  assert got[0]["mlm_loss"] == 1.0 and "reused_from" not in got[0]
  assert got[1]["run"] == "sst2_dense" and got[1]["reused_from"] == str(path)
  with pytest.raises(app.UsageError, match="budget settings"):
    perforation.reusable_records(str(path), dict(settings, mlm_steps=999))
  with pytest.raises(app.UsageError, match="no such file"):
    perforation.reusable_records(str(tmp_path / "missing.json"), settings)


def test_full_budget_dense_sst2_run_is_the_tables_minilm_row():
  # One run serves both benchmarks: the same config, so the same training.
  from benchmarks import dendritic_bert_table  # pylint: disable=g-import-not-at-top
  data = "/data/sst-2"
  ours = perforation.sst2_config(False, perforation.BUDGETS["full"], data)
  ours.seed = 0
  table = dendritic_bert_table.row_config("minilm", dendritic_bert_table.BUDGETS["full"], 0,
                                          f"local:{data}")
  assert ours.to_dict() == table.to_dict()
  perforated = perforation.sst2_config(True, perforation.BUDGETS["full"], data)
  assert perforated.trainer.to_dict() == ours.trainer.to_dict()
  assert perforated.optim.warmup_steps == ours.optim.warmup_steps


def test_full_budget_mlm_runs_differ_only_in_the_mask():
  # Dense and masked MLM runs share every setting but the perforation block, attention
  # dropout included (the masked path once ran without it: a confound).
  budget = perforation.BUDGETS["full"]
  dense = perforation.mlm_config("mlm_dense", 0.5, budget, "/data/wikitext").to_dict()
  for preset in ("mlm_perforated", "mlm_random", "mlm_bigbird"):
    masked = perforation.mlm_config(preset, 0.5, budget, "/data/wikitext").to_dict()
    assert masked["model"]["attention_dropout"] == budget["mlm_attention_dropout"]
    assert {k: v for k, v in masked.items() if k != "perforation"} == {
        k: v for k, v in dense.items() if k != "perforation"}


def test_last_train_value_reads_the_last_training_row(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  rows = [dict(step=50, split="train", sparsity=0.2), dict(step=100, split="train", sparsity=0.4),
          dict(step=100, split="val", accuracy=0.9)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert perforation.last_train_value(str(tmp_path), "sparsity") == 0.4


def test_speed_seqs_flag_parses_seq_block_pairs_and_rejects_the_rest():
  import pytest  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  assert perforation.parse_speed_seqs(["64:16", "512:64"]) == {64: 16, 512: 64}
  for bad in ("64", "64:0", "64:24", "x:16"):
    with pytest.raises(app.UsageError, match="SEQ:BLOCK"):
      perforation.parse_speed_seqs([bad])


def test_mean_by_bucket_groups_by_each_sentence_s_own_length():
  # Lengths 5 and 16 fall in bucket 16, 17 and 32 in 32, 40 in 64; none in 128.
  got = perforation.mean_by_bucket([5, 16, 17, 32, 40], (16, 32, 64, 128),
                                   accuracy=[1, 0, 1, 1, 0], other=[0, 2, 4, 6, 8])
  assert got == {"16": dict(n=2, accuracy=0.5, other=1.0),
                 "32": dict(n=2, accuracy=1.0, other=5.0),
                 "64": dict(n=1, accuracy=0.0, other=8.0)}


def test_real_tile_sparsity_counts_only_tiles_of_real_blocks():
  import numpy as np  # pylint: disable=g-import-not-at-top
  # One layer, one head, a 3 x 3 grid of block 16. Example 0 (20 tokens: 2 x 2 real
  # tiles) drops one of its 4; example 1 (40 tokens: 3 x 3) drops 3 of 9. Tiles
  # outside the real blocks (example 0's third row and column) do not count.
  hard = np.ones((1, 2, 1, 3, 3), bool)
  hard[0, 0, 0, 0, 1] = False
  hard[0, 0, 0, 2, :] = False
  hard[0, 1, 0, [0, 1, 2], [2, 2, 1]] = False
  got = perforation.real_tile_sparsity(hard, np.array([20, 40]), 16)
  np.testing.assert_allclose(got, [0.25, 1 / 3])
  # A padding example of the evaluation batch (no real token) is NaN, not a warning.
  got = perforation.real_tile_sparsity(hard, np.array([20, 0]), 16)
  assert got[0] == 0.25 and np.isnan(got[1])


def test_sst2_length_plot_is_drawn_from_records_that_have_lengths(tmp_path):
  by_length = {split: dict(overall=0.9, buckets={"16": dict(n=3, accuracy=0.9),
                                                 "32": dict(n=2, accuracy=0.8)})
               for split in ("valid", "dev")}
  quality = [dict(run="sst2_dense", task="sst2", seed=0, by_length=by_length),
             dict(run="sst2_perforated_50", task="sst2", seed=0, by_length=by_length),
             dict(run="sst2_perforated_50_cls_row", task="sst2", seed=0,
                  by_length=by_length),
             dict(run="mlm_dense", task="mlm", seed=0)]
  assert perforation.sst2_length_plot(quality, str(tmp_path / "lengths.png"))
  assert (tmp_path / "lengths.png").stat().st_size > 1000
  assert not perforation.sst2_length_plot(quality[3:], str(tmp_path / "none.png"))
  assert not (tmp_path / "none.png").exists()


def test_sst2_by_length_is_read_back_from_the_workdir(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  # An empty workdir would fail to restore: the kept file must be what answers.
  kept = {"dev": dict(overall=0.5, buckets={"16": dict(n=2, accuracy=0.5)})}
  (tmp_path / "by_length.json").write_text(json.dumps(kept))
  assert perforation.sst2_by_length(str(tmp_path)) == kept
