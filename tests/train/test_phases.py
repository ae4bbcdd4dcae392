"""Phase policies in the trainer (train/phases.py): the PerforatedAI dendrite cycles run
inside train.main, resume mid-cycle, freeze what rule "cc" freezes; warm starts."""

import json

import chex
import jax
import numpy as np
import pytest

from configs import dendritic_bert
from ponder import checkpoint as ckpt_lib
from ponder import errors
from ponder import mesh as mesh_lib
from ponder.nn import perforated
from train import phases
from train import trainer

quiet = dict(echo=lambda s: None)


def _smoke(preset="dsn_cc"):
  cfg = dendritic_bert.get_config(f"{preset},smoke")
  cfg.data.buckets = "128"
  return cfg


def test_dendrite_cycles_resume_mid_cycle_exactly(tmp_path):
  """A run killed right after its first switch (in the candidates phase) and rerun ends
  with the policy state and parameters of the run that never stopped."""
  cfg = _smoke()
  # A switch after a few evaluations, two candidate steps, then neurons; every step
  # checkpointed so the test can look inside the phases.
  cfg.trainer.update(total_steps=8, ckpt_every=1, keep_ckpts=10)
  whole = trainer.train_and_evaluate(cfg, str(tmp_path / "whole"), **quiet)
  history = whole["policy_state"]["history"]
  actions = [h["action"] for h in history]
  assert perforated.RESTRUCTURE in actions, actions
  switch = next(h["step"] for h in history if h["action"] == perforated.RESTRUCTURE)

  cut = str(tmp_path / "cut")
  trainer.train_and_evaluate(cfg, cut, stop_after=switch + 1, **quiet)
  record = phases.load_record(cut, switch)
  assert record["state"]["dendrites"] == 1 and record["state"]["phase"] == "candidates"
  assert record["evaluated"]["dendrites"] == 0  # the evaluated params had none yet
  assert phases.load_record(cut, switch + 1)["state"]["phase"] == "candidates"
  # The candidate steps (the first at learning rate 0: warm-up restarts at the switch)
  # moved the newest dendrites and nothing else.
  run = trainer.configured(trainer.build_run(cfg), record["state"])
  ckpt = ckpt_lib.Checkpointer(f"{tmp_path}/whole/checkpoints")
  before, after = (ckpt.restore(s, trainer.abstract_state(run)).params
                   for s in (switch + 1, switch + 2))
  ckpt.close()
  for m, a, b in zip(jax.tree.leaves(perforated.candidate_mask(before)),
                     jax.tree.leaves(before), jax.tree.leaves(after)):
    assert (not np.array_equal(a, b)) if m else np.array_equal(a, b)
  resumed = trainer.train_and_evaluate(cfg, cut, **quiet)
  assert resumed["resumed_from"] == switch + 1  # the checkpoint inside the cc phase
  assert resumed["policy_state"] == whole["policy_state"]
  chex.assert_trees_all_close(resumed["state"].params, whole["state"].params, atol=1e-6)
  assert resumed["accuracy"] == pytest.approx(whole["accuracy"])
  rows = [json.loads(line) for line in open(f"{cut}/metrics.jsonl")]
  assert [r["phase"] for r in rows if r["split"] == "phase"][:2] == ["restructure:1",
                                                                    "neurons"]


def test_a_switch_inside_a_log_interval_logs_each_phase_apart(tmp_path):
  """Rule cc's candidate steps report other metrics than the neuron steps: a switch
  between two logs closes the interval there instead of averaging the two kinds (which
  stopped a MiniLM run whose switch at step 660 fell inside a 50-step interval)."""
  cfg = _smoke()
  cfg.trainer.update(total_steps=8, log_every=3)
  result = trainer.train_and_evaluate(cfg, str(tmp_path), **quiet)
  rows = [json.loads(line) for line in open(f"{tmp_path}/metrics.jsonl")]
  switches = [r["step"] for r in rows if r.get("phase", "").startswith("restructure")]
  assert switches and switches[0] % 3, switches  # the switch is not on a log step
  train = [r for r in rows if r["split"] == "train"]
  assert switches[0] in [r["step"] for r in train]
  for r in train:  # one phase's metrics per row
    assert ("correlation" in r) != ("accuracy" in r), r
  assert any("correlation" in r for r in train)
  chex.assert_equal(int(result["state"].step), 8)


def test_candidate_phase_moves_only_the_newest_dendrites():
  """Rule "cc"'s loss (the task's `candidates` phase) gives gradient to the newest
  dendrite of each wrapped layer and to nothing else."""
  cfg = _smoke()
  cfg.model.update(dendrites=2, dendrite_phase="candidates")
  from train import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.build(cfg, mesh_lib.make_mesh(data=-1, model=1))
  params = task.init(jax.random.key(0))
  # u = 0 at init would make every error-weighted path trivial: give the cascade weight.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if jax.tree_util.keystr(p).endswith("['u']") else x, params)
  grads = jax.grad(lambda p: task.loss_fn(p, task.train_batch(0), jax.random.key(1),
                                          step=0, train=True)[0])(params)
  mask = perforated.candidate_mask(params)
  moved = jax.tree.map(lambda g: float(np.abs(g).max()), grads)
  for (path, g), m in zip(jax.tree_util.tree_flatten_with_path(moved)[0],
                          jax.tree.leaves(mask)):
    if m:
      assert g > 0, jax.tree_util.keystr(path)
    else:
      assert g == 0, jax.tree_util.keystr(path)


def test_records_unknown_policies_and_missing_records(tmp_path):
  phases.save_record(str(tmp_path), 5, {"k": 1}, {"k": 0}, opt_start=3)
  phases.save_record(str(tmp_path), 5, {"k": 2}, opt_start=5, keep=True)
  assert phases.load_record(str(tmp_path), 5) == {"evaluated": {"k": 0}, "state": {"k": 2},
                                                  "opt_start": 5}
  with pytest.raises(errors.CheckpointError, match="phases/7.json is missing"):
    phases.load_record(str(tmp_path), 7)
  cfg = _smoke()
  cfg.policy.name = "nope"
  with pytest.raises(errors.ConfigError, match="dendrites"):
    phases.build(cfg)
  cfg = _smoke()
  cfg.policy.candidate_steps = 0
  with pytest.raises(errors.ConfigError, match="candidate_steps"):
    phases.build(cfg)


def test_warm_start_copies_matching_parameters(tmp_path):
  """init.from_workdir: a run of the same model starts from the source's selected
  params; a wider DAN takes only what fits (the word table) and keeps the rest."""
  source = _smoke("dsn")
  source.trainer.update(total_steps=2, eval_every=1, ckpt_every=1)
  src = trainer.train_and_evaluate(source, str(tmp_path / "src"), **quiet)
  _, _, selected, _, _ = trainer.restore_run(str(tmp_path / "src"), selected=True)
  del src
  lines = []
  same = _smoke("dsn")
  same.init.from_workdir = str(tmp_path / "src")
  same.trainer.update(total_steps=0)
  cfg_run = trainer.build_run(trainer.resolve_paths(same))
  run, state, resumed, ckpt, _ = trainer.init_or_restore(cfg_run, str(tmp_path / "a"),
                                                          lines.append)
  ckpt.close()
  assert resumed is None
  chex.assert_trees_all_close(state.params, selected)
  wide = _smoke("dsn_wide")
  wide.init.from_workdir = str(tmp_path / "src")
  run = trainer.build_run(trainer.resolve_paths(wide))
  _, state, _, ckpt, _ = trainer.init_or_restore(run, str(tmp_path / "b"), lines.append)
  ckpt.close()
  np.testing.assert_array_equal(state.params["word_embeddings"]["embedding"],
                                selected["word_embeddings"]["embedding"])
  assert "kept their fresh init" in lines[-1] and "hidden_0" in lines[-1]
