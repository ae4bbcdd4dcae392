"""Training tokens/s of ponder's GPT-2 step beside Hugging Face's Flax and PyTorch GPT-2.

  python -m benchmarks.lm_throughput --out=lm_throughput.json [--quick]

One run, one machine, one model size, batch and sequence length, one optimizer:

* ponder: `jax.jit(partial(train.trainer.train_step, ...), donate_argnums=(0,))`, the
  step the trainer runs, on `models/gpt2.py`.
* hf_flax: transformers' `FlaxGPT2LMHeadModel` inside the same jitted step (same optax
  AdamW, schedule and clipping from `train.trainer.make_optimizer`).
* torch: transformers' PyTorch `GPT2LMHeadModel` (eager, its default attention) with
  `torch.optim.AdamW` on the same decay groups, schedule and global-norm clipping.

All three start from the same weights (ponder's initialisation written with
`gpt2.to_hf` and read back by transformers), take the same steps on the same batch with
dropout off, so their final losses agree: a check that they compute the same thing.
The sides step in round robin and the median synced step time is kept.

Issue 21's sides, in the same round robin: `ponder_old_default` (the system
allocator, float32, 3-D `nn.Dense`; a child process, `common.ChildStep`),
`ponder_chunked_ce` (the tied output layer and cross-entropy `CE_CHUNK` tokens at a
time, `lm.tied_token_nll`), `ponder_bf16` (dtype=bfloat16: bf16 matmuls with float32
accumulation forward and backward) beside `torch_bf16` (torch's CPU autocast; skipped
without AVX512_BF16, `common.torch_bf16_sides`). The
other sides share this process's allocator (`--reuse_memory`).

MFU: compiled training FLOPs per step (XLA's count for ponder's step) x steps/s over
the matmul peak of the side's precision (`common.PeakProbe`, measured between the
rounds of the steps; a run above load 1.5 is marked `loaded`);
`goal` (`benchmarks.goals.lm_throughput`) checks ponder at 1.2x the faster peer, and
`goal_needs_mfu` is the MFU such a step would need. `top_ops`, for the two JAX sides, is
where their step's time goes, op by op, from a profiler trace taken after the timed
steps.

Decoding: `gpt2.generate` with the key/value cache against full recomputation at every
step (`use_cache=False`), greedy, batch 1; tokens/s of new tokens.
"""

import functools
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import goals
from benchmarks import steps as step_lib
from models import gpt2
from ponder import analysis
from ponder import errors
from ponder import lm
from train import cli
from train import tasks

try:
  import torch
  from torch.nn import functional as F
  import transformers
except ImportError as e:  # The peers are optional for the library, not here.
  raise errors.PonderError(
      f"this benchmark needs PyTorch and transformers 4.57 ({e}); install the bench "
      "extra: pip install -e .[bench]") from e

_FLAGS = common.define_step_flags(
    quick="~1 minute: a 2-layer model, batch 4, sequence 64, fewer runs.",
    bf16="Also time ponder with dtype=bfloat16 and torch under bf16 autocast.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 112,
                                      "New tokens per decoding run (after a 16-token prompt).")

PROMPT_LEN = 16


def _hf_flax_loss(params, batch, key, *, model, train: bool, step=None):
  """tasks.lm_loss for transformers' Flax GPT-2 (same NLL, same shifted targets; the
  trainer's `step` is not read)."""
  del step
  tokens = batch["tokens"]
  logits = model(tokens[:, :-1], params=params, train=train, dropout_rng=key).logits
  return lm.token_nll(logits, tokens[:, 1:]).mean(), {}


def _torch_step(cfg, directory, tokens, total_steps, dtype="float32"):
  """transformers' PyTorch GPT-2 from the same weights, in the same step; bfloat16 is
  the forward under torch's CPU autocast (the peer of ponder's dtype=bfloat16)."""
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).train()
  ids = torch.from_numpy(tokens.astype(np.int64))
  inputs, targets = ids[:, :-1], ids[:, 1:]

  def loss_of():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(inputs).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

  return common.torch_train_step(model, cfg, total_steps, loss_of)


def _training(quick: bool, *, warmup: int, runs: int, probe, bf16: bool,
              old_default: bool) -> dict:
  cfg, model, tokens, params = step_lib.lm_setup(quick, "float32")
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len
  total_steps = 2 + warmup + runs
  out = dict(config="configs/gpt2_lm.py:wikitext2 (dropout 0)", batch_size=bs, seq_len=seq,
             n_layer=model.config.n_layer, n_embd=model.config.n_embd,
             n_head=model.config.n_head, vocab_size=step_lib.VOCAB,
             params=analysis.count_params(params), ce_chunk=step_lib.CE_CHUNK)
  batch = {"tokens": jnp.asarray(tokens)}
  steps = {}
  variants = [("ponder", "float32", tasks.lm_loss),
              ("ponder_chunked_ce", "float32", step_lib.chunked_ce_loss)]
  variants += [("ponder_bf16", "bfloat16", tasks.lm_loss)] if bf16 else []
  for side, dtype, loss in variants:
    print(f"compiling ponder's jitted train step ({side}) ...", flush=True)
    steps[side], out[side] = step_lib.lm_step(quick, dtype, loss)
  if old_default:
    print("compiling the old default step in a child process ...", flush=True)
    child = common.ChildStep("benchmarks.steps:lm_old_default_step",
                             dict(quick=quick), common.system_allocator_env())
    steps["ponder_old_default"], out["ponder_old_default"] = child, child.info
  with tempfile.TemporaryDirectory(prefix="gpt2_bench_") as directory:
    gpt2.to_hf(model, jax.device_get(params), directory)
    print("loading and compiling transformers' FlaxGPT2LMHeadModel ...", flush=True)
    hf = transformers.FlaxGPT2LMHeadModel.from_pretrained(directory, from_pt=True)
    steps["hf_flax"], out["hf_flax"] = common.jitted_train_step(
        functools.partial(_hf_flax_loss, model=hf), cfg, hf.params, batch)
    torch_bf16 = common.torch_bf16_sides(["torch_bf16"] if bf16 else [], out)
    for side, dtype in [("torch", "float32")] + [(side, "bfloat16") for side in torch_bf16]:
      print(f"first step of transformers' PyTorch GPT2LMHeadModel ({dtype}) ...", flush=True)
      steps[side], out[side] = _torch_step(cfg, directory, tokens, total_steps, dtype)
  for side in steps:
    if not side.startswith("torch"):
      steps[side]()  # So that every side has taken the same number of steps.
  print(f"timing {', '.join(steps)} in round robin ...", flush=True)
  timings = analysis.measure_interleaved(dict(steps, peak_probe=probe), warmup=warmup,
                                         runs=runs)
  timings.pop("peak_probe")
  if old_default:
    child.close()
  final_losses = {side: float(out[side]["final_loss"]) for side in steps}
  # Profiling takes more steps: the final losses are read before it.
  print("profiling the JAX steps op by op ...", flush=True)
  for side in ("ponder", "ponder_chunked_ce", "hf_flax"):
    out[side]["top_ops"] = common.op_breakdown(steps[side])
  flops = out["ponder"]["train_flops_per_step_compiled"]
  for side, timing in timings.items():
    dtype = "bfloat16" if side.endswith("_bf16") else "float32"
    out[side].update(timing, final_loss=final_losses[side], precision=dtype,
                     tokens_per_s=bs * seq / timing["median_s"],
                     mfu=common.mfu(flops, timing["median_s"], probe.peak(dtype)))
  out["cpu_speed"] = goals.cpu_speed({side: out[side]["tokens_per_s"] for side in timings})
  out["chunked_ce_over_full"] = (out["ponder_chunked_ce"]["tokens_per_s"]
                                 / out["ponder"]["tokens_per_s"])
  return out


def _decoding(cfg, *, new_tokens: int, runs: int) -> dict:
  model = tasks.build_lm_model(cfg, step_lib.VOCAB)
  if PROMPT_LEN + new_tokens > model.config.n_positions:
    raise errors.ConfigError(f"--decode_tokens={new_tokens} + the {PROMPT_LEN}-token prompt "
                             f"exceeds the model's {model.config.n_positions} positions.")
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, step_lib.VOCAB, (1, PROMPT_LEN)),
                       jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), prompt)["params"]
  run = lambda use_cache: lambda: gpt2.generate(
      model, params, prompt, key=jax.random.key(0), max_new_tokens=new_tokens,
      temperature=0.0, use_cache=use_cache)
  cached, recomputed = run(True)(), run(False)()
  times = analysis.measure_interleaved({"cache": run(True), "recompute": run(False)},
                                       warmup=1, runs=runs)
  rate = lambda name: new_tokens / times[name]["median_s"]
  return dict(batch_size=1, prompt_len=PROMPT_LEN, new_tokens=new_tokens,
              same_tokens=bool(jnp.array_equal(cached, recomputed)),
              cache_tokens_per_s=rate("cache"), recompute_tokens_per_s=rate("recompute"),
              cache_speedup=rate("cache") / rate("recompute"))


def _print_summary(result: dict) -> None:
  m, t = result["machine"], result["training"]
  print(f"\nmachine: {m['cpu_count']} CPU ({m['processor']}), jax {m['jax_version']}, "
        f"torch {m['torch_version']}, transformers {m['transformers_version']}; "
        f"1-min load {m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}")
  print(f"GPT-2 {t['n_layer']}x{t['n_embd']} ({t['params']:,} params), batch "
        f"{t['batch_size']} x seq {t['seq_len']}\n")
  print(f"{'side':18} {'tokens/s':>9} {'step ms':>8} {'MFU':>6} {'ponder x':>8} "
        f"{'final loss':>10}")
  for side in [k for k in t if isinstance(t[k], dict) and "tokens_per_s" in t[k]]:
    s = t[side]
    print(f"{side:18} {s['tokens_per_s']:9.0f} {1e3 * s['median_s']:8.1f} {s['mfu']:6.1%} "
          f"{t['ponder']['tokens_per_s'] / s['tokens_per_s']:8.2f} {s['final_loss']:10.6f}")
  peaks = result["peak"]["peak_flops"]
  print("matmul peak: " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in peaks.items())
        + f" (best of {result['peak']['calls']} rounds between the steps)"
        + ("; LOADED: absolute rates and MFU are not this machine's" if m["loaded"] else ""))
  print(f"1.2x the faster peer needs MFU {result['goal_needs_mfu']:.1%}")
  c = t["cpu_speed"]
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  print(f"new default x{fmt(c['over_old_default'])} the old default (goal "
        f"x{c['min_over_old_default']}); bf16 x{fmt(c['bf16_over_f32'])} float32 (goal "
        f"x{c['min_bf16_over_f32']}); chunked CE x{t['chunked_ce_over_full']:.2f} full logits")
  for side in ("ponder", "ponder_chunked_ce", "hf_flax"):
    print(f"\n{side}'s step, op by op (profiled):")
    for op in t[side]["top_ops"]["ops"]:
      print(f"  {op['ms']:7.1f} ms {op['share']:6.1%}  {op.get('shape', '?'):20} "
            f"{op.get('source', '').split('/', 1)[-1][-60:]}")
  d = result["decoding"]
  print(f"\ndecoding (batch 1, {d['new_tokens']} new tokens): cache "
        f"{d['cache_tokens_per_s']:.0f} tokens/s, recompute "
        f"{d['recompute_tokens_per_s']:.0f} tokens/s, x{d['cache_speedup']:.2f}; same "
        f"tokens: {d['same_tokens']}")
  g = result["goal"]
  print(f"speedup vs the best peer ({g['best_peer']}): x{g['speedup_vs_best_peer']:.2f} "
        f"(goal x{g['min_speedup']}: {'met' if g['met'] else 'not met'})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.reuse_memory(_FLAGS.reuse_memory.value)  # Every in-process side shares the allocator.
  logging.set_verbosity(logging.WARNING)
  transformers.logging.set_verbosity_error()  # "Some weights were not used" for the tie.
  torch.set_num_threads(os.cpu_count())  # torch's CPU default can be below the core count.
  quick = _FLAGS.quick.value
  runs = 3 if quick else _FLAGS.runs.value
  result = dict(machine=common.machine(torch_version=torch.__version__,
                                       transformers_version=transformers.__version__,
                                       torch_num_threads=torch.get_num_threads()))
  start = time.perf_counter()
  probe = common.peak_probe()
  training = _training(quick, warmup=1 if quick else _FLAGS.warmup.value, runs=runs,
                       probe=probe, bf16=_FLAGS.bf16.value,
                       old_default=_FLAGS.old_default.value)
  decoding = _decoding(step_lib.lm_config(quick),
                       new_tokens=32 if quick else _DECODE_TOKENS.value, runs=runs)
  goal = goals.lm_throughput(training)
  result.update(
      training=training, decoding=decoding,
      ponder_tokens_per_s=training["ponder"]["tokens_per_s"],
      hf_flax_tokens_per_s=training["hf_flax"]["tokens_per_s"],
      torch_tokens_per_s=training["torch"]["tokens_per_s"],
      speedup_vs_best_peer=goal["speedup_vs_best_peer"],
      peak=probe.record(), cpu_speed=training["cpu_speed"],
      goal_needs_mfu=goal["needs_mfu"], goal=goal,
      decode_cache_speedup=decoding["cache_speedup"])
  common.finish_machine(result["machine"], start)
  common.write_json(_FLAGS.out.value, result)  # First: a summary that fails loses nothing.
  _print_summary(result)


if __name__ == "__main__":
  app.run(main)
