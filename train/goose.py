"""ASNN-Goose: an RWKV student (dense or spiking, `models/rwkv.py`) distilled from a frozen
GPT-2 teacher on a language-modelling corpus, and the phase policy of its training.

The task (`build_task`, registered in `train/tasks.py` as "lm_distillation"):

  loss = kd_weight * T^2 KL(softmax(z_t / T) || softmax(z_s / T))      (Hinton et al. 2015)
       + ce_weight * CE(z_s, next token)
       + fdd_weight * mean_l (1 - CKA(h^s_{l+1} - h^s_l, h^t_{m(l)+1} - h^t_{m(l)}))

`distill.mode` "ce" trains on the labels alone (no teacher), "kd" at the fixed
`distill.temperature`, "ctkd" with CTKD's learnable global temperature (Li et al. 2023,
Sec. 3.2-3.3): T = T_min + (T_max - T_min) sigmoid(raw), `raw` a parameter of the run
(params["ctkd"]["raw"], trained by the same optimizer) reached through the gradient
reversal layer (`ponder.losses.ctkd_temperature`), so the student descends the KD loss
while T ascends it, scaled by lambda (`ctkd_lambda`):

  "cosine" (the official schedule): lambda = lambda_max (1 - cos(pi min(e, E) / E)) / 2,
           e the epoch (steps / steps per pass over the training tokens), E = lambda_epochs;
  "late"   (the seed's v12.1-v14 runs): lambda = 0 for the first lambda_warmup_ratio of
           training, then the same half-cosine from 0 to lambda_max over the rest.

FDD (feature-dynamics distillation) aligns each student block's residual update with
that of the teacher block at the same relative depth (`ponder.losses.default_layer_map`)
by linear CKA, which is blind to the rotation and scale of either feature space, so
the widths may differ. GPT-2's last hidden state is after its final LayerNorm (the
Hugging Face order), so its last "update" includes ln_f.

The phase policy `GoosePolicy` (train/phases.py's interface; `policy.name = "goose"`)
switches FDD on after `policy.fdd_warmup_steps`, kills it for good when validation
perplexity gets worse than the best so far by more than `policy.fdd_kill_threshold`
(a fraction), and stops training when validation perplexity has not improved by
`policy.min_delta` (a fraction) for `policy.patience_steps` steps; the trainer keeps the
best validation checkpoint. The FDD weight is the only thing the phases change
(`configure` sets `distill.fdd_weight` to 0 outside the "fdd" phase, so a run without
FDD does not even compute the teacher's hidden states).

The teacher is a `train.main` workdir of `configs/gpt2_lm.py` (`distill.teacher_workdir`;
loaded for training only: evaluating a student needs only its own workdir), or, for the
smoke configs, a tiny random GPT-2 built in-process (`distill.random_teacher`). The
student shares the teacher's tokenizer.

`spike_validation` runs `ponder.analysis.spikes.spike_report` for a spiking student
against a teacher (`python -m train.evaluate --workdir=W --spikes`).
"""

import functools
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import gpt2
from models import rwkv
from ponder import errors
from ponder import lm
from ponder import losses
from ponder.analysis import spikes as spikes_lib
from ponder.data import text
from train import phases
from train import tasks as tasks_lib

MODES = ("ce", "kd", "ctkd")
LAMBDA_RAMPS = ("cosine", "late")
RWKV_FIELDS = ("n_layer", "n_embd", "dim_att", "dim_ffn", "wkv", "wkv_chunk", "spike",
               "spike_sites", "spike_matmul", "spike_alpha_init", "spike_theta_init",
               "spike_slope", "lif_tau", "lif_threshold", "lif_surrogate_alpha")


# --- Schedules and the loss --------------------------------------------------------------


def ctkd_lambda(step, *, ramp: str, lambda_max: float, steps_per_epoch: float,
                lambda_epochs: float, warmup_ratio: float, total_steps: int):
  """The GRL strength at `step` (module docstring: "cosine" or "late")."""
  if ramp == "cosine":
    return losses.cosine_lambda(jnp.asarray(step, jnp.float32) / steps_per_epoch,
                                lambda_epochs, lambda_max)
  if ramp == "late":
    progress = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    ramp_part = jnp.clip((progress - warmup_ratio) / max(1.0 - warmup_ratio, 1e-9), 0.0, 1.0)
    return lambda_max * (1.0 - jnp.cos(jnp.pi * ramp_part)) / 2.0
  raise errors.unknown_key("distill.lambda_ramp", ramp, LAMBDA_RAMPS)


def temperature(params, lambda_, distill: ml_collections.ConfigDict):
  """The KD temperature: CTKD's learnable one (through the GRL) or the fixed one."""
  if distill.mode == "ctkd":
    return losses.ctkd_temperature(params["ctkd"]["raw"], lambda_, t_min=distill.t_min,
                                   t_max=distill.t_max)
  return jnp.float32(distill.temperature)


def distill_loss(params, batch, key, *, step, train: bool, student: rwkv.RWKV,
                 teacher: Optional[tuple], distill: ml_collections.ConfigDict,
                 lambda_fn: Callable):
  """The loss of the module docstring on (seq_len + 1)-token windows.

  teacher: (GPT-2 module, its params), frozen; None where the mode needs none.
  Metrics: ce, and with a teacher kd, temperature, lambda; fdd when its weight is
  nonzero; spike_rate (the mean fraction of nonzero spikes over the spiking sites).
  """
  del key, train  # RWKV-4 has no dropout; the teacher runs in eval mode.
  tokens = batch["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  use_fdd = distill.mode != "ce" and distill.fdd_weight > 0
  out, inter = student.apply({"params": params["student"]}, inputs,
                             output_hidden_states=use_fdd, mutable=["intermediates"])
  logits, aux = out if use_fdd else (out, {})
  ce = losses.cross_entropy(logits, targets)
  metrics = {"ce": ce}
  rates = jax.tree.leaves(inter.get("intermediates", {}))
  if rates:
    metrics["spike_rate"] = jnp.mean(jnp.stack(rates))
  if distill.mode == "ce":
    return ce, metrics
  if teacher is None:
    raise errors.ConfigError(
        f"distill.mode={distill.mode!r} needs a teacher, which is loaded for training "
        "only: set distill.teacher_workdir (or distill.random_teacher for smoke runs).")
  t_model, t_params = teacher
  t_out = t_model.apply({"params": t_params}, inputs, train=False,
                        output_hidden_states=use_fdd)
  t_logits, t_aux = t_out if use_fdd else (t_out, {})
  lam = lambda_fn(step)
  t = temperature(params, lam, distill)
  kd = losses.kd_loss(logits, jax.lax.stop_gradient(t_logits), t)
  loss = distill.kd_weight * kd + distill.ce_weight * ce
  metrics.update(kd=kd, temperature=t, **{"lambda": lam})
  if use_fdd:
    fdd = losses.fdd_cka_loss(aux["hidden_states"],
                              jax.lax.stop_gradient(t_aux["hidden_states"]))
    loss = loss + distill.fdd_weight * fdd
    metrics["fdd"] = fdd
  return loss, metrics


def distill_eval(params, batch, *, student: rwkv.RWKV):
  """Summed NLL of the student (the teacher is not needed to score it)."""
  logits = student.apply({"params": params["student"]}, batch["tokens"][:, :-1])
  return lm.nll_sums(logits, batch["tokens"][:, 1:], batch["mask"])


# --- Models ------------------------------------------------------------------------------


def build_student(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> rwkv.RWKV:
  """models/rwkv.py's RWKV from the config's model block."""
  if model_cfg.name != "rwkv":
    raise errors.unknown_key("student model", model_cfg.name, ("rwkv",))
  fields = {k: model_cfg[k] for k in RWKV_FIELDS if k in model_cfg}
  fields = {k: (v or None) if k in ("dim_att", "dim_ffn") else v for k, v in fields.items()}
  return rwkv.RWKV(rwkv.config(model_cfg.preset, vocab_size=vocab_size, **fields),
                   dtype=jnp.dtype(model_cfg.dtype))


def how_to_train_teacher(cfg: ml_collections.ConfigDict) -> str:
  return ("python -m train.main --config=configs/gpt2_lm.py:wikitext2 "
          f"--workdir={cfg.distill.teacher_workdir} --config.data.source={cfg.data.source}")


def load_teacher(workdir: str) -> tuple:
  """(GPT-2 module, params) of the newest checkpoint of a language-model workdir."""
  from train import trainer  # pylint: disable=g-import-not-at-top  (trainer imports tasks)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise errors.MissingDataError(
        f"the teacher run {workdir} does not exist (no config.json there); train it with "
        "python -m train.main --config=configs/gpt2_lm.py:wikitext2 "
        f"--workdir={workdir} --config.data.source=local:DIR.")
  cfg, task, params, _, _ = trainer.restore_run(workdir)
  if not isinstance(task.model, gpt2.GPT2):
    raise errors.ConfigError(f"the teacher {workdir} is a {type(task.model).__name__}; "
                             "ASNN-Goose distils from a GPT-2 (configs/gpt2_lm.py) run.")
  return task.model, params, cfg


def random_teacher(block: ml_collections.ConfigDict, vocab_size: int, seq_len: int,
                   key) -> tuple:
  """A tiny randomly initialised GPT-2 (smoke configs: no trained run needed)."""
  cfg = gpt2.config("mini", vocab_size=vocab_size, n_layer=block.n_layer,
                    n_embd=block.n_embd, n_head=block.n_head, n_positions=max(seq_len, 8))
  model = gpt2.GPT2(cfg)
  return model, model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]


def _teacher(cfg, vocab_size: int, trained: bool) -> Optional[tuple]:
  d = cfg.distill
  if d.mode == "ce":
    return None
  if d.random_teacher.enabled:
    return random_teacher(d.random_teacher, vocab_size, cfg.data.seq_len,
                          jax.random.fold_in(jax.random.key(cfg.seed), 1))
  if not trained:
    return None
  model, params, t_cfg = load_teacher(d.teacher_workdir)
  if model.config.vocab_size != vocab_size or t_cfg.data.tokenizer != cfg.data.tokenizer:
    raise errors.ConfigError(
        f"the teacher {d.teacher_workdir} uses tokenizer {t_cfg.data.tokenizer!r} with "
        f"{model.config.vocab_size} ids, the student {cfg.data.tokenizer!r} with "
        f"{vocab_size}: the student must share the teacher's tokenizer.")
  return model, params


# --- Task --------------------------------------------------------------------------------


def build_task(cfg: ml_collections.ConfigDict, mesh, teacher: Optional[Any] = None):
  """The "lm_distillation" task. `teacher` is the trainer's signal that this build trains
  (it loads the teacher run for training only); the GPT-2 itself is then restored
  from `distill.teacher_workdir` with its hidden states (`load_teacher`)."""
  del mesh
  d = cfg.distill
  if d.mode not in MODES:
    raise errors.unknown_key("distill.mode", d.mode, MODES)
  if d.lambda_ramp not in LAMBDA_RAMPS:
    raise errors.unknown_key("distill.lambda_ramp", d.lambda_ramp, LAMBDA_RAMPS)
  tasks_lib.check_text_source(cfg.data.source)
  tok = tasks_lib.build_tokenizer(cfg.data)
  cache = tasks_lib.lm_cache_dir(cfg.data)
  train_tokens = text.split_tokens(cfg.data.source, "train", tok, cache_dir=cache)
  eval_tokens = text.split_tokens(cfg.data.source, cfg.data.eval_split, tok, cache_dir=cache)
  student = build_student(cfg.model, tok.vocab_size)
  t = _teacher(cfg, tok.vocab_size, trained=teacher is not None)
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len
  lambda_fn = functools.partial(
      ctkd_lambda, ramp=d.lambda_ramp, lambda_max=d.lambda_max,
      steps_per_epoch=max(len(train_tokens) / (bs * seq), 1e-9),
      lambda_epochs=d.lambda_epochs, warmup_ratio=d.lambda_warmup_ratio,
      total_steps=cfg.trainer.total_steps)

  def init(key):
    params = {"student": student.init(key, jnp.zeros((1, seq), jnp.int32))["params"]}
    if d.mode == "ctkd":
      params["ctkd"] = {"raw": losses.ctkd_raw_init(d.temperature, t_min=d.t_min,
                                                    t_max=d.t_max)}
    return params

  return tasks_lib.Task(
      model=student, init=init,
      train_batch=lambda step: text.lm_train_batch(train_tokens, seed=cfg.seed, step=step,
                                                   batch_size=bs, seq_len=seq),
      eval_batches=functools.partial(text.lm_eval_batches, eval_tokens, batch_size=bs,
                                     seq_len=seq, stride=cfg.data.eval_stride or None),
      loss_fn=functools.partial(distill_loss, student=student, teacher=t, distill=d,
                                lambda_fn=lambda_fn),
      eval_fn=functools.partial(distill_eval, student=student),
      summarize=lm.summarize, select=("nll", "min"))


# --- Phase policy ------------------------------------------------------------------------


class GoosePolicy(phases.Policy):
  """FDD after a warm-up, its kill switch, and early stopping (module docstring).

  State: phase ("warmup" | "fdd" | "fdd_killed" | "no_fdd"), best_ppl (None before the
  first evaluation), best_step, history of (step, perplexity, phase).
  """

  def __init__(self, cfg):
    super().__init__(cfg)
    p = cfg.policy
    self.fdd_weight = float(cfg.distill.fdd_weight) if cfg.distill.mode != "ce" else 0.0
    self.fdd_warmup_steps = int(p.fdd_warmup_steps)
    self.kill = float(p.fdd_kill_threshold)
    self.patience = int(p.patience_steps)
    self.min_delta = float(p.min_delta)
    if self.patience <= 0 or self.kill <= 0 or self.min_delta < 0:
      raise errors.ConfigError(
          f"policy.patience_steps ({self.patience}) and policy.fdd_kill_threshold "
          f"({self.kill}) must be > 0 and policy.min_delta ({self.min_delta}) >= 0.")

  def init(self, cfg):
    return {"phase": "warmup" if self.fdd_weight > 0 else "no_fdd", "best_ppl": None,
            "best_step": 0, "history": []}

  def configure(self, cfg, state):
    cfg = phases.copy_config(cfg)
    cfg.distill.fdd_weight = self.fdd_weight if state["phase"] == "fdd" else 0.0
    return cfg

  def on_eval(self, ctx):
    state = dict(ctx.state)
    ppl, best = float(ctx.val["perplexity"]), state["best_ppl"]
    phase = state["phase"]
    if phase == "fdd" and best is not None and ppl > best * (1.0 + self.kill):
      phase = "fdd_killed"  # For good: the seed's kill switch does not re-arm.
    elif phase == "warmup" and ctx.step >= self.fdd_warmup_steps:
      phase = "fdd"
    if best is None or ppl < best * (1.0 - self.min_delta):
      state.update(best_ppl=ppl, best_step=int(ctx.step))
    stop = ctx.step - state["best_step"] >= self.patience
    state.update(phase=phase, history=state["history"] + [[int(ctx.step), ppl, phase]])
    name = phase if phase != ctx.state["phase"] else ("early_stop" if stop else "")
    return phases.Change(state, reset_optimizer=False, stop=stop, phase=name)


# --- Spike validation --------------------------------------------------------------------


def teacher_layer_map(student_layers: int, teacher_layers: int) -> dict:
  """Student block i -> teacher hidden state round(i L_t / L_s): the spikes of block i
  are functions of that block's input h_i, so they are paired with the input of the
  teacher block at the same relative depth (state 0 = the embeddings)."""
  return {i: int(round(i * teacher_layers / student_layers)) for i in range(student_layers)}


def spike_validation(student: rwkv.RWKV, params, teacher: tuple, batches, *,
                     max_batches: Optional[int] = None, seed: int = 0,
                     mi_tokens: int = 4096) -> dict:
  """`spikes_lib.spike_report` of a spiking student (params: the student's tree) against
  a GPT-2 (module, params) on LM eval batches; padding tokens (mask 0) are left out."""
  if student.config.spike == "none":
    raise errors.ConfigError("the spike report needs a spiking student (model.spike = "
                             "'ternary' or 'lif'); this one is dense.")
  t_model, t_params = teacher
  collect = spikes_lib.spiking_apply(student, params)
  hidden = jax.jit(lambda p, x: t_model.apply({"params": p}, x, train=False,
                                              output_hidden_states=True)[1]["hidden_states"])
  keep = lambda batch: np.asarray(batch["mask"], bool).reshape(-1)
  student_fn = lambda b: {k: np.asarray(v).reshape(-1, v.shape[-1])[keep(b)]
                          for k, v in collect(b["tokens"][:, :-1]).items()}
  teacher_fn = lambda b: [np.asarray(h).reshape(-1, h.shape[-1])[keep(b)]
                          for h in hidden(t_params, b["tokens"][:, :-1])]
  layer_map = teacher_layer_map(student.config.n_layer, t_model.config.n_layer)
  return spikes_lib.spike_report(student_fn, teacher_fn, batches, layer_map=layer_map,
                                 max_batches=max_batches, seed=seed, mi_tokens=mi_tokens)


def report_teacher(cfg: ml_collections.ConfigDict, teacher_workdir: str = "") -> tuple:
  """The (GPT-2, params) a run's spikes are validated against: `teacher_workdir`, else
  the run's own distillation teacher (its workdir, or its in-process random one)."""
  d = cfg.distill
  workdir = teacher_workdir or d.teacher_workdir
  if workdir:
    return load_teacher(workdir)[:2]
  if d.random_teacher.enabled:
    tok = tasks_lib.build_tokenizer(cfg.data)
    return random_teacher(d.random_teacher, tok.vocab_size, cfg.data.seq_len,
                          jax.random.fold_in(jax.random.key(cfg.seed), 1))
  raise errors.ConfigError(
      "this run has no teacher (distill.mode='ce'): give the GPT-2 run to compare the "
      "spikes with, --teacher_workdir=DIR.")


def spike_density(report: dict) -> float:
  """Fraction of nonzero spikes over all spiking channels (the report's overall rate)."""
  return float(report["health"]["overall"]["rate"])


def packed_bytes(codes_shape: tuple) -> dict:
  """Bytes of spikes [..., K] as float32 and as 2-bit codes packed 16 to a uint32 word
  (`ponder.ops.pack_ternary`'s layout: ceil(K / 16) words per row)."""
  rows = int(np.prod(codes_shape[:-1]))
  k = int(codes_shape[-1])
  return {"float32": rows * k * 4, "packed_uint32": rows * math.ceil(k / 16) * 4}
