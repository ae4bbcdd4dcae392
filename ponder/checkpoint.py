"""Checkpoints with orbax: periodic, on SIGTERM and at the end; keep the last k; resume.

A checkpoint that cannot be read (a truncated file, a half-copied directory) is reported,
moved aside to `<directory>/../corrupt_checkpoints/` (never deleted) and the previous one
is used, so a crash while saving never costs more than one checkpoint interval.

A checkpoint that reads fine but does not fit the requested state (another model size,
another optimizer) is not corrupt: restoring it raises `CheckpointError` naming the
arrays that differ, and the checkpoint stays where it is.
"""

import logging
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from ponder import errors

log = logging.getLogger(__name__)


class Checkpointer:
  """Wraps `ocp.CheckpointManager` for one train state pytree.

  With `best_metric`, the `keep` checkpoints kept are the best by that entry of the
  metrics passed to `save` (`best_mode` "max" or "min"), not the newest.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max"):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.best_metric, self.best_mode = best_metric, best_mode
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    best = {}
    if self.best_metric:
      metric = self.best_metric
      best = dict(best_fn=lambda m: float(m[metric]), best_mode=self.best_mode)
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, **best)
    # The handler named up front lets `item_metadata` read checkpoints of earlier runs.
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())

  def best_step(self) -> Optional[int]:
    """The step of the best checkpoint kept (`best_metric` managers), or None."""
    return self._manager.best_step()

  def restore(self, step: int, abstract: Any) -> Any:
    """Checkpoint `step` into `abstract`'s structure (no fallback: for a known step)."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, metrics: Optional[dict] = None) -> None:
    """Saves asynchronously; a step already on disk is left as it is."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore_latest(self, abstract_state: Any) -> Tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable checkpoint into `abstract_state`'s structure, or
    into `abstract_state(step)`'s when it is a function of the step (a run whose
    structure changes between phases).

    Returns (None, None) when there is none. Unreadable ones are quarantined with a
    warning; if every one is unreadable, raises CheckpointError (nothing is deleted).
    """
    steps = self.all_steps()
    abstract_for = abstract_state if callable(abstract_state) else lambda _: abstract_state
    for step in reversed(steps):
      abstract_state = abstract_for(step)
      try:
        saved = leaf_shapes(self._manager.item_metadata(step).tree)
      except Exception:  # pylint: disable=broad-except
        saved = None  # No readable metadata: only a failed restore below means damage.
      mismatch = saved and describe_mismatch(saved, leaf_shapes(abstract_state))
      if mismatch:
        raise errors.CheckpointError(
            f"the checkpoint at step {step} under {self.directory} does not fit the "
            f"requested model and optimizer: {mismatch}. It was left in place. Train "
            "the new config in a new --workdir, or rerun with the config the workdir was "
            "made with (its config.json).")
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        return state, step
      except Exception as e:  # A truncated or missing array file.
        self._report_unreadable(step, e)
    if steps:
      raise errors.CheckpointError(
          f"none of the checkpoints {steps} under {self.directory} could be read "
          "(see the warnings above; they were moved to corrupt_checkpoints/, nothing was "
          "deleted). Start again in a new --workdir, or copy an intact checkpoint back.")
    return None, None

  def _report_unreadable(self, step: int, error: Exception) -> None:
    where = self._quarantine(step)
    log.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and "
                "trying the previous one.", step, type(error).__name__, str(error)[:200],
                where)

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


def leaf_shapes(tree: Any) -> Dict[str, tuple]:
  """{"params/dense/kernel": shape, ...} for a state, an abstract state or the tree of
  orbax's checkpoint metadata (the three name their leaves alike)."""
  def name(path):
    return "/".join(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)))
                    for k in path)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {name(path): tuple(leaf.shape) for path, leaf in leaves}


def describe_mismatch(saved: Dict[str, tuple], wanted: Dict[str, tuple],
                      limit: int = 6) -> str:
  """"" when the two leaf-shape maps agree, else the first differences in words."""
  parts = [f"{k} is {saved[k]} in the checkpoint but {wanted[k]} now"
           for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  parts += [f"{k} is missing from the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
  parts += [f"{k} is in the checkpoint but not in the model"
            for k in sorted(saved.keys() - wanted.keys())]
  more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
  return "; ".join(parts[:limit]) + more


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring into `tree`'s layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
