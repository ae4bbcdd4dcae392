"""benchmarks/common.py: a SIGTERM stops the whole benchmark; the op-by-op breakdown
of a jitted train step."""

import functools
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from configs import gpt2_lm
from configs import vit as vit_config
from ponder import checkpoint as ckpt_lib
from train import tasks


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


def test_op_breakdown_names_the_train_step_s_own_ops_largest_first():
  """A GPT-2 step whose 16,384-way output layer of width 128 is most of its work: the
  breakdown's first op must be one of that layer's three matmuls (forward, and the
  gradients of its input and of the tied embedding), and profiling takes steps."""
  cfg = gpt2_lm.get_config("smoke")
  cfg.model.n_embd, vocab = 128, 16384
  model = tasks.build_lm_model(cfg, vocab)
  tokens = np.random.default_rng(0).integers(0, vocab, (8, 33)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens)}
  params = model.init(jax.random.key(0), batch["tokens"][:, :-1])["params"]
  run, _ = common.jitted_train_step(functools.partial(tasks.lm_loss, model=model),
                                    cfg, params, batch)
  for _ in range(3):  # The first calls also pay for thread pools and caches.
    run()
  breakdown = common.op_breakdown(run, top=4, runs=3)
  ops = breakdown["ops"]
  assert len(ops) == 4 and breakdown["summed_op_s"] > 0
  assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
  assert 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
  assert "wte.attend/dot_general" in ops[0]["source"], ops
  state, _ = run()
  assert int(state.step) == 7  # Three runs, three profiled, this one.
