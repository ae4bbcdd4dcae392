"""Michel-style head-pruning curves: the metric as 0-90% of the heads are masked.

  python -m benchmarks.head_pruning --out=DIR [--budget=short|full|smoke] \
      [--models=minilm,gpt2] [--sst2=local:../shared/data/sst-2] \
      [--wikitext=local:../shared/data/wikitext-2-valsplit]

Michel, Levy & Neubig 2019 (Sec. 4.2, Fig. 3): heads are masked in steps of 10% of all
heads, the least important first, with the importance re-computed after every step
("iterative pruning"), and the model is evaluated at each level without retraining.
Here for four importance rules (`ponder.analysis.heads.scores`): gradient (their I_h,
normalised per layer), entropy (diffuse heads first), combined (the rank average of
the two) and random (the control, a fixed seed per level), on

  minilm  all-MiniLM-L6-v2 (72 heads) fine-tuned on SST-2 (configs/dendritic_bert.py
          minilm): GLUE dev accuracy,
  gpt2    the 6 x 12-head GPT-2 of configs/plasticity.py gpt2_wt2 trained on
          WikiText-2 without the policy: valid perplexity.

The masked model is evaluated through the model's head_mask (equal to the structurally
pruned model to 1e-5: tests/models/test_head_pruning.py and test_gpt2.py). Importance is
measured on `score_batches` training batches; the evaluation covers `eval_examples` of
the split (all of it in the full budget).

Resumable: each trained model lives in DIR/runs/<model> (train.main's workdir: rerunning
resumes or reuses it) and each finished curve in DIR/curves.json, so a rerun computes
only what is missing. Writes DIR/curves.json (levels, metric per method, the baseline,
whether each importance beats random at 20-60%) and DIR/pruning_curves.png.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from configs import dendritic_bert
from configs import plasticity as plasticity_config
from ponder import errors
from ponder import lm
from ponder import mesh as mesh_lib
from ponder import plasticity
from ponder.analysis import heads as heads_lib
from train import trainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


LEVELS = tuple(round(0.1 * i, 1) for i in range(10))  # 0%, 10%, ..., 90% of the heads.
GOAL_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6)  # Where importance must beat random.
# budget -> (training steps per model, score batches per re-scoring, eval examples;
# 0 = the whole split).
BUDGETS = {"smoke": dict(steps=2, score_batches=1, eval_examples=16),
           "short": dict(steps=150, score_batches=2, eval_examples=256),
           "full": dict(steps=0, score_batches=8, eval_examples=0)}


def model_config(name: str, budget: str, *, sst2: str, wikitext: str):
  """The trained model's config: the policy off (a plain run), sized by the budget."""
  smoke = budget == "smoke"
  steps = BUDGETS[budget]["steps"]
  if name == "minilm":
    cfg = dendritic_bert.get_config("minilm,smoke" if smoke else "minilm")
    if not smoke:
      cfg.data.source = sst2
    metric = ("accuracy", "max", "test")  # GLUE dev, the split papers report.
  elif name == "gpt2":
    cfg = plasticity_config.get_config("gpt2_wt2,smoke" if smoke else "gpt2_wt2")
    cfg.policy.name = ""  # A plain run: the policy's block stays, unread.
    if not smoke:
      cfg.data.source = wikitext
    metric = ("perplexity", "min", "val")
  else:
    raise errors.unknown_key("head_pruning model", name, ("minilm", "gpt2"))
  if steps:
    cfg.trainer.update(total_steps=steps, eval_every=steps, ckpt_every=steps,
                       log_every=min(cfg.trainer.log_every, steps))
  return cfg, metric


def trained(cfg: ml_collections.ConfigDict, workdir: str):
  """(cfg, task, params) of the run in `workdir`, trained first unless it has finished
  (final_metrics.json) before."""
  if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
    if trainer.train_and_evaluate(cfg, workdir, echo=print)["preempted"]:
      raise SystemExit(f"stopped while training {workdir}; rerun to resume.")
  run_cfg, task, params, _, _ = trainer.restore_run(workdir, selected=True)
  return run_cfg, task, params


def _limited(batches, examples: int):
  """The first batches covering `examples` real rows (sentences or windows; 0 = all)."""
  seen = 0
  for batch in batches:
    if examples and seen >= examples:
      return
    mask = np.asarray(batch["mask"])
    seen += int(mask.reshape(len(mask), -1).any(1).sum())
    yield batch


def masked_evaluator(name: str, model):
  """(params, batch, head_mask) -> summed metric pieces, jitted once."""
  if name == "gpt2":
    def sums(params, batch, mask):
      logits = model.apply({"params": params}, batch["tokens"][:, :-1], head_mask=mask)
      return lm.nll_sums(logits, batch["tokens"][:, 1:], batch["mask"])
  else:
    def sums(params, batch, mask):
      logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           batch["token_type_ids"], head_mask=mask)
      hit = (logits.argmax(-1) == batch["label"]).astype(jnp.float32) * batch["mask"]
      return {"correct": hit.sum(), "count": batch["mask"].sum()}
  return jax.jit(sums)


def evaluate(name, sums_fn, params, batches, mask) -> float:
  total = None
  for batch in batches:
    out = sums_fn(params, batch, mask)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  total = jax.device_get(total)
  if name == "gpt2":
    return lm.summarize(total)["perplexity"]
  return float(total["correct"]) / max(float(total["count"]), 1.0)


def curve(fam: plasticity.Family, params, method: str, *, score_batches, eval_fn,
          seed: int = 0) -> list:
  """The metric at each of LEVELS for one importance rule, with iterative re-scoring:
  from the previous level's mask, score the active heads at that mask and mask the
  lowest until the level's count of heads is masked."""
  n = fam.layout.n_layer * fam.layout.n_head
  mask = jnp.ones((fam.layout.n_layer, fam.layout.n_head), jnp.float32)
  values = []
  for i, level in enumerate(LEVELS):
    target = int(round(level * n))
    masked = n - int(mask.sum())
    if target > masked:
      key = jax.random.fold_in(jax.random.key(seed), i)
      if method == "random":  # The control needs no pass over the data.
        scores = heads_lib.random_scores(key, mask.shape)
      else:
        stats = heads_lib.head_statistics(fam.apply, params, score_batches(), head_mask=mask,
                                          causal=fam.causal, query_mask_fn=fam.mask_fn,
                                          key_mask_fn=fam.mask_fn)
        scores = heads_lib.scores(stats, method)
      mask = plasticity.prune_heads(scores, mask, count=target - masked).mask
    values.append(eval_fn(mask))
  return values


def beats_random(curves: dict, mode: str) -> dict:
  """Per importance rule, whether it is better than random at every GOAL_LEVELS level."""
  better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
  rand = dict(zip(LEVELS, curves["random"]))
  return {m: all(better(dict(zip(LEVELS, v))[lv], rand[lv]) for lv in GOAL_LEVELS)
          for m, v in curves.items() if m != "random"}


def plot(results: dict, path: str) -> None:
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
  for ax, (name, r) in zip(axes[0], results.items()):
    for method, values in r["curves"].items():
      ax.plot([100 * x for x in LEVELS[:len(values)]], values, marker="o", label=method,
              linestyle="--" if method == "random" else "-")
    ax.set(xlabel="heads masked (%)", ylabel=r["metric"], title=f"{name} ({r['budget']})")
    if r["metric"] == "perplexity":
      ax.set_yscale("log")
    ax.legend()
  plt.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(out: str, budget: str, models, *, sst2: str, wikitext: str) -> dict:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "curves.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  sizes = BUDGETS[budget]
  for name in models:
    cfg, (metric, mode, split) = model_config(name, budget, sst2=sst2, wikitext=wikitext)
    run_cfg, task, params = trained(cfg, os.path.join(out, "runs", name))
    fam = plasticity.family(run_cfg, int(plasticity.embedding(params).shape[0]))
    mesh = mesh_lib.make_mesh(**run_cfg.mesh)
    source = task.test_batches if split == "test" else task.eval_batches
    batches = list(_limited(source(), sizes["eval_examples"]))
    sums_fn = masked_evaluator(name, fam.model)
    eval_fn = lambda mask: evaluate(name, sums_fn, params, batches, mask)  # noqa: E731
    start = run_cfg.trainer.total_steps  # Scoring batches the model was not trained on.
    score_batches = lambda: (mesh_lib.shard_batch(task.train_batch(start + s), mesh)  # noqa: E731
                             for s in range(sizes["score_batches"]))
    entry = results.get(name, {})
    if entry.get("budget") != budget:
      entry = {"budget": budget, "metric": metric, "mode": mode, "curves": {}}
    for method in heads_lib.METHODS:
      if method in entry["curves"]:
        continue
      entry["curves"][method] = curve(fam, params, method, score_batches=score_batches,
                                      eval_fn=eval_fn)
      entry["baseline"] = entry["curves"][method][0]
      results[name] = entry
      with open(path, "w") as f:  # After every curve: a killed run resumes from here.
        json.dump(results, f, indent=2)
      print(f"{name} {method}: " + " ".join(f"{v:.4g}" for v in entry["curves"][method]))
    entry["beats_random_20_60"] = beats_random(entry["curves"], mode)
    entry["levels"] = list(LEVELS)
    results[name] = entry
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(out, "pruning_curves.png"))
  return results


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as a program (so
  tests can import it beside the other benchmarks)."""
  flags.DEFINE_string("out", None, "Output directory (runs, curves.json, PNG).")
  flags.DEFINE_enum("budget", "short", ["smoke", "short", "full"], "Run sizes.")
  flags.DEFINE_list("models", ["minilm", "gpt2"], "minilm and/or gpt2.")
  flags.DEFINE_string("sst2", "local:../shared/data/sst-2", "SST-2 source.")
  flags.DEFINE_string("wikitext", "local:../shared/data/wikitext-2-valsplit",
                                  "WikiText-2 source.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
  if not flags.FLAGS.out:
    raise errors.ConfigError("--out=DIR is required (trained runs and curves go there).")
  results = run(flags.FLAGS.out, flags.FLAGS.budget, flags.FLAGS.models, sst2=flags.FLAGS.sst2,
                wikitext=flags.FLAGS.wikitext)
  for name, r in results.items():
    print(f"{name}: beats random at 20-60%: {r['beats_random_20_60']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
