"""benchmarks/goals.py on known measurements: results where a goal must fail, where it
must pass, and values exactly at a threshold (which meet it)."""

import pytest

from benchmarks import goals


def _dlvit_rows(*, flops=0.6, speed=1.5, accuracy=-0.005, corruption=0.0):
  """A baseline and a DendriticLiquid-ViT row, the liquid one at the given ratios and
  deltas from the baseline (FLOPs 12.5 M, 1,000 images/s, 87.11%, 73.54%)."""
  base = dict(flops_per_image=12.5e6, images_per_s=1000.0, test_accuracy=0.8711,
              corruption_mean=0.7354)
  liquid = dict(flops_per_image=flops * 12.5e6, images_per_s=speed * 1000.0,
                test_accuracy=0.8711 + accuracy, corruption_mean=0.7354 + corruption)
  return {"vit": base, "dendritic_liquid_vit": liquid}


def _met(g):
  return {k: v for k, v in g.items() if k.endswith("_met")}


def test_dlvit_goals_pass_when_every_measurement_is_inside():
  g = goals.dlvit_table(_dlvit_rows(corruption=0.002))
  assert _met(g) == dict(flops_met=True, throughput_met=True, accuracy_met=True,
                         corruption_met=True)
  assert g["flops_ratio"] == pytest.approx(0.6) and g["throughput_ratio"] == pytest.approx(1.5)


def test_dlvit_goals_fail_one_at_a_time():
  # The recorded full-budget table: FLOPs and throughput met, accuracy and corruption not.
  rows = {"vit": dict(flops_per_image=12.45e6, images_per_s=1755.0, test_accuracy=0.8711,
                      corruption_mean=0.7354),
          "dendritic_liquid_vit": dict(flops_per_image=7.83e6, images_per_s=2811.0,
                                       test_accuracy=0.8248, corruption_mean=0.7031)}
  assert _met(goals.dlvit_table(rows)) == dict(flops_met=True, throughput_met=True,
                                                accuracy_met=False, corruption_met=False)
  for field, value in [("flops", 0.66), ("speed", 1.39), ("accuracy", -0.0101),
                       ("corruption", -0.0001)]:
    failed = {k for k, v in _met(goals.dlvit_table(_dlvit_rows(**{field: value}))).items()
              if not v}
    assert failed == {dict(flops="flops_met", speed="throughput_met",
                           accuracy="accuracy_met", corruption="corruption_met")[field]}


def test_dlvit_goals_at_their_thresholds_are_met():
  # 0.8611 - 0.8711 is -0.01000000000000001 in floating point: still a 1.0-point drop.
  rows = _dlvit_rows(flops=0.65, speed=1.4, accuracy=-0.01, corruption=0.0)
  rows["dendritic_liquid_vit"]["test_accuracy"] = 0.8611
  assert all(_met(goals.dlvit_table(rows)).values())


def _variant(mode, ppl, inner, time, total=1.0):
  return dict(mode=mode, valid_ppl=ppl, inner_flops_per_token=inner, eval_s_per_token=time,
              ttt_layer_flops_per_token=inner + 1.0, total_flops_per_token=total)


def _pareto(adaptive, skip_ppl=110.0):
  return {"skip": _variant("skip", skip_ppl, 0.0, 1.0),
          "fixed1": _variant("fixed", 104.0, 25.0, 1.5),
          "fixed4": _variant("fixed", 100.0, 100.0, 4.0), **adaptive}


def test_pareto_goal_passes_meaningfully_only_when_inner_steps_help():
  variants = _pareto({"adaptive": _variant("adaptive", 100.5, 50.0, 2.0),
                      "adaptive_b1.8": _variant("adaptive", 103.0, 30.0, 1.5)})
  g = goals.ponder_pareto(variants)
  assert set(g["by_variant"]) == {"adaptive", "adaptive_b1.8"}  # Fixed and SKIP are not.
  a = g["by_variant"]["adaptive"]
  assert (a["ppl_ok"], a["inner_flops_ok"], a["time_ok"], a["passed"]) == (True, True, True, True)
  assert a["ppl_ratio"] == pytest.approx(1.005) and a["time_ratio"] == pytest.approx(0.5)
  b = g["by_variant"]["adaptive_b1.8"]
  assert (b["ppl_ok"], b["inner_flops_ok"], b["time_ok"], b["passed"]) == (False, True, True, False)
  assert g["passing"] == ["adaptive"] and g["passed"]
  assert g["inner_steps_help"] and g["meaningful_pass"]  # Fixed-4 is 9% better than SKIP.
  # The recorded synthetic run: Fixed-4 worse than SKIP, so the same pass is vacuous.
  g = goals.ponder_pareto(_pareto({"adaptive": _variant("adaptive", 100.5, 50.0, 2.0)},
                                  skip_ppl=90.0))
  assert g["passed"] and not g["inner_steps_help"] and not g["meaningful_pass"]


def test_pareto_goal_fails_on_time_or_flops():
  g = goals.ponder_pareto(_pareto({"slow": _variant("adaptive", 100.0, 28.0, 10.6),
                                   "costly": _variant("adaptive", 100.0, 66.0, 1.0)}))
  assert not g["by_variant"]["slow"]["time_ok"] and g["by_variant"]["slow"]["inner_flops_ok"]
  assert not g["by_variant"]["costly"]["inner_flops_ok"] and g["by_variant"]["costly"]["time_ok"]
  assert g["passing"] == [] and not g["passed"] and not g["meaningful_pass"]


def test_pareto_goal_at_its_thresholds_is_met():
  g = goals.ponder_pareto(_pareto({"adaptive": _variant("adaptive", 101.0, 65.0, 3.0)},
                                  skip_ppl=101.0))
  assert g["by_variant"]["adaptive"]["passed"]
  assert g["inner_steps_help"] and g["meaningful_pass"]  # Fixed-4 exactly 1% better.
  g = goals.ponder_pareto(_pareto({}))
  assert g["by_variant"] == {} and not g["passed"]  # No adaptive variant: nothing passes.


def _vit_result(ponder, eager, compiled):
  return dict(ponder_images_per_s=ponder, torch_eager_images_per_s=eager,
              torch_compile_images_per_s=compiled)


def test_vit_throughput_goal_is_against_the_faster_torch_side():
  # The recorded seed ViT: 0.75x eager, 0.73x torch.compile.
  g = goals.vit_throughput(_vit_result(19.8, 26.3, 27.2))
  assert g["best_peer"] == "torch_compile" and not g["met"]
  assert g["speedup_vs_best_peer"] == pytest.approx(19.8 / 27.2)
  assert goals.vit_throughput(_vit_result(45.0, 20.0, 30.0))["met"]  # 1.5x compile.
  assert not goals.vit_throughput(_vit_result(44.0, 20.0, 30.0))["met"]  # 2.2x eager only.
  g = goals.vit_throughput(_vit_result(31.0, 20.0, None))  # torch.compile did not run.
  assert g["best_peer"] == "torch_eager" and g["met"]


def _lm_training(ponder, hf_flax, torch, mfu=0.6):
  return {"ponder": dict(tokens_per_s=ponder, mfu=mfu), "hf_flax": dict(tokens_per_s=hf_flax),
          "torch": dict(tokens_per_s=torch)}


def test_lm_throughput_goal_and_the_mfu_it_needs():
  # The recorded GPT-2 4x128 step: 1.01x Hugging Face Flax, which would need MFU 75.4%.
  g = goals.lm_throughput(_lm_training(1107.0, 1093.0, 955.0, mfu=0.636))
  assert g["best_peer"] == "hf_flax" and not g["met"]
  assert g["needs_mfu"] == pytest.approx(0.636 * 1.2 * 1093.0 / 1107.0)
  g = goals.lm_throughput(_lm_training(1200.0, 800.0, 1000.0))
  assert g["best_peer"] == "torch" and g["met"]  # Exactly 1.2x the faster peer.
  assert g["needs_mfu"] == pytest.approx(0.6)  # It already runs at the MFU it needs.
  assert not goals.lm_throughput(_lm_training(1199.0, 800.0, 1000.0))["met"]


def test_cpu_speed_goals_from_one_run_s_rates():
  g = goals.cpu_speed(dict(ponder=130.0, ponder_old_default=100.0, ponder_bf16=195.0,
                           torch_eager=130.0))
  assert g["over_old_default"] == pytest.approx(1.3) and g["over_old_default_met"]
  assert g["bf16_over_f32"] == pytest.approx(1.5) and g["bf16_met"]
  assert g["over_torch_eager"] == pytest.approx(1.0) and g["over_torch_eager_met"]
  g = goals.cpu_speed(dict(ponder=129.0, ponder_old_default=100.0, ponder_bf16=64.5,
                           torch_eager=130.0))
  assert not (g["over_old_default_met"] or g["bf16_met"] or g["over_torch_eager_met"])
  assert g["bf16_over_f32"] == pytest.approx(0.5)
  g = goals.cpu_speed(dict(ponder=120.0, ponder_old_default=100.0))  # No bf16, no torch.
  assert g["bf16_over_f32"] is None and g["bf16_met"] is None
  assert g["over_torch_eager_met"] is None and not g["over_old_default_met"]
