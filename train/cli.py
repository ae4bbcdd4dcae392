"""Command-line plumbing shared by the binaries: clear errors for bad configs, and an
allocator that reuses memory.

`config_flags` reports an unknown `--config.x.y=...` override or a bad config argument
as a deep traceback; `parse_flags` checks them first, in every spelling absl accepts
(`--config=F`, `--config F`, `-config=F`; `--config.k=v`, `--config.k v`), and exits
with one line that names the key and the valid ones.
"""

import importlib.util
import os
import sys
from typing import List, Optional, Tuple

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


def config_args(argv: List[str], flag_name: str = "config") -> Tuple[Optional[str], List[str]]:
  """(the config file spec, the dotted override keys) as absl would read them from argv:
  one or two leading dashes, and a value after `=` or as the next argument."""
  spec, keys = None, []
  for i, arg in enumerate(argv[1:], start=1):
    if not arg.startswith("-") or arg in ("-", "--"):
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    if name == flag_name:
      spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    elif name.startswith(flag_name + "."):
      keys.append(name[len(flag_name) + 1:])
  return spec, keys


def parse_flags(argv: List[str], flag_name: str = "config") -> List[str]:
  """absl `flags_parser` that validates the config and its overrides before parsing."""
  spec, keys = config_args(argv, flag_name)
  try:
    if spec is not None:
      cfg = load_config_file(spec)
      for key in keys:
        check_override(cfg, key)
    return flags.FLAGS(argv)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}\nRun with --help for the flags.", file=sys.stderr)
    sys.exit(2)


# glibc's malloc returns XLA:CPU's large per-step temporaries to the system and takes
# them back as fresh pages every step (about a quarter of a ViT step in page faults on 2
# cores); one arena that never trims or mmaps keeps reusing the same pages.
REUSE_MEMORY_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                         "glibc.malloc.trim_threshold=17179869184")


def reuse_memory(enabled: bool, echo=print) -> None:
  """Re-executes this process with `REUSE_MEMORY_TUNABLES` unless they are set already
  (or `enabled` is False: the system allocator as it is). Call before the work starts:
  the process is replaced by a new one with the same command line."""
  current = os.environ.get("GLIBC_TUNABLES", "")
  if not enabled:
    echo("allocator: the system's malloc as configured (--noreuse_memory)")
    return
  if REUSE_MEMORY_TUNABLES in current:
    echo("allocator: glibc malloc reusing memory (GLIBC_TUNABLES; --noreuse_memory turns "
         "it off)")
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (current,
                                                                REUSE_MEMORY_TUNABLES))))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
