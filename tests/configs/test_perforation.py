"""configs/perforation.py: every preset builds; the smoke masked-LM run with the base
frozen trains the scorers and the MLM head only (a real train step through the task)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from configs import perforation
from ponder import errors
from train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", perforation.PRESETS)
def test_presets_build(preset):
  cfg = perforation.get_config(f"{preset},sparsity=0.3")
  assert cfg.perforation.target_sparsity == 0.3
  assert cfg.perforation.mode == ("none" if preset == "mlm_dense" else
                                  "learned" if preset in ("mlm_perforated", "sst2_perforated")
                                  else preset.removeprefix("mlm_"))
  smoke = perforation.get_config(f"{preset},smoke")
  assert smoke.model.init_from == "" and smoke.trainer.total_steps == 3


def test_unknown_preset_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="valid: .*mlm_perforated"):
    perforation.get_config("mlm_sparse")


def test_smoke_frozen_run_trains_only_scorers_and_head(tmp_path):
  cfg = perforation.get_config("mlm_perforated,smoke,freeze")
  cfg.trainer.update(total_steps=2, eval_every=2, ckpt_every=2)  # Step 0 has lr 0.
  result = trainer.train_and_evaluate(cfg, str(tmp_path), echo=lambda s: None)
  assert int(result["state"].step) == 2 and np.isfinite(result["mlm_loss"])
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert all(0.0 <= r["sparsity"] < 1.0 and "reg_target" in r for r in train_rows)
  _, task, start, _, _ = trainer.restore_run(str(tmp_path))  # The step-2 checkpoint.
  # The trainer's init: jitted, from the first half of the seed's key (eager init draws
  # other numbers).
  fresh = jax.jit(task.init)(jax.random.split(jax.random.key(cfg.seed))[0])
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start,
                       fresh)
  layer = moved["bert"]["encoder"]["layer_0"]
  assert layer["attention"]["self"]["perforation"]["bias"]
  assert not layer["attention"]["self"]["query"]["kernel"]
  assert not moved["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert moved["mlm_head"]["transform"]["kernel"]
