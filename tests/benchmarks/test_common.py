"""benchmarks/common.py: a SIGTERM stops the whole benchmark; the op-by-op breakdown
of a jitted train step; which runs of `train_parallel` wait for which."""

import functools
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
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
  breakdown's first op must be that layer's (one of its three matmuls, or the softmax
  over its logits), and profiling takes steps."""
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
  # The output layer's ops: the logits matmul [256, 16384], the input gradient
  # [256, 128], the embedding gradient [16384, 128] and the softmax's exp over
  # [8, 32, 16384]. Which is largest depends on XLA:CPU's kernels and on what else
  # shares the cores (under pytest-xdist the exp fusion has come first).
  top = ops[0]
  assert top["source"].startswith("jit(train_step)"), ops
  assert "16384" in top["shape"] or (top["shape"] == "f32[256,128]"
                                     and "dot_general" in top["source"]), ops
  state, _ = run()
  assert int(state.step) == 7  # Three runs, three profiled, this one.


def test_peak_probe_keeps_the_best_rate_per_precision_over_sizes_and_calls():
  ticks = iter([0.0, 2.0,  # float32 n=10: 2 s, then bf16 n=10: 1 s
                2.0, 3.0,
                10.0, 10.5,  # Second call: float32 faster (0.5 s), bf16 slower (4 s).
                20.0, 24.0])
  ran = []
  probe = common.PeakProbe(sizes=(10,), frameworks={
      "fake": lambda dtype, n: lambda: ran.append((dtype, n))}, clock=lambda: next(ticks))
  probe()
  probe()
  assert ran == [("float32", 10), ("bfloat16", 10)] * 2
  assert probe.peak("float32") == pytest.approx(2 * 10 ** 3 / 0.5)
  assert probe.peak("bfloat16") == pytest.approx(2 * 10 ** 3 / 1.0)
  record = probe.record()
  assert record["calls"] == 2
  assert record["peak_flops"] == {"bfloat16": pytest.approx(2000.0),
                                  "float32": pytest.approx(4000.0)}
  assert record["best_flops"]["fake/float32/10"] == pytest.approx(4000.0)
  assert common.mfu(1000.0, 0.5, probe.peak("float32")) == pytest.approx(0.5)


def test_peak_probe_over_frameworks_and_sizes_takes_the_maximum():
  times = {("a", 10): 1.0, ("a", 20): 1.0, ("b", 10): 0.1, ("b", 20): 100.0}
  clock = [0.0]

  def make(fw):
    def matmul(dtype, n):
      def run():
        clock[0] += times[fw, n]
      return run
    return matmul

  probe = common.PeakProbe(sizes=(10, 20), dtypes=("float32",),
                           frameworks={"a": make("a"), "b": make("b")},
                           clock=lambda: clock[0])
  probe()
  assert probe.peak("float32") == pytest.approx(max(2 * 20 ** 3 / 1.0, 2 * 10 ** 3 / 0.1))


def test_peak_probe_skips_a_framework_that_sits_a_precision_out():
  ran = []
  probe = common.PeakProbe(sizes=(10,), frameworks={
      "both": lambda dtype, n: lambda: ran.append(("both", dtype)),
      "f32_only": lambda dtype, n: (lambda: ran.append(("f32_only", dtype)))
                                   if dtype == "float32" else None})
  probe()
  assert sorted(ran) == [("both", "bfloat16"), ("both", "float32"), ("f32_only", "float32")]
  assert set(probe.record()["best_flops"]) == {"both/float32/10", "both/bfloat16/10",
                                               "f32_only/float32/10"}


def test_load_record_marks_a_run_above_the_limit():
  # The run's own 2 busy cores raise the load after it by about 2.
  assert not common.load_record((0.4, 1.0, 1.0), (3.5, 1.0, 1.0), own=2)["loaded"]
  assert common.load_record((0.4, 1.0, 1.0), (3.6, 1.0, 1.0), own=2)["loaded"]
  assert common.load_record((0.4, 1.0, 1.0), (1.6, 1.0, 1.0), own=0)["loaded"]
  record = common.load_record((2.0, 1.0, 1.0), (0.2, 0.3, 0.4), limit=1.5, own=2)
  assert record["loaded"] and record["load_average_end"] == [0.2, 0.3, 0.4]
  assert record["loaded_above_after"] == 3.5


def test_system_allocator_env_drops_only_the_reuse_tunables(monkeypatch):
  from train import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.foo=1:" + cli.REUSE_MEMORY_TUNABLES)
  assert common.system_allocator_env()["GLIBC_TUNABLES"] == "glibc.foo=1"
  monkeypatch.setenv("GLIBC_TUNABLES", cli.REUSE_MEMORY_TUNABLES)
  env = common.system_allocator_env()
  assert "GLIBC_TUNABLES" not in env and env["PATH"] == os.environ["PATH"]


def child_counter(start: int):
  """A `ChildStep` builder: each step adds one; info reports the child's tunables."""
  state = {"n": start}

  def run():
    state["n"] += 1
    info["final_loss"] = float(state["n"])
    return state["n"]

  info = dict(glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), pid=os.getpid())
  return run, info


def test_child_step_runs_in_a_process_with_the_given_environment():
  env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
  child = common.ChildStep("tests.benchmarks.test_common:child_counter", dict(start=5), env)
  try:
    assert child.info["glibc_tunables"] == "glibc.malloc.arena_max=2"
    assert child.info["pid"] != os.getpid()
    assert os.environ.get("GLIBC_TUNABLES") != "glibc.malloc.arena_max=2"  # Restored.
    assert [child(), child()] == [6.0, 7.0] and child.info["final_loss"] == 7.0
  finally:
    child.close()


def test_run_dependencies_follow_init_and_teacher_workdirs(tmp_path):
  def cfg(init="", teacher=""):
    return ml_collections.ConfigDict(dict(init=dict(from_workdir=init),
                                          distill=dict(teacher_workdir=teacher)))
  base, other = str(tmp_path / "vit_s0"), str(tmp_path / "vit_s1")
  runs = {base: ml_collections.ConfigDict(dict(trainer=dict(total_steps=1))),  # No init.
          other: cfg(),
          str(tmp_path / "finetune"): cfg(init=base, teacher=base),
          # Relative and absolute spellings of one workdir are the same run.
          str(tmp_path / "scratch"): cfg(teacher=os.path.relpath(other)),
          # A teacher outside `runs` is not waited for.
          str(tmp_path / "outside"): cfg(teacher="/elsewhere/teacher")}
  assert common.run_dependencies(runs) == {
      base: set(), other: set(), str(tmp_path / "finetune"): {base},
      str(tmp_path / "scratch"): {other}, str(tmp_path / "outside"): set()}
