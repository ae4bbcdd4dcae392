"""Shared test fixtures: the repo root, and the real offline data.

`real_data` is the workspace's ../shared/data when present, else the slices of the same
corpora packaged in ponder/data/assets/samples (same layout), so tests of real text run
on every fresh clone. `shared_data` is only the full folder and skips without it.
PONDER_SHARED_DATA=DIR points both at another folder; a missing DIR simulates a fresh
clone (`PONDER_SHARED_DATA=/nonexistent python -m pytest tests/data`).
"""

import os
import pathlib

import pytest

from ponder.data import samples

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("PONDER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_report_header(config):
  del config
  if SHARED_DATA.is_dir():
    return f"real data: {SHARED_DATA} (full)"
  return f"real data: packaged samples in {samples.root()} ({SHARED_DATA} not found)"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return ROOT


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real offline data not found at {SHARED_DATA} (only in the ponder workspace)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def real_data() -> pathlib.Path:
  """../shared/data, or the packaged samples in its layout (`is_sample` tells which)."""
  return SHARED_DATA if SHARED_DATA.is_dir() else samples.root()


def is_sample(data_root: pathlib.Path) -> bool:
  """Whether a `real_data` root is the packaged samples rather than the full data."""
  return data_root == samples.root()


def subprocess_env(devices: int = 1) -> dict:
  """Environment for a child Python with `devices` simulated CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env
