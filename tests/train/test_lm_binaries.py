"""The language-model path end to end: train.main, train.evaluate, train.generate."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


def _run(module, *args):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gpt2_smoke")
  cache = tmp_path_factory.mktemp("token_cache")
  _run("train.main", "--config=configs/gpt2_lm.py:smoke", f"--workdir={workdir}",
       f"--config.data.cache_dir={cache}")
  return workdir


def test_generate_is_reproducible_for_a_seed(smoke_run):
  args = (f"--workdir={smoke_run}", "--prompt=The", "--max_new_tokens=20")
  first = _run("train.generate", *args, "--seed=0")
  assert first == _run("train.generate", *args, "--seed=0")
  assert first.startswith("The") and len(first) > len("The")
  assert first != _run("train.generate", *args, "--seed=1")


def test_evaluate_reports_the_training_runs_final_perplexity(smoke_run):
  final = json.loads((smoke_run / "final_metrics.json").read_text())
  out = json.loads(_run("train.evaluate", f"--workdir={smoke_run}", "--split=valid")
                   .strip().splitlines()[-1])
  assert out["step"] == 3 and out["tokens"] == final["tokens"]
  assert math.isclose(out["perplexity"], final["perplexity"], rel_tol=1e-5)
  assert math.isclose(out["perplexity"], math.exp(out["nll"]), rel_tol=1e-9)
