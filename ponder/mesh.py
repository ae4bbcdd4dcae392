"""Device mesh and shardings.

The same code runs on 1 CPU, 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), a GPU or a TPU slice: a `Mesh`
with a `data` axis (batch) and a `model` axis (parameters, size 1 unless asked for).
"""

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ponder import errors

DATA, MODEL = "data", "model"


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A (data, model) mesh; `data=-1` takes every device left after `model`."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % model:
      raise errors.ConfigError(
          f"mesh.model={model} does not divide the {len(devices)} devices; pick a divisor.")
    data = len(devices) // model
  if data * model != len(devices):
    raise errors.ConfigError(
        f"mesh data={data} x model={model} needs {data * model} devices but "
        f"{len(devices)} are present; set mesh.data=-1 to use all of them.")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA]
  if batch_size < 1:
    raise errors.ConfigError(
        f"trainer.batch_size={batch_size}; it must be a positive multiple of the {n} "
        "device(s) of the data axis.")
  if batch_size % n:
    raise errors.ConfigError(
        f"trainer.batch_size={batch_size} is not divisible by the {n} devices of the data "
        f"axis; use a multiple of {n} (e.g. {max(n, batch_size // n * n)}).")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Places a global host batch on the mesh, split over `data`.

  Every process computes the same global batch (the order is a pure function of seed and
  step) and contributes its contiguous slice, so the same code runs on one host or many
  (`jax.distributed.initialize`).
  """
  sharding = batch_sharding(mesh)
  n, i = jax.process_count(), jax.process_index()

  def put(v):
    v = np.asarray(v)
    local = v.shape[0] // n
    return jax.make_array_from_process_local_data(sharding, v[i * local:(i + 1) * local],
                                                  v.shape)

  return {k: put(v) for k, v in batch.items()}
