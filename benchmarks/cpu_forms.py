"""Formulations of one op measured inside the whole train step, side by side.

  python -m benchmarks.cpu_forms --out=cpu_forms.json [--batch=128 --runs=10]

The seed ViT's (configs/vit.py:cifar10,seed_size) jitted train step as the model file
writes it (flax's LayerNorm: autodiff through mean, variance and their broadcasts;
flax's dot_product_attention on [batch, seq, heads, dim]) and with one op swapped while
it is traced: `ponder.nn.layer_norm` (the closed-form backward) or
`ponder.nn.heads_major_attention` (both attention matmuls on [batch, heads, seq, dim]),
on the same batch from the same weights, in round robin
(`analysis.measure_interleaved`). Their final losses agree: a check that they compute
the same thing. A form is adopted in the models only where this shows it faster
(WORKSPACE.md).
"""

import time
from unittest import mock

from absl import app
from absl import flags

from benchmarks import common
from benchmarks import steps as step_lib
from models import vit
from ponder import analysis
from ponder.nn import heads_major_attention
from ponder.nn import layer_norm
from train import cli

_OUT = flags.DEFINE_string("out", "", "JSON file for the results ('' = print only).")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per step.")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed steps per side (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side after its first.")
_REUSE_MEMORY = flags.DEFINE_bool("reuse_memory", True, "As train.main's --reuse_memory.")

# name: None (the model as written) or (the flax.linen attribute swapped, its stand-in).
FORMS = {
    "flax_forms": None,
    "closed_form_layer_norm": ("LayerNorm", layer_norm.LayerNorm),
    "heads_major_attention": ("dot_product_attention",
                              heads_major_attention.dot_product_attention),
}
BASE = "flax_forms"


def _step(form, batch_size: int):
  if form is None:
    return step_lib.vit_step("seed", batch_size, "float32")
  with mock.patch.object(vit.nn, *form):  # Traced and compiled inside.
    return step_lib.vit_step("seed", batch_size, "float32")


def run(batch_size: int, *, warmup: int, runs: int) -> dict:
  result = dict(machine=common.machine(), batch_size=batch_size,
                config="configs/vit.py:cifar10,seed_size")
  start = time.perf_counter()
  steps, out = {}, {}
  for name, form in FORMS.items():
    print(f"compiling the ViT step with {name} ...", flush=True)
    steps[name], out[name] = _step(form, batch_size)
  for step in steps.values():
    step()
  print(f"timing {', '.join(steps)} in round robin ...", flush=True)
  for name, timing in analysis.measure_interleaved(steps, warmup=warmup, runs=runs).items():
    out[name].update(timing, final_loss=float(out[name]["final_loss"]),
                     images_per_s=batch_size / timing["median_s"])
  base = out[BASE]["images_per_s"]
  for name in out:
    out[name]["speedup"] = out[name]["images_per_s"] / base
  result.update(forms=out)
  common.finish_machine(result["machine"], start)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.reuse_memory(_REUSE_MEMORY.value)
  result = run(_BATCH.value, warmup=_WARMUP.value, runs=_RUNS.value)
  m = result["machine"]
  print(f"\nseed ViT step, batch {result['batch_size']}; 1-min load "
        f"{m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}"
        + (" (LOADED)" if m["loaded"] else ""))
  for name, r in result["forms"].items():
    print(f"  {name:24} {r['images_per_s']:8.1f} images/s  x{r['speedup']:.3f}  "
          f"final loss {r['final_loss']:.6f}")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
