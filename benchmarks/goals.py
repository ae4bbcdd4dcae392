"""The benchmarks' goal checks, each a pure function of the fields a benchmark measured.

A benchmark calls its function on what it measured and writes the returned dict (the
thresholds, the measured ratios, a boolean per goal) into its JSON; tests feed the same
functions known inputs. This module defines no flags and imports no peer framework, so
one process can import it whatever benchmark modules it has loaded (their absl flags of
the same name would clash).

A value exactly at a threshold meets it: comparisons allow `_TOL` of floating-point
rounding (0.8611 - 0.8711 is -0.01000000000000001, a drop of exactly 1.0 point).
"""

_TOL = 1e-9

# benchmarks/dlvit_table.py: DendriticLiquid-ViT against the baseline ViT.
DLVIT = dict(max_flops_ratio=0.65, min_throughput_ratio=1.4, max_accuracy_drop=0.01)

# benchmarks/ponder_pareto.py: every adaptive variant against Fixed-4.
PONDER_PARETO = dict(reference="fixed4", max_ppl_ratio=1.01, max_inner_flops_ratio=0.65,
                     max_time_ratio=0.75)

# benchmarks/vit_throughput.py: ponder's training step against the faster PyTorch side.
VIT_THROUGHPUT = dict(min_speedup=1.5)

# benchmarks/lm_throughput.py: ponder's training step against the faster peer.
LM_THROUGHPUT = dict(min_speedup=1.2)

# Issue 21 (CPU speed, round 2), both throughput benchmarks: the new default step
# against the old default (system allocator, float32, 3-D dense) in the same run, the
# bf16 step against the float32 one, and (ViT) float32 against torch eager.
CPU_SPEED = dict(min_over_old_default=1.3, min_bf16_over_f32=1.5, min_vit_over_torch_eager=1.0)


def _at_most(value, limit) -> bool:
  return bool(value <= limit + _TOL)


def _at_least(value, limit) -> bool:
  return bool(value >= limit - _TOL)


def dlvit_table(rows: dict) -> dict:
  """DendriticLiquid-ViT's goals from the table's rows "vit" and "dendritic_liquid_vit"
  (fields flops_per_image, images_per_s, test_accuracy, corruption_mean): FLOPs at
  most 65% of the baseline's, throughput at least 1.4x, accuracy within 1.0 point,
  mean corruption accuracy no lower."""
  liquid, base = rows["dendritic_liquid_vit"], rows["vit"]
  flops_ratio = liquid["flops_per_image"] / base["flops_per_image"]
  throughput_ratio = liquid["images_per_s"] / base["images_per_s"]
  accuracy_delta = liquid["test_accuracy"] - base["test_accuracy"]
  corruption_delta = liquid["corruption_mean"] - base["corruption_mean"]
  return dict(
      flops_ratio=flops_ratio,
      flops_met=_at_most(flops_ratio, DLVIT["max_flops_ratio"]),
      throughput_ratio=throughput_ratio,
      throughput_met=_at_least(throughput_ratio, DLVIT["min_throughput_ratio"]),
      accuracy_delta=accuracy_delta,
      accuracy_met=_at_least(accuracy_delta, -DLVIT["max_accuracy_drop"]),
      corruption_delta=corruption_delta,
      corruption_met=_at_least(corruption_delta, 0.0), **DLVIT)


def ponder_pareto(variants: dict) -> dict:
  """PonderTTT's goal for every adaptive variant against Fixed-4: perplexity within 1%,
  at most 65% of its inner-loop FLOPs and 75% of its eval time per token.

  `variants` maps a name to its measured fields (mode, valid_ppl, inner_flops_per_token,
  eval_s_per_token, ttt_layer_flops_per_token, total_flops_per_token); it holds "skip"
  and "fixed4". The goal presumes that inner steps help: `inner_steps_help` is whether
  Fixed-4's perplexity is at least the goal's 1% better than SKIP's (otherwise spending
  fewer steps than Fixed-4 matches it trivially), and `meaningful_pass` whether some
  adaptive variant passes while it holds.
  """
  ref = variants[PONDER_PARETO["reference"]]
  by_variant = {}
  for name, r in variants.items():
    if r["mode"] != "adaptive":
      continue
    ratios = dict(ppl_ratio=r["valid_ppl"] / ref["valid_ppl"],
                  inner_flops_ratio=r["inner_flops_per_token"] / ref["inner_flops_per_token"],
                  time_ratio=r["eval_s_per_token"] / ref["eval_s_per_token"],
                  ttt_layer_flops_ratio=(r["ttt_layer_flops_per_token"]
                                         / ref["ttt_layer_flops_per_token"]),
                  total_flops_ratio=r["total_flops_per_token"] / ref["total_flops_per_token"])
    checks = dict(
        ppl_ok=_at_most(ratios["ppl_ratio"], PONDER_PARETO["max_ppl_ratio"]),
        inner_flops_ok=_at_most(ratios["inner_flops_ratio"],
                                PONDER_PARETO["max_inner_flops_ratio"]),
        time_ok=_at_most(ratios["time_ratio"], PONDER_PARETO["max_time_ratio"]))
    by_variant[name] = dict(ratios, **checks, passed=all(checks.values()))
  passing = [name for name, g in by_variant.items() if g["passed"]]
  spread = ref["valid_ppl"] / variants["skip"]["valid_ppl"]
  inner_steps_help = _at_most(spread, 1 / PONDER_PARETO["max_ppl_ratio"])
  return dict(PONDER_PARETO, reference_ppl_over_skip=spread,
              inner_steps_help=inner_steps_help, by_variant=by_variant, passing=passing,
              passed=bool(passing), meaningful_pass=bool(passing) and inner_steps_help)


def vit_throughput(result: dict) -> dict:
  """ponder's ViT training step at least 1.5x the faster PyTorch side (eager, or
  torch.compile where it ran: `torch_compile_images_per_s` None), on the headline
  config's measured images/s."""
  peers = {"torch_eager": result["torch_eager_images_per_s"],
           "torch_compile": result.get("torch_compile_images_per_s")}
  peers = {name: rate for name, rate in peers.items() if rate is not None}
  best = max(peers, key=peers.get)
  speedup = result["ponder_images_per_s"] / peers[best]
  return dict(VIT_THROUGHPUT, best_peer=best, speedup_vs_best_peer=speedup,
              met=_at_least(speedup, VIT_THROUGHPUT["min_speedup"]))


def lm_throughput(training: dict) -> dict:
  """ponder's GPT-2 training step at least 1.2x the faster peer (Hugging Face Flax or
  PyTorch), from each side's measured tokens_per_s; `needs_mfu` is the MFU ponder's step
  would need to meet it (its MFU scaled by the speed it lacks)."""
  ponder = training["ponder"]
  peers = {name: training[name]["tokens_per_s"] for name in ("hf_flax", "torch")}
  best = max(peers, key=peers.get)
  speedup = ponder["tokens_per_s"] / peers[best]
  needs_mfu = LM_THROUGHPUT["min_speedup"] * peers[best] * ponder["mfu"] / ponder["tokens_per_s"]
  return dict(LM_THROUGHPUT, best_peer=best, speedup_vs_best_peer=speedup,
              needs_mfu=needs_mfu, met=_at_least(speedup, LM_THROUGHPUT["min_speedup"]))


def cpu_speed(rates: dict) -> dict:
  """Issue 21's goals from one run's rates (items/s) of the sides "ponder" (the new
  default), "ponder_old_default", optionally "ponder_bf16" and "torch_eager" (the
  float32 peer the ViT goal is against); a missing side's ratio and check are None."""
  def ratio(a, b):
    return rates[a] / rates[b] if rates.get(a) and rates.get(b) else None

  def check(value, limit):
    return None if value is None else _at_least(value, limit)

  over_old = ratio("ponder", "ponder_old_default")
  bf16 = ratio("ponder_bf16", "ponder")
  eager = ratio("ponder", "torch_eager")
  return dict(CPU_SPEED, over_old_default=over_old,
              over_old_default_met=check(over_old, CPU_SPEED["min_over_old_default"]),
              bf16_over_f32=bf16, bf16_met=check(bf16, CPU_SPEED["min_bf16_over_f32"]),
              over_torch_eager=eager,
              over_torch_eager_met=check(eager, CPU_SPEED["min_vit_over_torch_eager"]))
