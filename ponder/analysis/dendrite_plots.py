"""The PerforatedAI picture of a dendrite run, from the tracker's history.

Two panels in one figure, DIR/dendrites.png: the validation score at every evaluation with
a vertical line where dendrites were added (solid: the cycle improved, dashed: a retry
with a fresh dendrite), and the best score of each architecture (dendrite count) against
its parameter count, which is the trade-off the package's graphs are read for.
"""

import math
import os
from typing import Mapping, Sequence


def best_per_architecture(history: Sequence[Mapping], *, maximize: bool = True) -> list:
  """[(num_dendrites, params, best score)] in order of dendrite count.

  history: one row per evaluation with "score", "num_dendrites" (of the params that were
  evaluated) and "params" (their count).
  """
  best = {}
  for row in history:
    k, score = int(row["num_dendrites"]), float(row["score"])
    if not math.isfinite(score):
      continue
    old = best.get(k)
    if old is None or (score > old[1] if maximize else score < old[1]):
      best[k] = (int(row["params"]), score)
  return [(k, p, s) for k, (p, s) in sorted(best.items())]


def dendrite_history(history: Sequence[Mapping], out_dir: str, *, maximize: bool = True,
                     title: str = "") -> str:
  """Writes out_dir/dendrites.png and returns its path.

  history: one row per evaluation, in order: {"score": float, "num_dendrites": int,
  "step": int (optional: the x axis is then the training step),
  "params": int, "action": "continue" | "restructure" | "retry" | "complete"} (the
  tracker's Decision.action after that evaluation; "action" may be left out).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Files only: no display on a training machine.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "dendrites.png")
  fig, (ax_score, ax_arch) = plt.subplots(1, 2, figsize=(11, 4))
  # Training steps where every row has one (the trainer's history), else evaluations.
  by_step = all("step" in r for r in history)
  xs = [r["step"] if by_step else i for i, r in enumerate(history)]
  ax_score.plot(xs, [float(r["score"]) for r in history], marker="o", ms=3, lw=1.2,
                label="validation")
  added = False
  for x, row in zip(xs, history):
    action = row.get("action", "continue")
    if action in ("restructure", "retry"):
      ax_score.axvline(x if by_step else x + 0.5,
                       color="tab:red" if action == "restructure" else "tab:gray",
                       ls="-" if action == "restructure" else "--", lw=1,
                       label=None if added else "dendrite added")
      added = True
  ax_score.set_xlabel("training step" if by_step else "evaluation")
  ax_score.set_ylabel("validation score")
  ax_score.set_title("score per evaluation")
  ax_score.grid(alpha=0.3)
  ax_score.legend(fontsize="small")

  arch = best_per_architecture(history, maximize=maximize)
  if arch:
    ks, params, scores = zip(*arch)
    ax_arch.plot(params, scores, marker="s", lw=1.2)
    for k, p, s in arch:
      ax_arch.annotate(f"{k} dendrite{'s' if k != 1 else ''}", (p, s), fontsize="small",
                       textcoords="offset points", xytext=(4, 4))
  ax_arch.set_xlabel("parameters")
  ax_arch.set_ylabel("best validation score")
  ax_arch.set_title("best score per architecture")
  ax_arch.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
