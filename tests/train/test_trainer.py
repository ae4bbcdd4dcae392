"""The shared train loop: resume, preemption, corrupt checkpoints, NaN, devices, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import vit as vit_config
from ponder import checkpoint as ckpt_lib
from ponder import errors
from ponder import metric_log as plog
from tests.conftest import ROOT, subprocess_env
from train import trainer


def smoke_config(**trainer_overrides):
  cfg = vit_config.get_config("digits,smoke")
  cfg.trainer.update(log_every=1, **trainer_overrides)
  return cfg


def _params(result):
  return jax.device_get(result["state"].params)


def test_smoke_run_leaves_config_metrics_and_checkpoint_and_restores(tmp_path):
  result = trainer.train_and_evaluate(smoke_config(), str(tmp_path), echo=lambda s: None)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "vit"
  rows = plog.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 3
  assert os.listdir(tmp_path / "tb")
  assert 0.0 <= result["accuracy"] <= 1.0 and result["examples"] == 360
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # restore_run(params_dir=): parameters alone under <workdir>/<dir>/<step>, as a
  # plasticity run keeps its baseline (train.evaluate --params_dir).
  with pytest.raises(errors.CheckpointError, match="no parameters under"):
    trainer.restore_run(str(tmp_path), params_dir="kept")
  kept = jax.tree.map(lambda p: p + 1.0, _params(result))
  store = ckpt_lib.Checkpointer(str(tmp_path / "kept"), keep=1)
  store.save(2, kept)
  store.close()
  _, _, params, step, _ = trainer.restore_run(str(tmp_path), params_dir="kept")
  assert step == 2
  chex.assert_trees_all_close(jax.device_get(params), kept)


def test_resume_equals_uninterrupted_run(tmp_path):
  cfg = smoke_config(total_steps=6, ckpt_every=2, eval_every=100)
  full = trainer.train_and_evaluate(cfg, str(tmp_path / "full"), echo=lambda s: None)
  # "Crash" after 3 steps (last checkpoint at step 2), then rerun the same command.
  trainer.train_and_evaluate(cfg, str(tmp_path / "cut"), stop_after=3, echo=lambda s: None)
  said = []
  resumed = trainer.train_and_evaluate(cfg, str(tmp_path / "cut"), echo=said.append)
  assert resumed["resumed_from"] == 2
  assert any("Resuming from checkpoint at step 2" in s for s in said)
  chex.assert_trees_all_close(_params(resumed), _params(full), atol=1e-6, rtol=0)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  cfg = smoke_config(total_steps=4, ckpt_every=2, eval_every=100)
  trainer.train_and_evaluate(cfg, str(tmp_path), echo=lambda s: None)
  latest = tmp_path / "checkpoints" / "4"
  for f in latest.rglob("*"):  # Truncate every file of step 4, as a crash mid-copy would.
    if f.is_file():
      f.write_bytes(b"")
  manager = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  state = jax.eval_shape(lambda: _abstract_state(cfg))
  with caplog.at_level("WARNING"):
    restored, step = manager.restore_latest(state)
  assert step == 2 and "unreadable" in caplog.text
  assert (tmp_path / "corrupt_checkpoints" / "4").is_dir()  # Kept, not deleted.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def _abstract_state(cfg):
  from train import tasks
  from ponder import mesh as mesh_lib
  task = tasks.build(cfg, mesh_lib.make_mesh())
  tx, _ = trainer.make_optimizer(cfg.optim, cfg.trainer.total_steps)
  params = task.init(jax.random.key(0))
  return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params))


def test_train_step_skips_update_on_nonfinite_loss():
  params = {"w": jnp.ones(3)}
  tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  loss_fn = lambda p, b, k, step, train: (jnp.sum(p["w"]) * b["scale"], {})
  good, m = trainer.train_step(state, {"scale": 1.0}, None, loss_fn=loss_fn, tx=tx,
                               schedule=schedule)
  chex.assert_trees_all_close(good.params["w"], jnp.full(3, 0.9))
  assert bool(m["finite"]) and int(good.step) == 1
  bad, m = trainer.train_step(good, {"scale": jnp.nan}, None, loss_fn=loss_fn, tx=tx,
                              schedule=schedule)
  assert not bool(m["finite"])
  chex.assert_trees_all_close(bad.params, good.params)
  assert int(bad.step) == 1


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path):
  # An absurd learning rate without clipping overflows the weights within a few steps.
  cfg = smoke_config(total_steps=30, ckpt_every=1, eval_every=100)
  cfg.optim.update(lr=1e30, clip=0.0, warmup_steps=0)
  with pytest.raises(errors.NonFiniteLossError) as info:
    trainer.train_and_evaluate(cfg, str(tmp_path), echo=lambda s: None)
  err = info.value
  assert err.metric in trainer.WATCHED and f"at step {err.step}" in str(err)
  manager = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert manager.latest_step() is not None and manager.latest_step() <= err.step
  restored, _ = manager.restore_latest(jax.eval_shape(lambda: _abstract_state(cfg)))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def test_optimizer_schedule_and_decay_mask():
  cfg = smoke_config().optim
  cfg.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  _, schedule = trainer.make_optimizer(cfg, total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(110)],
                             [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  # Weight decay reaches matrices only: a zero gradient moves a kernel, never a bias.
  cfg.update(clip=0.0, weight_decay=0.5, warmup_steps=0)
  tx, _ = trainer.make_optimizer(cfg, total_steps=10)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert np.all(np.asarray(updates["kernel"]) < 0) and np.all(np.asarray(updates["bias"]) == 0)


def _run_main(args, devices=1, **kwargs):
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=ROOT,
                        env=subprocess_env(devices), capture_output=True, text=True, **kwargs)


def test_cli_unknown_config_key_names_it_and_the_valid_ones(tmp_path):
  out = _run_main(["--config=configs/vit.py:smoke", f"--workdir={tmp_path}",
                   "--config.trainer.totl_steps=5"])
  assert out.returncode == 2
  assert "trainer.totl_steps" in out.stderr and "total_steps" in out.stderr
  assert "Traceback" not in out.stderr


def test_cli_smoke_then_resume_with_more_steps(tmp_path):
  first = _run_main(["--config=configs/vit.py:smoke", f"--workdir={tmp_path}"])
  assert first.returncode == 0, first.stderr
  assert "final: accuracy=" in first.stdout
  second = _run_main(["--config=configs/vit.py:smoke", f"--workdir={tmp_path}",
                      "--config.trainer.total_steps=5"])
  assert second.returncode == 0, second.stderr
  assert "Resuming from checkpoint at step 3" in second.stdout
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 5


def test_sigterm_checkpoints_and_resumed_run_equals_uninterrupted(tmp_path):
  args = ["--config=configs/vit.py:smoke", "--config.trainer.total_steps=150",
          "--config.trainer.ckpt_every=1000", "--config.trainer.eval_every=1000",
          "--config.trainer.log_every=1"]
  proc = subprocess.Popen([sys.executable, "-m", "train.main", *args,
                           f"--workdir={tmp_path / 'cut'}"], cwd=ROOT,
                          env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "cut" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and (not metrics.exists() or
                                    len(metrics.read_text().splitlines()) < 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "SIGTERM: saved checkpoint at step" in out
  stopped = ckpt_lib.Checkpointer(str(tmp_path / "cut" / "checkpoints")).latest_step()
  assert 5 <= stopped < 150
  assert _run_main([*args, f"--workdir={tmp_path / 'cut'}"]).returncode == 0
  assert _run_main([*args, f"--workdir={tmp_path / 'full'}"]).returncode == 0
  cfg = vit_config.get_config("smoke")
  cfg.trainer.total_steps = 150
  state = jax.eval_shape(lambda: _abstract_state(cfg))
  cut, _ = ckpt_lib.Checkpointer(str(tmp_path / "cut" / "checkpoints")).restore_latest(state)
  full, _ = ckpt_lib.Checkpointer(str(tmp_path / "full" / "checkpoints")).restore_latest(state)
  chex.assert_trees_all_close(cut.params, full.params, atol=1e-6, rtol=0)


_LOSSES = """
import json, sys
from configs import vit
from ponder import metric_log as plog
from train import trainer
cfg = vit.get_config("digits,smoke")
cfg.trainer.update(total_steps=4, batch_size=16, log_every=1, eval_every=4)
trainer.train_and_evaluate(cfg, sys.argv[1], echo=lambda s: None)
import jax
print(json.dumps({"devices": jax.device_count(),
                  "losses": [r["loss"] for r in plog.read_metrics(sys.argv[1], "train")]}))
"""


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
  losses = {}
  for n in (1, 8):
    out = subprocess.run([sys.executable, "-c", _LOSSES, str(tmp_path / str(n))], cwd=ROOT,
                         env=subprocess_env(n), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == n
    losses[n] = result["losses"]
  assert len(losses[1]) == 4
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5, atol=1e-6)
