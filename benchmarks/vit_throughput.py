"""Training throughput of ponder's jitted ViT step beside the same ViT in PyTorch.

  python -m benchmarks.vit_throughput --out=vit_throughput.json [--quick]

One run, one machine, one model config, one batch, one optimizer: ponder's step is
`jax.jit(partial(train.trainer.train_step, ...), donate_argnums=(0,))` exactly as the
trainer builds it (benchmarks/common.py); PyTorch runs `benchmarks/torch_vit.py` (the same architecture, with
ponder's initial weights copied in) with `torch.optim.AdamW` on the same parameter
groups, learning-rate schedule and global-norm clipping, eagerly and under
`torch.compile`. Data is random and resident (no input pipeline on either side).

Each side takes a first step (compilation), then warm-up steps, then timed steps; the
sides take their steps in round robin, so load from other processes on a shared
machine slows them alike, and the median of the synced step times is reported. All
sides start from the same weights and take the same steps on the same batch, so their
final losses agree: a check that they compute the same thing.

MFU is the model's analytic training FLOPs (3 x the forward matmul FLOPs: forward, and
backward for activations and weights) per second over the machine's measured
dense-matmul FLOP/s (the better of XLA's and torch's matmul). The seed document's FLOPs
claim is set beside the compiled and analytic counts. The JSON's top level holds the
headline (first) config's numbers and `goal` (`benchmarks.goals.vit_throughput`: ponder
at least 1.5x the faster PyTorch side); `configs` holds every config in full.
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
from configs import vit as vit_config
from ponder import analysis
from ponder import errors
from train import tasks

try:
  import torch
  from torch.nn import functional as F
  from benchmarks import torch_vit
except ImportError as e:  # The PyTorch peer is optional for the library, not here.
  raise errors.PonderError(
      f"this benchmark needs PyTorch ({e}); install the bench extra: pip install -e .[bench]"
  ) from e

_OUT = flags.DEFINE_string("out", "", "JSON file for the results ('' = print only).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "~1 minute: seed config at batch 32, fewer runs, no torch.compile.")
_PRESETS = flags.DEFINE_list("presets", ["seed", "digits"], "Configs to run: seed, digits.")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed steps per side (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side after its first.")

# name -> (configs/vit.py argument, image [height, width, channels], classes).
PRESETS = {
    "seed": ("cifar10,seed_size", (32, 32, 3), 10),  # The seed document's ViT.
    "digits": ("digits", (8, 8, 1), 10),
}
SEED_CLAIM_FLOPS = 321_558_272  # The seed document's "FLOPs: 321,558,272 (0.32 GFLOPs)".
QUICK_BATCH = 32
INFERENCE_BATCH = 256


def _model_kwargs(cfg) -> dict:
  if cfg.model.dropout:
    raise errors.ConfigError("the PyTorch peer has no dropout; benchmark with model.dropout=0")
  return {k: cfg.model[k] for k in ("patch", "width", "depth", "heads", "mlp_ratio", "qkv_bias")}


def _torch_step(cfg, host_params, image_shape, num_classes, images, labels, *, compile,
                total_steps):
  """The same ViT and step in PyTorch, eager or under torch.compile."""
  model = torch_vit.load_flax_params(
      torch_vit.ViT(num_classes=num_classes, image_size=image_shape[0],
                    channels=image_shape[2], **_model_kwargs(cfg)), host_params)
  forward = torch.compile(model) if compile else model
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(labels.astype(np.int64))
  return common.torch_train_step(model, cfg, total_steps,
                                 lambda: F.cross_entropy(forward(x), y))


def _analytic_forward_flops(cfg, image_shape, num_classes) -> int:
  return analysis.vit_flops(
      image_size=image_shape[0], patch=cfg.model.patch, channels=image_shape[2],
      width=cfg.model.width, depth=cfg.model.depth,
      mlp_dim=int(cfg.model.width * cfg.model.mlp_ratio), num_classes=num_classes)


def _run_preset(name: str, *, quick: bool, warmup: int, runs: int, peak: float) -> dict:
  """Trains one config on all three sides and returns throughputs, speedups and MFU."""
  arg, image_shape, num_classes = PRESETS[name]
  cfg = vit_config.get_config(arg)
  batch_size = QUICK_BATCH if quick else cfg.trainer.batch_size
  model = tasks.build_model(cfg.model, num_classes=num_classes)
  rng = np.random.default_rng(cfg.seed)
  images = rng.standard_normal((batch_size, *image_shape), np.float32)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.asarray(images[:1]))["params"]
  host_params = jax.device_get(params)  # The jitted step donates (deletes) `params`.
  train_flops = 3 * _analytic_forward_flops(cfg, image_shape, num_classes)

  out = dict(config=f"configs/vit.py:{arg}", image_shape=list(image_shape),
             batch_size=batch_size, params=analysis.count_params(host_params),
             train_flops_per_image_analytic=train_flops)
  print(f"[{name}] compiling ponder's jitted train step ...", flush=True)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  steps = {}
  loss_fn = functools.partial(tasks.classification_loss, model=model,
                              label_smoothing=cfg.label_smoothing)
  steps["ponder"], out["ponder"] = common.jitted_train_step(loss_fn, cfg, params, batch)
  out["ponder"]["train_flops_per_image_compiled"] = (
      out["ponder"].pop("train_flops_per_step_compiled") / batch_size)
  sides = [("torch_eager", False)] + ([] if quick else [("torch_compile", True)])
  for side, compile_ in sides:
    print(f"[{name}] first {side} step ...", flush=True)
    try:
      steps[side], out[side] = _torch_step(
          cfg, host_params, image_shape, num_classes, images, labels, compile=compile_,
          total_steps=1 + warmup + runs)
    except Exception as e:  # pylint: disable=broad-except
      if not compile_:
        raise
      # torch.compile fails in many ways (no compiler, inductor bugs): record, go on.
      out[side] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:500]}")
  if quick:
    out["torch_compile"] = dict(error="skipped (--quick)")
  steps["ponder"]()  # So that every side has taken the same number of steps.
  print(f"[{name}] timing {', '.join(steps)} in round robin ...", flush=True)
  for side, timing in analysis.measure_interleaved(steps, warmup=warmup, runs=runs).items():
    out[side].update(timing, final_loss=float(out[side]["final_loss"]))
  for side in ("ponder", "torch_eager", "torch_compile"):
    if "median_s" in out[side]:
      ips = batch_size / out[side]["median_s"]
      out[side].update(images_per_s=ips, mfu=ips * train_flops / peak)
  for side in ("torch_eager", "torch_compile"):
    other = out[side].get("images_per_s")
    out[f"speedup_vs_{side}"] = out["ponder"]["images_per_s"] / other if other else None
  print(f"[{name}] ponder inference ...", flush=True)
  out["ponder_inference"] = _inference(model, host_params, image_shape, quick=quick)
  return out


def _seed_flops() -> dict:
  """Forward FLOPs per image of the seed's ViT: compiled, analytic, MACs, the claim."""
  arg, image_shape, num_classes = PRESETS["seed"]
  cfg = vit_config.get_config(arg)
  model = tasks.build_model(cfg.model, num_classes=num_classes)
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image.shape)))
  compiled = analysis.compiled_flops(lambda p, x: model.apply(p, x), params, image)
  analytic = _analytic_forward_flops(cfg, image_shape, num_classes)
  return dict(seed_config_params=analysis.count_params(params),
              seed_config_flops_per_image_compiled=compiled,
              seed_config_flops_per_image_analytic=analytic,
              seed_config_macs_per_image=analytic // 2,
              seed_claim=SEED_CLAIM_FLOPS,
              seed_claim_over_macs=SEED_CLAIM_FLOPS / (analytic // 2),
              seed_claim_over_flops=SEED_CLAIM_FLOPS / analytic)


def _inference(model, host_params, image_shape, *, quick: bool) -> dict:
  """ponder's batch-1 latency and large-batch throughput (the seed reports both)."""
  result = analysis.latency_and_throughput(
      lambda p, x: model.apply({"params": p}, x), jax.device_put(host_params), image_shape,
      batch_size=QUICK_BATCH if quick else INFERENCE_BATCH, runs=3 if quick else 5)
  return dict(latency_ms=1e3 * result["latency_s"], batch_size=result["batch_size"],
              images_per_s=result["items_per_s"])


def _machine(torch_threads: int) -> dict:
  return common.machine(torch_version=torch.__version__, torch_num_threads=torch_threads,
                        jax_threads="XLA default (all cores)",
                        torch_compile_cache="cold (fresh dir)")


def _fmt(value, width: int, spec: str) -> str:
  return f"{'-':>{width}}" if value is None else format(value, f"{width}{spec}")


def _print_summary(result: dict) -> None:
  m = result["machine"]
  print(f"\nmachine: {m['cpu_count']} CPU ({m['processor']}), jax {m['jax_version']}, "
        f"torch {m['torch_version']} ({m['torch_num_threads']} threads); 1-min load "
        f"{m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}; "
        f"{m['wall_s']:.0f} s")
  print(f"matmul peak: {result['peak_matmul_flops'] / 1e9:.1f} GFLOP/s (xla "
        f"{result['peak_matmul_flops_xla'] / 1e9:.1f}, torch "
        f"{result['peak_matmul_flops_torch'] / 1e9:.1f})\n")
  header = (f"{'config':8} {'batch':>5} {'side':14} {'images/s':>9} {'step ms':>8} "
            f"{'MFU':>6} {'ponder x':>8} {'final loss':>10}  note")
  print(header + "\n" + "-" * len(header))
  for name, r in result["configs"].items():
    for side in ("ponder", "torch_eager", "torch_compile"):
      s = r[side]
      speedup = 1.0 if side == "ponder" else r[f"speedup_vs_{side}"]
      note = s.get("error", "")
      if "compile_s" in s:
        note = f"compile {s['compile_s']:.1f}s"
      elif side == "torch_compile" and "first_step_s" in s:
        note = f"first step (compile) {s['first_step_s']:.1f}s"
      step_ms = 1e3 * s["median_s"] if "median_s" in s else None
      print(f"{name:8} {r['batch_size']:5d} {side:14} {_fmt(s.get('images_per_s'), 9, '.1f')} "
            f"{_fmt(step_ms, 8, '.1f')} {_fmt(s.get('mfu'), 6, '.1%')} "
            f"{_fmt(speedup, 8, '.2f')} {_fmt(s.get('final_loss'), 10, '.6f')}  {note}")
  f = result
  print(f"\nseed ViT forward per image: compiled {f['seed_config_flops_per_image_compiled']:,.0f} "
        f"FLOPs, analytic {f['seed_config_flops_per_image_analytic']:,} FLOPs "
        f"= {f['seed_config_macs_per_image']:,} MACs; seed claim {f['seed_claim']:,} "
        f"(= {f['seed_claim_over_macs']:.4f} x MACs, {f['seed_claim_over_flops']:.4f} x FLOPs)")
  g = f["goal"]
  print(f"goal: x{g['speedup_vs_best_peer']:.2f} the faster PyTorch side ({g['best_peer']}), "
        f"needs x{g['min_speedup']}: {'met' if g['met'] else 'not met'}")
  inf = f["ponder_inference"]
  print(f"{f['headline_config']} ViT inference (ponder): batch-1 latency "
        f"{inf['latency_ms']:.2f} ms, {inf['images_per_s']:.0f} images/s at batch "
        f"{inf['batch_size']}")


def _run(presets, *, quick: bool, warmup: int, runs: int) -> dict:
  torch.set_num_threads(os.cpu_count())  # torch's CPU default can be below the core count.
  result = dict(machine=_machine(torch.get_num_threads()))
  start = time.perf_counter()
  xla_peak = analysis.matmul_peak_flops()
  torch_peak = common.torch_matmul_peak()
  peak = max(xla_peak, torch_peak)
  result.update(peak_matmul_flops=peak, peak_matmul_flops_xla=xla_peak,
                peak_matmul_flops_torch=torch_peak)
  result["configs"] = {name: _run_preset(name, quick=quick, warmup=warmup, runs=runs, peak=peak)
                       for name in presets}
  head = result["configs"][presets[0]]
  result.update(
      headline_config=presets[0],
      ponder_images_per_s=head["ponder"]["images_per_s"],
      torch_eager_images_per_s=head["torch_eager"]["images_per_s"],
      torch_compile_images_per_s=head["torch_compile"].get("images_per_s"),
      speedup_vs_torch_eager=head["speedup_vs_torch_eager"],
      speedup_vs_torch_compile=head["speedup_vs_torch_compile"],
      mfu=head["ponder"]["mfu"],
      mfu_definition="images/s x 3 x analytic forward matmul FLOPs per image / "
                     "max(XLA, torch) measured dense-matmul FLOP/s",
      ponder_inference=head["ponder_inference"],
      **_seed_flops())
  result["goal"] = goals.vit_throughput(result)
  result["machine"].update(load_average_end=os.getloadavg(),
                           wall_s=time.perf_counter() - start)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # jax logs backend probing at INFO.
  unknown = set(_PRESETS.value) - set(PRESETS)
  if unknown:
    raise errors.unknown_key("preset", sorted(unknown)[0], PRESETS)
  quick = _QUICK.value
  # A fresh inductor cache, so torch.compile's first step is a cold compile every run.
  with tempfile.TemporaryDirectory(prefix="torchinductor_") as cache:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    result = _run(["seed"] if quick else _PRESETS.value, quick=quick,
                  warmup=1 if quick else _WARMUP.value, runs=3 if quick else _RUNS.value)
  _print_summary(result)
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
