"""Trains and evaluates one experiment config.

  python -m train.main --config=configs/vit.py:fashion_mnist --workdir=runs/vit_fmnist \
      [--config.trainer.total_steps=2000 ...]

The workdir gets config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/ and
final_metrics.json. Rerunning the same command resumes from the latest checkpoint.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ponder import errors
from train import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Multi-host: call jax.distributed.initialize() first "
    "(run the same command on every host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # jax logs backend probing at INFO.
  import jax  # After flag parsing, so --help is fast.
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from train import trainer
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  metrics = {k: v for k, v in result.items()
             if k not in ("state", "resumed_from", "preempted")}
  if metrics:
    print("final: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in metrics.items()))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
