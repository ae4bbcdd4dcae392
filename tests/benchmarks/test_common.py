"""benchmarks/common.py's training wrapper: a SIGTERM stops the whole benchmark."""

import os
import signal
import threading
import time

import pytest

from benchmarks import common
from configs import vit as vit_config
from ponder import checkpoint as ckpt_lib


def test_sigterm_checkpoints_the_run_and_stops_the_benchmark(tmp_path):
  cfg = vit_config.get_config("smoke")
  cfg.trainer.update(total_steps=10_000, log_every=1, ckpt_every=10_000, eval_every=10_000)
  metrics = tmp_path / "metrics.jsonl"

  def terminate_once_training():  # After compilation, while the loop polls the flag.
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists()
                                      or len(metrics.read_text().splitlines()) < 2):
      time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate_once_training, daemon=True).start()
  with pytest.raises(SystemExit, match="rerun the same command to resume"):
    common.train(cfg, str(tmp_path), echo=lambda s: None)
  step = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step()
  assert step is not None and 2 <= step < 10_000
