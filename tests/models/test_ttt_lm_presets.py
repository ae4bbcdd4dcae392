"""The long-context TTT LM presets (configs/ttt_lm.py) and the reconstruction-loss gate
in the whole model: the recall task's evaluation reports the recall accuracy,
the long presets keep attention short beside TTT, a gated pass equals the array-steps
pass of the decisions it reports, and the grad and dual forms agree under the gate
with the code's and the paper's options."""

import chex
import jax
import numpy as np
import pytest

from configs import ttt_lm as ttt_lm_config
from models import ttt_lm
from ponder import errors
from ponder.data import synthetic
from ponder.nn import ttt
from tests.models.test_ttt_lm import MB, _apply_array, _apply_static, _config, _ids, _params
from train import tasks


@pytest.mark.parametrize("preset,seq,window", [
    ("recall", 256, 32), ("shakespeare_long", 1024, 32), ("wikitext2_long", 512, 64)])
def test_long_presets_leave_the_long_range_to_ttt(preset, seq, window):
  cfg = ttt_lm_config.get_config(preset)
  assert cfg.data.seq_len == seq == cfg.model.n_positions
  assert cfg.model.attn_window == window and cfg.model.ttt_mode == "add"
  assert cfg.model.ttt_positions and seq % cfg.model.ttt_mini_batch == 0
  smoke = ttt_lm_config.get_config(f"{preset},smoke")
  assert 0 < smoke.model.attn_window < smoke.data.seq_len


def test_recall_task_reports_the_accuracy_on_recalled_values():
  cfg = ttt_lm_config.get_config("recall,smoke")
  task = tasks.build(cfg, None)
  params = _params(task.model, cfg.data.seq_len, scale=0.05)
  batch = next(iter(task.eval_batches()))
  summary = task.summarize(jax.jit(task.eval_fn)(params, batch))
  # Independently: the argmax of the logits at the RECALL targets.
  logits = _apply_static(task.model, params, batch["tokens"][:, :-1])
  recall = batch["kind"][:, 1:] == synthetic.RECALL
  hits = np.asarray(logits).argmax(-1) == batch["tokens"][:, 1:]
  pairs = synthetic.TASKS["recall"]["num_pairs"]
  assert recall.sum() == pairs * len(recall)  # Every stored pair is asked once per row.
  assert summary["recall_acc"] == pytest.approx(hits[recall].mean())
  assert np.isfinite(summary["nll"])


def test_recall_loss_and_score_are_the_answers_only():
  # data.loss_on="recall" (the recall preset's): the training loss is the mean NLL of
  # the answers, evaluation scores them alone, and "real" keeps every position.
  cfg = ttt_lm_config.get_config("recall,smoke")
  assert cfg.data.loss_on == "recall"
  task = tasks.build(cfg, None)
  params = _params(task.model, cfg.data.seq_len, scale=0.05)
  batch = task.train_batch(0)
  loss, _ = task.loss_fn(params, batch, jax.random.key(0), train=False)
  logits = np.asarray(_apply_static(task.model, params, batch["tokens"][:, :-1]))
  targets = batch["tokens"][:, 1:]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  answers = synthetic.train_batch(cfg.data.source, seed=cfg.seed, step=0,
                                  batch_size=cfg.trainer.batch_size,
                                  seq_len=cfg.data.seq_len)["kind"][:, 1:] == synthetic.RECALL
  np.testing.assert_allclose(float(loss), nll[answers].mean(), rtol=1e-5)
  evaluation = next(iter(task.eval_batches()))
  np.testing.assert_array_equal(evaluation["mask"] > 0,
                                evaluation["kind"][:, 1:] == synthetic.RECALL)
  assert (evaluation["real"] == 1).all()


def test_recall_loss_on_a_source_without_answers_is_a_clear_error():
  cfg = ttt_lm_config.get_config("synthetic,smoke")
  cfg.data.loss_on = "recall"
  with pytest.raises(errors.ConfigError, match="synthetic:recall"):
    tasks.build(cfg, None)


def test_gated_model_equals_its_decisions_and_forms_agree():
  # The paper's options where the default is the code's (tests/nn/test_ttt_gate.py runs
  # the gate under the code's), with the M backbone and windowed attention.
  options = dict(ttt_token_idx="none", ttt_learnable_token_idx=False, ttt_loss_scale=1.0,
                 ttt_rope=False, ttt_backbone="M", attn_window=8)
  seq = 4 * MB
  models = {form: ttt_lm.TTTLM(_config(ttt_mode="add", ttt_form=form, **options))
            for form in ttt.FORMS}
  params = _params(models["dual"], seq)
  ids = _ids(2, seq)
  gate = ttt_lm.calibrate_recon_gate(models["dual"], params, [_ids(2, seq, seed=5)],
                                     buckets=(0, 1, 2), target=(0.3, 0.4, 0.3))
  out = {form: ttt_lm.gate_decisions(model, params, ids, gate)
         for form, model in models.items()}
  (logits, decisions), (logits_grad, decisions_grad) = out["dual"], out["grad"]
  steps, _ = decisions["h_1"]
  np.testing.assert_array_equal(steps, decisions_grad["h_1"][0])
  chex.assert_trees_all_close(logits, logits_grad, atol=1e-4)
  np.testing.assert_array_equal(steps, np.broadcast_to(steps[:, :1], steps.shape))
  reference = _apply_array(models["dual"], params, ids, np.asarray(steps[:, 0]))
  chex.assert_trees_all_close(logits, reference, atol=1e-5)
  # The config's gate ("adaptive" with ponder_gate="recon") is the same gate.
  cfg = _config(ttt_mode="add", ttt_form="dual", ttt_steps="adaptive", ponder_gate="recon",
                ponder_buckets=(0, 1, 2), ponder_target=(0.3, 0.4, 0.3),
                ponder_thresholds=tuple(np.asarray(gate.thresholds).tolist()), **options)
  chex.assert_trees_all_close(_apply_static(ttt_lm.TTTLM(cfg), params, ids), logits,
                              atol=1e-5)


def test_recon_gate_config_needs_thresholds():
  with pytest.raises(errors.ConfigError, match="calibrate_recon_gate"):
    _config(ponder_gate="recon")
  with pytest.raises(errors.ConfigError, match="valid: entropy, recon"):
    _config(ponder_gate="loss")
