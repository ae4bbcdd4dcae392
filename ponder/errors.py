"""Errors that tell the researcher what was wrong and what to do next.

Every error raised for bad input (config, data, shapes, checkpoints, a diverging loss)
is a `PonderError`, so a binary can print its message without a traceback.
"""


class PonderError(Exception):
  """Base class: the message says what was wrong and how to fix it."""


class ConfigError(PonderError, KeyError):
  """An unknown or invalid config key or value."""

  def __str__(self):  # KeyError would quote the message.
    return str(self.args[0]) if self.args else ""


class MissingDataError(PonderError, FileNotFoundError):
  """A dataset, tokenizer or weight file is not where it was looked for."""


class ShapeError(PonderError, ValueError):
  """An array has a shape the function cannot take."""


class CheckpointError(PonderError):
  """A checkpoint could not be read or does not fit the model."""


class NonFiniteLossError(PonderError, FloatingPointError):
  """The loss (or another watched metric) became NaN or Inf."""

  def __init__(self, step: int, metric: str, value: float):
    self.step, self.metric, self.value = step, metric, value
    super().__init__(
        f"{metric} became {value} at step {step}. The update of that step was not "
        "applied and no checkpoint was written after it; the last good checkpoint is "
        "intact. Lower optim.lr, tighten optim.clip, or check the batch at this step.")


def unknown_key(kind: str, key: str, valid) -> ConfigError:
  """A ConfigError that lists the valid choices."""
  return ConfigError(f"unknown {kind} {key!r}; valid: {', '.join(sorted(map(str, valid)))}")
