"""PonderTTT's Pareto front: valid perplexity against FLOPs per token of TTT language
models with Fixed-1/2/4 inner steps, SKIP (k = 0) and the adaptive allocation at several
budgets; and the TTT-Linear layer's training throughput in its jax.grad and dual forms.

  python -m benchmarks.ponder_pareto --out=DIR [--preset=synthetic] [--budget=full]
  python -m benchmarks.ponder_pareto --out=DIR --preset=wikitext2 \
      --data_dir=../shared/data/wikitext-2-valsplit
  python -m benchmarks.ponder_pareto --out=DIR --throughput_only

Every variant is `configs/ttt_lm.py:PRESET,mode=fixed,k=K|mode=skip|mode=adaptive`
(adaptive with its `ponder_target` and `ponder_budget`), trained by
`train.trainer.train_and_evaluate` in its own workdir DIR/<variant>. Rerunning the
command resumes an unfinished run from its last checkpoint and reuses a finished one
(final_metrics.json at total_steps), so an interrupted benchmark restarts where it
stopped; a workdir trained with another config (another --budget, say) is an error.
`--jobs=2` trains the runs two at a time first (`common.train_parallel`, logs in
DIR/<run>.log), then measures as before.
`--budget`: full (the preset's steps; three adaptive settings), short (50 synthetic,
40 recall, 30 shakespeare_long or 20 wikitext2 / wikitext2_long steps, two adaptive
settings: minutes to an hour, and far from trained) or smoke (the configs' tiny smoke
models, 2 steps: what the test runs). Presets: synthetic, wikitext2 and the long-context
recall, shakespeare_long, wikitext2_long (configs/ttt_lm.py; --data_dir for the text
ones).

Measured on the task's evaluation data (synthetic: its 16 fixed batches; wikitext2: the
whole valid split), every variant with its own trained parameters:
* valid_ppl: exp of the mean next-token NLL (synthetic: also nll_easy / nll_hard).
  Adaptive: the SKIP first pass, the allocation and the second pass, exactly as the
  model's `steps="adaptive"` evaluates (so it equals train.main's final perplexity).
* inner_flops_per_token: the analytic FLOPs of the TTT inner loop proper, the gradient
  updates: `ttt_lm.ttt_flops_per_token(cfg, k) - ttt_flops_per_token(cfg, 0)` (0 for
  SKIP). The output rule z = f(theta_Q x; W), which every variant runs, is in
  ttt_layer_flops_per_token (the library's count) and in the total. Adaptive:
  `ponder_alloc.adaptive_flops_per_token` over the allocated k (its SKIP first pass
  makes no update).
* total_flops_per_token: XLA's compiled FLOPs of the whole model's forward pass at each
  static k per token, with the TTT scan's other mini-batches added analytically (XLA
  counts a loop body once); adaptive: `adaptive_flops_per_token` (one SKIP pass plus the
  mean over the allocated k) plus the compiled FLOPs of the allocation (entropies,
  quantiles; a budget's bisection loop counted once, a small lower bound).
* eval_s_per_token: every variant's jitted evaluation forward (adaptive: its two-pass
  program, `lax.switch` per mini-batch) on the same batch, timed in round robin
  (`analysis.measure_interleaved`), median over runs.
* allocation (mini-batches and tokens at each k) and mean_steps.
* correlations (adaptive variants), Spearman and Pearson: allocated k against the
  per-token loss gain nll(k = 0) - nll(allocated k), both under the variant's parameters;
  on the synthetic task also the SKIP pass's mean entropy over a mini-batch's own
  positions against the fraction of its targets that are unpredictable (the source's
  labels), and the same for the causal allocation signal (ponder_alloc's window that ends
  at the mini-batch's first position; before the batch mean of granularity "batch").
* inner_fit: the inner reconstruction loss of the evaluation batch's mini-batches after
  1..4 steps from W_0 over the loss before them (`ttt.inner_loss_by_step`, per TTT
  block and averaged), under each variant's parameters: whether steps past the first
  still fit the inner objective.
* goal (`benchmarks.goals.ponder_pareto`): adaptive's valid perplexity within 1% of
  Fixed-4's, with at most 65% of its inner-loop FLOPs and 75% of its eval wall-clock per
  token; per adaptive variant.
  reference_ppl_over_skip (Fixed-4's perplexity over SKIP's) says whether the inner steps
  matter at all: near or above 1 (an undertrained model, a short run) the goal is met
  vacuously; inner_steps_help is whether it is at most 1/1.01, and meaningful_pass whether
  some adaptive variant passes while it holds.
* gates without training (GATE_SETTINGS): on Fixed-1's parameters SKIP/update at a 50%
  update rate, on Fixed-4's {1, 2, 4} at ponder_target: recon<setting> is PonderTTT's
  reconstruction-loss gate (`ttt.ReconGate`: each TTT layer's own inner loss at the
  start of the previous mini-batch, percentile thresholds calibrated on two training-
  stream batches past the run, an EMA that keeps the realised rate on target; one pass,
  `lax.switch` per mini-batch, shared by the batch); oracle<setting> ranks each
  evaluation batch's mini-batches by their realised counterfactual gain: the batch's
  NLL with that one mini-batch at the lowest k and every other at the highest, minus
  its NLL with all at the highest (`_mini_batch_score`; one extra pass per mini-batch:
  16 per batch on the recall preset, 128 at sequence 2048), and random<setting> at
  random, both allocating exactly the target fractions. Each of these rows has
  raised_rate_by_position (the share above the lowest k at each mini-batch position;
  gate_positions.png) and gate_recovery has oracle_gain_by_position (the mean
  counterfactual gain). gate_recovery: oracle recovery = (base -
  gate) / (base - oracle) in NLL, base = every mini-batch at the lowest k (also for
  random), and whether it reaches 80%. Each row's inner_flops_per_token counts its
  signal: gate_flops_per_token (recon: `ttt_lm.gate_flops_per_token`; the entropy
  adaptive rows: their SKIP first pass and allocation) plus update_flops_per_token.
  The oracle's and random's times are their second pass alone (the oracle needs every
  k's pass first).
* recall_acc (recall preset): argmax accuracy on the recalled values; fixed1_vs_skip:
  Fixed-1's perplexity at least 5% below SKIP's or its recall accuracy 10 points above.
* seeds (--seeds=N > 1): SKIP and Fixed-1/2/4 retrained with seeds 1..N-1 in
  DIR/<variant>_s<i>; their valid perplexity (and recall accuracy) per seed.
* throughput: one TTTLayer (4 heads x 64, k = 1, mini-batch 16, sequence 2048, batch 1),
  forward + backward (jax.value_and_grad of a loss of the output) in the grad and dual
  forms, in round robin; also their analytic inner-loop FLOPs and their agreement.

Files in DIR: results.json, pareto.png (valid perplexity against inner-loop FLOPs,
total FLOPs and measured time per token, every row), recall.png (recall preset: recall
accuracy against inner FLOPs and time), allocation.png, gate_positions.png, curves.png (all trained
variants' training loss and eval perplexity) and each workdir's own curves.png.

Runtime on the 2-core CPU while another training job shared it (1-minute load about 4;
seconds per step of each variant in configs/ttt_lm.py's docstring; an idle machine is
about twice as fast): synthetic short 7.5 min (measured); synthetic full about 40 min
(500 steps per variant, about 35 min of training steps); wikitext2 full about 80 min
(100 steps per variant, 72 min of training steps, plus evaluations of the whole valid
split); wikitext2 short about 20 min; recall full with --seeds=2 --jobs=2 on an idle
machine 60 min of training and 4 min of measurement (the oracle's 16 extra passes per
batch included; measured 2026-12-04), each further seed 18-30 min. Most of a smoke or
short run is XLA compiling (15-40 s per train step program on this CPU).
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from benchmarks import common
from benchmarks import goals
from configs import ttt_lm as ttt_lm_config
from models import ttt_lm
from ponder import analysis
from ponder import errors
from ponder import lm
from ponder import metric_log as plog
from ponder.data import synthetic
from ponder.nn import ponder_alloc
from ponder.nn import ttt
from train import trainer

PRESETS = ("synthetic", "wikitext2", "recall", "shakespeare_long", "wikitext2_long")


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much one benchmark run trains and times."""
  smoke: bool  # configs/ttt_lm.py's smoke model and data instead of the preset's
  total_steps: dict  # preset -> training steps per variant; absent = the preset's
  adaptive: tuple  # one adaptive variant per (ponder_target, ponder_budget)
  timing_runs: int  # timed evaluation passes per variant (round robin, median kept)
  layer: dict  # TTT-Linear throughput: batch, seq, width, heads, runs


_TARGET = ponder_alloc.DEFAULT_TARGET
_LAYER = dict(batch=1, seq=2048, width=256, heads=4)
_SMOKE_STEPS = {preset: 2 for preset in PRESETS}
BUDGETS = {
    "smoke": Budget(True, _SMOKE_STEPS, ((_TARGET, 0.0),), 1,
                    dict(batch=1, seq=32, width=16, heads=2, runs=1)),
    "short": Budget(False, dict(synthetic=50, wikitext2=20, recall=40, shakespeare_long=30,
                                wikitext2_long=20), ((_TARGET, 0.0), (_TARGET, 1.5)),
                    5, dict(_LAYER, runs=3)),
    "full": Budget(False, {}, ((_TARGET, 0.0), (_TARGET, 1.8), ((0.1, 0.3, 0.6), 0.0)), 10,
                   dict(_LAYER, runs=10)),
}



@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  mode: str  # configs/ttt_lm.py's mode: fixed | skip | adaptive
  k: int = 0  # the fixed k (0 for skip and adaptive)
  target: tuple = _TARGET  # adaptive: ponder_target
  budget: float = 0.0  # adaptive: ponder_budget (0 = none)


def variants(budget: Budget) -> list:
  """SKIP, Fixed-1/2/4 and one adaptive variant per setting of the budget."""
  out = [Variant("skip", "skip")] + [Variant(f"fixed{k}", "fixed", k) for k in (1, 2, 4)]
  for target, ponder_budget in budget.adaptive:
    name = "adaptive"
    if tuple(target) != _TARGET:
      name += "_t" + "-".join(str(round(100 * t)) for t in target)
    if ponder_budget:
      name += f"_b{ponder_budget:g}"
    out.append(Variant(name, "adaptive", target=tuple(target), budget=float(ponder_budget)))
  return out


def variant_config(preset: str, budget: Budget, variant: Variant, data_dir: str = "",
                   seed: int = 0):
  """configs/ttt_lm.py's config of one variant under a budget (and training seed)."""
  if preset not in PRESETS:
    raise errors.unknown_key("ponder_pareto preset", preset, PRESETS)
  arg = f"{preset},mode={variant.mode},k={variant.k}" + (",smoke" if budget.smoke else "")
  cfg = ttt_lm_config.get_config(arg)
  if data_dir and cfg.data.source.startswith("synthetic:"):
    raise errors.ConfigError(f"--data_dir is read by the text presets only; {preset} "
                             "generates its data.")
  cfg.seed = seed
  cfg.model.update(ponder_target=variant.target, ponder_budget=variant.budget)
  steps = budget.total_steps.get(preset)
  if steps:
    every = max(steps // 2, 1)  # Two evaluations: a curve, however short.
    cfg.trainer.update(total_steps=steps, eval_every=every, ckpt_every=every)
    # Warm-up at most a tenth of the run, so that a short run reaches its peak rate.
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))
  if data_dir:
    cfg.data.source = f"local:{data_dir}"
  return cfg


def train_or_load(cfg, workdir: str, echo: Callable = print):
  """Trains `cfg` in `workdir` unless a finished run of it is there (resuming an
  unfinished one), then returns (task, params, step, trained_s) of its last checkpoint;
  trained_s is the training wall time of this call (0 when the run was reused)."""
  if os.path.exists(os.path.join(workdir, "config.json")):
    changed = trainer.config_diff(trainer.load_config(workdir), cfg)
    if changed:
      raise errors.ConfigError(
          f"{workdir} holds a run of another config (differs in {', '.join(changed)}); "
          "remove it or pass another --out.")
  final = os.path.join(workdir, "final_metrics.json")
  step, trained_s = -1, 0.0
  if os.path.exists(final):
    with open(final) as f:
      step = json.load(f)["step"]
  if step < cfg.trainer.total_steps:
    start = time.perf_counter()
    common.train(cfg, workdir, echo=echo)
    trained_s = time.perf_counter() - start
  _, task, params, step, _ = trainer.restore_run(workdir)
  return task, params, step, trained_s


def _correlation(x, y) -> dict:
  """Spearman's rho and Pearson's r of two samples (None where either is constant)."""
  x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return dict(spearman=None, pearson=None, n=int(len(x)))
  return dict(spearman=float(stats.spearmanr(x, y).statistic),
              pearson=float(stats.pearsonr(x, y).statistic), n=int(len(x)))


def _canonical(model) -> ttt_lm.TTTLM:
  """The variant's model with the fields that only choose default steps reset, so all
  variants of a preset share one compiled program per k."""
  cfg = dataclasses.replace(model.config, ttt_steps=0, ponder_target=_TARGET,
                            ponder_budget=0.0)
  return ttt_lm.TTTLM(cfg, dtype=model.dtype)


def _logits(model, params, inputs, steps=None):
  return model.apply({"params": params}, inputs, train=False, steps=steps)


@functools.partial(jax.jit, static_argnames=("mini_batch", "causal"))
def _difficulty(logits, *, mini_batch: int, causal: bool):
  return ponder_alloc.mini_batch_difficulty(logits, mini_batch, causal=causal)


_token_nll = jax.jit(lm.token_nll)
_hits = jax.jit(lambda logits, targets: logits.argmax(-1) == targets)


class _Programs:
  """The compiled evaluation programs all variants of one preset share."""

  def __init__(self, model: ttt_lm.TTTLM, params, inputs):
    self.tokens = inputs.size
    self.by_k, self.total_flops = {}, {}
    # XLA's cost analysis counts a loop body once, so of the TTT layers' lax.scan over
    # seq / mini_batch mini-batches it counts one; the others come from the analytic
    # count (tested against XLA's count of one mini-batch in tests/nn/test_ttt.py).
    uncounted = 1.0 - model.config.ttt_mini_batch / inputs.shape[1]
    for k in model.config.ttt_allowed_steps:
      compiled = jax.jit(functools.partial(_logits, model, steps=k)).lower(
          params, inputs).compile()
      self.by_k[k] = compiled
      self.total_flops[k] = (analysis.cost_of(compiled)["flops"] / self.tokens
                             + uncounted * ttt_lm.ttt_flops_per_token(model.config, k))
    self.second_pass = jax.jit(functools.partial(_logits, model))  # Array steps.

  def allocator(self, cfg: ttt_lm.TTTLMConfig, probe_shape):
    """A variant's compiled allocation (SKIP logits -> steps) and its FLOPs per token."""
    compiled = jax.jit(functools.partial(ttt_lm.adaptive_steps, cfg)).lower(
        jax.ShapeDtypeStruct(probe_shape, jnp.float32)).compile()
    return compiled, analysis.cost_of(compiled)["flops"] / self.tokens


def _evaluate(variant: Variant, model, params, batches: Sequence[dict],
              programs: _Programs) -> dict:
  """Per-token arrays of a variant over the evaluation batches (numpy, [N, seq] or
  [N, seq / mini_batch]): nll, mask, steps; adaptive: also gain and difficulties."""
  cfg = model.config
  mb = cfg.ttt_mini_batch
  out = {name: [] for name in ("nll", "mask", "real", "steps", "gain", "own", "signal",
                               "hard", "hit", "recall")}
  allocate = alloc_flops = None
  for batch in batches:
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    if variant.mode == "adaptive":
      probe = programs.by_k[0](params, inputs)
      if allocate is None:
        allocate, alloc_flops = programs.allocator(cfg, probe.shape)
      steps = allocate(probe)
      logits = programs.second_pass(params, inputs, steps)
      steps = np.asarray(steps)
      if steps.ndim == 1:  # One k per mini-batch, shared by the batch.
        steps = np.broadcast_to(np.repeat(steps, mb), targets.shape)
      nll0 = np.asarray(_token_nll(probe, targets))
      out["own"].append(np.asarray(_difficulty(probe, mini_batch=mb, causal=False)))
      out["signal"].append(np.asarray(_difficulty(probe, mini_batch=mb,
                                                  causal=cfg.ponder_causal)))
    else:
      logits = programs.by_k[variant.k](params, inputs)
      steps = np.full(targets.shape, variant.k)
    nll = np.asarray(_token_nll(logits, targets))
    out["nll"].append(nll)
    _append_quality(out, batch, logits)
    out["steps"].append(steps)
    if variant.mode == "adaptive":
      out["gain"].append(nll0 - nll)
  arrays = {k: np.concatenate(v) for k, v in out.items() if v}
  arrays["alloc_flops"] = alloc_flops
  return arrays


def _append_quality(out: dict, batch: dict, logits) -> None:
  """Per-token arrays of one batch that `_quality` reads besides "nll": the mask, the
  argmax hits, and the synthetic sources' labels (difficulty, recall targets); and
  "real", the positions the model computes on (the FLOP counts' tokens: the mask's
  unless the scored targets are a subset, as data.loss_on="recall" makes them)."""
  out["mask"].append(batch["mask"])
  out["real"].append(batch.get("real", batch["mask"]))
  out["hit"].append(np.asarray(_hits(logits, batch["tokens"][:, 1:])))
  if "difficulty" in batch:
    out["hard"].append(batch["difficulty"][:, 1:])
  if "kind" in batch:
    out["recall"].append(batch["kind"][:, 1:] == synthetic.RECALL)


def _quality(arrays: dict) -> dict:
  """valid NLL and perplexity over the scored tokens; synthetic: nll_easy / nll_hard;
  recall: recall_acc, the argmax accuracy on the recalled targets."""
  mask, nll = arrays["mask"], arrays["nll"]
  mean_nll = float((nll * mask).sum() / mask.sum())
  out = dict(valid_nll=mean_nll, valid_ppl=math.exp(mean_nll), scored_tokens=int(mask.sum()))
  if "hard" in arrays:
    hard = arrays["hard"].astype(np.float64) * mask
    easy = (1.0 - arrays["hard"]) * mask
    out.update(nll_hard=float((nll * hard).sum() / max(hard.sum(), 1.0)),
               nll_easy=float((nll * easy).sum() / max(easy.sum(), 1.0)))
  if "recall" in arrays and arrays["recall"].any():
    recall = arrays["recall"] & (mask > 0)
    out["recall_acc"] = float(arrays["hit"][recall].mean())
  return out


def _summary(variant: Variant, cfg: ttt_lm.TTTLMConfig, arrays: dict,
             programs: _Programs) -> dict:
  """valid perplexity, FLOPs, allocation and correlations from `_evaluate`'s arrays."""
  mb = cfg.ttt_mini_batch
  mask, steps = arrays["mask"], arrays["steps"]
  n, seq = mask.shape
  out = dict(mode=variant.mode, k=variant.k, **_quality(arrays))
  # Mini-batch units: every mini-batch of a row with a scored target.
  mb_real = mask.reshape(n, seq // mb, mb).max(-1) > 0
  token_steps = steps[mask > 0]
  allocation, mb_steps = _allocation(cfg, arrays["real"], steps)
  out.update(allocation)
  allowed = cfg.ttt_allowed_steps
  layer = {k: ttt_lm.ttt_flops_per_token(cfg, k) for k in allowed}
  inner = {k: layer[k] - layer[0] for k in allowed}
  if variant.mode == "adaptive":
    # The entropy signal's own cost is the SKIP first pass and the allocation.
    gate = programs.total_flops[0] + arrays["alloc_flops"]
    update = ponder_alloc.adaptive_flops_per_token(mb_steps, inner)
    out.update(
        update_flops_per_token=update, gate_flops_per_token=gate,
        inner_flops_per_token=update + gate,
        ttt_layer_flops_per_token=ponder_alloc.adaptive_flops_per_token(mb_steps, layer),
        total_flops_per_token=ponder_alloc.adaptive_flops_per_token(
            mb_steps, programs.total_flops) + arrays["alloc_flops"],
        allocation_flops_per_token=arrays["alloc_flops"])
    real = mask > 0
    gain = arrays["gain"]
    correlations = dict(steps_vs_loss_gain=_correlation(token_steps, gain[real]))
    out["mean_loss_gain_by_steps"] = {
        str(k): float(gain[real][token_steps == k].mean()) for k in allowed
        if (token_steps == k).any()}
    if "hard" in arrays:
      hard_frac = (arrays["hard"] * mask).reshape(n, seq // mb, mb).sum(-1) / np.maximum(
          mask.reshape(n, seq // mb, mb).sum(-1), 1.0)
      correlations["entropy_vs_hard_fraction"] = _correlation(
          arrays["own"][mb_real], hard_frac[mb_real])
      correlations["allocation_signal_vs_hard_fraction"] = _correlation(
          arrays["signal"][mb_real], hard_frac[mb_real])
    out["correlations"] = correlations
  else:
    out.update(inner_flops_per_token=float(inner[variant.k]),
               update_flops_per_token=float(inner[variant.k]), gate_flops_per_token=0.0,
               ttt_layer_flops_per_token=float(layer[variant.k]),
               total_flops_per_token=float(programs.total_flops[variant.k]))
  return out


def _allocation(cfg: ttt_lm.TTTLMConfig, mask, steps):
  """({"allocation": mini-batches and tokens at each k, "mean_steps"}, the k of every
  mini-batch with a position in `mask`) from per-token steps [rows, seq]; `mask` is
  the positions computed on ("real"), so the mean k is what the FLOPs cost."""
  mb = cfg.ttt_mini_batch
  n, seq = mask.shape
  mb_steps = steps[:, ::mb][mask.reshape(n, seq // mb, mb).max(-1) > 0]
  token_steps = steps[mask > 0]
  allowed = cfg.ttt_allowed_steps
  return dict(allocation={
      "mini_batches": {str(k): int((mb_steps == k).sum()) for k in allowed},
      "tokens": {str(k): int((token_steps == k).sum()) for k in allowed}},
      mean_steps=float(token_steps.mean())), mb_steps


@dataclasses.dataclass(frozen=True)
class GateSetting:
  """An allocation evaluated on one trained variant's parameters (no training): the
  reconstruction-loss gate, the oracle and a random allocation at the same rate."""
  name: str  # suffix of the result names: recon<name>, oracle<name>, random<name>
  source: str  # the trained variant whose parameters it runs
  buckets: tuple
  target: tuple


# SKIP/update at a 50% update rate on Fixed-1's parameters (the anchor's setting and
# the 80% recovery goal), and {1, 2, 4} at ponder_target on Fixed-4's (the goal
# against Fixed-4 at the same parameters).
GATE_SETTINGS = (GateSetting("_update", "fixed1", (0, 1), (0.5, 0.5)),
                 GateSetting("", "fixed4", (1, 2, 4), _TARGET))
GATE_RECOVERY_GOAL = 0.8  # The issue's: the gate recovers >= 80% of the oracle's gain.
_CALIBRATION_BATCHES = 2  # Training-stream batches past the run's last step.


def _mini_batch_score(nll_of_steps: Callable, mask, n: int, low: int, top: int):
  """[n]: mini-batch j's realised gain, the oracle's ranking: the masked mean NLL of
  `nll_of_steps(steps)` (per-token NLL [rows, seq] of the pass with k = steps[j] at
  mini-batch j) with j alone at `low` and the rest at `top`, minus that with all at
  `top`. Counterfactual, not local: an update at j changes W for every later mini-batch,
  so on the recall task the gain of updating a mini-batch of stored pairs lands at the
  queries 200+ tokens later, where the local difference nll_low - nll_top at j sees
  nothing and ties every unscored mini-batch (the oracle then updated all of them)."""
  mean = lambda steps: float((nll_of_steps(steps) * mask).sum() / mask.sum())
  reference = mean(np.full(n, top, np.int32))
  return np.array([mean(np.where(np.arange(n) == j, low, top).astype(np.int32))
                   - reference for j in range(n)])


def oracle_recovery(base_nll: float, gate_nll: float, oracle_nll: float):
  """The share of the oracle's NLL gain over the base (every mini-batch at the lowest
  k) that the gate achieves at the same rate, (base - gate) / (base - oracle); None
  when the oracle gains nothing."""
  if not base_nll - oracle_nll > 0:
    return None
  return (base_nll - gate_nll) / (base_nll - oracle_nll)


def _evaluate_gates(setting: GateSetting, model, params, train_batch, cfg_steps: int,
                    batches: Sequence[dict], programs: _Programs, seed: int = 0) -> dict:
  """Per-token arrays (as `_evaluate`) of the gate, the oracle and the random
  allocation of one setting, plus the base (lowest k) NLL and the gate's thresholds.
  The gate is calibrated on training batches cfg_steps, cfg_steps + 1, ... (`train_batch`,
  past the trained steps)."""
  cfg = model.config
  mb, low, top = cfg.ttt_mini_batch, setting.buckets[0], setting.buckets[-1]
  calibration = [train_batch(cfg_steps + i)["tokens"][:, :-1]
                 for i in range(_CALIBRATION_BATCHES)]
  gate = ttt_lm.calibrate_recon_gate(model, params, calibration, buckets=setting.buckets,
                                     target=setting.target, granularity="batch")
  rng = np.random.default_rng(seed)
  names = ("recon", "oracle", "random")
  out = {name: {key: [] for key in ("nll", "mask", "real", "steps", "hit", "hard",
                                    "recall", "steps_mask")} for name in names}
  base, scores, programs_by_name = [], [], {}
  for batch in batches:
    inputs, targets, mask = batch["tokens"][:, :-1], batch["tokens"][:, 1:], batch["mask"]
    nll_low = np.asarray(_token_nll(programs.by_k[low](params, inputs), targets))
    base.append(nll_low)
    logits, decisions = ttt_lm.gate_decisions(model, params, inputs, gate)
    layer_steps = [np.asarray(k).T for k, _ in decisions.values()]  # [batch, n] per layer
    score = _mini_batch_score(
        lambda steps: np.asarray(_token_nll(programs.second_pass(params, inputs, steps),
                                            targets)),
        mask, inputs.shape[1] // mb, low, top)
    scores.append(score)
    allocs = {"recon": (logits, layer_steps)}
    for name, ranking in (("oracle", score), ("random", rng.random(score.shape))):
      # Distinct ranks (ties by position), so that equal gains (mini-batches whose update
      # changes no scored target) cannot push the oracle off the target fractions.
      ranking = np.argsort(np.argsort(ranking, kind="stable"), kind="stable")
      steps = ponder_alloc.allocate(ranking, ponder_alloc.calibrate(
          ranking, setting.target, setting.buckets), setting.buckets)
      allocs[name] = (programs.second_pass(params, inputs, steps),
                      [np.broadcast_to(np.asarray(steps), (len(inputs), len(steps)))])
    for name, (logits, layer_steps) in allocs.items():
      o = out[name]
      o["nll"].append(np.asarray(_token_nll(logits, targets)))
      _append_quality(o, batch, logits)
      for k in layer_steps:  # Every TTT layer's allocation, stacked as rows.
        o["steps"].append(np.repeat(k, mb, axis=1))
        o["steps_mask"].append(batch.get("real", mask))
    programs_by_name.setdefault("recon", functools.partial(
        ttt_lm.gate_decisions, model, params, inputs, gate))
    programs_by_name.setdefault("allocated", functools.partial(
        programs.second_pass, params, inputs, allocs["oracle"][1][0][0]))
  arrays = {name: {k: np.concatenate(v) for k, v in o.items() if v} for name, o in out.items()}
  base = np.concatenate(base)
  return dict(arrays=arrays, gate=gate, timed=programs_by_name,
              oracle_gain_by_position=np.mean(scores, axis=0).tolist(),
              base_nll=float((base * arrays["recon"]["mask"]).sum()
                             / arrays["recon"]["mask"].sum()))


def _gate_summaries(setting: GateSetting, cfg: ttt_lm.TTTLMConfig, evaluated: dict,
                    programs: _Programs) -> dict:
  """The results rows recon<name>, oracle<name>, random<name>: quality, allocation,
  FLOPs (the gate's signal counted in its inner and total FLOPs) and the recovery."""
  allowed = cfg.ttt_allowed_steps
  layer = {k: ttt_lm.ttt_flops_per_token(cfg, k) for k in allowed}
  inner = {k: layer[k] - layer[0] for k in allowed}
  rows = {}
  for name, arrays in evaluated["arrays"].items():
    allocation, mb_steps = _allocation(cfg, arrays["steps_mask"], arrays["steps"])
    gate = float(ttt_lm.gate_flops_per_token(cfg)) if name == "recon" else 0.0
    # One pass (no SKIP first pass): the mean over the allocated k.
    mean = lambda table: float(np.mean([table[int(k)] for k in mb_steps]))
    update = mean(inner)
    rows[name + setting.name] = dict(
        # The recon gate is an adaptive variant for benchmarks.goals; the oracle (which
        # needs every k's outcome first) and random are references, not candidates.
        mode="adaptive" if name == "recon" else name, k=0, params_of=setting.source,
        buckets=list(setting.buckets), target=list(setting.target), **_quality(arrays),
        **allocation, realised_rate=float(mb_steps.mean()) / max(setting.buckets),
        target_rate=float(np.dot(setting.target, setting.buckets)) / max(setting.buckets),
        update_flops_per_token=update, gate_flops_per_token=gate,
        inner_flops_per_token=update + gate,
        ttt_layer_flops_per_token=mean(layer),
        total_flops_per_token=mean(programs.total_flops) + gate,
        # Where in the sequence each allocation spends its steps: the share of rows (and
        # TTT layers) above the lowest bucket at each mini-batch position.
        raised_rate_by_position=(arrays["steps"][:, ::cfg.ttt_mini_batch]
                                 > setting.buckets[0]).mean(0).tolist())
  base = evaluated["base_nll"]
  nll = {name: rows[name + setting.name]["valid_nll"] for name in evaluated["arrays"]}
  recovery = dict(
      params_of=setting.source, buckets=list(setting.buckets), target=list(setting.target),
      thresholds=np.asarray(evaluated["gate"].thresholds).tolist(), base_nll=base,
      gate_nll=nll["recon"], oracle_nll=nll["oracle"], random_nll=nll["random"],
      recovery=oracle_recovery(base, nll["recon"], nll["oracle"]),
      random_recovery=oracle_recovery(base, nll["random"], nll["oracle"]),
      realised_rate=rows["recon" + setting.name]["realised_rate"],
      target_rate=rows["recon" + setting.name]["target_rate"], goal=GATE_RECOVERY_GOAL,
      oracle_gain_by_position=evaluated["oracle_gain_by_position"])
  recovery["passed"] = (recovery["recovery"] is not None
                        and recovery["recovery"] >= GATE_RECOVERY_GOAL)
  return rows, recovery


def _train_speed(workdir: str) -> Optional[float]:
  """Median seconds per training step from the run's logged intervals, leaving out the
  first (it holds the compilation) when there are others."""
  rates = [r["steps_per_s"] for r in plog.read_metrics(workdir, "train") if "steps_per_s" in r]
  rates = rates[1:] or rates
  return 1.0 / float(np.median(rates)) if rates else None


def layer_throughput(*, batch: int, seq: int, width: int, heads: int, runs: int,
                     steps: int = 1, mini_batch: int = 16, seed: int = 0) -> dict:
  """Training tokens/s of one TTTLayer (TTT-Linear) in the grad and dual forms: the
  jitted value and gradient (parameters) of the mean squared output, in round robin."""
  x = jax.random.normal(jax.random.key(seed), (batch, seq, width))
  layers = {form: ttt.TTTLayer(width, heads, form=form, steps=steps, mini_batch=mini_batch)
            for form in ttt.FORMS}
  params = jax.jit(functools.partial(layers["grad"].init, train=True))(
      jax.random.key(seed + 1), x[:, :mini_batch])
  loss = lambda p, x, layer: jnp.mean(jnp.square(layer.apply(p, x, train=True)))
  compiled = {form: jax.jit(jax.value_and_grad(functools.partial(loss, layer=layer))).lower(
      params, x).compile() for form, layer in layers.items()}
  outs = {form: fn(params, x) for form, fn in compiled.items()}
  (loss_g, grads_g), (loss_d, grads_d) = outs["grad"], outs["dual"]
  grad_diff = max(float(jnp.max(jnp.abs(a - b)))
                  for a, b in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_d)))
  times = analysis.measure_interleaved(
      {form: functools.partial(fn, params, x) for form, fn in compiled.items()},
      warmup=1, runs=runs)
  tokens = batch * seq
  out = dict(batch=batch, seq=seq, width=width, heads=heads, head_dim=width // heads,
             steps=steps, mini_batch=mini_batch, kind="linear",
             loss_abs_diff=abs(float(loss_g) - float(loss_d)), grad_max_abs_diff=grad_diff,
             machine=common.machine())
  for form in compiled:  # Analytic: XLA counts the scan's body once (see _Programs).
    inner = heads * ttt.inner_flops_per_token(steps, width // heads, form=form,
                                              mini_batch=mini_batch)
    out[form] = dict(times[form], tokens_per_s=tokens / times[form]["median_s"],
                     inner_forward_flops_per_token=inner)
  out["dual_speedup"] = out["dual"]["tokens_per_s"] / out["grad"]["tokens_per_s"]
  return out


_MAX_FIT_STEPS = 4


@functools.partial(jax.jit, static_argnames="model")
def _ttt_views(model: ttt_lm.TTTLM, params, inputs) -> dict:
  """Every TTT layer's sown (xk, xv, eta) on `inputs` (a SKIP pass: views ignore k)."""
  _, aux = model.apply({"params": params}, inputs, train=False, steps=0,
                       mutable=["intermediates"])
  return aux["intermediates"]


_inner_loss_by_step = jax.jit(ttt.inner_loss_by_step,
                              static_argnames=("kind", "mini_batch", "max_steps"))


def inner_fit(model: ttt_lm.TTTLM, params, inputs) -> dict:
  """`ttt.inner_loss_by_step` of every TTT layer of a trained variant on `inputs`: the
  inner reconstruction loss after j = 0..4 steps from W_0 relative to j = 0, per block
  and averaged. Whether steps past the first still fit the inner objective, so whether
  there is anything for Fixed-2/4 and the adaptive allocation to buy. Pass the
  `_canonical` model: then every variant reuses one compiled program."""
  cfg = model.config
  views = _ttt_views(model, params, inputs)
  by_block = {}
  for i in cfg.ttt_positions:
    p = params[f"h_{i}"]["ttt"]
    (xk, xv, eta), = views[f"h_{i}"]["ttt"]["views"]
    by_block[f"h_{i}"] = np.asarray(_inner_loss_by_step(
        p["ttt_state"], xk, xv, eta, p["ttt_norm_scale"], p["ttt_norm_bias"],
        kind=cfg.ttt_kind, mini_batch=cfg.ttt_mini_batch,
        max_steps=_MAX_FIT_STEPS)).tolist()
  return dict(relative_loss_by_block=by_block,
              relative_loss=np.mean(list(by_block.values()), axis=0).tolist())


def _plots(out_dir: str, preset: str, results: dict, workdirs: dict) -> None:
  groups = {"adaptive": "adaptive (entropy, recon gates)", "oracle": "oracle / random",
            "random": "oracle / random"}
  points = [dict(r, label=name, group=groups.get(r["mode"], "fixed k"),
                 eval_us_per_token=1e6 * r["eval_s_per_token"]) for name, r in results.items()]
  analysis.plots.pareto(
      points, os.path.join(out_dir, "pareto.png"), y="valid_ppl", y_label="valid perplexity",
      xs=[("inner_flops_per_token", "inner-loop FLOPs / token (TTT updates)"),
          ("total_flops_per_token", "total forward FLOPs / token"),
          ("eval_us_per_token", "measured eval time / token (us)")],
      title=f"PonderTTT on {preset}: perplexity against compute")
  fractions = {}
  for unit in ("mini_batches", "tokens"):
    fractions[unit.replace("_", "-")] = {
        name: {k: c / max(sum(r["allocation"][unit].values()), 1)
               for k, c in r["allocation"][unit].items()} for name, r in results.items()}
  analysis.plots.allocation_histogram(fractions, os.path.join(out_dir, "allocation.png"),
                                      title="inner steps allocated (evaluation data)")
  analysis.plots.line_panels(
      {f"{setting.source}'s parameters, buckets {setting.buckets}": {
          kind: results[kind + setting.name]["raised_rate_by_position"]
          for kind in ("recon", "oracle", "random")} for setting in GATE_SETTINGS},
      os.path.join(out_dir, "gate_positions.png"), x_label="mini-batch position",
      y_label="share above the lowest k",
      title="where the gate, the oracle and random spend their steps (evaluation data)")
  metrics = [("train", "loss"), ("eval", "perplexity")]
  if preset in ("synthetic", "recall"):
    metrics += [("eval", "nll_easy"), ("eval", "nll_hard")]
  if preset == "recall":
    metrics += [("eval", "recall_acc")]
  if results["skip"].get("recall_acc") is not None:
    analysis.plots.pareto(
        points, os.path.join(out_dir, "recall.png"), y="recall_acc",
        y_label="recall accuracy", xs=[("inner_flops_per_token", "inner FLOPs / token"),
                                       ("eval_us_per_token", "eval time / token (us)")],
        title=f"PonderTTT on {preset}: recall accuracy against compute")
  analysis.plots.compare_runs({name: plog.read_metrics(w) for name, w in workdirs.items()},
                              os.path.join(out_dir, "curves.png"), metrics=metrics,
                              title=f"TTT LM variants on {preset}")


FIXED1_GOAL = dict(max_ppl_ratio=0.95, min_recall_gain=0.10)  # The issue's.


def fixed1_vs_skip(results: dict) -> dict:
  """Whether one inner step buys something: Fixed-1's perplexity at least 5% below
  SKIP's, or (recall) its recall accuracy at least 10 points above."""
  f1, skip = results["fixed1"], results["skip"]
  out = dict(FIXED1_GOAL, ppl_ratio=f1["valid_ppl"] / skip["valid_ppl"])
  out["passed"] = out["ppl_ratio"] <= FIXED1_GOAL["max_ppl_ratio"]
  if "recall_acc" in f1:
    out["recall_gain"] = f1["recall_acc"] - skip["recall_acc"]
    out["passed"] |= out["recall_gain"] >= FIXED1_GOAL["min_recall_gain"]
  return out


def run_workdir(out_dir: str, name: str, seed: int = 0) -> str:
  """DIR/<variant> for seed 0 (the main rows), DIR/<variant>_s<seed> for the others."""
  return os.path.join(out_dir, name + (f"_s{seed}" if seed else ""))


def training_runs(preset: str, budget: Budget, data_dir: str, out_dir: str, seeds: int
                  ) -> dict:
  """{workdir: config} of every run `run` trains: each variant with seed 0, and SKIP and
  Fixed-1/2/4 with seeds 1..seeds-1 (`_seed_spread`)."""
  runs = {}
  for seed in range(max(seeds, 1)):
    for variant in variants(budget):
      if seed == 0 or variant.mode != "adaptive":
        runs[run_workdir(out_dir, variant.name, seed)] = variant_config(
            preset, budget, variant, data_dir, seed=seed)
  return runs


def _seed_spread(preset: str, budget: Budget, data_dir: str, out_dir: str, seeds: int,
                 batches, programs: _Programs, echo: Callable) -> dict:
  """Fixed and SKIP variants retrained with seeds 1..seeds-1 (workdirs DIR/<name>_s<i>;
  the main rows are seed 0): {name: {"valid_ppl": [per seed], "recall_acc": [...]}},
  seed 0 first. Empty for one seed."""
  if seeds < 2:
    return {}
  spread = {}
  for variant in variants(budget):
    if variant.mode == "adaptive":
      continue
    rows = []
    for seed in range(seeds):
      cfg = variant_config(preset, budget, variant, data_dir, seed=seed)
      workdir = run_workdir(out_dir, variant.name, seed)
      echo(f"== {variant.name}, seed {seed}: {workdir}")
      task, params, _, _ = train_or_load(cfg, workdir, echo)
      rows.append(_quality(_evaluate(variant, task.model, params, batches, programs)))
    spread[variant.name] = {key: [r[key] for r in rows] for key in rows[0]
                            if key in ("valid_ppl", "recall_acc")}
  return spread


def run(out_dir: str, preset: str, budget: Budget, *, data_dir: str = "", seeds_n: int = 1,
        jobs: int = 1, echo: Callable = print) -> dict:
  """Trains or loads every variant, measures them, writes DIR/results.json and the PNGs,
  and returns the results. seeds_n > 1 retrains SKIP and Fixed-1/2/4 with seeds
  1..seeds_n-1 for their seed spread (`_seed_spread`). jobs > 1 first trains every run
  in that many processes (`common.train_parallel`); the rest then reuses them."""
  os.makedirs(out_dir, exist_ok=True)
  machine = common.machine()
  if jobs > 1:
    common.train_parallel(training_runs(preset, budget, data_dir, out_dir, seeds_n), jobs,
                          echo)
  loaded, workdirs, configs = {}, {}, {}
  for variant in variants(budget):
    cfg = variant_config(preset, budget, variant, data_dir)
    workdirs[variant.name] = run_workdir(out_dir, variant.name)
    echo(f"== {variant.name}: {workdirs[variant.name]}")
    loaded[variant.name] = (variant, *train_or_load(cfg, workdirs[variant.name], echo))
    configs[variant.name] = cfg
  first = next(iter(loaded.values()))
  task0, params0 = first[1], first[2]
  canonical = _canonical(task0.model)
  for name, (_, task, *_rest) in loaded.items():
    if _canonical(task.model) != canonical:
      raise errors.ConfigError(f"variant {name}'s model differs from {first[0].name}'s "
                               "beyond its steps: they cannot share programs.")
  batches = list(task0.eval_batches())
  seq, mb = batches[0]["tokens"].shape[1] - 1, canonical.config.ttt_mini_batch
  if seq % mb:
    raise errors.ConfigError(f"data.seq_len={seq} must be a multiple of ttt_mini_batch={mb} "
                             "for per-mini-batch statistics.")
  echo("compiling the evaluation programs ...")
  timing_inputs = batches[0]["tokens"][:, :-1]
  programs = _Programs(canonical, params0, timing_inputs)
  results, timed = {}, {}
  for name, (variant, task, params, step, trained_s) in loaded.items():
    echo(f"evaluating {name} ...")
    arrays = _evaluate(variant, task.model, params, batches, programs)
    results[name] = dict(_summary(variant, task.model.config, arrays, programs),
                         workdir=workdirs[name], steps_trained=int(step),
                         ponder_target=list(variant.target), ponder_budget=variant.budget,
                         train_s_per_step=_train_speed(workdirs[name]),
                         trained_now_s=trained_s,
                         inner_fit=inner_fit(canonical, params, timing_inputs))
    if variant.mode == "adaptive":  # The model's own two-pass program.
      fn = jax.jit(functools.partial(_logits, task.model)).lower(params, timing_inputs).compile()
    else:
      fn = programs.by_k[variant.k]
    timed[name] = functools.partial(fn, params, timing_inputs)
  recovery = {}
  for setting in GATE_SETTINGS:
    _, task, params, _, _ = loaded[setting.source]
    echo(f"gates on {setting.source}'s parameters, buckets {setting.buckets} ...")
    evaluated = _evaluate_gates(setting, canonical, params, task.train_batch,
                                configs[setting.source].trainer.total_steps, batches,
                                programs, seed=configs[setting.source].seed)
    rows, recovery["recon" + setting.name] = _gate_summaries(
        setting, canonical.config, evaluated, programs)
    for name, row in rows.items():
      results[name] = dict(row, inner_fit=results[setting.source]["inner_fit"])
      kind = "recon" if name.startswith("recon") else "allocated"
      timed[name] = evaluated["timed"][kind]
  seeds = _seed_spread(preset, budget, data_dir, out_dir, seeds_n, batches, programs, echo)
  for name, spread in seeds.items():
    results[name]["seeds"] = spread
  echo(f"timing {len(timed)} evaluation programs in round robin ...")
  times = analysis.measure_interleaved(timed, warmup=1, runs=budget.timing_runs)
  for name, t in times.items():
    results[name].update(eval_s_per_token=t["median_s"] / timing_inputs.size,
                         eval_tokens_per_s=timing_inputs.size / t["median_s"],
                         eval_times_s=t["times_s"])
  cfg0 = configs[first[0].name]
  echo("TTT-Linear layer throughput, grad and dual forms ...")
  result = dict(
      machine=dict(machine, load_average_end=os.getloadavg()), preset=preset,
      budget=dataclasses.asdict(budget), data_source=cfg0.data.source,
      model={k: v for k, v in dataclasses.asdict(canonical.config).items()
             if not k.startswith("ponder_") and k != "ttt_steps"},
      batch_size=cfg0.trainer.batch_size, seq_len=seq, eval_batches=len(batches),
      timing_batch=list(timing_inputs.shape),
      flops_by_k=dict(total_compiled={str(k): v for k, v in programs.total_flops.items()},
                      ttt_layer={str(k): ttt_lm.ttt_flops_per_token(canonical.config, k)
                                 for k in programs.total_flops}),
      variants=results, goal=goals.ponder_pareto(results), gate_recovery=recovery,
      fixed1_vs_skip=fixed1_vs_skip(results),
      throughput=layer_throughput(**budget.layer))
  _plots(out_dir, preset, results, workdirs)
  common.write_json(os.path.join(out_dir, "results.json"), result)
  return result


def print_throughput(t: dict) -> None:
  print(f"TTT-Linear {t['heads']}x{t['head_dim']}, seq {t['seq']}, fwd+bwd: grad "
        f"{t['grad']['tokens_per_s']:.0f} tokens/s, dual {t['dual']['tokens_per_s']:.0f} "
        f"tokens/s (x{t['dual_speedup']:.2f}); max |grad diff| {t['grad_max_abs_diff']:.2e}")


def print_summary(result: dict) -> None:
  print(f"\n{'variant':22} {'ppl':>8} {'recall':>6} {'inner F/tok':>11} {'gate F/tok':>11} "
        f"{'total F/tok':>11} {'us/tok':>7} {'mean k':>6}")
  for name, r in result["variants"].items():
    recall = r.get("recall_acc")
    print(f"{name:22} {r['valid_ppl']:8.3f} "
          f"{'-' if recall is None else format(recall, '.3f'):>6} "
          f"{r['inner_flops_per_token']:11.0f} {r['gate_flops_per_token']:11.0f} "
          f"{r['total_flops_per_token']:11.0f} {1e6 * r['eval_s_per_token']:7.2f} "
          f"{r['mean_steps']:6.2f}")
    if "seeds" in r:
      print(f"  seeds: {r['seeds']}")
    fit = ", ".join(f"{x:.3f}" for x in r["inner_fit"]["relative_loss"][1:])
    print(f"  inner loss after 1..{_MAX_FIT_STEPS} steps from W_0 (x step 0): {fit}")
    for what, c in r.get("correlations", {}).items():
      print(f"  {what}: spearman {c['spearman']}, pearson {c['pearson']} (n={c['n']})")
  goal = result["goal"]
  print(f"Fixed-4's perplexity over SKIP's: {goal['reference_ppl_over_skip']:.4f}"
        + ("" if goal["inner_steps_help"] else " (inner steps do not help: a pass below "
           "is vacuous)"))
  for name, g in goal["by_variant"].items():
    print(f"goal {name}: ppl x{g['ppl_ratio']:.4f}, inner FLOPs x{g['inner_flops_ratio']:.3f}"
          f", time x{g['time_ratio']:.3f} -> {'pass' if g['passed'] else 'fail'}")
  f1 = result["fixed1_vs_skip"]
  print(f"Fixed-1 over SKIP: ppl x{f1['ppl_ratio']:.4f}"
        + (f", recall {f1['recall_gain']:+.3f}" if "recall_gain" in f1 else "")
        + f" -> {'pass' if f1['passed'] else 'fail'}")
  for name, g in result["gate_recovery"].items():
    rec = lambda x: "n/a" if x is None else f"{x:.3f}"
    print(f"{name}: oracle recovery {rec(g['recovery'])} (random {rec(g['random_recovery'])})"
          f", rate {g['realised_rate']:.3f} for target {g['target_rate']:.3f}; nll base "
          f"{g['base_nll']:.4f}, gate {g['gate_nll']:.4f}, oracle {g['oracle_nll']:.4f} -> "
          f"{'pass' if g['passed'] else 'fail'}")
  print_throughput(result["throughput"])


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as a program (so
  tests can import it beside the other benchmarks)."""
  flags.DEFINE_string("out", None, "Directory for results.json, the PNGs and one "
                             "workdir per variant.")
  flags.DEFINE_enum("preset", "synthetic", PRESETS, "configs/ttt_lm.py preset.")
  flags.DEFINE_enum("budget", "full", list(BUDGETS),
                              "full: the preset's steps; short: minutes; smoke: seconds.")
  flags.DEFINE_string(
      "data_dir", "", "wikitext2: a WikiText-layout directory, e.g. "
      "../shared/data/wikitext-2-valsplit ('' = the config's source).")
  flags.DEFINE_integer(
      "seeds", 1, "Training seeds of SKIP and Fixed-1/2/4 for their seed spread (the "
      "main rows are seed 0).")
  flags.DEFINE_integer(
      "jobs", 1, "Runs trained at once before the measurements (benchmarks.common."
      "train_parallel: each in its own process, its log in DIR/<run>.log).")
  flags.DEFINE_bool(
      "throughput_only", False, "Only the TTT-Linear layer throughput, merged into "
      "DIR/results.json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  budget = BUDGETS[flags.FLAGS.budget]
  out_dir = flags.FLAGS.out
  if flags.FLAGS.throughput_only:
    path = os.path.join(out_dir, "results.json")
    result = {}
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
    result["throughput"] = layer_throughput(**budget.layer)
    common.write_json(path, result)
    print_throughput(result["throughput"])
  else:
    print_summary(run(out_dir, flags.FLAGS.preset, budget, data_dir=flags.FLAGS.data_dir,
                      seeds_n=flags.FLAGS.seeds, jobs=flags.FLAGS.jobs))


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("out")
  app.run(main)
