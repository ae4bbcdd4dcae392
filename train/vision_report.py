"""What the evaluation of an image classifier writes beyond test accuracy: accuracy under
the 15 common corruptions (ponder.analysis.robustness), and for the dendritic models the
kept-token masks per pruning stage and the gate importance heatmaps (PNG).

Used by `python -m train.evaluate --workdir=DIR --corruptions=N --pictures` and by
benchmarks/dlvit_table.py.
"""

import os
from typing import Callable, Optional

import jax
import numpy as np

from ponder import errors
from ponder.analysis import robustness
from ponder.analysis import token_maps
from ponder.data import vision


def inference(model) -> Callable:
  """The jitted inference program fn(params, normalised images) -> logits."""
  return jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))


def predictor(model, params, ds: vision.ImageDataset, apply: Optional[Callable] = None
              ) -> Callable:
  """fn(images in [0, 1] [b, H, W, C]) -> logits, normalised as in training; `apply`
  (default `inference(model)`) lets a caller share one compiled program."""
  apply = apply or inference(model)
  return lambda images: apply(params, vision.normalise(ds, images, scale=1.0))


def corruption_provider(ds: vision.ImageDataset, num_examples: int, *, seed: int = 0,
                        source: str = "generated", data_dir: Optional[str] = None):
  """(clean images, labels, provider) over the first `num_examples` test images.

  source "generated" corrupts them with ponder.data.corruptions; "tfds" reads the
  released CIFAR-10-C (CIFAR-10 only; its own 10,000 images, so num_examples is unused).
  """
  if source == "tfds":
    if ds.name != "cifar10":
      raise errors.ConfigError(f"the released corrupted test set exists for cifar10, not {ds.name}")
    return ds.test_images, ds.test_labels, robustness.tfds_cifar10_c(data_dir)
  images, labels = ds.test_images[:num_examples], ds.test_labels[:num_examples]
  return images, labels, robustness.generated(images, labels, seed=seed)


def write_pictures(model, params, ds: vision.ImageDataset, outdir: str, *,
                   num_images: int = 6, prefix: str = "") -> list:
  """Kept-token masks (DendriticLiquid-ViT) and importance heatmaps (both dendritic
  models) of the first `num_images` test images, as PNGs in `outdir`; returns the paths
  (none for a model without gates)."""
  if not hasattr(model, "num_branches"):  # No dendritic gates: nothing to draw.
    return []
  images = vision.normalise(ds, ds.test_images[:num_images])
  _, aux = model.apply({"params": params}, images, train=False, return_aux=True)
  os.makedirs(outdir, exist_ok=True)
  aux = jax.device_get(aux)
  n = images.shape[1] // model.patch * (images.shape[2] // model.patch) + 1
  everything = np.broadcast_to(np.arange(n), (num_images, n))
  kept = aux["kept_positions"]
  # Stage s scores the tokens that entered it: all of them, then those stage s-1 kept.
  positions = [everything] + kept[:-1] if kept else [everything] * len(aux["importance"])
  paths = []
  heat = os.path.join(outdir, f"{prefix}importance.png")
  labels = ([f"stage {s}" for s in range(len(kept))] if kept else
            [f"block {l}" for l in range(len(aux["importance"]))])
  token_maps.importance_figure(ds.test_images[:num_images], aux["importance"], positions,
                               model.patch, heat, labels=labels,
                               title=f"{type(model).__name__}: dendritic importance a_n")
  paths.append(heat)
  if kept:
    masks = os.path.join(outdir, f"{prefix}kept_tokens.png")
    token_maps.kept_tokens_figure(ds.test_images[:num_images], kept, model.patch, masks,
                                  title=f"kept tokens, keep ratio {model.keep_ratio}")
    paths.append(masks)
  return paths
