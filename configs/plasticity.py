"""Neural plasticity (issue 18): plateau-detected warm-up, then cycles of head scoring,
pruning, fine-tuning of the structurally pruned model and regrowth
(`ponder.plasticity.PlasticityPolicy`, a train.main phase policy), with a dashboard.

  python -m train.main --config=configs/plasticity.py:minilm_sst2 --workdir=runs/plast_minilm \
      --config.data.source=local:../shared/data/sst-2
  python -m train.main --config=configs/plasticity.py:gpt2_wt2 --workdir=runs/plast_gpt2 \
      --config.data.source=local:../shared/data/wikitext-2-valsplit
Presets:
  minilm_sst2  all-MiniLM-L6-v2 (6 x 12 = 72 heads) fine-tuned on SST-2
               (configs/dendritic_bert.py's minilm setup), pruned 15% of the heads per
               cycle for 3 cycles (Michel et al. prune ~40% of BERT's heads on MNLI)
  gpt2_wt2     a ponder GPT-2 with 6 layers x 12 heads (width 192, head_dim 16) trained
               from scratch on WikiText-2, pruned 10% per cycle (Michel's iterative step)
`smoke` turns either into a seconds-long offline run of every phase (tiny model, a
plateau window of 3 logs, 2-step fine-tunes). `score=gradient|entropy|combined|random`
picks the importance; `cycles=N` the number of cycles.
Outputs beside the trainer's: <workdir>/dashboard.html (rewritten at every evaluation),
<workdir>/plasticity/{baseline,full}/ (the baseline's and every head's parameters) and
the policy state per checkpoint in <workdir>/phases/.
"""

from configs import common
from configs import dendritic_bert
from configs import gpt2_lm
from ponder import errors

PROMPTS = ["The history of the", "In 1998 , the band", "He was born in"]


def policy(**overrides) -> dict:
  """The policy block (ponder/plasticity.py PlasticityPolicy)."""
  block = dict(
      name="plasticity",        # train/phases.py POLICIES entry
      metric="accuracy",        # validation metric compared with the baseline
      mode="max",               # max | min: which way the metric is better
      score="gradient",         # gradient | entropy | combined | random (the control)
      cycles=3,                 # prune -> fine-tune -> regrow -> evaluate cycles
      prune_fraction=0.1,       # heads pruned per cycle, fraction of all (Michel: 10%)
      min_heads_per_layer=0,    # a layer keeps at least this many (Michel allow 0)
      finetune_steps=100,       # steps of each cycle's fine-tune (rounded up to an eval)
      score_batches=8,          # training batches per scoring pass (entropy, gradients)
      regrow=True,              # revive masked heads by their gradient at xi = 0
      regrow_max=0,             # at most this many per cycle; 0 = all that pass
      regrow_quantile=0.5,      # revive above this quantile of the active heads' importance
      regrow_init="restore",    # restore (weights at pruning) | reinit (fresh init)
      plateau_window=20,        # training-loss logs in the plateau test's slope fit
      plateau_z=2.0,            # one-sided confidence multiplier of the slope
      plateau_rel_tol=0.01,     # decrease per window (relative) that still counts
      warmup_max_steps=1000,    # hard cap of the warm-up, in steps
      time_batch=32,            # batch of the side-by-side CPU timing
      time_seq=64,              # sequence length of the timing
      prompts=[],               # language models: prompts generated from per cycle
      generate_tokens=20,       # new tokens per generation
      temperature=1.0,          # sampling temperature of the generations
      top_k=40,                 # top-k of the generations (0 = all)
  )
  block.update(overrides)
  return block


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="minilm_sst2", smoke=False, score="gradient", cycles=3)
  if arg.preset == "minilm_sst2":
    c = dendritic_bert.get_config("minilm,smoke" if arg.smoke else "minilm")
    c.trainer.update(total_steps=2000, log_every=10, eval_every=50, ckpt_every=50)
    c.policy = policy(prune_fraction=0.15, finetune_steps=150, warmup_max_steps=600)
  elif arg.preset == "gpt2_wt2":
    c = gpt2_lm.get_config("wikitext2,smoke" if arg.smoke else "wikitext2")
    c.model.update(n_layer=6, n_embd=192, n_head=12, n_positions=128)
    c.trainer.update(total_steps=1500, batch_size=16, log_every=10, eval_every=50,
                     ckpt_every=50)
    c.policy = policy(metric="perplexity", mode="min", finetune_steps=100,
                      warmup_max_steps=600, time_batch=16, time_seq=128,
                      prompts=list(PROMPTS))
  else:
    raise errors.unknown_key("plasticity preset", arg.preset, ("minilm_sst2", "gpt2_wt2"))
  c.model.heads_per_layer = None   # set by the policy: heads kept per layer (None = all)
  c.policy.update(score=arg.score, cycles=arg.cycles)
  if arg.smoke:
    if arg.preset == "gpt2_wt2":  # Characters: a 50,257-way output would dominate.
      c.model.update(n_layer=2, n_embd=32, n_head=4, n_positions=64)
      c.data.update(tokenizer="char")
      c.policy.update(prompts=["The "])
    c.trainer.update(total_steps=40, log_every=1, eval_every=2, ckpt_every=2)
    c.policy.update(plateau_window=3, warmup_max_steps=4, finetune_steps=2,
                    score_batches=1, time_batch=2, time_seq=16, generate_tokens=4,
                    prune_fraction=0.25)
  return c
