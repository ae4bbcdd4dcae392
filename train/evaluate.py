"""Evaluates the newest checkpoint of a run on a split.

  python -m train.evaluate --workdir=runs/gpt2_wt2 --split=valid [--stride=64]
  python -m train.evaluate --workdir=runs/dlvit --corruptions=2000 --pictures
  python -m train.evaluate --workdir=runs/goose/fdd --spikes [--teacher_workdir=DIR]
  python -m train.evaluate --workdir=runs/minilm_sst2 --params_dir=plasticity/baseline

Language models report the mean token NLL and perplexity (exp of the mean NLL over every
token of the split; with --stride < seq_len each token is scored with more context, as
in the Hugging Face perplexity guide). Classifiers report test accuracy; with
--corruptions=N also the accuracy on the first N test images under each of the 15
common corruptions at 5 severities, their mean and the drop from clean
(--corruption_source=tfds reads the released CIFAR-10-C instead), written to
WORKDIR/eval/corruptions.json; --pictures writes the dendritic models' kept-token masks
and importance heatmaps to WORKDIR/eval/*.png (train/vision_report.py). --spikes
(a spiking RWKV student of configs/goose.py) writes the spike validation report against
the GPT-2 teacher: firing rates, dead and saturated channels, the rate histograms, MI
with its shuffled baseline, the CKA heatmap, each check against the seed's threshold
(WORKDIR/eval/spikes/spikes.json, firing_rates.png, cka.png).
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from ponder import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.main --workdir.")
_SPLIT = flags.DEFINE_string("split", "valid", "Split to score: language models "
                             "train|valid|test (default valid); classifiers (images, "
                             "text) val|test (default test).")
_STRIDE = flags.DEFINE_integer("stride", 0, "Sliding-window stride; 0 = the run's setting.")
_CORRUPTIONS = flags.DEFINE_integer("corruptions", 0, "Classifiers: test images to corrupt "
                                    "(0 = no corruption evaluation).")
_CORRUPTION_SOURCE = flags.DEFINE_enum("corruption_source", "generated", ["generated", "tfds"],
                                       "generated (ponder.data.corruptions) or tfds "
                                       "cifar10_corrupted.")
_PICTURES = flags.DEFINE_bool("pictures", False, "Classifiers: write kept-token and "
                              "importance PNGs of the dendritic models.")
_SPIKES = flags.DEFINE_bool("spikes", False, "Spiking students (configs/goose.py): write "
                           "the spike validation report to WORKDIR/eval/spikes/.")
_TEACHER = flags.DEFINE_string("teacher_workdir", "", "--spikes: the GPT-2 run to compare "
                               "with; '' = the run's own distillation teacher.")
_SPIKE_BATCHES = flags.DEFINE_integer("spike_batches", 8, "--spikes: validation batches "
                                      "in the report.")
_PARAMS_DIR = flags.DEFINE_string("params_dir", "", "Score the newest parameters saved in "
                                  "this folder of the workdir instead of its checkpoint "
                                  "(e.g. plasticity/baseline: a plasticity run's unpruned "
                                  "baseline), in the structure of its config.json.")
_REUSE_MEMORY = flags.DEFINE_bool("reuse_memory", True, "As train.main's --reuse_memory.")
flags.mark_flags_as_required(["workdir"])


def _vision_extras(cfg, task, params, outdir) -> dict:
  """The corruption report and pictures the flags ask for (classifiers only)."""
  from ponder.analysis import robustness
  from ponder.data import vision
  from train import vision_report
  ds = vision.load_image_dataset(cfg.data.name, source=cfg.data.source,
                                 data_dir=cfg.data.data_dir or None)
  out = {}
  if _CORRUPTIONS.value:
    images, labels, provider = vision_report.corruption_provider(
        ds, _CORRUPTIONS.value, seed=cfg.seed, source=_CORRUPTION_SOURCE.value)
    report = robustness.corruption_report(
        {"model": vision_report.predictor(task.model, params, ds)}, images, labels,
        provider)["model"]
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "corruptions.json"), "w") as f:
      json.dump(report, f, indent=2)
    out.update(corruption_mean=report["mean"], corruption_drop=report["drop"])
  if _PICTURES.value:
    out["pictures"] = vision_report.write_pictures(task.model, params, ds, outdir)
  return out



def _spike_report(cfg, task, params, outdir) -> dict:
  """The ASNN-Goose spike validation report (train/goose.py, ponder/analysis/spikes.py)."""
  from ponder.analysis import spikes
  from train import goose
  if cfg.task != "lm_distillation":
    raise errors.ConfigError(f"--spikes reads a spiking student (configs/goose.py); this "
                             f"run is a {cfg.task!r} run.")
  rep = goose.spike_validation(task.model, params["student"],
                               goose.report_teacher(cfg, _TEACHER.value),
                               task.eval_batches(), max_batches=_SPIKE_BATCHES.value,
                               seed=cfg.seed)
  files = spikes.write_report(rep, outdir)
  return {"spikes_passed": rep["passed"], "spike_density": goose.spike_density(rep),
          "spike_checks": {k: [c["value"], c["threshold"], c["pass"]]
                           for k, c in rep["checks"].items()}, "spike_files": files}


def _classifier_split() -> str:
  split = _SPLIT.value if flags.FLAGS["split"].present else "test"
  split = {"valid": "val"}.get(split, split)
  if split not in ("val", "test"):
    raise errors.unknown_key("classifier split", split, ("val", "test"))
  return split


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from train import cli
  cli.reuse_memory(_REUSE_MEMORY.value, echo=lambda s: None)
  import jax
  from train import trainer
  try:
    cfg = trainer.load_config(_WORKDIR.value)
    overrides, split = {}, _SPLIT.value
    if cfg.task in ("language_model", "lm_distillation"):
      overrides = dict(eval_split=split, eval_stride=_STRIDE.value or cfg.data.eval_stride)
    else:
      split = _classifier_split()
    cfg, task, params, step, mesh = trainer.restore_run(
        _WORKDIR.value, params_dir=_PARAMS_DIR.value, **overrides)
    eval_fn = jax.jit(task.eval_fn)
    which = "val"  # Language models: the split named in the overrides.
    lm_task = cfg.task in ("language_model", "lm_distillation")
    if not lm_task and task.test_batches is None:
      if split == "val":  # data.val_size=0: its evaluations were on test.
        raise errors.ConfigError(f"{_WORKDIR.value} was trained without a validation "
                                 "split (data.val_size=0); score --split=test.")
    elif not lm_task:
      which = split
    metrics = trainer.evaluate(task, eval_fn, params, mesh, split=which)
    if _SPIKES.value:
      metrics.update(_spike_report(cfg, task, params,
                                   os.path.join(_WORKDIR.value, "eval", "spikes")))
    if cfg.task == "classification":
      metrics.update(_vision_extras(cfg, task, params, os.path.join(_WORKDIR.value, "eval")))
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({"step": step, "split": split, **metrics}))


if __name__ == "__main__":
  app.run(main)
