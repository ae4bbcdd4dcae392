"""The classification task with DendriticLiquid-ViT: the step reaches the model, the
keep-ratio and distillation terms join the loss, per-module learning rates."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ponder import errors
from ponder import mesh as mesh_lib
from tests import fakes
from tests.conftest import ROOT, subprocess_env
from train import cli
from train import tasks
from train import trainer

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _config(arg, data_dir):
  cfg = cli.load_config_file(f"{CONFIGS / 'dendritic_liquid_vit.py'}:{arg}")
  cfg.data.update(data_dir=str(data_dir), source="local")
  return cfg


def _loss(task, params, batch, key):
  return jax.jit(lambda p, b, k: task.loss_fn(p, b, k, step=5, train=True))(params, batch,
                                                                            key)


def test_step_and_keep_ratio_loss_reach_the_model(tmp_path):
  data = fakes.write_fashion_mnist(tmp_path / "data")
  cfg = _config("fashion_mnist,smoke,scratch", data)
  task = tasks.build(cfg, mesh_lib.make_mesh())
  assert tasks.takes_step(task.model)
  batch = task.train_batch(5)
  params = task.init(jax.random.key(0))
  loss, metrics = _loss(task, params, batch, jax.random.key(1))
  # The step reaches the model's schedules: hard masks at step 5, soft ones at step 0.
  _, at_start = jax.jit(lambda p, b, k: task.loss_fn(p, b, k, step=0, train=True))(
      params, batch, jax.random.key(1))
  assert float(metrics["kept_stage0"]) != float(at_start["kept_stage0"])
  assert set(metrics) >= {"accuracy", "cross_entropy", "keep_ratio_loss", "kept_stage0"}
  expected = metrics["cross_entropy"] + cfg.keep_ratio_weight * metrics["keep_ratio_loss"]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # The ablation has no schedules and no extra terms: the plain classification loss.
  vcfg = _config("fashion_mnist,smoke,variant=dendritic_vit", data)
  vtask = tasks.build(vcfg, mesh_lib.make_mesh())
  _, vmetrics = _loss(vtask, vtask.init(jax.random.key(0)), vtask.train_batch(0),
                      jax.random.key(1))
  assert set(vmetrics) == {"accuracy"}


def _flat(tree):
  return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def test_finetune_protocol_starts_from_and_distils_the_baseline(tmp_path):
  # DynamicViT's protocol (the default): `baseline=DIR` is both the warm start
  # (init.from_workdir) and the teacher.
  data = fakes.write_fashion_mnist(tmp_path / "data")
  teacher = cli.load_config_file(f"{CONFIGS / 'vit.py'}:fashion_mnist_p4,smoke")
  teacher.data.update(data_dir=str(data), source="local")
  teacher.trainer.update(total_steps=1, eval_every=1, ckpt_every=1)
  base_dir = str(tmp_path / "teacher")
  trainer.train_and_evaluate(teacher, base_dir, echo=lambda s: None)
  with pytest.raises(errors.ConfigError, match="baseline=DIR"):
    _config("fashion_mnist_p4,smoke", data)
  cfg = _config(f"fashion_mnist_p4,smoke,baseline={base_dir}", data)
  assert cfg.init.from_workdir == cfg.distill.teacher_workdir == base_dir
  run = trainer.build_run(cfg)
  fresh = trainer.init_state(run.task, run.tx, jax.random.key(0))
  state = trainer.warm_start(run, fresh, echo=lambda s: None)
  # Every baseline parameter has the same path and shape in the liquid model, so all
  # are copied; what the liquid model adds keeps its fresh init.
  _, _, base_params, _, _ = trainer.restore_run(base_dir, selected=True)
  base, warm, init = _flat(base_params), _flat(state.params), _flat(fresh.params)
  copied = [k for k in warm if k in base and np.array_equal(warm[k], base[k])]
  assert len(copied) == len(base) > 0
  for k in set(warm) - set(copied):
    np.testing.assert_array_equal(warm[k], init[k])
  params = state.params
  task = run.task
  loss, metrics = _loss(task, params, task.train_batch(0), jax.random.key(1))
  # The student has the teacher's head but prunes and adds a block: the outputs differ.
  assert float(metrics["distill_kl"]) > 0.0 and float(metrics["distill_tokens"]) > 0.0
  expected = (metrics["cross_entropy"] + cfg.keep_ratio_weight * metrics["keep_ratio_loss"]
              + cfg.distill.kl_weight * metrics["distill_kl"]
              + cfg.distill.token_weight * metrics["distill_tokens"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  grads = jax.grad(lambda p: task.loss_fn(p, task.train_batch(0), jax.random.key(1),
                                          step=0, train=True)[0])(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_lr_scales_scale_the_updates_of_named_modules():
  params = {"cfc": {"kernel": jnp.ones((2, 2))}, "block0": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda p: 0.3 * p, params)
  optim = ml_collections.ConfigDict(common.optim(lr=1e-2, warmup_steps=0))

  def first_update(o):
    tx, _ = trainer.make_optimizer(o, total_steps=10)
    return tx.update(grads, tx.init(params), params)[0]

  plain = first_update(optim)
  optim.lr_scales = {"cfc": 0.5}
  scaled = first_update(optim)
  np.testing.assert_allclose(scaled["cfc"]["kernel"], 0.5 * plain["cfc"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["block0"]["kernel"], plain["block0"]["kernel"])
  assert float(jnp.abs(plain["cfc"]["kernel"]).min()) > 0.0


def test_evaluate_writes_the_corruption_report_and_pictures(tmp_path):
  data = fakes.write_fashion_mnist(tmp_path / "data")
  cfg = _config("fashion_mnist,smoke,scratch", data)
  cfg.trainer.update(total_steps=1, eval_every=1, ckpt_every=1)
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(cfg, str(workdir), echo=lambda s: None)
  out = subprocess.run(
      [sys.executable, "-m", "train.evaluate", f"--workdir={workdir}", "--corruptions=6",
       "--pictures"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr
  metrics = json.loads(out.stdout.strip().splitlines()[-1])
  report = json.loads((workdir / "eval" / "corruptions.json").read_text())
  assert len(report["per_corruption"]) == 15
  np.testing.assert_allclose(metrics["corruption_mean"], report["mean"])
  np.testing.assert_allclose(report["drop"], report["clean"] - report["mean"])
  # Clean accuracy of the 6 corrupted images' originals: a fraction with denominator 6.
  assert round(report["clean"] * 6, 6) == round(report["clean"] * 6)
  for name in ("importance.png", "kept_tokens.png"):
    assert (workdir / "eval" / name).read_bytes()[:4] == b"\x89PNG"
