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

Issue 21's sides, in the same round robin: `ponder_old_default`, ponder's step as it
was before (the system allocator, float32, 3-D `nn.Dense`), run in a child process
because glibc reads its allocator settings at process start (`common.ChildStep`);
`ponder_bf16` (compute_dtype=bfloat16) beside `torch_eager_bf16` (torch's CPU
autocast; skipped without AVX512_BF16, `common.torch_bf16_sides`). Every other side shares this process's allocator (`--reuse_memory`, the
trainer's default). `cpu_speed` holds the ratios (`goals.cpu_speed`), and
`ponder.top_ops` where the step's time goes (`common.op_breakdown`).

MFU is the model's analytic training FLOPs (3 x the forward matmul FLOPs: forward, and
backward for activations and weights) per second over the matmul peak of the side's
precision (`common.PeakProbe`: the best of XLA's and torch's matmuls over three sizes,
timed between the rounds of the steps, so under the same load); a run whose load
average exceeded 1.5 is marked `loaded`. The seed document's FLOPs
claim is set beside the compiled and analytic counts. The JSON's top level holds the
headline (first) config's numbers and `goal` (`benchmarks.goals.vit_throughput`: ponder
at least 1.5x the faster PyTorch side); `configs` holds every config in full.
"""

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
from configs import vit as vit_config
from ponder import analysis
from ponder import errors
from train import cli
from train import tasks

try:
  import torch
  from torch.nn import functional as F
  from benchmarks import torch_vit
except ImportError as e:  # The PyTorch peer is optional for the library, not here.
  raise errors.PonderError(
      f"this benchmark needs PyTorch ({e}); install the bench extra: pip install -e .[bench]"
  ) from e

_FLAGS = common.define_step_flags(
    quick="~1 minute: seed config at batch 32, fewer runs, no torch.compile.",
    bf16="Also time ponder with compute_dtype=bfloat16 and torch eager under bf16 autocast.")
_PRESETS = flags.DEFINE_list("presets", ["seed", "digits"], "Configs to run: seed, digits.")

SEED_CLAIM_FLOPS = 321_558_272  # The seed document's "FLOPs: 321,558,272 (0.32 GFLOPs)".
QUICK_BATCH = 32
INFERENCE_BATCH = 256


def _model_kwargs(cfg) -> dict:
  if cfg.model.dropout:
    raise errors.ConfigError("the PyTorch peer has no dropout; benchmark with model.dropout=0")
  return {k: cfg.model[k] for k in ("patch", "width", "depth", "heads", "mlp_ratio", "qkv_bias")}


def _torch_step(cfg, host_params, image_shape, num_classes, images, labels, *, compile,
                total_steps, dtype="float32"):
  """The same ViT and step in PyTorch, eager or under torch.compile; bfloat16 is the
  forward under torch's CPU autocast (the peer of ponder's compute_dtype=bfloat16)."""
  model = torch_vit.load_flax_params(
      torch_vit.ViT(num_classes=num_classes, image_size=image_shape[0],
                    channels=image_shape[2], **_model_kwargs(cfg)), host_params)
  forward = torch.compile(model) if compile else model
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(labels.astype(np.int64))
  def loss_of():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      return F.cross_entropy(forward(x).float(), y)

  return common.torch_train_step(model, cfg, total_steps, loss_of)


def _analytic_forward_flops(cfg, image_shape, num_classes) -> int:
  return analysis.vit_flops(
      image_size=image_shape[0], patch=cfg.model.patch, channels=image_shape[2],
      width=cfg.model.width, depth=cfg.model.depth,
      mlp_dim=int(cfg.model.width * cfg.model.mlp_ratio), num_classes=num_classes)


def _run_preset(name: str, *, quick: bool, warmup: int, runs: int, probe, bf16: bool,
                old_default: bool) -> dict:
  """Trains one config on every side in round robin (with the peak probe between
  rounds) and returns throughputs, speedups and MFU."""
  arg, image_shape, num_classes = step_lib.VIT_PRESETS[name]
  cfg = vit_config.get_config(arg)
  batch_size = QUICK_BATCH if quick else cfg.trainer.batch_size
  cfg, model, images, labels, params, _ = step_lib.vit_setup(name, batch_size, "float32")
  host_params = jax.device_get(params)  # The jitted step donates (deletes) `params`.
  train_flops = 3 * _analytic_forward_flops(cfg, image_shape, num_classes)

  out = dict(config=f"configs/vit.py:{arg}", image_shape=list(image_shape),
             batch_size=batch_size, params=analysis.count_params(host_params),
             train_flops_per_image_analytic=train_flops)
  steps = {}
  total_steps = 2 + warmup + runs
  precisions = [("", "float32")] + ([("_bf16", "bfloat16")] if bf16 else [])
  for suffix, dtype in precisions:
    print(f"[{name}] compiling ponder's jitted train step ({dtype}) ...", flush=True)
    side = "ponder" + suffix
    steps[side], out[side] = step_lib.vit_step(name, batch_size, dtype)
    out[side]["train_flops_per_image_compiled"] = (
        out[side].pop("train_flops_per_step_compiled") / batch_size)
  if old_default:
    print(f"[{name}] compiling the old default step in a child process ...", flush=True)
    child = common.ChildStep("benchmarks.steps:vit_old_default_step",
                             dict(name=name, batch_size=batch_size),
                             common.system_allocator_env())
    steps["ponder_old_default"], out["ponder_old_default"] = child, child.info
  sides = [("torch_eager", False, "float32")]
  sides += [] if quick else [("torch_compile", True, "float32")]
  sides += [(side, False, "bfloat16") for side in
            common.torch_bf16_sides(["torch_eager_bf16"] if bf16 else [], out)]
  for side, compile_, dtype in sides:
    print(f"[{name}] first {side} step ...", flush=True)
    try:
      steps[side], out[side] = _torch_step(
          cfg, host_params, image_shape, num_classes, images, labels, compile=compile_,
          total_steps=total_steps, dtype=dtype)
    except Exception as e:  # pylint: disable=broad-except
      if not compile_:
        raise
      # torch.compile fails in many ways (no compiler, inductor bugs): record, go on.
      out[side] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:500]}")
  if quick:
    out["torch_compile"] = dict(error="skipped (--quick)")
  for side in steps:
    if side.startswith("ponder"):
      steps[side]()  # So that every side has taken the same number of steps.
  print(f"[{name}] timing {', '.join(steps)} in round robin ...", flush=True)
  timings = analysis.measure_interleaved(dict(steps, peak_probe=probe), warmup=warmup,
                                         runs=runs)
  timings.pop("peak_probe")
  if old_default:
    child.close()
  print(f"[{name}] profiling ponder's step op by op ...", flush=True)
  final_loss = float(out["ponder"]["final_loss"])  # Profiling takes more steps.
  out["ponder"]["top_ops"] = common.op_breakdown(steps["ponder"])
  out["ponder"]["final_loss"] = final_loss
  for side, timing in timings.items():
    out[side].update(timing, final_loss=float(out[side]["final_loss"]))
    dtype = "bfloat16" if side.endswith("_bf16") else "float32"
    ips = batch_size / timing["median_s"]
    out[side].update(images_per_s=ips, precision=dtype,
                     mfu=common.mfu(train_flops * batch_size, timing["median_s"],
                                    probe.peak(dtype)))
  for side in ("torch_eager", "torch_compile"):
    other = out[side].get("images_per_s")
    out[f"speedup_vs_{side}"] = out["ponder"]["images_per_s"] / other if other else None
  out["cpu_speed"] = goals.cpu_speed({side: out[side]["images_per_s"] for side in timings})
  print(f"[{name}] ponder inference ...", flush=True)
  out["ponder_inference"] = _inference(model, host_params, image_shape, quick=quick)
  return out


def _seed_flops() -> dict:
  """Forward FLOPs per image of the seed's ViT: compiled, analytic, MACs, the claim."""
  arg, image_shape, num_classes = step_lib.VIT_PRESETS["seed"]
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
  peaks = result["peak"]["peak_flops"]
  print("matmul peak: " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in peaks.items())
        + f" (best of {result['peak']['calls']} rounds between the steps)"
        + ("; LOADED: absolute rates and MFU are not this machine's"
           if m["loaded"] else "") + "\n")
  header = (f"{'config':8} {'batch':>5} {'side':18} {'images/s':>9} {'step ms':>8} "
            f"{'MFU':>6} {'ponder x':>8} {'final loss':>10}  note")
  print(header + "\n" + "-" * len(header))
  for name, r in result["configs"].items():
    for side in [k for k in r if isinstance(r[k], dict) and ("median_s" in r[k]
                                                             or "error" in r[k])]:
      s = r[side]
      note = s.get("error", "")
      if "compile_s" in s:
        note = f"compile {s['compile_s']:.1f}s"
      elif "first_step_s" in s:
        note = f"first step {s['first_step_s']:.1f}s"
      step_ms = 1e3 * s["median_s"] if "median_s" in s else None
      speedup = (r["ponder"]["images_per_s"] / s["images_per_s"]
                 if "images_per_s" in s else None)
      print(f"{name:8} {r['batch_size']:5d} {side:18} {_fmt(s.get('images_per_s'), 9, '.1f')} "
            f"{_fmt(step_ms, 8, '.1f')} {_fmt(s.get('mfu'), 6, '.1%')} "
            f"{_fmt(speedup, 8, '.2f')} {_fmt(s.get('final_loss'), 10, '.6f')}  {note}")
    c = r["cpu_speed"]
    print(f"{name}: new default x{_fmt(c['over_old_default'], 0, '.2f')} the old default "
          f"(goal x{c['min_over_old_default']}), bf16 x{_fmt(c['bf16_over_f32'], 0, '.2f')} "
          f"float32 (goal x{c['min_bf16_over_f32']}), float32 "
          f"x{_fmt(c['over_torch_eager'], 0, '.2f')} torch eager "
          f"(goal x{c['min_vit_over_torch_eager']})")
    print(f"{name}: ponder's step op by op (profiled):")
    for op in r["ponder"]["top_ops"]["ops"]:
      print(f"  {op['ms']:7.1f} ms {op['share']:6.1%}  {op.get('shape', '?'):20} "
            f"{op.get('source', '').split('/', 1)[-1][-60:]}")
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


def _run(presets, *, quick: bool, warmup: int, runs: int, bf16: bool,
         old_default: bool) -> dict:
  torch.set_num_threads(os.cpu_count())  # torch's CPU default can be below the core count.
  result = dict(machine=_machine(torch.get_num_threads()))
  start = time.perf_counter()
  probe = common.peak_probe()
  result["configs"] = {name: _run_preset(name, quick=quick, warmup=warmup, runs=runs,
                                         probe=probe, bf16=bf16, old_default=old_default)
                       for name in presets}
  result["peak"] = probe.record()
  head = result["configs"][presets[0]]
  result.update(
      headline_config=presets[0],
      ponder_images_per_s=head["ponder"]["images_per_s"],
      torch_eager_images_per_s=head["torch_eager"]["images_per_s"],
      torch_compile_images_per_s=head["torch_compile"].get("images_per_s"),
      speedup_vs_torch_eager=head["speedup_vs_torch_eager"],
      speedup_vs_torch_compile=head["speedup_vs_torch_compile"],
      mfu=head["ponder"]["mfu"],
      mfu_definition="images/s x 3 x analytic forward matmul FLOPs per image / the "
                     "matmul peak of the side's precision (`peak`: best of XLA's and "
                     "torch's over sizes and rounds, measured between the steps)",
      cpu_speed=head["cpu_speed"],
      ponder_inference=head["ponder_inference"],
      **_seed_flops())
  result["goal"] = goals.vit_throughput(result)
  common.finish_machine(result["machine"], start)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.reuse_memory(_FLAGS.reuse_memory.value)  # Every in-process side shares the allocator.
  logging.set_verbosity(logging.WARNING)  # jax logs backend probing at INFO.
  unknown = set(_PRESETS.value) - set(step_lib.VIT_PRESETS)
  if unknown:
    raise errors.unknown_key("preset", sorted(unknown)[0], step_lib.VIT_PRESETS)
  quick = _FLAGS.quick.value
  # A fresh inductor cache, so torch.compile's first step is a cold compile every run.
  with tempfile.TemporaryDirectory(prefix="torchinductor_") as cache:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    result = _run(["seed"] if quick else _PRESETS.value, quick=quick,
                  warmup=1 if quick else _FLAGS.warmup.value,
                  runs=3 if quick else _FLAGS.runs.value, bf16=_FLAGS.bf16.value,
                  old_default=_FLAGS.old_default.value)
  common.write_json(_FLAGS.out.value, result)  # First: a summary that fails loses nothing.
  _print_summary(result)


if __name__ == "__main__":
  app.run(main)
