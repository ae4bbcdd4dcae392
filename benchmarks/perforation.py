"""Learned attention perforation (issue 20): quality against density, learned against the
fixed baselines, and what the block mask saves in compiled FLOPs and CPU time.

  python -m benchmarks.perforation --out=DIR [--budget=short|full]
      [--wikitext=../shared/data/wikitext-2-valsplit] [--sst2=../shared/data/sst-2]
      [--skip_speed | --skip_quality] [--seeds=0,1] [--only=mlm_dense,mlm_perforated_50]
      [--reuse=results/perforation/perforation_full.json]

Writes DIR/perforation.json, DIR/sparsity_sweep.png, DIR/masks.png and
DIR/sst2_by_length.png (SST-2 accuracy by sentence length, dense and perforated); the training
runs live in DIR/runs/<name> (train.main workdirs), so a rerun resumes an interrupted
run and reuses finished ones (their final_metrics.json); `--reuse` takes the records of
runs whose directories are gone from an earlier perforation.json of the same budget.

1. Speed (no training: the cost depends only on the row budget, which the learned mask
   and every baseline share at a given target). MiniLM-L6 sizes (6 x 384, 12 heads),
   batch 1, at sequence 512 (block 64, an 8 x 8 mask) and 2048 (block 128, 16 x 16; the
   position table is widened with random rows, so this is a timing model only), and at
   64 (block 16, a 4 x 4 mask: the SST-2 runs' longest length bucket; most SST-2
   sentences fit the 16- and 32-token buckets, one or two tiles per row, where a block
   mask has at most one tile to skip). For
   dense and each target sparsity: compiled FLOPs and forward time of one attention
   (`ponder.ops.attention`, impl "auto" = the gathered XLA path on CPU) against
   `jax.nn.dot_product_attention`, and of the whole perforated encoder against the
   dense one (learned scorer included), all timed in round robin in one process.
2. Quality: masked LM on WikiText-2 at sequence 512 (configs/perforation.py presets):
   dense MiniLM + a new tied MLM head (the reference), the learned perforation at each
   target, and the baselines (random, band + global, BigBird-like, static per-head) at
   the budget's targets (full: 0.3, 0.5, 0.7; at 512, an 8 x 8 mask, 0.1 keeps all 8
   tiles of a row, so every fixed pattern is dense, and 0.9 keeps only the forced
   diagonal and [CLS] column, so every mask, learned or fixed, is that one but for the
   second tile of [CLS]'s row: the dense and learned runs stand for both ends); the
   same steps and batches for all. Then SST-2 dev accuracy of
   MiniLM fine-tuned dense and perforated (learned, 0.5), and perforated with the [CLS]
   row kept whole (`sst2_perforated_50_cls_row`: query block 0, the row the classifier
   reads, sees every key block).
3. masks.png: the learned 0.5 run's hard masks of a few heads on real validation windows.

Budgets: short (minutes per run on 2 loaded cores; the numbers say little about quality)
and full (planned at about 4 hours from the step FLOPs; measured on 2 idle cores,
2026-12-02: 24 min per dense MLM run and 30 per masked one with its evaluation, so its 18
MLM and 3 SST-2 runs take about 9 hours per seed: build it across sittings with --only
and --reuse).
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import dendritic_bert
from configs import perforation as perforation_configs
from models import bert
from ponder import ops
from ponder.data import glue
from ponder.analysis import flops
from ponder.analysis import timing
from ponder.nn import perforation as P
from train import trainer

FLAGS = flags.FLAGS

SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)
BASELINES = ("static", "random", "band_global", "bigbird")
# Phase 3: dense, the learned mask at 0.5, and the same with the [CLS] row kept whole.
SST2_RUNS = ("sst2_dense", "sst2_perforated_50", "sst2_perforated_50_cls_row")
# (steps, batch, validation windows, the learned model's and the baselines' targets,
# SST-2 steps, speed runs). The smoke sweep trains two learned targets, not five: each
# run is mostly compilation, and two points already draw the sweep's picture.
# mlm_attention_dropout: every MLM run, dense or masked, shares one rate, so the
# comparison differs only in the mask. It is 0 (BERT pretrained with 0.1): the MLM phase
# is a 150-step adaptation of an already pretrained encoder, and on CPU the Bernoulli
# draw over 8 x 12 x 512 x 512 probabilities in each of 6 layers costs a fifth of a
# step (a masked run: 13-14 s a step with it, 11 s without, 2026-12-02). SST-2 keeps the
# checkpoint's 0.1, dense and perforated alike.
BUDGETS = {
    "smoke": dict(mlm_steps=2, mlm_batch=2, mlm_attention_dropout=0.0, eval_windows=1,
                  sweep=(0.5, 0.9), baseline_sparsities=(0.5,),
                  sst2_steps=2, sst2_batch=8, sst2_valid_fraction=0.05, runs=1,
                  speed_seqs={64: 16, 128: 32}, preset="tiny", smoke=True),
    "short": dict(mlm_steps=4, mlm_batch=2, mlm_attention_dropout=0.0, eval_windows=4,
                  sweep=SPARSITIES, baseline_sparsities=(0.5,),
                  sst2_steps=8, sst2_batch=8, sst2_valid_fraction=0.01, runs=2,
                  speed_seqs={64: 16, 512: 64, 2048: 128}, preset="minilm_l6",
                  smoke=False),
    "full": dict(mlm_steps=150, mlm_batch=8, mlm_attention_dropout=0.0, eval_windows=48,
                 sweep=SPARSITIES, baseline_sparsities=(0.3, 0.5, 0.7), sst2_steps=1100,
                 sst2_batch=32, sst2_valid_fraction=0.05, runs=5,
                 speed_seqs={64: 16, 512: 64, 2048: 128}, preset="minilm_l6", smoke=False),
}


# --- 1. Speed and FLOPs ------------------------------------------------------------------


def minilm_config(seq: int, spec=None, preset: str = "minilm_l6"):
  return bert.config(preset, max_position_embeddings=max(512, seq), perforation=spec)


def speed_records(budget: dict, impl: str) -> list:
  """Attention-only and whole-encoder forward, dense and at every target, per sequence
  (budget["speed_seqs"]: sequence -> block)."""
  records, runs, preset = [], budget["runs"], budget["preset"]
  for seq, block in budget["speed_seqs"].items():
    ids = jax.random.randint(jax.random.key(seq), (1, seq), 1000, 30000)
    mask = jnp.ones((1, seq), jnp.int32)
    cfg = minilm_config(seq, preset=preset)
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    q, k, v = [jax.random.normal(key, (1, heads, seq, head_dim))
               for key in jax.random.split(jax.random.key(1), 3)]
    bshd = lambda x: x.swapaxes(1, 2)  # noqa: E731
    dense_attention = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
    dense_model = bert.Bert(cfg)
    params = dense_model.init(jax.random.key(0), ids[:, :8], mask[:, :8])
    dense_forward = jax.jit(lambda p, i, m: dense_model.apply(p, i, m).last_hidden_state)
    cases = {"dense": (functools.partial(dense_attention, *map(bshd, (q, k, v))),
                       functools.partial(dense_forward, params, ids, mask))}
    fl = {"dense": (flops.compiled_flops(dense_attention, *map(bshd, (q, k, v))),
                    flops.compiled_flops(dense_forward, params, ids, mask))}
    nb = -(-seq // block)
    budgets = {}
    for s in SPARSITIES:
      spec = P.PerforationSpec(block=block, target_sparsity=s)
      budget = spec.row_budget(nb)
      budgets[s] = budget
      block_mask = jnp.asarray(P.fixed_pattern(
          P.PerforationSpec(mode="random", block=block, target_sparsity=s), nb, heads, 0))
      block_mask = jnp.broadcast_to(block_mask[None], (1, heads, nb, nb))
      attn = jax.jit(lambda q, k, v, m, a=budget, b=block: ops.attention(
          q, k, v, m, block_sizes=ops.AttentionBlockSizes(b, b), max_active_blocks=a,
          fallback=False, impl=impl))
      model = bert.Bert(minilm_config(seq, spec, preset))
      p_params = bert.load_into(model.init(jax.random.key(0), ids[:, :8], mask[:, :8]),
                                params)
      ctrl = P.control(0, spec, impl=impl)
      forward = jax.jit(lambda p, i, m, model=model, ctrl=ctrl: model.apply(
          p, i, m, perforation=ctrl).last_hidden_state)
      cases[s] = (functools.partial(attn, q, k, v, block_mask),
                  functools.partial(forward, p_params, ids, mask))
      fl[s] = (flops.compiled_flops(attn, q, k, v, block_mask),
               flops.compiled_flops(forward, p_params, ids, mask))
    for part, index in (("attention", 0), ("model", 1)):
      times = timing.measure_interleaved({n: c[index] for n, c in cases.items()},
                                         warmup=1, runs=runs)
      dense_ms = 1e3 * times["dense"]["median_s"]
      for name in cases:
        ms = 1e3 * times[name]["median_s"]
        record = dict(part=part, seq=seq, block=block, target_sparsity=(
            0.0 if name == "dense" else name), row_budget=nb if name == "dense" else
            budgets[name], blocks_per_row=nb, ms=ms, dense_ms=dense_ms,
            speedup=dense_ms / ms, gflops=fl[name][index] / 1e9,
            dense_gflops=fl["dense"][index] / 1e9,
            flops_ratio=fl[name][index] / fl["dense"][index])
        records.append(record)
        print(f"{part:9s} seq {seq:4d} sparsity {record['target_sparsity']:.1f} "
              f"({record['row_budget']:2d}/{nb} tiles per row): {ms:9.1f} ms vs dense "
              f"{dense_ms:9.1f} ms  x{record['speedup']:.2f}; FLOPs x"
              f"{record['flops_ratio']:.3f}", flush=True)
  return records


# --- 2. Quality --------------------------------------------------------------------------


def mlm_config(preset: str, sparsity: float, budget: dict, wikitext: str):
  smoke = ",smoke" if budget["smoke"] else ""
  cfg = perforation_configs.get_config(f"{preset},sparsity={sparsity},"
                                       f"steps={budget['mlm_steps']}{smoke}")
  if not smoke:
    cfg.data.source = f"local:{os.path.abspath(wikitext)}"
  cfg.data.eval_windows = budget["eval_windows"]
  cfg.model.attention_dropout = budget["mlm_attention_dropout"]
  cfg.trainer.batch_size = budget["mlm_batch"]
  cfg.optim.warmup_steps = max(1, budget["mlm_steps"] // 10)
  # Evaluate once, at the end (the selected checkpoint is the last one).
  cfg.trainer.update(eval_every=budget["mlm_steps"], ckpt_every=max(budget["mlm_steps"] // 2, 1))
  return cfg


def sst2_config(perforated: bool, budget: dict, sst2: str, cls_row: bool = False):
  """SST-2 fine-tuning, dense (configs/dendritic_bert.py:minilm) or perforated. At the
  preset's length (the full budget) the preset's schedule stands: warm-up 66, an
  evaluation every 220 steps selecting on validation. The dense run is then exactly the
  `minilm` row of benchmarks/dendritic_bert_table.py, and the perforated one differs
  from it only in the mask. Shorter budgets evaluate once, at the end. `cls_row`: query
  block 0 ([CLS], the row the classifier reads) keeps every key block."""
  steps, batch = budget["sst2_steps"], budget["sst2_batch"]
  smoke = ",smoke" if budget["smoke"] else ""
  length = "" if steps == dendritic_bert.PRESETS["minilm"]["trainer"]["total_steps"] else (
      f",steps={steps}")
  if perforated:
    cfg = perforation_configs.get_config(f"sst2_perforated,sparsity=0.5,block=16"
                                         f"{length}{smoke}")
  else:
    cfg = dendritic_bert.get_config(f"minilm{length}{smoke}")
  if not smoke:
    cfg.data.source = f"local:{os.path.abspath(sst2)}"
  cfg.trainer.batch_size = batch
  cfg.data.valid_fraction = budget["sst2_valid_fraction"]
  if perforated:
    cfg.perforation.keep_cls_row = cls_row
  if length:
    cfg.optim.warmup_steps = max(1, steps // 16)
    cfg.trainer.update(eval_every=steps, ckpt_every=max(steps // 2, 1))
  return cfg


def run_once(cfg, workdir: str) -> dict:
  """The run's final metrics: read when it finished before, else trained (resumed)."""
  path = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  common.train(cfg, workdir, echo=lambda s: print(f"[{os.path.basename(workdir)}] {s}",
                                                   flush=True))
  with open(path) as f:
    return json.load(f)


def quality_records(out: str, budget: dict, save, seeds=(0,), only=(), reuse=()) -> list:
  """Trains (or reads) every run for every seed; `save(records)` after each, so a
  stopped benchmark leaves what it measured. The order puts the comparison at 0.5
  first: dense, learned and every baseline there, then the rest of the sweep, then
  SST-2. With `only` (run names), only those are trained; other finished runs are still
  read and reported. Seed 0 lives in runs/<name>, seed k in runs/<name>_seed<k>.
  `reuse`: records of an earlier benchmark at the same budget (its perforation.json);
  a run that has no finished workdir here takes its record from there (marked
  `reused_from`) instead of training again, unless `only` names it (retrain it after a
  change to the code it ran): run directories do not outlive a machine, the committed
  records do."""
  reused = {(r["run"], r.get("seed", 0)): r for r in reuse}
  first = [("mlm_dense", "mlm_dense", 0.0), ("mlm_perforated_50", "mlm_perforated", 0.5)]
  first += [(f"mlm_{mode}_50", f"mlm_{mode}", 0.5) for mode in BASELINES
            if 0.5 in budget["baseline_sparsities"]]
  rest = [(f"mlm_perforated_{int(s * 100)}", "mlm_perforated", s) for s in budget["sweep"]
          if s != 0.5]
  rest += [(f"mlm_{mode}_{int(s * 100)}", f"mlm_{mode}", s) for mode in BASELINES
           for s in budget["baseline_sparsities"] if s != 0.5]
  runs = [(name, "mlm", preset, s, seed) for seed in seeds for name, preset, s in first + rest]
  runs += [(name, "sst2", None, 0.5 if "_50" in name else 0.0, seed) for seed in seeds
           for name in SST2_RUNS]
  records = []
  for name, kind, preset, s, seed in runs:
    workdir = os.path.join(out, "runs", name if seed == 0 else f"{name}_seed{seed}")
    finished = os.path.exists(os.path.join(workdir, "final_metrics.json"))
    if not finished and (name, seed) in reused and name not in only:
      records.append(reused[(name, seed)])
      save(records)
      continue
    if only and name not in only and not finished:
      continue
    if kind == "mlm":
      cfg = mlm_config(preset, s if s else 0.5, budget, FLAGS.wikitext)
    else:
      cfg = sst2_config(name != "sst2_dense", budget, FLAGS.sst2,
                        cls_row=name.endswith("_cls_row"))
    cfg.seed = seed
    final = run_once(cfg, workdir)
    record = dict(run=name, task=kind, seed=seed, target_sparsity=s,
                  steps=cfg.trainer.total_steps, batch=cfg.trainer.batch_size)
    if kind == "mlm":
      record.update(mode=cfg.perforation.mode, achieved_sparsity=final.get("sparsity", 0.0),
                    mlm_loss=final["mlm_loss"], accuracy=final["accuracy"],
                    seq=cfg.data.seq_len)
    else:
      record.update(mode="learned" if s else "none", keep_cls_row=name.endswith("_cls_row"),
                    dev_accuracy=final["accuracy"],
                    val_accuracy=final.get("val", {}).get("accuracy"),
                    selected_step=final.get("selected_step"))
      if s:  # The classification eval does not measure the mask: the last training rows do.
        record["train_sparsity"] = last_train_value(workdir, "sparsity")
      record["by_length"] = sst2_by_length(workdir)
    records.append(record)
    print(json.dumps(records[-1]), flush=True)
    save(records)
  return records


def mean_by_bucket(lengths, buckets, **per_example) -> dict:
  """{bucket: {n, name: mean}} of examples grouped by the smallest bucket that holds
  each one's own token count (not the batch's padded length), for each per-example
  array in `per_example`; keys are strings, as JSON has them, so fresh and reused
  records compare."""
  own = np.array([glue.bucket_length(int(n), buckets) for n in lengths], np.int64)
  return {str(b): dict(n=int((own == b).sum()), **{
      name: float(np.mean(np.asarray(v, np.float64)[own == b]))
      for name, v in per_example.items()}) for b in sorted(buckets) if (own == b).any()}


def real_tile_sparsity(hard, lengths, block: int):
  """Per example, the share of its real tiles (query and key blocks that hold a real
  token) that the hard masks `[layers, b, heads, nq, nk]` drop, over layers and heads."""
  hard = np.asarray(hard)
  # An all-padding row of the batch (no real token) has no tiles: NaN, filtered later.
  return np.array([1.0 - hard[:, e, :, :r, :r].mean() if r else np.nan for e, r in
                   enumerate(-(-np.asarray(lengths) // block))])


def sst2_by_length(workdir: str) -> dict:
  """Accuracy of an SST-2 run's selected parameters by sentence length, on validation
  (5% of train.tsv: mostly short phrases) and dev (whole sentences, longer), in the
  run's own evaluation batches; for a perforated run also the share of real tiles its
  masks drop. With the diagonal and the [CLS] column always kept, a sentence of one
  block (at block 16, up to 16 tokens) loses nothing; one of two blocks has a single
  free tile, [CLS]'s row reading key block 1, the row the classifier reads.
  `overall` equals the run's reported accuracy (the same batches). Kept in the
  workdir's by_length.json, so a rerun of the benchmark does not evaluate again."""
  path = os.path.join(workdir, "by_length.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  cfg, task, params, _, _ = trainer.restore_run(workdir, selected=True)
  buckets = tuple(int(b) for b in str(cfg.data.buckets).split(","))
  spec = getattr(getattr(task.model, "config", None), "perforation", None)

  @jax.jit
  def forward(p, b):
    logits, sown = task.model.apply(
        {"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"],
        train=False, mutable=["intermediates"])
    hard = P.collect(sown["intermediates"], "perforation_hard") if spec else None
    return logits, hard

  out = {}
  for split, batches in (("valid", task.eval_batches), ("dev", task.test_batches)):
    lengths, per_example = [], {"accuracy": []}
    if spec:
      per_example["real_tile_sparsity"] = []
    for b in batches():
      real = b["mask"] > 0
      logits, hard = forward(params, {k: jnp.asarray(v) for k, v in b.items()})
      n = b["attention_mask"].sum(-1)
      lengths.append(n[real])
      per_example["accuracy"].append((np.asarray(logits).argmax(-1) == b["label"])[real])
      if spec:
        per_example["real_tile_sparsity"].append(
            real_tile_sparsity(hard, n, spec.block)[real])
    lengths = np.concatenate(lengths)
    per_example = {k: np.concatenate(v) for k, v in per_example.items()}
    out[split] = dict(overall=float(per_example["accuracy"].mean()),
                      buckets=mean_by_bucket(lengths, buckets, **per_example))
    if spec:
      out[split]["real_tile_sparsity"] = float(per_example["real_tile_sparsity"].mean())
  common.write_json(path, out)
  return out


def last_train_value(workdir: str, key: str) -> float:
  """`key` of the last training row of the run's metrics.jsonl (a mean over the steps
  since the row before)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["split"] == "train" and key in r][-1][key]


def reusable_records(path: str, budget_settings: dict) -> list:
  """The quality records of an earlier run of this benchmark, each marked with where it
  came from; they must have been trained under the same budget."""
  if not path:
    return []
  if not os.path.exists(path):
    raise app.UsageError(f"--reuse={path}: no such file (a perforation.json written by "
                         "this benchmark)")
  with open(path) as f:
    earlier = json.load(f)
  # Through JSON, so tuples and lists compare equal.
  if json.loads(json.dumps(budget_settings)) != earlier.get("budget_settings"):
    raise app.UsageError(
        f"--reuse={path} was measured with budget settings {earlier.get('budget_settings')}, "
        f"not this run's {budget_settings}: pass a file of the same --budget, or drop --reuse "
        "to train every run")
  return [dict(r, reused_from=r.get("reused_from", path)) for r in earlier.get("quality", [])]


def _by_seed(quality: list, task: str, key: str) -> dict:
  """{run name: {seed: `key`}} for one task's records."""
  values = {}
  for r in quality:
    if r["task"] == task:
      values.setdefault(r["run"], {})[r.get("seed", 0)] = r[key]
  return values


def _paired_means(values: dict, a: str, b: str):
  """The means of runs a and b over the seeds both have (None, None if none or either
  is missing): a seed moves every run of it alike (dense MLM loss moves 0.14 between
  seeds 0 and 1, more than the masks differ), so a run is compared with another only on
  shared seeds."""
  seeds = sorted(set(values.get(a, {})) & set(values.get(b, {})))
  if not seeds:
    return None, None
  return (float(np.mean([values[a][s] for s in seeds])),
          float(np.mean([values[b][s] for s in seeds])))


def goals(speed: list, quality: list) -> dict:
  """The issue's goals, each on the mean over the seeds its two runs share; a goal whose
  runs are not in the records (e.g. the speed part under --skip_speed) is None, not
  measured, rather than False, missed."""
  loss = _by_seed(quality, "mlm", "mlm_loss")
  learned, dense = _paired_means(loss, "mlm_perforated_50", "mlm_dense")
  modes = {r["run"]: r["mode"] for r in quality if r["task"] == "mlm"}
  fixed = [_paired_means(loss, "mlm_perforated_50", n) for n in loss if n.endswith("_50")
           and modes[n] in ("random", "band_global", "bigbird")]
  model_2048 = [r for r in speed if r["part"] == "model" and r["seq"] == 2048
                and r["target_sparsity"] == 0.5]
  sst2 = _by_seed(quality, "sst2", "dev_accuracy")
  sst_gap = {}
  for run in SST2_RUNS[1:]:
    perforated, sst_dense = _paired_means(sst2, run, "sst2_dense")
    sst_gap[run] = None if perforated is None else sst_dense - perforated
  cls_gap = sst_gap["sst2_perforated_50_cls_row"]
  sst_gap = sst_gap["sst2_perforated_50"]
  return {
      "mlm_50_within_2pct_of_dense": None if learned is None else learned <= 1.02 * dense,
      "mlm_50_loss_ratio_to_dense": None if learned is None else learned / dense,
      # None until a fixed pattern has been measured (all() of nothing is no result).
      "mlm_50_beats_every_fixed_pattern": None if not fixed else all(
          ours is not None and ours < theirs for ours, theirs in fixed),
      "model_2048_speedup_at_50": model_2048[0]["speedup"] if model_2048 else None,
      "model_2048_at_least_1.4x": model_2048[0]["speedup"] >= 1.4 if model_2048 else None,
      "sst2_points_below_dense": None if sst_gap is None else 100 * sst_gap,
      "sst2_within_0.5_points": None if sst_gap is None else sst_gap <= 0.005,
      # The same mask with query block 0 ([CLS]) reading every key block.
      "sst2_cls_row_points_below_dense": None if cls_gap is None else 100 * cls_gap,
      "sst2_cls_row_within_0.5_points": None if cls_gap is None else cls_gap <= 0.005,
  }


# --- 3. Plots ----------------------------------------------------------------------------


def sweep_plot(quality: list, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  # Each run's loss over dense MiniLM's on the same seed, then the mean over its seeds:
  # a seed moves every run alike, so raw means over unequal seed sets would mislead.
  loss = _by_seed(quality, "mlm", "mlm_loss")
  achieved = _by_seed(quality, "mlm", "achieved_sparsity")
  dense = loss.get("mlm_dense", {})
  modes = {r["run"]: r["mode"] for r in quality if r["task"] == "mlm"}
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.axhline(1.0, color="k", ls="--", label="dense MiniLM")
  ax.axhline(1.02, color="grey", ls=":", label="goal: within 2% of dense")
  for mode, marker in (("learned", "o-"), ("static", "s"), ("random", "x"),
                       ("band_global", "^"), ("bigbird", "v")):
    pts, n_seeds = [], set()
    for n in loss:
      seeds = sorted(set(loss[n]) & set(dense))
      if modes[n] == mode and seeds:
        pts.append((1 - np.mean([achieved[n][s] for s in seeds]),
                    np.mean([loss[n][s] / dense[s] for s in seeds])))
        n_seeds.add(len(seeds))
    if pts:
      seeds = "/".join(str(k) for k in sorted(n_seeds))
      ax.plot(*zip(*sorted(pts)), marker, label=f"{mode} ({seeds} seed{'s' * (seeds != '1')})")
  ax.set_xlabel("density (1 - achieved block sparsity)")
  ax.set_ylabel("MLM loss / dense MiniLM's (same seed)")
  ax.set_title("WikiText-2, sequence 512, block 64")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def sst2_length_plot(quality: list, path: str) -> bool:
  """Validation and dev accuracy by sentence-length bucket, dense against perforated
  (means over seeds; n per bucket in the tick labels). False (nothing drawn) when no
  SST-2 record has `by_length`."""
  runs = {}
  for r in quality:
    if r["task"] == "sst2" and "by_length" in r:
      runs.setdefault(r["run"], []).append(r["by_length"])
  if not runs:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
  for ax, split in zip(axes, ("valid", "dev")):
    first = next(iter(runs.values()))[0][split]["buckets"]
    buckets = sorted(first, key=int)
    width = 0.8 / len(runs)
    for i, (name, seeds) in enumerate(sorted(runs.items())):
      acc = [100 * np.mean([s[split]["buckets"][b]["accuracy"] for s in seeds
                            if b in s[split]["buckets"]]) for b in buckets]
      ax.bar(np.arange(len(buckets)) + width * (i - (len(runs) - 1) / 2), acc, width=width,
             label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels([f"<= {b}\nn={first[b]['n']}" for b in buckets], fontsize=8)
    ax.set_xlabel("tokens per sentence ([CLS] and [SEP] included)")
    ax.set_title({"valid": "validation (5% of train)", "dev": "GLUE dev"}[split])
    ax.set_ylim(50, 100)
  axes[0].set_ylabel("accuracy (%)")
  axes[0].legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def masks_plot(workdir: str, path: str) -> dict:
  """Hard masks of the first, middle and last layer, heads 0-3, on two validation
  windows."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  _, task, params, _, _ = trainer.restore_run(workdir, selected=True)
  b = next(iter(task.eval_batches()))
  _, sown = task.model.apply({"params": params}, b["input_ids"][:2], b["attention_mask"][:2],
                             b["token_type_ids"][:2], positions=b["positions"][:2],
                             mutable=["intermediates"])
  hard = np.asarray(P.collect(sown["intermediates"], "perforation_hard"))
  n_layers, n_heads = hard.shape[0], hard.shape[2]
  layers, heads = sorted({0, n_layers // 2, n_layers - 1}), range(min(4, n_heads))
  fig, axes = plt.subplots(2 * len(layers), len(heads), figsize=(7, 10), squeeze=False)
  for w in range(2):
    for li, layer in enumerate(layers):
      for hi, head in enumerate(heads):
        ax = axes[w * len(layers) + li, hi]
        ax.imshow(hard[layer, w, head], cmap="Greys", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"win {w} L{layer} H{head}", fontsize=7)
  fig.suptitle("learned block masks (black = kept), target sparsity 0.5")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  # How much the masks differ between the two inputs (input dependence).
  return {"tiles_differing_between_windows": float(np.mean(hard[:, 0] != hard[:, 1]))}


def parse_speed_seqs(items) -> dict:
  """["64:16", "512:64"] -> {64: 16, 512: 64} (sequence -> block)."""
  seqs = {}
  for item in items:
    seq, _, block = item.partition(":")
    if not (seq.isdigit() and block.isdigit() and int(block) > 0
            and int(seq) % int(block) == 0):
      raise app.UsageError(f"--speed_seqs: {item!r} is not SEQ:BLOCK with BLOCK dividing "
                           "SEQ (e.g. 64:16)")
    seqs[int(seq)] = int(block)
  return seqs


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as a program (so
  tests can import it beside the other benchmarks)."""
  flags.DEFINE_string("out", "", "output directory")
  flags.DEFINE_enum("budget", "short", ["smoke", "short", "full"],
                    "training budget (smoke: tiny random models on packaged data, for CI)")
  flags.DEFINE_enum("impl", "auto", ["auto", "pallas", "xla"],
                    "ponder.ops.attention implementation of the perforated paths")
  flags.DEFINE_string("wikitext", "../shared/data/wikitext-2-valsplit",
                      "WikiText directory (train.txt, valid.txt)")
  flags.DEFINE_string("sst2", "../shared/data/sst-2", "SST-2 directory (train.tsv, dev.tsv)")
  flags.DEFINE_bool("skip_quality", False, "only the speed part")
  flags.DEFINE_list("seeds", ["0"], "seeds of every training run (the goals use the mean)")
  flags.DEFINE_list("only", [], "train only these runs (e.g. mlm_dense,mlm_perforated_50); "
                    "finished others are still reported")
  flags.DEFINE_string("reuse", "", "an earlier perforation.json of the same budget (e.g. "
                      "results/perforation/perforation_full.json): its runs are not "
                      "trained again where DIR/runs has no finished copy")
  flags.DEFINE_list("speed_seqs", [], "time only these SEQ:BLOCK cases (e.g. 64:16) "
                    "instead of the budget's")
  flags.DEFINE_bool("skip_speed", False,
                    "only the quality part (speed is measured by a later run without it, "
                    "on quiet cores; training does not care about load)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
  out = FLAGS.out or "results/perforation"
  os.makedirs(out, exist_ok=True)
  budget = dict(BUDGETS[FLAGS.budget])
  if FLAGS.speed_seqs:
    budget["speed_seqs"] = parse_speed_seqs(FLAGS.speed_seqs)
  start = os.getloadavg()
  result = dict(machine=common.machine(), budget=FLAGS.budget, impl=FLAGS.impl,
                budget_settings={k: v for k, v in budget.items() if k != "speed_seqs"},
                speed_seqs=list(budget["speed_seqs"].items()))
  path = os.path.join(out, "perforation.json")
  previous = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  if (previous.get("speed") and previous.get("budget") == FLAGS.budget
      and previous.get("impl") == FLAGS.impl
      and previous.get("speed_seqs") == json.loads(json.dumps(result["speed_seqs"]))):
    result["speed"] = previous["speed"]  # Reused: rerun with a new --out to remeasure.
  elif FLAGS.skip_speed:
    result["speed"] = []
  else:
    result["speed"] = speed_records(budget, FLAGS.impl)
  common.write_json(path, result)
  if not FLAGS.skip_quality:
    result["quality"] = quality_records(
        out, budget, lambda r: common.write_json(path, dict(result, quality=r)),
        seeds=[int(x) for x in FLAGS.seeds], only=FLAGS.only,
        reuse=reusable_records(FLAGS.reuse, result["budget_settings"]))
    result["goals"] = goals(result["speed"], result["quality"])
    common.write_json(path, result)
    sweep_plot(result["quality"], os.path.join(out, "sparsity_sweep.png"))
    sst2_length_plot(result["quality"], os.path.join(out, "sst2_by_length.png"))
    if os.path.exists(os.path.join(out, "runs", "mlm_perforated_50", "final_metrics.json")):
      result["masks"] = masks_plot(os.path.join(out, "runs", "mlm_perforated_50"),
                                   os.path.join(out, "masks.png"))
  result["load"] = common.load_record(start, os.getloadavg())
  common.write_json(path, result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
