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

MFU: compiled training FLOPs per step (XLA's count for ponder's step) x steps/s over
the machine's measured dense-matmul FLOP/s (the better of XLA's and torch's);
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

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import goals
from configs import gpt2_lm
from models import gpt2
from ponder import analysis
from ponder import errors
from ponder import lm
from train import tasks

try:
  import torch
  from torch.nn import functional as F
  import transformers
except ImportError as e:  # The peers are optional for the library, not here.
  raise errors.PonderError(
      f"this benchmark needs PyTorch and transformers 4.57 ({e}); install the bench "
      "extra: pip install -e .[bench]") from e

_OUT = flags.DEFINE_string("out", "", "JSON file for the results ('' = print only).")
_QUICK = flags.DEFINE_bool("quick", False,
                           "~1 minute: a 2-layer model, batch 4, sequence 64, fewer runs.")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed steps per side (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side after its first.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 112,
                                      "New tokens per decoding run (after a 16-token prompt).")

VOCAB = 50257  # GPT-2 BPE.
PROMPT_LEN = 16


def _config(quick: bool):
  """configs/gpt2_lm.py:wikitext2 (the model trained in WORKSPACE.md), dropout off."""
  cfg = gpt2_lm.get_config("wikitext2")
  cfg.model.update(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
  if quick:
    cfg.model.n_layer = 2
    cfg.trainer.batch_size, cfg.data.seq_len = 4, 64
  return cfg


def _hf_flax_loss(params, batch, key, *, model, train: bool):
  """tasks.lm_loss for transformers' Flax GPT-2 (same NLL, same shifted targets)."""
  tokens = batch["tokens"]
  logits = model(tokens[:, :-1], params=params, train=train, dropout_rng=key).logits
  return lm.token_nll(logits, tokens[:, 1:]).mean(), {}


def _torch_step(cfg, directory, tokens, total_steps):
  """transformers' PyTorch GPT-2 from the same weights, in the same step."""
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).train()
  ids = torch.from_numpy(tokens.astype(np.int64))
  inputs, targets = ids[:, :-1], ids[:, 1:]

  def loss_of():
    logits = model(inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

  return common.torch_train_step(model, cfg, total_steps, loss_of)


def _training(cfg, *, warmup: int, runs: int, peak: float) -> dict:
  model = tasks.build_lm_model(cfg, VOCAB)
  bs, seq = cfg.trainer.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(cfg.seed).integers(0, VOCAB, (bs, seq + 1)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.asarray(tokens[:, :-1]))["params"]
  total_steps = 1 + warmup + runs
  out = dict(config="configs/gpt2_lm.py:wikitext2 (dropout 0)", batch_size=bs, seq_len=seq,
             n_layer=model.config.n_layer, n_embd=model.config.n_embd,
             n_head=model.config.n_head, vocab_size=VOCAB,
             params=analysis.count_params(params))
  batch = {"tokens": jnp.asarray(tokens)}
  steps = {}
  with tempfile.TemporaryDirectory(prefix="gpt2_bench_") as directory:
    gpt2.to_hf(model, jax.device_get(params), directory)
    print("compiling ponder's jitted train step ...", flush=True)
    steps["ponder"], out["ponder"] = common.jitted_train_step(
        functools.partial(tasks.lm_loss, model=model), cfg, params, batch)
    print("loading and compiling transformers' FlaxGPT2LMHeadModel ...", flush=True)
    hf = transformers.FlaxGPT2LMHeadModel.from_pretrained(directory, from_pt=True)
    steps["hf_flax"], out["hf_flax"] = common.jitted_train_step(
        functools.partial(_hf_flax_loss, model=hf), cfg, hf.params, batch)
    print("first step of transformers' PyTorch GPT2LMHeadModel ...", flush=True)
    steps["torch"], out["torch"] = _torch_step(cfg, directory, tokens, total_steps)
  for name in ("ponder", "hf_flax"):
    steps[name]()  # So that every side has taken the same number of steps.
  print(f"timing {', '.join(steps)} in round robin ...", flush=True)
  timings = analysis.measure_interleaved(steps, warmup=warmup, runs=runs)
  final_losses = {side: float(out[side]["final_loss"]) for side in steps}
  # Profiling takes more steps: the final losses are read before it.
  print("profiling the two JAX steps op by op ...", flush=True)
  for side in ("ponder", "hf_flax"):
    out[side]["top_ops"] = common.op_breakdown(steps[side])
  flops = out["ponder"]["train_flops_per_step_compiled"]
  for side, timing in timings.items():
    out[side].update(timing, final_loss=final_losses[side],
                     tokens_per_s=bs * seq / timing["median_s"],
                     mfu=flops / timing["median_s"] / peak)
  return out


def _decoding(cfg, *, new_tokens: int, runs: int) -> dict:
  model = tasks.build_lm_model(cfg, VOCAB)
  if PROMPT_LEN + new_tokens > model.config.n_positions:
    raise errors.ConfigError(f"--decode_tokens={new_tokens} + the {PROMPT_LEN}-token prompt "
                             f"exceeds the model's {model.config.n_positions} positions.")
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (1, PROMPT_LEN)), jnp.int32)
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
  print(f"{'side':8} {'tokens/s':>9} {'step ms':>8} {'MFU':>6} {'ponder x':>8} "
        f"{'final loss':>10}")
  for side in ("ponder", "hf_flax", "torch"):
    s = t[side]
    print(f"{side:8} {s['tokens_per_s']:9.0f} {1e3 * s['median_s']:8.1f} {s['mfu']:6.1%} "
          f"{t['ponder']['tokens_per_s'] / s['tokens_per_s']:8.2f} {s['final_loss']:10.6f}")
  print(f"matmul peak {result['peak_matmul_flops'] / 1e9:.1f} GFLOP/s; 1.2x the faster peer "
        f"needs MFU {result['goal_needs_mfu']:.1%}")
  for side in ("ponder", "hf_flax"):
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
  logging.set_verbosity(logging.WARNING)
  transformers.logging.set_verbosity_error()  # "Some weights were not used" for the tie.
  torch.set_num_threads(os.cpu_count())  # torch's CPU default can be below the core count.
  quick = _QUICK.value
  cfg = _config(quick)
  runs = 3 if quick else _RUNS.value
  result = dict(machine=common.machine(torch_version=torch.__version__,
                                       transformers_version=transformers.__version__,
                                       torch_num_threads=torch.get_num_threads()))
  peak = max(analysis.matmul_peak_flops(), common.torch_matmul_peak())
  training = _training(cfg, warmup=1 if quick else _WARMUP.value, runs=runs, peak=peak)
  decoding = _decoding(cfg, new_tokens=32 if quick else _DECODE_TOKENS.value, runs=runs)
  goal = goals.lm_throughput(training)
  result.update(
      training=training, decoding=decoding,
      ponder_tokens_per_s=training["ponder"]["tokens_per_s"],
      hf_flax_tokens_per_s=training["hf_flax"]["tokens_per_s"],
      torch_tokens_per_s=training["torch"]["tokens_per_s"],
      speedup_vs_best_peer=goal["speedup_vs_best_peer"],
      peak_matmul_flops=peak,
      goal_needs_mfu=goal["needs_mfu"], goal=goal,
      decode_cache_speedup=decoding["cache_speedup"])
  result["machine"]["load_average_end"] = os.getloadavg()
  _print_summary(result)
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
