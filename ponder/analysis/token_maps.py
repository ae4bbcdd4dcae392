"""Pictures of token pruning: which patches each stage keeps, where the dendritic gates
see importance, and the accuracy-vs-FLOPs trade-off of the keep ratio.

Token t >= 1 of a ViT is patch t - 1 in row-major order over the (H / patch) x
(W / patch) grid (models/vit.py's `PatchEmbed`); token 0 is the class token and has no
place on the image.
"""

from typing import Mapping, Sequence

import numpy as np

from ponder import errors


def patch_grid(values: np.ndarray, positions: np.ndarray, grid: tuple) -> np.ndarray:
  """Scatters per-token `values` [n] at token `positions` [n] onto a [gh, gw] patch grid
  (NaN where no token is); the class token (position 0) is left out."""
  gh, gw = grid
  out = np.full(gh * gw, np.nan, np.float32)
  values, positions = np.asarray(values), np.asarray(positions)
  patches = positions > 0
  if positions.max(initial=0) > gh * gw:
    raise errors.ShapeError(f"token position {positions.max()} is outside a {gh}x{gw} grid")
  out[positions[patches] - 1] = values[patches]
  return out.reshape(gh, gw)


def _upsample(grid_values: np.ndarray, patch: int) -> np.ndarray:
  return np.kron(grid_values, np.ones((patch, patch), np.float32))


def _show_image(ax, image):
  image = np.asarray(image, np.float32)
  lo, hi = image.min(), image.max()
  image = (image - lo) / max(hi - lo, 1e-6)  # Normalised inputs back to [0, 1] for display.
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
  ax.set_xticks([])
  ax.set_yticks([])


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Files only: no display on a training machine.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _panel_figure(images, patch: int, titles: Sequence[str], overlay, path: str, *,
                  title: str = "", colorbar: str = "") -> None:
  """PNG with a row per image: the image, then one panel per title showing the image
  under `overlay(i, s, grid) -> (values [H, W], imshow kwargs)`."""
  images = np.asarray(images)
  b, h, w = images.shape[:3]
  grid = (h // patch, w // patch)
  plt = _plt()
  cols = 1 + len(titles)
  fig, axes = plt.subplots(b, cols, figsize=(1.8 * cols, 1.8 * b), squeeze=False)
  artist = None
  for i in range(b):
    _show_image(axes[i, 0], images[i])
    for s in range(len(titles)):
      _show_image(axes[i, s + 1], images[i])
      values, kwargs = overlay(i, s, grid)
      artist = axes[i, s + 1].imshow(values, **kwargs)
      if i == 0:
        axes[i, s + 1].set_title(titles[s], fontsize=8)
  axes[0, 0].set_title("input", fontsize=8)
  if colorbar and artist is not None:
    fig.colorbar(artist, ax=axes.ravel().tolist(), shrink=0.6, label=colorbar)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def kept_tokens_figure(images: np.ndarray, kept_positions: Sequence[np.ndarray], patch: int,
                       path: str, *, title: str = "") -> None:
  """PNG: each row an image, then one panel per pruning stage with the dropped patches
  veiled. `kept_positions[s]` is [batch, n_s] (the model's aux["kept_positions"])."""

  def overlay(i, s, grid):
    kept = kept_positions[s][i]
    keep = _upsample(np.nan_to_num(patch_grid(np.ones(len(kept)), kept, grid)), patch)
    # Dropped patches under an opaque dark-red veil; kept ones untouched.
    return np.ma.masked_where(keep > 0, keep), dict(cmap="Reds_r", alpha=0.85, vmin=0, vmax=1)

  titles = [f"stage {s}: {k.shape[1] - 1} kept" for s, k in enumerate(kept_positions)]
  _panel_figure(images, patch, titles, overlay, path, title=title)


def importance_figure(images: np.ndarray, importances: Sequence[np.ndarray],
                      positions: Sequence[np.ndarray], patch: int, path: str, *,
                      labels: Sequence[str] = (), title: str = "") -> None:
  """PNG: each row an image, then a heatmap of the gate importance a_n per stage over the
  patches the stage sees (blank where a token was pruned before it).

  importances[s]: [batch, n_s]; positions[s]: [batch, n_s] token positions of those scores.
  """

  def overlay(i, s, grid):
    heat = _upsample(patch_grid(importances[s][i], positions[s][i], grid), patch)
    return heat, dict(cmap="magma", alpha=0.6, vmin=0.0, vmax=1.0)

  titles = list(labels) or [f"stage {s}" for s in range(len(importances))]
  _panel_figure(images, patch, titles, overlay, path, title=title, colorbar="importance a_n")


def tradeoff_figure(curves: Mapping[str, Sequence[tuple]], path: str, *, xlabel: str,
                    ylabel: str, title: str = "", annotations: Mapping[str, Sequence] = None
                    ) -> None:
  """PNG of y against x per named curve ([(x, y), ...]; one point draws a marker),
  e.g. accuracy against the fraction of the baseline's FLOPs over a keep-ratio sweep;
  `annotations[name]` labels that curve's points (e.g. the keep ratios)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 4.0))
  for name, points in curves.items():
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o", lw=1.5 if len(points) > 1 else 0, label=name)
    for x, y, note in zip(xs, ys, (annotations or {}).get(name, ())):
      ax.annotate(str(note), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
