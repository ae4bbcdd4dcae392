"""ASNN-Goose (train/goose.py): the distillation loss against a NumPy reference, CTKD's
temperature gradient through the GRL against finite differences, the lambda ramps, the
phase policy, the spike validation of a student, and the packed-memory count."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import goose as goose_configs
from models import gpt2
from models import rwkv
from ponder import errors
from ponder import losses
from ponder import metric_log
from ponder import ops
from train import goose
from train import phases
from train import trainer

VOCAB, SEQ = 13, 6


def _models(spike="ternary", n_layer=2):
  student = rwkv.RWKV(rwkv.config("tiny", n_layer=n_layer, n_embd=8, vocab_size=VOCAB,
                                  spike=spike))
  teacher = gpt2.GPT2(gpt2.config("mini", vocab_size=VOCAB, n_layer=1, n_embd=8, n_head=2,
                                  n_positions=16))
  tokens = jax.random.randint(jax.random.key(0), (2, SEQ + 1), 0, VOCAB)
  sp = student.init(jax.random.key(1), tokens[:, :-1])["params"]
  # Non-zero output projections, so the residual updates (FDD's inputs) are not all 0.
  sp = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 * jax.random.normal(jax.random.key(len(str(p))), v.shape)
      if getattr(p[-1], "key", "") == "kernel" else v, sp)
  tp = teacher.init(jax.random.key(2), tokens[:, :-1])["params"]
  return student, sp, teacher, tp, tokens


def _distill(mode="ctkd", fdd_weight=0.5):
  cfg = goose_configs.get_config("spiking_ctkd_fdd,smoke")
  d = ml_collections.ConfigDict(cfg.distill.to_dict())
  d.update(mode=mode, fdd_weight=fdd_weight, kd_weight=0.7, ce_weight=0.3)
  return d


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kd(s, t, temp):
  lt, ls = _log_softmax(t / temp), _log_softmax(s / temp)
  return temp ** 2 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))


def _np_cka(x, y):
  n = x.shape[0]
  h = np.eye(n) - 1.0 / n
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def test_distill_loss_matches_numpy_and_ctkd_gradient_is_reversed():
  student, sp, teacher, tp, tokens = _models(n_layer=1)  # One block: a quicker compile.
  d = _distill()
  lam = 0.6
  params = {"student": sp, "ctkd": {"raw": losses.ctkd_raw_init(2.5, t_min=d.t_min,
                                                                t_max=d.t_max)}}
  loss_fn = lambda p: goose.distill_loss(p, {"tokens": tokens}, None, step=0, train=True,
                                         student=student, teacher=(teacher, tp), distill=d,
                                         lambda_fn=lambda step: lam)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  s_logits, s_aux = student.apply({"params": sp}, tokens[:, :-1], output_hidden_states=True)
  t_logits, t_aux = teacher.apply({"params": tp}, tokens[:, :-1], output_hidden_states=True)
  s, t = np.asarray(s_logits, np.float64), np.asarray(t_logits, np.float64)
  y = np.asarray(tokens[:, 1:])
  ce = -np.mean(np.take_along_axis(_log_softmax(s), y[..., None], -1))
  hs, ht = np.asarray(s_aux["hidden_states"], np.float64), np.asarray(t_aux["hidden_states"],
                                                                      np.float64)
  ds, dt = np.diff(hs, axis=0), np.diff(ht, axis=0)
  layer_map = losses.default_layer_map(1, 1)
  fdd = np.mean([1 - _np_cka(ds[i].reshape(-1, 8), dt[j].reshape(-1, 8))
                 for i, j in enumerate(layer_map)])
  temp = float(metrics["temperature"])
  assert temp == pytest.approx(2.5, rel=1e-5)
  expected = 0.7 * _np_kd(s, t, temp) + 0.3 * ce + 0.5 * fdd
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["fdd"]), fdd, rtol=1e-4, atol=1e-6)

  # d loss / d raw through the GRL = -lambda * kd_weight * dKD/dT * dT/draw.
  h = 1e-3
  dkd_dt = (_np_kd(s, t, temp + h) - _np_kd(s, t, temp - h)) / (2 * h)
  sig = (temp - d.t_min) / (d.t_max - d.t_min)
  dt_draw = (d.t_max - d.t_min) * sig * (1 - sig)
  np.testing.assert_allclose(float(grads["ctkd"]["raw"]), -lam * 0.7 * dkd_dt * dt_draw,
                             rtol=2e-3)


def test_ce_mode_needs_no_teacher_and_kd_mode_does():
  student, sp, _, _, tokens = _models(spike="none", n_layer=1)
  args = dict(step=0, train=True, student=student, teacher=None,
              lambda_fn=lambda step: 0.0)
  loss, metrics = jax.jit(lambda p: goose.distill_loss(
      p, {"tokens": tokens}, None, distill=_distill("ce", 0.0), **args))({"student": sp})
  chex.assert_trees_all_close(loss, metrics["ce"])
  assert "spike_rate" not in metrics  # A dense student has no spiking sites.
  with pytest.raises(errors.ConfigError, match="needs a teacher"):
    goose.distill_loss({"student": sp}, {"tokens": tokens}, None,
                       distill=_distill("kd", 0.0), **args)


def test_lambda_ramps():
  common = dict(lambda_max=0.8, steps_per_epoch=10.0, lambda_epochs=2.0,
                warmup_ratio=0.25, total_steps=100)
  cos = [float(goose.ctkd_lambda(s, ramp="cosine", **common)) for s in (0, 10, 20, 50)]
  np.testing.assert_allclose(cos, [0.0, 0.4, 0.8, 0.8], atol=1e-6)  # E = 20 steps.
  late = np.array([float(goose.ctkd_lambda(s, ramp="late", **common)) for s in range(101)])
  assert np.all(late[:26] == 0.0) and late[-1] == pytest.approx(0.8)
  assert np.all(np.diff(late) >= -1e-7)
  np.testing.assert_allclose(late[int(25 + 75 / 2)], 0.4, atol=0.02)  # Half-way.
  with pytest.raises(errors.ConfigError, match="lambda_ramp"):
    goose.ctkd_lambda(0, ramp="linear", **common)


def _ctx(step, ppl, state):
  unused = {f.name: None for f in dataclasses.fields(phases.EvalContext)}
  return phases.EvalContext(**dict(unused, step=step, val={"perplexity": ppl}, state=state))


def test_policy_switches_fdd_on_kills_it_and_stops_early():
  cfg = goose_configs.get_config("spiking_ctkd_fdd")
  cfg.policy.update(fdd_warmup_steps=100, fdd_kill_threshold=0.1, patience_steps=150)
  policy = goose.GoosePolicy(cfg)
  state = policy.init(cfg)
  assert policy.configure(cfg, state).distill.fdd_weight == 0.0  # Warm-up: FDD off.
  phases_seen = []
  for step, ppl in [(50, 900.0), (100, 700.0), (150, 650.0), (200, 800.0), (250, 640.0),
                    (300, 660.0), (350, 700.0), (400, 700.0)]:
    change = policy.on_eval(_ctx(step, ppl, state))
    state = change.state
    assert not change.reset_optimizer
    phases_seen.append((state["phase"], change.stop))
  assert [p for p, _ in phases_seen] == ["warmup", "fdd", "fdd", "fdd_killed", "fdd_killed",
                                         "fdd_killed", "fdd_killed", "fdd_killed"]
  # Best 640 at step 250; stop once 150 steps pass without improvement.
  assert [s for _, s in phases_seen] == [False] * 7 + [True]
  assert state["best_step"] == 250 and state["best_ppl"] == 640.0
  assert policy.configure(cfg, state).distill.fdd_weight == 0.0
  fdd_state = dict(state, phase="fdd")
  assert policy.configure(cfg, fdd_state).distill.fdd_weight == cfg.distill.fdd_weight
  import json  # The state is JSON (it is kept beside every checkpoint).
  assert json.loads(json.dumps(state)) == state


def test_fdd_switched_on_by_the_policy_trains_from_the_next_step(tmp_path):
  # The phase change only reconfigures (no new parameters, no optimizer reset); the
  # trainer must still rebuild the step, or FDD never reaches the loss.
  cfg = goose_configs.get_config("spiking_ctkd_fdd,smoke")
  cfg.trainer.update(total_steps=4, eval_every=2, ckpt_every=4)
  trainer.train_and_evaluate(cfg, str(tmp_path))
  rows = metric_log.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert ["fdd" in r for r in rows] == [False, False, True, True]
  phase = metric_log.read_metrics(str(tmp_path), "phase")
  assert [(r["step"], r["phase"]) for r in phase] == [(2, "fdd")]


def test_policy_without_fdd_and_bad_settings():
  cfg = goose_configs.get_config("spiking_kd")
  policy = goose.GoosePolicy(cfg)
  assert policy.init(cfg)["phase"] == "no_fdd"
  cfg.policy.patience_steps = 0
  with pytest.raises(errors.ConfigError, match="patience_steps"):
    goose.GoosePolicy(cfg)


def test_unknown_mode_is_a_config_error():
  cfg = goose_configs.get_config("spiking_kd,smoke")
  cfg.distill.mode = "fitnet"
  with pytest.raises(errors.ConfigError, match="valid: ce, ctkd, kd"):
    goose.build_task(cfg, None)
  with pytest.raises(errors.ConfigError, match="goose preset"):
    goose_configs.get_config("spiking_fitnet")


def test_spike_validation_leaves_out_padding_and_pairs_by_depth():
  student, sp, teacher, tp, _ = _models()
  assert goose.teacher_layer_map(4, 2) == {0: 0, 1: 0, 2: 1, 3: 2}
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    mask = np.ones((4, 16), np.float32)
    mask[3, 5:] = 0.0  # A padded last window.
    batches.append({"tokens": rng.integers(0, VOCAB, (4, 17)), "mask": mask})
  rep = goose.spike_validation(student, sp, (teacher, tp), batches, mi_tokens=64)
  sites = rep["health"]["sites"]
  assert len(sites) == 2 * len(rwkv.DEFAULT_SPIKE_SITES)
  assert all(s["tokens"] == 2 * (64 - 11) for s in sites.values())
  layer_map = goose.teacher_layer_map(2, 1)  # Block inputs by depth: both -> embeddings.
  assert rep["cka"]["pairs"] == [[str(i), t] for i, t in layer_map.items()] == [["0", 0],
                                                                                ["1", 0]]
  assert set(rep["checks"]) == {"dead_fraction", "saturated_fraction", "mi_excess_bits",
                                "cka_mean", "firing_rate"}
  assert 0.0 < goose.spike_density(rep) < 1.0
  dense, dp, *_ = _models(spike="none")
  with pytest.raises(errors.ConfigError, match="spiking student"):
    goose.spike_validation(dense, dp, (teacher, tp), batches)


def test_packed_bytes_count_matches_pack_ternary():
  codes = jnp.asarray(np.random.default_rng(0).integers(-1, 2, (3, 5, 40)), jnp.int8)
  counted = goose.packed_bytes(codes.shape)
  packed = ops.pack_ternary(codes.reshape(-1, 40), jnp.uint32)
  assert counted == {"float32": codes.size * 4, "packed_uint32": int(packed.nbytes)}
  assert counted["packed_uint32"] == 15 * math.ceil(40 / 16) * 4
