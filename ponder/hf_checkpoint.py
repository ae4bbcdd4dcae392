"""The files of a Hugging Face checkpoint directory, read without torch where possible.

A directory holds `config.json` and the weights as `model.safetensors` (read with
safetensors' numpy API) or, in older checkpoints, the torch pickle `pytorch_model.bin`
(read only when torch is installed). `models/gpt2.py` and `models/bert.py` map the
tensor names to their parameter trees.
"""

import pathlib
from typing import Optional

import numpy as np

from ponder import errors

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"


def read_state_dict(directory: pathlib.Path,
                    model_class: str) -> tuple[dict[str, np.ndarray], Optional[str]]:
  """(name -> float/int array, the safetensors "format" metadata or None).

  `model_class` is the transformers class named in the error that says how to convert
  a torch pickle when torch is missing (e.g. "BertModel").
  """
  directory = pathlib.Path(directory)
  if (directory / SAFETENSORS_FILE).is_file():
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(directory / SAFETENSORS_FILE, "np") as f:
      fmt = (f.metadata() or {}).get("format")
      return {k: f.get_tensor(k) for k in f.keys()}, fmt
  if (directory / TORCH_FILE).is_file():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.CheckpointError(
          f"{directory / TORCH_FILE} is a torch pickle and torch is not installed. "
          "Install torch, or convert the checkpoint once where torch is available "
          f"(transformers: {model_class}.from_pretrained(dir).save_pretrained(dir, "
          "safe_serialization=True)) to get model.safetensors.") from e
    state = torch.load(directory / TORCH_FILE, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v).numpy()
            for k, v in state.items()}, None
  raise errors.MissingDataError(f"no {SAFETENSORS_FILE} or {TORCH_FILE} in {directory}.")
