"""Overlays the curves of several runs in one PNG (e.g. float32 against bfloat16).

  python -m train.compare --runs=float32=runs/a,bfloat16=runs/b \
      --metrics=train:loss,eval:accuracy --out=results/compare.png

Each run is NAME=WORKDIR of a train.main run; each metric SPLIT:NAME of its
metrics.jsonl (split train or eval). One panel per metric, one line per run. Prints
each run's last value of each metric.
"""

import os
import sys

from absl import app
from absl import flags

from ponder import errors
from ponder import metric_log

_RUNS = flags.DEFINE_list("runs", None, "NAME=WORKDIR of each run, comma separated.")
_METRICS = flags.DEFINE_list("metrics", ["train:loss"], "SPLIT:NAME of each panel.")
_OUT = flags.DEFINE_string("out", None, "The PNG to write.")
_TITLE = flags.DEFINE_string("title", "", "Figure title.")
flags.mark_flags_as_required(["runs", "out"])


def parse_pairs(items, sep: str, what: str) -> list:
  """"A<sep>B" items as (A, B) pairs; a missing separator is a ConfigError."""
  pairs = [item.split(sep, 1) for item in items]
  bad = [item for item, pair in zip(items, pairs) if len(pair) != 2 or not all(pair)]
  if bad:
    raise errors.ConfigError(f"{what} must look like A{sep}B; got {bad}")
  return [tuple(pair) for pair in pairs]


def compare(runs: list, metrics: list, out: str, title: str = "") -> dict:
  """Draws `runs` [(name, workdir)] for `metrics` [(split, name)] into `out`; returns
  {run: {"split:name": last value}}."""
  from ponder.analysis import plots  # pylint: disable=g-import-not-at-top
  rows = {}
  for name, workdir in runs:
    rows[name] = metric_log.read_metrics(workdir)
    if not rows[name]:
      raise errors.MissingDataError(f"{workdir} has no metrics.jsonl rows: is it a train.main "
                             "--workdir?")
  drawn = plots.compare_runs(rows, out, metrics=metrics, title=title)
  missing = [m for m in metrics if m not in drawn]
  if missing:
    raise errors.ConfigError(f"no run logged {missing}; metrics are SPLIT:NAME of "
                             "metrics.jsonl (e.g. train:loss, eval:accuracy)")
  last = {}
  for name, run_rows in rows.items():
    last[name] = {}
    for split, metric in metrics:
      values = [r[metric] for r in run_rows if r.get("split") == split and metric in r]
      last[name][f"{split}:{metric}"] = values[-1] if values else None
  return last


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    runs = parse_pairs(_RUNS.value, "=", "--runs")
    metrics = parse_pairs(_METRICS.value, ":", "--metrics")
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    last = compare(runs, metrics, _OUT.value, _TITLE.value)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for name, values in last.items():
    print(name, " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in values.items()))
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
