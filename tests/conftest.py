"""Shared test fixtures: the repo root, and the real offline data.

`real_data` is the workspace's ../shared/data when present, else the slices of the same
corpora packaged in ponder/data/assets/samples (same layout), so tests of real text run
on every fresh clone. `shared_data` is only the full folder and skips without it.
PONDER_SHARED_DATA=DIR points both at another folder; a missing DIR simulates a fresh
clone (`PONDER_SHARED_DATA=/nonexistent python -m pytest tests/data`).

The session shares one persistent JAX compilation cache (`_compilation_cache`).
"""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

from ponder.data import samples

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("PONDER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _compilation_cache() -> str:
  """One persistent JAX compilation cache for the test session, shared by the xdist
  workers and every child process (train.main, the benchmarks and the notebook kernels
  inherit the environment variables). The suite compiles the same smoke steps in many
  processes, and a cache hit returns the executable XLA would build again: the key is the
  program, the compile options and the jax version. The process that makes the
  directory (the xdist controller, or a plain pytest) removes it at exit. Set
  JAX_COMPILATION_CACHE_DIR to keep one between sessions."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    path = tempfile.mkdtemp(prefix="ponder-test-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # A size limit turns on the cache's file lock, so that one process never reads an
  # entry another is still writing.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
  import jax  # pylint: disable=g-import-not-at-top
  # Also for this process, where jax may have read the environment before this ran.
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_compilation_cache_max_size",
                    int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


COMPILATION_CACHE = _compilation_cache()


def pytest_report_header(config):
  del config
  cache = f"compilation cache: {COMPILATION_CACHE}"
  if SHARED_DATA.is_dir():
    return [f"real data: {SHARED_DATA} (full)", cache]
  return [f"real data: packaged samples in {samples.root()} ({SHARED_DATA} not found)", cache]


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
