"""Command-line plumbing shared by the binaries: clear errors for bad configs.

`config_flags` reports an unknown `--config.x.y=...` override or a bad config argument
as a deep traceback; `parse_flags` checks them first and exits with one line that names
the key and the valid ones.
"""

import importlib.util
import os
import sys
from typing import List

from absl import flags
import ml_collections

from ponder import errors


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way config_flags does."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise errors.ConfigError(f"config file {path!r} not found; configs live in configs/*.py")
  module_spec = importlib.util.spec_from_file_location("_ponder_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override(cfg: ml_collections.ConfigDict, dotted: str) -> None:
  """Raises ConfigError if `dotted` (e.g. "trainer.total_steps") is not a config field."""
  node, walked = cfg, []
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(walked) or "the top level"
      valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise errors.ConfigError(
          f"unknown config key {dotted!r}: no {part!r} at {where}; valid keys there: "
          f"{', '.join(sorted(valid))}")
    node, walked = node[part], walked + [part]


def parse_flags(argv: List[str], flag_name: str = "config") -> List[str]:
  """absl `flags_parser` that validates the config and its overrides before parsing."""
  prefix = f"--{flag_name}."
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag_name}=")), None)
  try:
    if spec is not None:
      cfg = load_config_file(spec)
      for a in argv:
        if a.startswith(prefix):
          check_override(cfg, a[len(prefix):].split("=", 1)[0])
    return flags.FLAGS(argv)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}\nRun with --help for the flags.", file=sys.stderr)
    sys.exit(2)
