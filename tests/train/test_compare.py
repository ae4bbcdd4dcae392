"""train.compare: overlays runs' curves and reports their last values; bad input is clear."""

import os

import pytest

from ponder import errors
from ponder import metric_log
from train import compare


def _run(workdir, losses, accuracy):
  writer = metric_log.MetricWriter(str(workdir), tensorboard=False)
  for step, loss in enumerate(losses, 1):
    writer.write(step, {"loss": loss}, split="train")
  writer.write(len(losses), {"accuracy": accuracy}, split="eval")
  writer.close()
  return str(workdir)


def test_overlay_writes_a_png_and_the_last_values(tmp_path):
  runs = [("float32", _run(tmp_path / "a", [2.0, 1.5, 1.25], 0.5)),
          ("bfloat16", _run(tmp_path / "b", [2.0, 1.6], 0.25))]
  out = tmp_path / "compare.png"
  last = compare.compare(runs, [("train", "loss"), ("eval", "accuracy")], str(out))
  assert last == {"float32": {"train:loss": 1.25, "eval:accuracy": 0.5},
                  "bfloat16": {"train:loss": 1.6, "eval:accuracy": 0.25}}
  assert os.path.getsize(out) > 1000


def test_bad_input_is_a_clear_error(tmp_path):
  with pytest.raises(errors.ConfigError, match="A=B"):
    compare.parse_pairs(["float32"], "=", "--runs")
  with pytest.raises(errors.MissingDataError, match="metrics.jsonl"):
    compare.compare([("x", str(tmp_path))], [("train", "loss")], str(tmp_path / "p.png"))
  run = _run(tmp_path / "a", [1.0], 0.5)
  with pytest.raises(errors.ConfigError, match="no run logged"):
    compare.compare([("a", run)], [("eval", "perplexity")], str(tmp_path / "p.png"))
