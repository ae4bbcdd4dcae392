"""Baseline ViT, Dendritic-ViT and DendriticLiquid-ViT at one training budget (the
DendriticLiquid-ViT study's table).

  python -m benchmarks.dlvit_table --out=results/dlvit/table.json               # full
  python -m benchmarks.dlvit_table --budget=short --out=/tmp/dlvit/table.json   # minutes

1. Trains the three models with the Fashion-MNIST presets (configs/vit.py and
   configs/dendritic_liquid_vit.py, `steps=` the budget's steps): same steps, batch,
   data order and optimizer; DendriticLiquid-ViT distils from the baseline trained here
   (DynamicViT Eq. 11-12). Runs live in --workdir/<model>: a finished run is reused, an
   interrupted one resumes, so the command can be rerun after a crash.
2. Measures each trained model: test accuracy; parameters; FLOPs per image (XLA's cost
   analysis of the jitted inference program at batch 256, over 256); throughput in
   images/s at batch 256, every model interleaved in one measurement so load on the
   machine slows all alike; accuracy under the 15 corruptions x 5 severities of the
   budget's first `corruption_examples` test images (one corrupted set scored by every
   model).
3. Keep-ratio sweep: the trained DendriticLiquid-ViT evaluated with inference keep
   ratios 0.5 ... 0.9 (accuracy, FLOPs, throughput in the same interleaved measurement).
   These are one model's inference settings, not models trained at each ratio.
4. Writes the JSON (with the goals checked by `benchmarks.goals.dlvit_table`: FLOPs <=
   65% of the baseline's, throughput >= 1.4x, accuracy within 1.0 point, mean corruption
   accuracy no lower), sweep.png (accuracy against the fraction of the baseline's
   FLOPs), and the kept-token and importance pictures, next to --out.

Full budget: 3,000 steps of 128 per model (6.4 epochs, the presets' optimizer; the
baseline preset's 9,500 steps would take over an hour per pruned model on 2 CPU cores)
and 5,000 corrupted test images: about 1 h on the 2-core workspace CPU.
"""

import dataclasses
import os
import sys

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
_WORKDIR = flags.DEFINE_string("workdir", "runs/dlvit_table", "Where the three runs live.")
_BUDGET = flags.DEFINE_enum("budget", "full", ["full", "short", "smoke"],
                            "full (~1 h), short (minutes), smoke (seconds; tests).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Fashion-MNIST idx directory ('' = the "
                                "config's source: the Debian package or tfds).")
_RATIOS = flags.DEFINE_list("keep_ratios", ["0.5", "0.6", "0.7", "0.8", "0.9"],
                            "Inference keep ratios of the sweep.")

MODELS = ("vit", "dendritic_vit", "dendritic_liquid_vit")
CONFIGS = {"vit": "configs/vit.py:fashion_mnist",
           "dendritic_vit": "configs/dendritic_liquid_vit.py:fashion_mnist,variant=dendritic_vit",
           "dendritic_liquid_vit": "configs/dendritic_liquid_vit.py:fashion_mnist"}
BATCH = 256  # The study's throughput batch.


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int  # Training steps of every model (0 = the smoke config's).
  corruption_examples: int  # Test images corrupted.
  runs: int  # Timed rounds of the interleaved throughput measurement.
  smoke: bool = False  # The configs' `smoke` sizes (tests).


BUDGETS = {"full": Budget(3000, 5000, 10), "short": Budget(300, 500, 5),
           "smoke": Budget(0, 8, 1, smoke=True)}


def build_configs(budget: Budget, workdir: str, data_dir: str = "") -> dict:
  """The three runs' configs, the DendriticLiquid-ViT one distilling from the baseline."""
  cfgs = {}
  for name in MODELS:
    arg = f"steps={budget.steps}" + (",smoke" if budget.smoke else "")
    cfg = cli.load_config_file(f"{CONFIGS[name]},{arg}")
    if data_dir:
      cfg.data.update(source="local", data_dir=data_dir)
    cfgs[name] = cfg
  cfgs["dendritic_liquid_vit"].distill.teacher_workdir = os.path.join(workdir, "vit")
  return cfgs


def train_all(cfgs: dict, workdir: str) -> None:
  """Trains (or resumes, or reuses) each run; the baseline first: it is the teacher."""
  for name in MODELS:
    print(f"== {name}: {cfgs[name].trainer.total_steps} steps in {workdir}/{name}")
    common.train(cfgs[name], os.path.join(workdir, name))


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


def measure(models: dict, ds: vision.ImageDataset, budget: Budget, ratios) -> dict:
  """Accuracy, parameters, FLOPs per image and interleaved throughput of every model and
  of the DendriticLiquid-ViT at each sweep ratio (keys "dendritic_liquid_vit@<rho>")."""
  liquid, liquid_params = models["dendritic_liquid_vit"]
  variants = dict(models)
  for rho in ratios:
    variants[f"dendritic_liquid_vit@{rho:g}"] = (liquid.clone(keep_ratio=rho), liquid_params)
  images = vision.normalise(ds, ds.test_images[:BATCH])
  spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
  fns = {name: vision_report.inference(model) for name, (model, _) in variants.items()}
  rows = {}
  for name, (model, params) in variants.items():
    predict = vision_report.predictor(model, params, ds, apply=fns[name])
    rows[name] = dict(
        test_accuracy=robustness.accuracy(predict, ds.test_images, ds.test_labels, BATCH),
        params=analysis.count_params(params),
        flops_per_image=analysis.compiled_flops(fns[name], params, spec) / BATCH,
        tokens_per_block=_tokens_per_block(model, params, images[:1]))
  timed = analysis.measure_interleaved(
      {name: (lambda f=fns[name], p=variants[name][1]: f(p, images)) for name in variants},
      warmup=2, runs=budget.runs)
  for name, t in timed.items():
    rows[name].update(images_per_s=BATCH / t["median_s"], step_times_s=t["times_s"])
  base = rows["vit"]
  for row in rows.values():
    row.update(flops_ratio=row["flops_per_image"] / base["flops_per_image"],
               throughput_ratio=row["images_per_s"] / base["images_per_s"],
               accuracy_delta=row["test_accuracy"] - base["test_accuracy"])
  return rows


def sweep_figure(rows: dict, ratios, trained_ratio: float, path: str) -> None:
  curves = {"DendriticLiquid-ViT, keep ratio at inference": [
      (rows[f"dendritic_liquid_vit@{r:g}"]["flops_ratio"],
       100 * rows[f"dendritic_liquid_vit@{r:g}"]["test_accuracy"]) for r in ratios]}
  for name, label in (("vit", "baseline ViT"), ("dendritic_vit", "Dendritic-ViT")):
    curves[label] = [(rows[name]["flops_ratio"], 100 * rows[name]["test_accuracy"])]
  token_maps.tradeoff_figure(
      curves, path, xlabel="FLOPs per image / baseline's", ylabel="test accuracy (%)",
      title=f"Fashion-MNIST: accuracy vs FLOPs (trained at keep ratio {trained_ratio:g})",
      annotations={"DendriticLiquid-ViT, keep ratio at inference": [f"{r:g}" for r in ratios]})


def run(budget: Budget, out: str, workdir: str, data_dir: str = "", ratios=(0.5, 0.7, 0.9)
        ) -> dict:
  cfgs = build_configs(budget, workdir, data_dir)
  train_all(cfgs, workdir)
  models = {}
  for name in MODELS:
    _, task, params, _, _ = trainer.restore_run(os.path.join(workdir, name))
    models[name] = (task.model, params)
  data = cfgs["vit"].data
  ds = vision.load_image_dataset(data.name, source=data.source, data_dir=data.data_dir or None)
  rows = measure(models, ds, budget, ratios)
  images, labels, provider = vision_report.corruption_provider(
      ds, budget.corruption_examples, seed=cfgs["vit"].seed)
  report = robustness.corruption_report(
      {name: vision_report.predictor(*models[name], ds) for name in MODELS},
      images, labels, provider, batch_size=BATCH)
  for name in MODELS:
    rows[name].update(corruption_mean=report[name]["mean"], corruption=report[name])
  outdir = os.path.dirname(os.path.abspath(out))
  os.makedirs(outdir, exist_ok=True)
  pictures = []
  for name in ("dendritic_vit", "dendritic_liquid_vit"):
    pictures += vision_report.write_pictures(*models[name], ds, outdir, prefix=f"{name}_")
  trained_ratio = models["dendritic_liquid_vit"][0].keep_ratio
  sweep_figure(rows, ratios, trained_ratio, os.path.join(outdir, "sweep.png"))
  result = dict(
      machine=common.machine(), budget=dataclasses.asdict(budget), workdir=workdir,
      batch_size=BATCH, models=rows, goals=goals.dlvit_table(rows),
      sweep_note=f"keep ratios applied at inference to the model trained at {trained_ratio}",
      pictures=[os.path.basename(p) for p in pictures] + ["sweep.png"])  # Beside --out.
  common.write_json(out, result)
  return result


def _print(result: dict) -> None:
  print(f"{'model':32s} {'acc %':>6s} {'params':>9s} {'MFLOP/img':>9s} {'x FLOPs':>7s} "
        f"{'img/s':>8s} {'x speed':>7s} {'corrupt %':>9s}")
  for name, r in result["models"].items():
    corrupt = f"{100 * r['corruption_mean']:9.2f}" if "corruption_mean" in r else " " * 9
    print(f"{name:32s} {100 * r['test_accuracy']:6.2f} {r['params']:9,d} "
          f"{r['flops_per_image'] / 1e6:9.2f} {r['flops_ratio']:7.3f} {r['images_per_s']:8.0f} "
          f"{r['throughput_ratio']:7.2f} {corrupt}")
  print("goals:", {k: v for k, v in result["goals"].items() if k.endswith("met")})


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    ratios = [float(r) for r in _RATIOS.value]
    result = run(BUDGETS[_BUDGET.value], _OUT.value, _WORKDIR.value, _DATA_DIR.value, ratios)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  _print(result)


if __name__ == "__main__":
  app.run(main)
