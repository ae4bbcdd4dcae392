"""benchmarks/ponder_pareto.py end to end on its smoke budget: every variant trained,
measured and written, FLOPs ordered by k, the adaptive perplexity equal to the
trainer's own evaluation, and finished runs reused on a rerun.

The benchmark runs once, as its command line, in a child process whose XLA compiles
without backend optimisation: compiling five variants' train steps is most of its time
(about a minute on 2 idle CPU cores, two when the cores are shared).
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import goals
from benchmarks import ponder_pareto
from ponder import errors
from ponder import metric_log as plog
from tests.conftest import ROOT, subprocess_env

SMOKE = ponder_pareto.BUDGETS["smoke"]
TRAINED = {v.name for v in ponder_pareto.variants(SMOKE)}
GATED = {kind + s.name for s in ponder_pareto.GATE_SETTINGS
         for kind in ("recon", "oracle", "random")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("pareto")
  env = subprocess_env()
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  done = subprocess.run([sys.executable, "-m", "benchmarks.ponder_pareto", f"--out={out}",
                         "--budget=smoke", "--preset=synthetic", "--jobs=2"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "goal adaptive:" in done.stdout  # The printed summary.
  return out, json.loads((out / "results.json").read_text())


def test_writes_results_and_pictures(run):
  out, result = run
  for name in TRAINED:  # --jobs=2 trained each run in a worker, with its own log.
    assert "steps" in (out / f"{name}.log").read_text(), name
  for name in ("pareto.png", "allocation.png", "gate_positions.png", "curves.png"):
    assert (out / name).stat().st_size > 1000, name
  assert set(result["variants"]) == TRAINED | GATED
  assert TRAINED >= {"skip", "fixed1", "fixed2", "fixed4", "adaptive"}
  for name, r in result["variants"].items():
    assert math.isfinite(r["valid_ppl"]) and r["valid_ppl"] > 1.0, name
    assert r["eval_s_per_token"] > 0
    if name in TRAINED:
      assert r["steps_trained"] == SMOKE.total_steps["synthetic"]
      assert (out / name / "curves.png").exists()
    fit = r["inner_fit"]  # ttt.inner_loss_by_step, tested against a reference there.
    assert set(fit["relative_loss_by_block"]) == {"h_1"}  # The smoke model's TTT block.
    assert len(fit["relative_loss"]) == 5 and fit["relative_loss"][0] == 1.0
  t = result["throughput"]
  assert t["grad"]["tokens_per_s"] > 0 and t["dual"]["tokens_per_s"] > 0
  assert t["grad_max_abs_diff"] < 1e-5  # The two forms compute the same gradients.


def test_flops_grow_with_k_and_skip_makes_no_update(run):
  v = run[1]["variants"]
  assert v["skip"]["inner_flops_per_token"] == 0 and v["skip"]["mean_steps"] == 0
  for key in ("inner_flops_per_token", "ttt_layer_flops_per_token", "total_flops_per_token"):
    assert v["skip"][key] < v["fixed1"][key] < v["fixed2"][key] < v["fixed4"][key], key
  assert [v[f"fixed{k}"]["mean_steps"] for k in (1, 2, 4)] == [1, 2, 4]


def test_adaptive_allocation_costs_and_correlations(run):
  result = run[1]
  a, v = result["variants"]["adaptive"], result["variants"]
  assert 1.0 <= a["mean_steps"] <= 4.0
  assert sum(a["allocation"]["tokens"].values()) == a["scored_tokens"]
  assert a["allocation"]["tokens"]["0"] == 0  # Buckets are {1, 2, 4}.
  assert v["fixed1"]["inner_flops_per_token"] <= a["update_flops_per_token"]
  assert a["update_flops_per_token"] <= v["fixed4"]["inner_flops_per_token"]
  # Its inner FLOPs count the entropy signal: the SKIP pass and the allocation.
  assert a["inner_flops_per_token"] == pytest.approx(
      a["update_flops_per_token"] + v["skip"]["total_flops_per_token"]
      + a["allocation_flops_per_token"])
  # The first (SKIP) pass is paid on top of the second.
  assert a["total_flops_per_token"] > v["skip"]["total_flops_per_token"] + v[
      "fixed1"]["total_flops_per_token"]
  for what in ("steps_vs_loss_gain", "entropy_vs_hard_fraction",
               "allocation_signal_vs_hard_fraction"):
    c = a["correlations"][what]
    assert c["n"] > 0 and set(c) == {"spearman", "pearson", "n"}
  # The goal is benchmarks.goals' (tested on known inputs there) of what was measured.
  assert result["goal"] == goals.ponder_pareto(result["variants"])
  assert set(result["goal"]["by_variant"]) == {"adaptive", "recon", "recon_update"}


def test_gates_oracle_and_random_at_the_same_rate(run):
  result = run[1]
  v = result["variants"]
  for setting in ponder_pareto.GATE_SETTINGS:
    g = result["gate_recovery"]["recon" + setting.name]
    rows = [v[kind + setting.name] for kind in ("recon", "oracle", "random")]
    # Oracle and random allocate exactly the target fractions; the gate about them.
    assert rows[1]["allocation"] == rows[2]["allocation"]
    assert abs(g["realised_rate"] - g["target_rate"]) < 0.25
    # (No oracle <= base check: at a forced update rate the oracle must also update
    # chunks whose realised gain is negative, so on an untrained smoke model it can lose.)
    assert g["recovery"] == ponder_pareto.oracle_recovery(g["base_nll"], g["gate_nll"],
                                                          g["oracle_nll"])
    # One share per mini-batch position; with SKIP/update their mean is the update rate.
    n_mb = result["seq_len"] // result["model"]["ttt_mini_batch"]
    assert len(g["oracle_gain_by_position"]) == n_mb
    for row in rows:
      assert len(row["raised_rate_by_position"]) == n_mb
      if setting.buckets == (0, 1):
        assert np.mean(row["raised_rate_by_position"]) == pytest.approx(row["realised_rate"])
    # The gate pays for its signal; the oracle and random are charged nothing.
    assert rows[0]["gate_flops_per_token"] > 0 == rows[1]["gate_flops_per_token"]
    assert rows[0]["inner_flops_per_token"] == pytest.approx(
        rows[0]["update_flops_per_token"] + rows[0]["gate_flops_per_token"])
  # The entropy gate's own cost is a SKIP pass: more than the recon gate's signal.
  assert v["adaptive"]["gate_flops_per_token"] > 10 * v["recon"]["gate_flops_per_token"]
  assert result["fixed1_vs_skip"] == ponder_pareto.fixed1_vs_skip(v)


def test_valid_perplexity_is_the_trainers(run):
  # The benchmark scores the final parameters on the validation stream: the trainer's
  # last evaluation (final_metrics.json holds the selected checkpoint's test stream).
  out, result = run
  for name in TRAINED:
    r = result["variants"][name]
    last = plog.read_metrics(str(out / name), "eval")[-1]
    assert math.isclose(r["valid_ppl"], last["perplexity"], rel_tol=1e-4), name
    final = json.loads((out / name / "final_metrics.json").read_text())
    assert final["split"] == "test" and final["test"]["tokens"] > 0


def test_rerun_reuses_a_finished_run_and_refuses_another_config(run):
  out, _ = run
  variant = ponder_pareto.variants(SMOKE)[0]
  cfg = ponder_pareto.variant_config("synthetic", SMOKE, variant)
  _, _, step, trained_s = ponder_pareto.train_or_load(cfg, str(out / variant.name))
  assert (step, trained_s) == (SMOKE.total_steps["synthetic"], 0.0)
  cfg.trainer.total_steps += 1
  with pytest.raises(errors.ConfigError, match="trainer.total_steps"):
    ponder_pareto.train_or_load(cfg, str(out / variant.name))
