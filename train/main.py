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
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir's run with a config that differs "
    "from its config.json (for fields that keep the state's shape, e.g. optim.lr).")
_REUSE_MEMORY = flags.DEFINE_bool(
    "reuse_memory", True, "Run with glibc malloc settings that reuse memory between "
    "steps (re-executes the command with GLIBC_TUNABLES set); --noreuse_memory = off.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # jax logs backend probing at INFO.
  cli.reuse_memory(_REUSE_MEMORY.value)
  import jax  # After flag parsing, so --help is fast.
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from train import trainer
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                        allow_config_change=_ALLOW_CHANGE.value)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if "split" in result:
    print(final_line(result))
    if _CONFIG.value.get("reference", ""):
      print(f"expected: {_CONFIG.value.reference}")


def _fmt(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items() if isinstance(v, (int, float)))


def final_line(result: dict) -> str:
  """`final: <headline metrics> (<split>, step S selected on ...; val ...)`."""
  headline = result["test"] or result["val"]
  return (f"final: {_fmt(headline)} ({result['split']}; step {result['selected_step']} "
          f"selected on {result['selected_on']}; val {_fmt(result['val'])})")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
