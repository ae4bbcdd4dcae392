"""The train steps the throughput benchmarks time, built from a few plain arguments so
that a `common.ChildStep` process can build the same step (this module defines no
flags: a spawned child imports it beside the benchmark's own module).

Each `*_step` returns (run, info) from `common.jitted_train_step`; the `*_old_default_step`
builders give ponder's step as it was before issue 21 (float32, every dense layer
`nn.Dense` on 3-D inputs) for a child process that runs with the system allocator.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import gpt2_lm
from configs import vit as vit_config
from ponder import lm
from ponder.nn import dense
from train import tasks

# name -> (configs/vit.py argument, image [height, width, channels], classes).
VIT_PRESETS = {
    "seed": ("cifar10,seed_size", (32, 32, 3), 10),  # The seed document's ViT.
    "digits": ("digits", (8, 8, 1), 10),
}


def vit_setup(name: str, batch_size: int, compute_dtype: str):
  """One preset's config, model, random resident batch, initial parameters and loss."""
  arg, image_shape, num_classes = VIT_PRESETS[name]
  cfg = vit_config.get_config(arg)
  cfg.model.compute_dtype = compute_dtype
  model = tasks.build_model(cfg.model, num_classes=num_classes)
  rng = np.random.default_rng(cfg.seed)
  images = rng.standard_normal((batch_size, *image_shape), np.float32)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.asarray(images[:1]))["params"]
  loss_fn = functools.partial(tasks.classification_loss, model=model,
                              label_smoothing=cfg.label_smoothing)
  return cfg, model, images, labels, params, loss_fn


def vit_step(name: str, batch_size: int, compute_dtype: str):
  """ponder's jitted ViT train step on `vit_setup`'s batch."""
  cfg, _, images, labels, params, loss_fn = vit_setup(name, batch_size, compute_dtype)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  return common.jitted_train_step(loss_fn, cfg, params, batch)


def vit_old_default_step(name: str, batch_size: int):
  """ponder's step as it was before issue 21, for `common.ChildStep` (whose process
  has the system allocator): float32, every dense layer `nn.Dense` on 3-D inputs."""
  dense.Dense = dense.FlaxDense  # This child process only.
  return vit_step(name, batch_size, "float32")


VOCAB = 50257  # GPT-2 BPE.
CE_CHUNK = 512  # Tokens per chunk of the chunked output layer + cross-entropy.


def lm_config(quick: bool):
  """configs/gpt2_lm.py:wikitext2 (the model trained in WORKSPACE.md), dropout off."""
  cfg = gpt2_lm.get_config("wikitext2")
  cfg.model.update(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
  if quick:
    cfg.model.n_layer = 2
    cfg.trainer.batch_size, cfg.data.seq_len = 4, 64
  return cfg


def lm_setup(quick: bool, dtype: str):
  """The benchmark's config, model, random resident batch and initial parameters."""
  cfg = lm_config(quick)
  cfg.model.dtype = dtype
  model = tasks.build_lm_model(cfg, VOCAB)
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(cfg.seed).integers(0, VOCAB, (bs, seq + 1)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.asarray(tokens[:, :-1]))["params"]
  return cfg, model, tokens, params


def chunked_ce_loss(params, batch, key, *, model, train: bool, step=None, total_steps=None,
                    chunk: int = CE_CHUNK):
  """`tasks.lm_loss` for GPT-2 (which reads no step) with the tied output layer and
  cross-entropy taken `chunk` tokens at a time (`lm.tied_token_nll`): the
  [tokens, 50257] logits are never materialised."""
  del step, total_steps
  tokens = batch["tokens"]
  _, aux = model.apply({"params": params}, tokens[:, :-1], train=train,
                       rngs={"dropout": key}, output_hidden_states=True)
  return lm.tied_token_nll(aux["hidden_states"][-1], params["wte"]["embedding"],
                           tokens[:, 1:], chunk=chunk, dtype=model.dtype).mean(), {}


def lm_step(quick: bool, dtype: str, loss=tasks.lm_loss):
  """ponder's jitted GPT-2 train step on `lm_setup`'s batch, with `loss`."""
  cfg, model, tokens, params = lm_setup(quick, dtype)
  return common.jitted_train_step(functools.partial(loss, model=model), cfg, params,
                                  {"tokens": jnp.asarray(tokens)})


def lm_old_default_step(quick: bool):
  """ponder's step as it was before issue 21, for `common.ChildStep` (whose process
  has the system allocator): float32, every dense layer `nn.Dense` on 3-D inputs."""
  dense.Dense = dense.FlaxDense  # This child process only.
  return lm_step(quick, "float32")
