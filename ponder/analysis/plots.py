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

  `rows` are metrics.jsonl rows (`ponder.metric_log.read_metrics`). Returns the metric
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


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, path: str, title: str) -> None:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pareto(points: Sequence[Mapping], path: str, *, y: str, xs: Sequence[tuple],
           y_label: str = "", title: str = "") -> None:
  """Writes a PNG with one panel per x: `y` against each (x key, axis label) of `xs`.

  `points` are dicts with "label", "group" and the keys; a group's points share a
  marker and are joined in order of x (a front of fixed settings, say), and every point
  is annotated with its label.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4.2), squeeze=False)
  groups = list(dict.fromkeys(p["group"] for p in points))
  markers = "osD^v<>p*h"
  for ax, (x, x_label) in zip(axes.flat, xs):
    for i, group in enumerate(groups):
      members = sorted((p for p in points if p["group"] == group), key=lambda p: p[x])
      ax.plot([p[x] for p in members], [p[y] for p in members], marker=markers[i % 10],
              ms=7, lw=1.0, label=group)
      for p in members:
        ax.annotate(p["label"], (p[x], p[y]), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label or y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  _save(plt, fig, path, title)


def allocation_histogram(fractions: Mapping[str, Mapping[str, Mapping]], path: str, *,
                         title: str = "") -> None:
  """Writes a PNG of grouped bars: per panel (a unit such as "tokens"), the fraction of
  that unit given each number of steps, one bar colour per series.

  `fractions[unit][series][steps]` is a fraction; steps are sorted numerically.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(fractions), figsize=(6.0 * len(fractions), 4.0),
                           squeeze=False)
  for ax, (unit, by_series) in zip(axes.flat, fractions.items()):
    steps = sorted({int(k) for series in by_series.values() for k in series})
    width = 0.8 / max(len(by_series), 1)
    for i, (name, series) in enumerate(by_series.items()):
      ax.bar([j + (i - (len(by_series) - 1) / 2) * width for j in range(len(steps))],
             [series.get(k, series.get(str(k), 0.0)) for k in steps], width, label=name)
    ax.set_xticks(range(len(steps)), [str(k) for k in steps])
    ax.set_xlabel("inner steps k")
    ax.set_ylabel(f"fraction of {unit}")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="x-small")
  _save(plt, fig, path, title)


def line_panels(panels: Mapping[str, Mapping[str, Sequence[float]]], path: str, *,
                x_label: str, y_label: str, title: str = "") -> None:
  """Writes a PNG with one panel per key of `panels`: each series (a list of y values
  at x = 0, 1, ...) as a marked line."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
  for ax, (panel, by_series) in zip(axes.flat, panels.items()):
    for name, ys in by_series.items():
      ax.plot(range(len(ys)), ys, marker="o", ms=4, lw=1.0, label=name)
    ax.set_title(panel, fontsize="medium")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  _save(plt, fig, path, title)


def compare_runs(rows_by_run: Mapping[str, Sequence[Mapping]], path: str, *,
                 metrics: Sequence[tuple], title: str = "") -> list:
  """Writes a PNG with one panel per (split, metric) of `metrics`, one line per run,
  from each run's metrics.jsonl rows. Returns the (split, metric) panels drawn."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.8),
                           squeeze=False)
  drawn = []
  for ax, (split, name) in zip(axes.flat, metrics):
    for run, rows in rows_by_run.items():
      points = [(r["step"], r[name]) for r in rows
                if r.get("split") == split and isinstance(r.get(name), (int, float))
                and math.isfinite(r[name])]
      if points:
        ax.plot(*zip(*points), marker="o" if split == "eval" else None, lw=1.2, label=run)
        drawn.append((split, name))
    if name in _LOG_SCALE:
      ax.set_yscale("log")
    ax.set_title(f"{split} {name}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
  _save(plt, fig, path, title)
  return list(dict.fromkeys(drawn))
