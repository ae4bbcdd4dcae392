"""benchmarks/dlvit_table.py end to end on the smoke budget and a fake Fashion-MNIST.

Run as a command: importing two benchmark modules that define absl flags of the same
name into one test process would clash."""

import json
import subprocess
import sys

import numpy as np

from benchmarks import goals
from tests import fakes
from tests.conftest import ROOT, subprocess_env

MODELS = ("vit", "dendritic_vit", "dendritic_liquid_vit")
POLICIES = ("learned", "random", "inverted", "pixel_variance")


def test_smoke_table(tmp_path):
  data = fakes.write_fashion_mnist(tmp_path / "data", n_train=32, n_test=16)
  out = tmp_path / "out" / "table.json"
  runs = tmp_path / "runs"
  env = subprocess_env()
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"  # Compiling is most of it.
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.dlvit_table", "--budget=smoke", f"--out={out}",
       f"--workdir={runs}", f"--data_dir={data}", "--keep_ratios=0.5,0.9", "--jobs=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  # --jobs=2: each run starts only after the run it starts from and distils from
  # (vit_s0) is done, and writes its own log.
  lines = proc.stdout.splitlines()
  start = {l.split(":")[0][3:]: i for i, l in enumerate(lines) if " steps in " in l}
  end = {l.split(":")[0][3:]: i for i, l in enumerate(lines) if l.endswith(": done")}
  assert set(start) == set(end) == {"vit_s0", "dendritic_vit_s0", "dendritic_liquid_vit_s0",
                                    "dendritic_liquid_vit@trained0.5_s0"}
  for name in ("dendritic_liquid_vit_s0", "dendritic_liquid_vit@trained0.5_s0"):
    assert end["vit_s0"] < start[name]
  assert start["dendritic_vit_s0"] < end["vit_s0"]  # Independent runs overlap.
  for name in start:
    assert "steps" in (runs / f"{name}.log").read_text()
  result = json.loads(out.read_text())
  rows = result["models"]
  assert set(rows) == {*MODELS, "dendritic_liquid_vit@trained0.5"}
  for name, row in rows.items():
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["images_per_s"] > 0
    assert np.isfinite(row["flops_per_image"]) and row["flops_per_image"] > 0
    # The table's accuracy is the trainer's own test score of the selected checkpoint.
    final = json.loads((runs / f"{name}_s0" / "final_metrics.json").read_text())
    assert row["test_accuracy_per_seed"] == [final["test"]["accuracy"]]
  assert rows["vit"]["flops_ratio"] == 1.0
  # The liquid models start from the baseline run and distil from it.
  liquid = json.loads((runs / "dendritic_liquid_vit_s0" / "config.json").read_text())
  assert liquid["init"]["from_workdir"] == liquid["distill"]["teacher_workdir"] == str(
      runs / "vit_s0")
  # Trained at 0.5 (the preset trains at 0.6): fewer compiled FLOPs.
  assert (rows["dendritic_liquid_vit@trained0.5"]["flops_per_image"]
          < rows["dendritic_liquid_vit"]["flops_per_image"])
  ablations = result["policy_ablations"]
  assert set(ablations) == set(POLICIES)
  for policy in POLICIES:  # Same weights and token counts: the same FLOPs per ratio.
    assert set(ablations[policy]) == {"0.5", "0.9"}
    for rho in ("0.5", "0.9"):
      assert ablations[policy][rho]["flops_ratio"] == ablations["learned"][rho]["flops_ratio"]
      assert 0.0 <= ablations[policy][rho]["accuracy"] <= 1.0
  assert ablations["learned"]["0.5"]["flops_ratio"] < ablations["learned"]["0.9"]["flops_ratio"]
  for name in MODELS:
    report = rows[name]["corruption"]
    assert len(report["per_corruption"]) == 15
    assert all(len(v) == 5 for v in report["per_corruption"].values())
    np.testing.assert_allclose(rows[name]["corruption_mean"], report["mean"])
  # The goals are benchmarks.goals' (tested on known inputs there) of the measured rows,
  # and the policy goal is the learned-over-random gap at keep ratio 0.5.
  gap = ablations["learned"]["0.5"]["accuracy"] - ablations["random"]["0.5"]["accuracy"]
  assert result["goals"] == dict(goals.dlvit_table(rows), policy_ratio=0.5,
                                 min_learned_over_random=0.02, learned_over_random=gap,
                                 policy_met=gap >= 0.02)
  for name in result["pictures"]:
    assert (out.parent / name).read_bytes()[:4] == b"\x89PNG"
