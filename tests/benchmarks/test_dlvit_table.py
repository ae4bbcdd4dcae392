"""benchmarks/dlvit_table.py end to end on the smoke budget and a fake Fashion-MNIST."""

import json

import numpy as np
from absl import flags

from benchmarks import dlvit_table
from tests import fakes


def test_smoke_table(tmp_path):
  flags.FLAGS.mark_as_parsed()
  data = fakes.write_fashion_mnist(tmp_path / "data", n_train=32, n_test=16)
  out = tmp_path / "out" / "table.json"
  ratios = (0.5, 0.9)
  result = dlvit_table.run(dlvit_table.BUDGETS["smoke"], str(out), str(tmp_path / "runs"),
                           str(data), ratios=ratios)
  assert json.loads(out.read_text())["goals"] == result["goals"]
  rows = result["models"]
  assert set(rows) == {*dlvit_table.MODELS, "dendritic_liquid_vit@0.5",
                       "dendritic_liquid_vit@0.9"}
  for row in rows.values():
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["images_per_s"] > 0
    assert np.isfinite(row["flops_per_image"]) and row["flops_per_image"] > 0
  assert rows["vit"]["flops_ratio"] == 1.0
  # Dropping more tokens at inference costs fewer compiled FLOPs, with the same weights.
  assert (rows["dendritic_liquid_vit@0.5"]["flops_per_image"]
          < rows["dendritic_liquid_vit@0.9"]["flops_per_image"])
  assert rows["dendritic_liquid_vit@0.5"]["params"] == rows["dendritic_liquid_vit"]["params"]
  for name in dlvit_table.MODELS:
    report = rows[name]["corruption"]
    assert len(report["per_corruption"]) == 15
    assert all(len(v) == 5 for v in report["per_corruption"].values())
  assert set(result["goals"]) >= {"flops_met", "throughput_met", "accuracy_met",
                                  "corruption_met"}
  for path in result["pictures"]:
    with open(path, "rb") as f:
      assert f.read(4) == b"\x89PNG"
