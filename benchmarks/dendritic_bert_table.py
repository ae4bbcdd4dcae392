"""The DendriticBERT table: MiniLM fine-tuned with and without PerforatedAI dendrites, and
the DAN ("DSN") with and without dendrites against its parameter-matched wide twin.

  python -m benchmarks.dendritic_bert_table --out=results/dendritic_bert/table.json
  python -m benchmarks.dendritic_bert_table --budget=short --out=/tmp/dbt/table.json

1. Trains every row's runs with configs/dendritic_bert.py presets on SST-2 (`--data`,
   default local:../shared/data/sst-2): validation is the 5% carve of train.tsv, dev is
   scored once at the end. Runs live in --workdir/<budget>/<row>_s<seed>: a finished run
   is reused, an interrupted one resumes (rerun the same command), so the table can be
   built over several sittings; `--rows` builds a subset.
2. The wide twin (`dsn_wide`) is matched to the dendrite count of the GD tracker's seed-0
   run (its selected params), so it is trained after that run; runs go seed by seed.
3. For every row: dev accuracy (mean, spread = population std over seeds, and each seed),
   validation accuracy, dendrites added per wrapped layer (from the selected params),
   parameters (total / embedding / non-embedding), compiled FLOPs per example at 64
   tokens, training time (wall seconds of the runs, from their metrics logs), and CPU
   latency at batch 1 and throughput at batch 256 at 64 tokens, every row's model
   interleaved in one measurement so load slows all alike.
4. Writes the JSON with the goals (`check_goals`) and a
   dendrites.png per tracker run (in the run's workdir; `--pictures` copies each tracker
   row's first seed's next to --out).

Budgets: full = the presets (MiniLM 1,100 steps, 1 seed per MiniLM row unless
`--minilm_seeds=N`: 12-25 min each on 2 quiet cores; DAN rows 2,000 steps x 3 seeds:
minutes each); short = 300 DAN steps
(evaluations every 50, the fixed switch every 2nd), MiniLM rows 60 steps
(evaluations every 20 on a 1% validation carve), 1 seed; smoke = the configs' smoke
settings (tests).
"""

import collections
import dataclasses
import json
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import dendritic_bert
from ponder import analysis
from ponder.analysis import params as params_lib
from ponder.nn import perforated
from train import cli
from train import trainer

SEQ_LEN = 64  # tokens of the FLOPs and timing inputs (SST-2's longest buckets are 48-64)
BATCH = 256  # the throughput batch


@dataclasses.dataclass(frozen=True)
class Budget:
  dan_seeds: int
  minilm_seeds: int
  dan_steps: int = 0  # 0 = the preset's
  minilm_steps: int = 0
  overrides: tuple = ()  # (config key, value) for every run
  minilm_overrides: tuple = ()
  runs: int = 5  # timed rounds of the interleaved measurement
  smoke: bool = False


BUDGETS = {
    "full": Budget(dan_seeds=3, minilm_seeds=1),
    "short": Budget(dan_seeds=1, minilm_seeds=1, dan_steps=300, minilm_steps=60,
                    # The fixed switch every 2nd evaluation, so dendrites train before
                    # the end (the presets' 5th and 3rd would switch at the last step).
                    overrides=(("trainer.eval_every", 50), ("policy.n_epochs_to_switch", 2),
                               ("policy.fixed_switch_num", 2),
                               ("policy.candidate_steps", 50)),
                    minilm_overrides=(("trainer.eval_every", 20),
                                      ("data.valid_fraction", 0.01),
                                      ("policy.candidate_steps", 20)), runs=3),
    "smoke": Budget(dan_seeds=1, minilm_seeds=1, runs=1, smoke=True),
}
# Row -> preset; the order they are trained in (dsn_wide after the GD runs it matches).
ROWS = {"dsn": "dsn", "dsn_gd": "dsn_gd", "dsn_cc": "dsn_cc", "dsn_wide": "dsn_wide",
        "minilm": "minilm", "minilm_gd": "minilm_gd", "minilm_cc": "minilm_cc"}


def is_minilm(row: str) -> bool:
  return row.startswith("minilm")


def row_config(row: str, budget: Budget, seed: int, data: str, match_k: int = 1):
  """The config of one run of `row` at `budget`."""
  steps = budget.minilm_steps if is_minilm(row) else budget.dan_steps
  arg = ROWS[row] + (f",steps={steps}" if steps else "") + (",smoke" if budget.smoke else "")
  if row == "dsn_wide":
    arg += f",match_k={match_k}"
  cfg = dendritic_bert.get_config(arg)
  cfg.seed = seed
  if not budget.smoke:
    cfg.data.source = data
  for key, value in budget.overrides + (budget.minilm_overrides if is_minilm(row) else ()):
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def seeds(row: str, budget: Budget) -> range:
  return range(budget.minilm_seeds if is_minilm(row) else budget.dan_seeds)


def train_seconds(workdir: str) -> float:
  """Wall seconds spent in training steps, from metrics.jsonl (each train row's steps
  over its steps/s), so pauses between sittings do not count."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if r["split"] == "train"]
  total, last = 0.0, 0
  for r in train:
    total += (r["step"] - last) / r["steps_per_s"]
    last = r["step"]
  return total


def dendrite_counts(params) -> dict:
  """{layer path: dendrites} of the wrapped layers (empty without dendrites)."""
  return perforated.dendrite_layers(params)


def build_run(row: str, budget: Budget, root: str, data: str, seed: int,
              match_k: int = 1) -> str:
  """Trains (or reuses, or resumes) one run; returns its workdir."""
  cfg = row_config(row, budget, seed, data, match_k)
  workdir = os.path.join(root, f"{row}_s{seed}")
  print(f"== {row} seed {seed}: {cfg.trainer.total_steps} steps in {workdir}", flush=True)
  if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
    common.train(cfg, workdir)
  return workdir


def wide_match(root: str, gd_dir: str) -> int:
  """dsn_wide's dendrite count to match: seed 0's GD run's, fixed once chosen (in
  <root>/dsn_wide_match_k.json) so every seed of dsn_wide has the same width."""
  path = os.path.join(root, "dsn_wide_match_k.json")
  if not os.path.exists(path):
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
      json.dump({"match_k": matched_k([gd_dir]), "from": gd_dir}, f)
  with open(path) as f:
    return int(json.load(f)["match_k"])


def matched_k(gd_dirs: list) -> int:
  """The most common dendrite count of the GD tracker runs' selected params (>= 1)."""
  counts = []
  for d in gd_dirs:
    _, _, params, _, _ = trainer.restore_run(d, selected=True)
    counts.append(max(dendrite_counts(params).values(), default=0))
  k = collections.Counter(counts).most_common(1)[0][0] if counts else 1
  return max(int(k), 1)


def summarize_run(workdir: str) -> tuple:
  """(summary, (model, params)) of one run: dev and validation accuracy, the selected
  params' structure and counts."""
  cfg, task, params, step, _ = trainer.restore_run(workdir, selected=True)
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  cost = params_lib.text_classifier_cost(task.model, params, seq_len=SEQ_LEN)
  return dict(workdir=workdir, seed=int(cfg.seed), dev_accuracy=final["accuracy"],
              val_accuracy=final["val"]["accuracy"], selected_step=step,
              dendrites=dendrite_counts(params), train_s=train_seconds(workdir),
              steps=final["step"], **cost), (task.model, params)


def _spread(xs) -> dict:
  return dict(mean=float(np.mean(xs)), std=float(np.std(xs)), values=[float(x) for x in xs])


def timing(models: dict, runs: int) -> dict:
  """Batch-1 latency and batch-256 throughput at SEQ_LEN tokens of every row's first
  model, interleaved in one measurement."""
  fns, calls = {}, {}
  for name, (model, params) in models.items():
    fn = jax.jit(lambda p, ids, mask, m=model: m.apply({"params": p}, ids, mask, train=False))
    fns[name] = fn
    for batch in (1, BATCH):
      ids = jnp.full((batch, SEQ_LEN), 1000, jnp.int32)
      mask = jnp.ones((batch, SEQ_LEN), jnp.int32)
      calls[f"{name}@{batch}"] = lambda f=fn, p=params, i=ids, m=mask: f(p, i, m)
  timed = analysis.measure_interleaved(calls, warmup=2, runs=runs)
  return {name: dict(latency_ms=1e3 * timed[f"{name}@1"]["median_s"],
                     throughput_per_s=BATCH / timed[f"{name}@{BATCH}"]["median_s"])
          for name in models}


def table(budget_name: str, root: str, data: str, rows=(), minilm_seeds: int = 0) -> dict:
  budget = BUDGETS[budget_name]
  if minilm_seeds:  # more MiniLM seeds than the budget's, in a later sitting
    budget = dataclasses.replace(budget, minilm_seeds=minilm_seeds)
  root = os.path.join(root, budget_name)
  wanted = [r for r in ROWS if not rows or r in rows]
  if any(is_minilm(r) for r in wanted) and not budget.smoke:
    from train import tasks  # pylint: disable=g-import-not-at-top
    tasks.resolve_init_from("minilm")  # a missing package stops here, saying what to do
  # Seed-major: a sitting that stops early leaves whole seeds of the table.
  dirs = {row: [] for row in wanted}
  for seed in range(max(len(seeds(row, budget)) for row in wanted)):
    for row in wanted:
      if seed >= len(seeds(row, budget)):
        continue
      k = 1
      if row == "dsn_wide":
        k = wide_match(root, os.path.join(root, "dsn_gd_s0")) if "dsn_gd" in wanted else 1
      dirs[row].append(build_run(row, budget, root, data, seed, match_k=k))
  out_rows, models = {}, {}
  for row, runs in dirs.items():
    per_seed = []
    for d in runs:
      summary, model = summarize_run(d)
      per_seed.append(summary)
      models.setdefault(row, model)
    first = per_seed[0]
    out_rows[row] = dict(
        preset=ROWS[row], seeds=len(per_seed),
        dev_accuracy=_spread([s["dev_accuracy"] for s in per_seed]),
        val_accuracy=_spread([s["val_accuracy"] for s in per_seed]),
        dendrites_per_layer=[s["dendrites"] for s in per_seed],
        params=dict(total=first["total"], embedding=first["embedding"],
                    non_embedding=first["non_embedding"]),
        params_per_seed=[s["non_embedding"] for s in per_seed],
        flops_per_example=first["flops_per_example"], seq_len=SEQ_LEN,
        train_s=_spread([s["train_s"] for s in per_seed]),
        runs=[dict(workdir=s["workdir"], seed=s["seed"], steps=s["steps"],
                   selected_step=s["selected_step"]) for s in per_seed])
  for row, t in timing(models, budget.runs).items():
    out_rows[row].update(t)
  return dict(budget=budget_name, data=data, rows=out_rows, goals=check_goals(out_rows))


VERDICTS = {True: "met", False: "missed", None: "not tested"}


def _goal(met, detail: str) -> dict:
  return dict(met=met, detail=detail)


def _no_dendrite_added(row: dict) -> bool:
  """True when no seed of a tracker row ever added a dendrite: the tracker never
  switched, so the row trained as its plain model, step for step."""
  per_seed = row.get("dendrites_per_layer")
  return per_seed is not None and not any(per_seed)


def check_goals(rows: dict) -> dict:
  """The issue's goals, each met / missed / None (a row it needs was not built, or a
  dendrite row added no dendrite: then it compared the plain model with itself)."""
  acc = lambda r: rows[r]["dev_accuracy"]  # noqa: E731
  untested = lambda r: _goal(None, f"not tested: {r} added no dendrite in any seed (the "  # noqa: E731
                             "tracker never switched: validation improved at every "
                             "evaluation), so it trained as the plain model")
  out = {}
  dendritic = [r for r in ("dsn_gd", "dsn_cc") if r in rows]
  if dendritic and "minilm" in rows:
    best = max(dendritic, key=lambda r: acc(r)["mean"])
    share = rows[best]["flops_per_example"] / rows["minilm"]["flops_per_example"]
    out["dsn_86_at_1pct_flops"] = _goal(
        acc(best)["mean"] >= 0.86 and share < 0.01,
        f"{best} dev {100 * acc(best)['mean']:.2f}% (>= 86%), {100 * share:.3f}% of "
        "MiniLM's FLOPs per example (< 1%)")
  for r in dendritic:
    if "dsn_wide" in rows and _no_dendrite_added(rows[r]):
      out[f"{r}_beats_wide"] = untested(r)
    elif "dsn_wide" in rows:
      margin = acc(r)["mean"] - acc("dsn_wide")["mean"]
      spread = max(acc(r)["std"], acc("dsn_wide")["std"])
      out[f"{r}_beats_wide"] = _goal(
          margin > spread, f"{r} - dsn_wide = {100 * margin:+.2f} points against a seed "
          f"spread of {100 * spread:.2f} ({rows[r]['seeds']} and {rows['dsn_wide']['seeds']} "
          "seeds)")
  for r in ("minilm_gd", "minilm_cc"):
    if r in rows and "minilm" in rows and _no_dendrite_added(rows[r]):
      out[f"{r}_at_least_minilm"] = untested(r)
    elif r in rows and "minilm" in rows:
      out[f"{r}_at_least_minilm"] = _goal(
          acc(r)["mean"] >= acc("minilm")["mean"],
          f"{r} {100 * acc(r)['mean']:.2f}% vs minilm {100 * acc('minilm')['mean']:.2f}%")
  return out


def copy_pictures(result: dict, out_dir: str) -> list:
  """Every tracker row's first-seed dendrites.png next to the table, as
  <row>_dendrites.png; returns their file names."""
  copied = []
  for row, r in result["rows"].items():
    src = os.path.join(r["runs"][0]["workdir"], "dendrites.png")
    if row.endswith(("_gd", "_cc")) and os.path.exists(src):
      dst = os.path.join(out_dir, f"{row}_dendrites.png")
      shutil.copyfile(src, dst)
      copied.append(os.path.basename(dst))  # beside the JSON: no machine's paths
  return copied


def define_flags() -> None:
  """The command line's flags (defined only when run as a program, so tests can import
  this module beside other benchmarks)."""
  flags.DEFINE_string("out", "results/dendritic_bert/table.json",
                      "JSON file; pictures beside it.")
  flags.DEFINE_string("workdir", "runs/dendritic_bert_table", "Where runs live.")
  flags.DEFINE_enum("budget", "full", ["full", "short", "smoke"],
                    "full (hours, resumable), short (minutes), smoke (tests).")
  flags.DEFINE_string("data", "local:../shared/data/sst-2",
                      "data.source of every run (local:DIR or tfds:glue/sst2).")
  flags.DEFINE_list("rows", [], "Rows to build ('' = all of the budget's).")
  flags.DEFINE_integer("minilm_seeds", 0, "Seeds of each MiniLM row (0 = the budget's; "
                       "finished seeds are reused, so a rerun with more adds seeds).")
  flags.DEFINE_bool("pictures", True, "Copy each tracker row's dendrites.png next to --out.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
  f = flags.FLAGS
  cli.reuse_memory(True)
  start = time.perf_counter()
  machine = common.machine()
  result = table(f.budget, f.workdir, f.data, tuple(f.rows), f.minilm_seeds)
  result["machine"] = machine
  common.finish_machine(machine, start)
  out_dir = os.path.dirname(os.path.abspath(f.out))
  os.makedirs(out_dir, exist_ok=True)
  if f.pictures:
    result["pictures"] = copy_pictures(result, out_dir)
  common.write_json(f.out, result)
  for row, r in result["rows"].items():
    acc = r["dev_accuracy"]
    print(f"{row:10s} dev {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f} "
          f"({r['seeds']} seeds)  non-emb {r['params']['non_embedding']:,}  "
          f"{r['flops_per_example'] / 1e6:.2f} MFLOP  {r['latency_ms']:.2f} ms  "
          f"{r['throughput_per_s']:.0f}/s  dendrites {r['dendrites_per_layer'][0] or '-'}")
  for name, g in result["goals"].items():
    print(f"goal {name}: {VERDICTS[g['met']]} ({g['detail']})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
