"""Checkpoints with orbax: periodic, on SIGTERM and at the end; keep the last k; resume.

A checkpoint that cannot be read (a truncated file, a half-copied directory) is reported,
moved aside to `<directory>/../corrupt_checkpoints/` (never deleted) and the previous one
is used, so a crash while saving never costs more than one checkpoint interval.
"""

import logging
import os
import shutil
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from ponder import errors

log = logging.getLogger(__name__)


class Checkpointer:
  """Wraps `ocp.CheckpointManager` for one train state pytree."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Saves asynchronously; a step already on disk is left as it is."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore_latest(self, abstract_state: Any) -> Tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable checkpoint into `abstract_state`'s structure.

    Returns (None, None) when there is none. Unreadable ones are quarantined with a
    warning; if every one is unreadable, raises CheckpointError (nothing is deleted).
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        return state, step
      except Exception as e:  # orbax raises many types for a damaged directory.
        where = self._quarantine(step)
        log.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and "
                    "trying the previous one.", step, type(e).__name__, str(e)[:200], where)
    if steps:
      raise errors.CheckpointError(
          f"none of the checkpoints {steps} under {self.directory} could be restored "
          "(see the warnings above; they were moved to corrupt_checkpoints/). If the "
          "model or config changed since they were written, start a new --workdir.")
    return None, None

  def _quarantine(self, step: int) -> str:
    self._manager.wait_until_finished()
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(step))
    suffix = 0
    while os.path.exists(dst):
      suffix += 1
      dst = os.path.join(dst_root, f"{step}.{suffix}")
    shutil.move(src, dst)
    self._manager.close()
    self._manager = self._open()
    return dst

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring into `tree`'s layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
