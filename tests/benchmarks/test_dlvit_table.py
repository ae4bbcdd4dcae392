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


def test_smoke_table(tmp_path):
  data = fakes.write_fashion_mnist(tmp_path / "data", n_train=32, n_test=16)
  out = tmp_path / "out" / "table.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.dlvit_table", "--budget=smoke", f"--out={out}",
       f"--workdir={tmp_path / 'runs'}", f"--data_dir={data}", "--keep_ratios=0.5,0.9"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  rows = result["models"]
  assert set(rows) == {*MODELS, "dendritic_liquid_vit@0.5", "dendritic_liquid_vit@0.9"}
  for row in rows.values():
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["images_per_s"] > 0
    assert np.isfinite(row["flops_per_image"]) and row["flops_per_image"] > 0
  assert rows["vit"]["flops_ratio"] == 1.0
  # Dropping more tokens at inference costs fewer compiled FLOPs, with the same weights.
  assert (rows["dendritic_liquid_vit@0.5"]["flops_per_image"]
          < rows["dendritic_liquid_vit@0.9"]["flops_per_image"])
  assert rows["dendritic_liquid_vit@0.5"]["params"] == rows["dendritic_liquid_vit"]["params"]
  for name in MODELS:
    report = rows[name]["corruption"]
    assert len(report["per_corruption"]) == 15
    assert all(len(v) == 5 for v in report["per_corruption"].values())
    np.testing.assert_allclose(rows[name]["corruption_mean"], report["mean"])
  # The goals are benchmarks.goals' (tested on known inputs there) of the measured rows.
  assert result["goals"] == goals.dlvit_table(rows)
  for name in result["pictures"]:
    assert (out.parent / name).read_bytes()[:4] == b"\x89PNG"
