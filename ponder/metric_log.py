"""Metrics to JSONL and TensorBoard (tensorboardX: no TensorFlow), and a progress bar."""

import json
import math
import os
import sys
import time
from typing import Mapping, Optional

import jax
import numpy as np
import tqdm


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """Appends `{"step", "split", "time", **metrics}` lines to `<workdir>/metrics.jsonl`
  and writes the same scalars as TensorBoard events under `<workdir>/tb/`.

  Only process 0 writes, so a multi-host run has one log.

  `purge_step` (a resumed run: the restored step + 1) hides TensorBoard events written
  at or after it by the run that was lost, as `truncate_metrics` drops its JSONL rows.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               purge_step: Optional[int] = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # Lazy: heavy import, optional in tests.
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30,
                                 purge_step=purge_step)

  def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": time.time()}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: Optional[str] = None) -> list:
  """The JSONL rows of a run (optionally one split), in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops the rows logged after `step` (a run resumed from checkpoint `step` repeats
  those steps), so the log holds each step once. Returns how many rows were dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = read_metrics(workdir)
  keep = [r for r in rows if r["step"] <= step]
  if len(keep) < len(rows) and jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)  # Atomic: a crash here leaves the old or the new file whole.
  return len(rows) - len(keep)


def progress(total: int, initial: int = 0, desc: str = "train") -> tqdm.tqdm:
  """A step progress bar with rate and ETA (quiet on processes other than 0)."""
  interactive = sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                   dynamic_ncols=True, smoothing=0.1,
                   mininterval=0.2 if interactive else 10.0,
                   disable=jax.process_index() != 0)


def format_metrics(metrics: Mapping[str, float]) -> str:
  parts = []
  for k, v in metrics.items():
    v = _scalar(v)
    if isinstance(v, float) and math.isfinite(v):
      parts.append(f"{k}={v:.4g}")
    else:
      parts.append(f"{k}={v}")
  return " ".join(parts)
