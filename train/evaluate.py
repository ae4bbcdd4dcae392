"""Evaluates the newest checkpoint of a run on a split.

  python -m train.evaluate --workdir=runs/gpt2_wt2 --split=valid [--stride=64]

Language models report the mean token NLL and perplexity (exp of the mean NLL over every
token of the split; with --stride < seq_len each token is scored with more context, as
in the Hugging Face perplexity guide). Classifiers report test accuracy.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from ponder import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.main --workdir.")
_SPLIT = flags.DEFINE_string("split", "valid", "Split to score (language models).")
_STRIDE = flags.DEFINE_integer("stride", 0, "Sliding-window stride; 0 = the run's setting.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from train import trainer
  try:
    cfg = trainer.load_config(_WORKDIR.value)
    overrides = {}
    if cfg.task == "language_model":
      overrides = dict(eval_split=_SPLIT.value, eval_stride=_STRIDE.value or cfg.data.eval_stride)
    cfg, task, params, step, mesh = trainer.restore_run(_WORKDIR.value, **overrides)
    eval_fn = jax.jit(task.eval_fn)
    metrics = trainer.evaluate(task, eval_fn, params, mesh)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({"step": step, "split": _SPLIT.value if overrides else "test", **metrics}))


if __name__ == "__main__":
  app.run(main)
