"""Baseline ViT, Dendritic-ViT and DendriticLiquid-ViT on Fashion-MNIST at patch 4 (49
patches): the DendriticLiquid-ViT study's table, its keep-policy ablations and a sweep of
models trained at each keep ratio.

  python -m benchmarks.dlvit_table --out=results/dlvit/table.json               # full
  python -m benchmarks.dlvit_table --budget=short --out=/tmp/dlvit/table.json   # short

1. Trains, per seed of the budget, the baseline (configs/vit.py:fashion_mnist_p4) and
   Dendritic-ViT from scratch at the budget's steps, and DendriticLiquid-ViT with
   DynamicViT's protocol: started from that seed's trained baseline (every parameter
   with the same path and shape) and fine-tuned for the budget's fine-tune steps while
   distilling from it. The full budget also trains DendriticLiquid-ViT from scratch
   (distilling from the baseline) at the baseline's steps. Then, from seed 0's
   baseline, one fine-tuned model per trained keep ratio (0.5, 0.7, 0.9; the preset's
   0.6 is the main model). Runs live in --workdir/<name>_s<seed>: a finished run is
   reused, an interrupted one resumes.
2. Table (seed 0's weights unless said): test accuracy of every seed (each run's
   validation-selected checkpoint scored once on test by the trainer; mean and sample
   std), parameters, compiled inference FLOPs per image (XLA's cost analysis at batch
   256, over 256), images/s at batch 256 with every model interleaved in one loop (so
   load on the machine slows all alike), and the mean accuracy under the 15 corruptions
   x 5 severities of the first `corruption_examples` test images.
3. Keep-policy ablations on the main fine-tuned model's weights at inference keep ratios
   0.5-0.9 (same token counts, so the same FLOPs): the learned policy, random, inverted
   (the lowest scores), and pixel variance (a saliency heuristic), on the first
   `eval_examples` test images. The policy goal: learned beats random by at least 2
   points at keep ratio 0.5.
4. Writes the JSON (goals of `benchmarks.goals.dlvit_table` plus the policy goal),
   sweep.png (accuracy against the fraction of the baseline's FLOPs: the models trained
   at each ratio, and each policy over inference ratios), and the kept-token and
   importance pictures of the fine-tuned model and of Dendritic-ViT, next to --out.

Full budget: baseline and Dendritic-ViT 4,000 steps of 128 (the preset), fine-tuning
1,000, two seeds, 5,000 corrupted test images. Medium: the same at 1,500 / 500 steps and
2,000 corrupted images. `--jobs=2` trains two runs at once. Short: 100 / 20 steps, one seed, a
500-image validation split, ablations on 500 test images, 100 corrupted images (a check
that everything runs; its numbers are not a result).
"""

import dataclasses
import json
import os
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from benchmarks import common
from benchmarks import goals
from ponder import analysis
from ponder import errors
from ponder.analysis import robustness
from ponder.analysis import token_maps
from ponder.data import vision
from train import cli
from train import trainer
from train import vision_report

_OUT = flags.DEFINE_string("out", "results/dlvit/table.json", "JSON file; PNGs beside it.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/dlvit_table", "Where the runs live.")
_BUDGET = flags.DEFINE_enum("budget", "full", ["full", "medium", "short", "smoke"],
                            "full (hours), medium (under 2 h with --jobs=2), short (under an "
                            "hour), smoke (seconds; tests).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Fashion-MNIST idx directory ('' = the "
                                "config's source: the Debian package or tfds).")
_JOBS = flags.DEFINE_integer(
    "jobs", 1, "Runs trained at once (benchmarks.common.train_parallel: each in its own "
    "process, its log in --workdir/<run>.log, a fine-tune once its baseline is done).")
_RATIOS = flags.DEFINE_list("keep_ratios", ["0.5", "0.6", "0.7", "0.9"],
                            "Inference keep ratios of the policy ablations.")

PRESET = "fashion_mnist_p4"
MODELS = ("vit", "dendritic_vit", "dendritic_liquid_vit")
SCRATCH = "dendritic_liquid_vit_scratch"
POLICIES = ("learned", "random", "inverted", "pixel_variance")
BATCH = 256  # The study's throughput batch.
POLICY_GOAL = dict(policy_ratio=0.5, min_learned_over_random=0.02)


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int  # Steps of the baseline, Dendritic-ViT and the scratch run (0 = smoke's).
  finetune_steps: int  # Steps of each fine-tuned DendriticLiquid-ViT (0 = smoke's).
  seeds: tuple  # Seeds of the table's three models.
  trained_ratios: tuple  # Keep ratios of the extra fine-tuned models (seed 0).
  corruption_examples: int  # Test images corrupted.
  eval_examples: Optional[int]  # Test images of the ablations (None = all).
  runs: int  # Timed rounds of the interleaved throughput measurement.
  val_size: int = -1  # Validation images (-1 = the dataset's default).
  scratch: bool = False  # Also train DendriticLiquid-ViT from scratch.
  smoke: bool = False  # The configs' `smoke` sizes (tests).


BUDGETS = {
    "full": Budget(4000, 1000, (0, 1), (0.5, 0.7, 0.9), 5000, None, 10, scratch=True),
    # Every model and ablation of the full budget at 3/8 of its steps (3.6 epochs of the
    # 54,000 training images; fine-tuning at half), 2,000 corrupted images: one sitting
    # on 2 cores with --jobs=2 (1 h 47 min measured, 2026-12-03, partly under load).
    "medium": Budget(1500, 500, (0, 1), (0.5, 0.7, 0.9), 2000, None, 10, scratch=True),
    "short": Budget(100, 20, (0,), (0.5, 0.7, 0.9), 100, 500, 3, val_size=500),
    "smoke": Budget(0, 0, (0,), (0.5,), 8, None, 1, val_size=8, smoke=True),
}


def _config(spec: str, budget: Budget, steps: int, data_dir: str):
  arg = (f",steps={steps}" if steps else "") + (",smoke" if budget.smoke else "")
  cfg = cli.load_config_file(spec + arg)
  if data_dir:
    cfg.data.update(source="local", data_dir=data_dir)
  cfg.data.val_size = budget.val_size
  return cfg


def build_configs(budget: Budget, workdir: str, data_dir: str = "") -> dict:
  """{run name: config}: the table's models per seed, the scratch run, and the models
  fine-tuned at each trained keep ratio; each liquid one starts from and distils from
  its seed's baseline."""
  cfgs = {}
  liquid = f"configs/dendritic_liquid_vit.py:{PRESET}"
  for seed in budget.seeds:
    base = os.path.abspath(os.path.join(workdir, f"vit_s{seed}"))
    specs = {"vit": (f"configs/vit.py:{PRESET}", budget.steps),
             "dendritic_vit": (f"{liquid},variant=dendritic_vit", budget.steps),
             "dendritic_liquid_vit": (f"{liquid},baseline={base}", budget.finetune_steps)}
    if budget.scratch and seed == budget.seeds[0]:
      specs[SCRATCH] = (f"{liquid},scratch", budget.steps)
    for name, (spec, steps) in specs.items():
      cfgs[f"{name}_s{seed}"] = _config(spec, budget, steps, data_dir)
      cfgs[f"{name}_s{seed}"].seed = seed
    if SCRATCH in specs:
      cfgs[f"{SCRATCH}_s{seed}"].distill.teacher_workdir = base
  seed = budget.seeds[0]
  for rho in budget.trained_ratios:
    cfg = cfgs[f"dendritic_liquid_vit_s{seed}"].copy_and_resolve_references()
    cfg.model.keep_ratio = rho
    cfgs[f"dendritic_liquid_vit@trained{rho:g}_s{seed}"] = cfg
  return cfgs


def train_all(cfgs: dict, workdir: str, jobs: int = 1) -> dict:
  """Trains (or resumes, or reuses) each run: in order with jobs=1 (baselines come
  before the runs that start from them), else by `common.train_parallel`;
  returns {run name: its final_metrics.json}."""
  if jobs > 1:
    common.train_parallel({os.path.join(workdir, n): c for n, c in cfgs.items()}, jobs,
                          echo=lambda line: print(line, flush=True))
  finals = {}
  for name, cfg in cfgs.items():
    path = os.path.join(workdir, name)
    if jobs == 1:
      print(f"== {name}: {cfg.trainer.total_steps} steps in {path}", flush=True)
      common.train(cfg, path)
    with open(os.path.join(path, "final_metrics.json")) as f:
      finals[name] = json.load(f)
  return finals


def _tokens_per_block(model, params, images) -> list:
  """Tokens (class token included) each block processes at inference."""
  n = (images.shape[1] // model.patch) * (images.shape[2] // model.patch) + 1
  if not hasattr(model, "stages"):
    return [n] * model.depth
  _, aux = model.apply({"params": params}, images, train=False, return_aux=True)
  counts = []
  for l in range(model.depth):
    if l in model.stages:
      n = aux["num_tokens"][list(model.stages).index(l)]
    counts.append(n)
  return counts


def seed_accuracy(finals: dict, name: str, seeds) -> dict:
  """Test accuracy of `name` per seed (each run's validation-selected checkpoint), with
  the mean and the sample standard deviation."""
  per_seed = [finals[f"{name}_s{s}"]["test"]["accuracy"] for s in seeds]
  return dict(test_accuracy=float(np.mean(per_seed)), test_accuracy_per_seed=per_seed,
              test_accuracy_std=float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0)


def measure(models: dict, ds: vision.ImageDataset, runs: int) -> dict:
  """Parameters, FLOPs per image, tokens per block and interleaved throughput."""
  images = vision.normalise(ds, ds.test_images[:BATCH])  # Fewer only in tests' data.
  n = len(images)
  spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
  fns = {name: vision_report.inference(model) for name, (model, _) in models.items()}
  rows = {}
  for name, (model, params) in models.items():
    rows[name] = dict(params=analysis.count_params(params),
                      flops_per_image=analysis.compiled_flops(fns[name], params, spec) / n,
                      tokens_per_block=_tokens_per_block(model, params, images[:1]))
  timed = analysis.measure_interleaved(
      {name: (lambda f=fns[name], p=models[name][1]: f(p, images)) for name in models},
      warmup=2, runs=runs)
  base = rows["vit"]
  for name, row in rows.items():
    row.update(images_per_s=n / timed[name]["median_s"], step_times_s=timed[name]["times_s"])
    row.update(flops_ratio=row["flops_per_image"] / base["flops_per_image"],
               throughput_ratio=row["images_per_s"] / base["images_per_s"])
  return rows


def policy_ablations(model, params, ds: vision.ImageDataset, ratios, examples, base_flops
                     ) -> dict:
  """{policy: {ratio: accuracy, flops_ratio}} on the same weights: every policy keeps
  the same number of tokens at a ratio, so it costs the same FLOPs."""
  images, labels = ds.test_images[:examples], ds.test_labels[:examples]
  spec = jax.ShapeDtypeStruct((BATCH, *images.shape[1:]), np.float32)
  out = {}
  for rho in ratios:
    variant = model.clone(keep_ratio=rho)
    flops = analysis.compiled_flops(vision_report.inference(variant), params, spec) / BATCH
    for policy in POLICIES:
      predict = vision_report.predictor(variant.clone(keep_policy=policy), params, ds)
      out.setdefault(policy, {})[f"{rho:g}"] = dict(
          accuracy=robustness.accuracy(predict, images, labels, min(BATCH, len(labels))),
          flops_ratio=flops / base_flops)
  return out


def policy_goal(ablations: dict) -> dict:
  at = f"{POLICY_GOAL['policy_ratio']:g}"
  if at not in ablations["learned"]:
    return dict(POLICY_GOAL, learned_over_random=None, policy_met=None)
  gap = ablations["learned"][at]["accuracy"] - ablations["random"][at]["accuracy"]
  return dict(POLICY_GOAL, learned_over_random=gap,
              policy_met=bool(gap >= POLICY_GOAL["min_learned_over_random"]))


def sweep_figure(rows: dict, trained: dict, ablations: dict, path: str) -> None:
  pct = lambda r: 100 * r["test_accuracy"]
  curves = {"trained at each keep ratio (test)": sorted(
      (r["flops_ratio"], pct(r)) for r in trained.values())}
  notes = {"trained at each keep ratio (test)": [
      f"{rho}" for _, rho in sorted((r["flops_ratio"], rho) for rho, r in trained.items())]}
  for policy, by_ratio in ablations.items():
    label = f"same weights, {policy} policy"
    curves[label] = [(v["flops_ratio"], 100 * v["accuracy"]) for v in by_ratio.values()]
    notes[label] = list(by_ratio) if policy == "learned" else []
  for name, label in (("vit", "baseline ViT"), ("dendritic_vit", "Dendritic-ViT")):
    curves[label] = [(rows[name]["flops_ratio"], pct(rows[name]))]
  token_maps.tradeoff_figure(
      curves, path, xlabel="FLOPs per image / baseline's", ylabel="accuracy (%)",
      title="Fashion-MNIST, patch 4: models trained at each keep ratio, and keep\n"
            "policies on one fine-tuned model (labels: keep ratio)", annotations=notes)


def run(budget: Budget, out: str, workdir: str, data_dir: str = "", ratios=(0.5, 0.7, 0.9),
        jobs: int = 1) -> dict:
  cfgs = build_configs(budget, workdir, data_dir)
  finals = train_all(cfgs, workdir, jobs)
  seed = budget.seeds[0]
  names = list(MODELS) + ([SCRATCH] if budget.scratch else [])
  trained_names = {f"{rho:g}": f"dendritic_liquid_vit@trained{rho:g}" for rho in
                   budget.trained_ratios}
  models = {}
  for name in names + list(trained_names.values()):
    _, task, params, _, _ = trainer.restore_run(os.path.join(workdir, f"{name}_s{seed}"),
                                                selected=True)
    models[name] = (task.model, params)
  data = cfgs[f"vit_s{seed}"].data
  ds = vision.load_image_dataset(data.name, source=data.source, data_dir=data.data_dir or None)
  rows = measure(models, ds, budget.runs)
  for name in names:
    rows[name].update(seed_accuracy(finals, name, budget.seeds if name in MODELS else [seed]))
  for name in trained_names.values():
    rows[name].update(seed_accuracy(finals, name, [seed]))
  for row in rows.values():
    row["accuracy_delta"] = row["test_accuracy"] - rows["vit"]["test_accuracy"]
  images, labels, provider = vision_report.corruption_provider(
      ds, budget.corruption_examples, seed=cfgs[f"vit_s{seed}"].seed)
  report = robustness.corruption_report(
      {name: vision_report.predictor(*models[name], ds) for name in names},
      images, labels, provider, batch_size=min(BATCH, len(labels)))  # No padding to 256.
  for name in names:
    rows[name].update(corruption_mean=report[name]["mean"], corruption=report[name])
  liquid, liquid_params = models["dendritic_liquid_vit"]
  ablations = policy_ablations(liquid, liquid_params, ds, ratios,
                               budget.eval_examples or len(ds.test_labels),
                               rows["vit"]["flops_per_image"])
  main_ratio = f"{liquid.keep_ratio:g}"
  trained = {rho: rows[name] for rho, name in trained_names.items()}
  trained[main_ratio] = rows["dendritic_liquid_vit"]
  outdir = os.path.dirname(os.path.abspath(out))
  os.makedirs(outdir, exist_ok=True)
  pictures = []
  for name in ("dendritic_vit", "dendritic_liquid_vit"):
    pictures += vision_report.write_pictures(*models[name], ds, outdir, prefix=f"{name}_")
  sweep_figure(rows, trained, ablations, os.path.join(outdir, "sweep.png"))
  result = dict(
      machine=common.machine(), budget=dataclasses.asdict(budget), workdir=workdir,
      preset=PRESET, batch_size=BATCH, models=rows,
      goals=dict(goals.dlvit_table(rows), **policy_goal(ablations)),
      policy_ablations=ablations,
      ablation_examples=budget.eval_examples or len(ds.test_labels),
      trained_ratio=liquid.keep_ratio,
      warm_start=f"dendritic_liquid_vit* start from vit_s<seed> and distil from it; "
                 f"{SCRATCH} (if present) trains from scratch, distilling from vit_s{seed}",
      pictures=[os.path.basename(p) for p in pictures] + ["sweep.png"])  # Beside --out.
  common.write_json(out, result)
  return result


def _print(result: dict) -> None:
  print(f"{'model':34s} {'acc %':>6s} {'+-':>5s} {'params':>9s} {'MFLOP/img':>9s} "
        f"{'x FLOPs':>7s} {'img/s':>8s} {'x speed':>7s} {'corrupt %':>9s}")
  for name, r in result["models"].items():
    corrupt = f"{100 * r['corruption_mean']:9.2f}" if "corruption_mean" in r else " " * 9
    print(f"{name:34s} {100 * r['test_accuracy']:6.2f} {100 * r['test_accuracy_std']:5.2f} "
          f"{r['params']:9,d} {r['flops_per_image'] / 1e6:9.2f} {r['flops_ratio']:7.3f} "
          f"{r['images_per_s']:8.0f} {r['throughput_ratio']:7.2f} {corrupt}")
  print(f"policies ({result['ablation_examples']} test images), accuracy % by keep ratio:")
  for policy, by_ratio in result["policy_ablations"].items():
    print(f"  {policy:16s} " + "  ".join(f"{rho}: {100 * v['accuracy']:.2f}"
                                         for rho, v in by_ratio.items()))
  print("goals:", {k: v for k, v in result["goals"].items() if k.endswith("met")})


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    ratios = [float(r) for r in _RATIOS.value]
    result = run(BUDGETS[_BUDGET.value], _OUT.value, _WORKDIR.value, _DATA_DIR.value, ratios,
                 _JOBS.value)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  _print(result)


if __name__ == "__main__":
  app.run(main)
