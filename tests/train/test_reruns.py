"""Reruns never lose or mix work: a changed config is refused before anything is written,
allowed fields resume, a checkpoint that does not fit is an error (never quarantined),
a failed start leaves nothing behind, metrics hold each step once after a resume, and a
distilled run is evaluated from its own workdir alone."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from configs import vit as vit_config
from ponder import checkpoint as ckpt_lib
from ponder import errors
from ponder import metric_log as plog
from tests import fakes
from tests.conftest import ROOT, subprocess_env
from train import cli
from train import trainer

quiet = dict(echo=lambda s: None)


def smoke(**trainer_overrides):
  cfg = vit_config.get_config("digits,smoke")
  cfg.trainer.update(log_every=1, **trainer_overrides)
  return cfg


def _snapshot(workdir):
  return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
          for p in workdir.rglob("*") if p.is_file() and "tb" not in p.parts}


def test_changed_config_is_refused_with_the_key_diff_and_nothing_is_touched(tmp_path):
  trainer.train_and_evaluate(smoke(), str(tmp_path), **quiet)
  before = _snapshot(tmp_path)
  changed = smoke()
  changed.model.width = 64
  with pytest.raises(errors.ConfigError) as info:
    trainer.train_and_evaluate(changed, str(tmp_path), **quiet)
  message = str(info.value)
  assert "model.width: 32 -> 64" in message
  assert "--workdir" in message and "--allow_config_change" in message
  assert _snapshot(tmp_path) == before  # config.json, checkpoints, metrics untouched.
  assert not (tmp_path / "corrupt_checkpoints").exists()
  # The original command still resumes from the finished state, not from step 0.
  again = trainer.train_and_evaluate(smoke(), str(tmp_path), **quiet)
  assert again["resumed_from"] == 3


def test_allowed_fields_resume(tmp_path):
  trainer.train_and_evaluate(smoke(), str(tmp_path), **quiet)
  said = []
  longer = trainer.train_and_evaluate(smoke(total_steps=5, eval_every=5), str(tmp_path),
                                      echo=said.append)
  assert longer["resumed_from"] == 3 and int(longer["state"].step) == 5
  assert any("trainer.total_steps: 3 -> 5" in s for s in said)
  assert json.loads((tmp_path / "config.json").read_text())["trainer"]["total_steps"] == 5


def test_allow_config_change_keeps_the_state_or_names_the_mismatch(tmp_path):
  trainer.train_and_evaluate(smoke(), str(tmp_path), **quiet)
  lr = smoke(total_steps=4)
  lr.optim.lr = 5e-4
  result = trainer.train_and_evaluate(lr, str(tmp_path), allow_config_change=True, **quiet)
  assert result["resumed_from"] == 3 and int(result["state"].step) == 4
  wider = smoke(total_steps=6)
  wider.optim.lr = 5e-4
  wider.model.width = 64
  with pytest.raises(errors.CheckpointError) as info:
    trainer.train_and_evaluate(wider, str(tmp_path), allow_config_change=True, **quiet)
  assert "does not fit" in str(info.value) and "(32," in str(info.value)
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


def test_truncated_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path):
  trainer.train_and_evaluate(smoke(total_steps=4, ckpt_every=2, eval_every=100),
                             str(tmp_path), **quiet)
  for f in (tmp_path / "checkpoints" / "4").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
      f.write_bytes(f.read_bytes()[:1])  # A copy that stopped after one byte.
  result = trainer.train_and_evaluate(smoke(total_steps=4, ckpt_every=2, eval_every=100),
                                      str(tmp_path), **quiet)
  assert result["resumed_from"] == 2 and int(result["state"].step) == 4
  assert (tmp_path / "corrupt_checkpoints" / "4").is_dir()


def test_resumed_metrics_hold_each_step_once(tmp_path):
  cfg = smoke(total_steps=6, ckpt_every=2, eval_every=2)
  trainer.train_and_evaluate(cfg, str(tmp_path), stop_after=3, **quiet)  # Killed at step 3.
  assert [r["step"] for r in plog.read_metrics(str(tmp_path), "train")] == [1, 2, 3]
  trainer.train_and_evaluate(cfg, str(tmp_path), **quiet)  # Resumes from step 2.
  steps = [r["step"] for r in plog.read_metrics(str(tmp_path), "train")]
  assert steps == [1, 2, 3, 4, 5, 6]
  evals = [r["step"] for r in plog.read_metrics(str(tmp_path), "eval")]
  assert evals == sorted(set(evals)) == [2, 4, 6]


@pytest.mark.parametrize("change", [dict(patch=3), dict(heads=3)])
def test_a_failed_start_leaves_no_files(tmp_path, change):
  cfg = smoke()
  cfg.model.update(change)
  workdir = tmp_path / "new"
  with pytest.raises(errors.ConfigError) as info:
    trainer.train_and_evaluate(cfg, str(workdir), **quiet)
  assert f"model.{next(iter(change))}=3" in str(info.value)
  assert not workdir.exists()


def test_selected_checkpoint_is_scored_once_on_test(tmp_path):
  result = trainer.train_and_evaluate(smoke(total_steps=4, eval_every=2), str(tmp_path),
                                      **quiet)
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["split"] == "test" and final["test"]["examples"] == 360
  assert final["val"]["examples"] == 287  # 20% of the 1,437 digits train images.
  evals = {r["step"]: r["accuracy"] for r in plog.read_metrics(str(tmp_path), "eval")}
  best = max(evals.values())
  assert evals[final["selected_step"]] == best
  assert final["val"]["accuracy"] == pytest.approx(best)
  assert result["accuracy"] == final["test"]["accuracy"]


def _one_step(config_file, data):
  # DendriticLiquid-ViT with `scratch`: distillation from a teacher, no warm start.
  extra = ",scratch" if config_file == "dendritic_liquid_vit.py" else ""
  cfg = cli.load_config_file(f"{ROOT / 'configs' / config_file}:fashion_mnist,smoke{extra}")
  cfg.data.update(data_dir=str(data), source="local")
  cfg.trainer.update(total_steps=1, eval_every=1, ckpt_every=1)
  return cfg


def test_distilled_run_evaluates_without_its_teacher(tmp_path, monkeypatch):
  data = fakes.write_fashion_mnist(tmp_path / "data")
  trainer.train_and_evaluate(_one_step("vit.py", data), str(tmp_path / "teacher"), **quiet)
  student = _one_step("dendritic_liquid_vit.py", data)
  monkeypatch.chdir(tmp_path)
  student.distill.teacher_workdir = "teacher"  # Relative: stored absolute.
  trainer.train_and_evaluate(student, str(tmp_path / "student"), **quiet)
  saved = json.loads((tmp_path / "student" / "config.json").read_text())
  assert saved["distill"]["teacher_workdir"] == str(tmp_path / "teacher")
  shutil.move(str(tmp_path / "teacher"), str(tmp_path / "teacher_moved"))
  out = subprocess.run([sys.executable, "-m", "train.evaluate",
                        f"--workdir={tmp_path / 'student'}", "--noreuse_memory"],
                       cwd=os.path.dirname(ROOT), env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["split"] == "test"


def test_missing_teacher_names_the_path_and_the_command(tmp_path):
  student = _one_step("dendritic_liquid_vit.py", fakes.write_fashion_mnist(tmp_path / "data"))
  student.distill.teacher_workdir = str(tmp_path / "no_teacher")
  with pytest.raises(errors.MissingDataError) as info:
    trainer.train_and_evaluate(student, str(tmp_path / "student"), **quiet)
  message = str(info.value)
  assert str(tmp_path / "no_teacher") in message
  assert "python -m train.main --config=configs/vit.py:fashion_mnist" in message
  assert not (tmp_path / "student").exists()
