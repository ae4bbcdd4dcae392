"""Pictures of a run: training curves from its metrics rows."""

import math
from typing import Iterable, Mapping, Sequence

# Bookkeeping columns of metrics.jsonl rows that are not curves worth drawing.
_NOT_CURVES = ("step", "split", "time", "steps_per_s", "examples", "tokens", "count")
# Metrics that span orders of magnitude during training.
_LOG_SCALE = ("perplexity",)


def curve_names(rows: Iterable[Mapping]) -> list:
  """The scalar metrics present in `rows`, in first-seen order."""
  names = []
  for row in rows:
    for key, value in row.items():
      if (key not in _NOT_CURVES and key not in names and isinstance(value, (int, float))
          and not isinstance(value, bool)):
        names.append(key)
  return names


def training_curves(rows: Sequence[Mapping], path: str, *, title: str = "") -> list:
  """Writes a PNG with one panel per metric against step, train and eval overlaid.

  `rows` are metrics.jsonl rows (`ponder.logging.read_metrics`). Returns the metric
  names drawn (empty, and no file, when there is nothing to draw).
  """
  names = curve_names(rows)
  if not names:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Files only: no display on a training machine.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = min(3, len(names))
  nrows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    for split, style in (("train", dict(lw=1.0)), ("eval", dict(marker="o", lw=1.5))):
      points = [(r["step"], r[name]) for r in rows
                if r.get("split") == split and isinstance(r.get(name), (int, float))
                and math.isfinite(r[name])]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=split, **style)
    if name in _LOG_SCALE:
      ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return names
