"""A GPT-2-style LM with TTT layers (models/ttt_lm.py) and PonderTTT's adaptive inner steps.

  python -m train.main --config=configs/ttt_lm.py:synthetic,mode=adaptive --workdir=runs/ttt_syn
  python -m train.main --config=configs/ttt_lm.py:wikitext2,k=4 --workdir=runs/ttt_wt2_k4 \
      --config.data.source=local:../shared/data/wikitext-2-valsplit
  python -m train.main --config=configs/ttt_lm.py:shakespeare,smoke --workdir=/tmp/ttt_smoke
Presets: synthetic (ponder/data/synthetic.py, PonderTTT's Phase 1: spans of random,
copied and arithmetic tokens; the evaluation also reports nll_easy / nll_hard on the
predictable and unpredictable targets), wikitext2 (GPT-2 BPE, a WikiText-layout
directory), shakespeare (characters, one text file); long context with 32/64-token
sliding-window attention beside TTT: recall (synthetic associative recall at 256, the
answers 241+ tokens from their source; also recall_acc), shakespeare_long (characters
at 1024), wikitext2_long (BPE at 512).
Arguments: mode=fixed|skip|adaptive (k inner steps everywhere, k = 0, or PonderTTT's
entropy-based allocation among model.ponder_buckets), k=INT (the fixed k), smoke (a
seconds-long run on the packaged text or a small synthetic task).
benchmarks/ponder_pareto.py trains and compares every mode of a preset, and evaluates
PonderTTT's reconstruction-loss gate (model.ponder_gate="recon" with ponder_thresholds
from models.ttt_lm.calibrate_recon_gate), the oracle and a random allocation on the
trained Fixed-1 / Fixed-4 parameters.

Sized for the 2-core CPU. Seconds per training step measured there while another
training job shared the cores (1-minute load about 4; an idle machine is about twice as
fast), SKIP / Fixed-1 / Fixed-2 / Fixed-4 / adaptive:
  synthetic  0.24 / 0.28 / 0.48 / 0.83 / 0.81 (500 steps: 2-7 min a run)
  wikitext2  3.8 / 4.2 / 5.0 / 6.2 / 8.2 (100 steps: 6-14 min a run; GPT-2's output
             layer over 50,257 tokens is most of it)
  recall     0.24 / 0.26 / 0.51 / 0.99 / 0.93 (1,000 steps: 4-17 min a run; measured
             with two runs side by side on an otherwise quiet machine, 2026-12-04)
Adaptive costs as much as Fixed-4 to train: its gradient goes through a lax.switch per
mini-batch. WORKSPACE.md records both presets' Pareto runs (benchmarks/ponder_pareto.py).
"""

import ml_collections

from configs import common
from configs import gpt2_lm
from ponder import errors

PRESETS = {
    # Sized for 2 CPU cores (module docstring): one TTT layer in the second of 2 blocks.
    "synthetic": dict(
        model=dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, ttt_positions=(1,)),
        data=dict(source="synthetic:mixed", tokenizer="none", seq_len=128),
        trainer=dict(total_steps=500, batch_size=16, log_every=20, eval_every=100,
                     ckpt_every=100),
        optim=dict(lr=2e-3, warmup_steps=50, weight_decay=0.1, b2=0.99)),
    # configs/gpt2_lm.py:wikitext2's model, batch and optimizer, trained 100 steps.
    "wikitext2": common.derive(
        gpt2_lm.PRESETS["wikitext2"], model=dict(ttt_positions=(1, 3)),
        trainer=dict(total_steps=100, eval_every=50, ckpt_every=50),
        optim=dict(warmup_steps=10)),
    # Long context with TTT as the only long-range path: 32-token sliding-window
    # attention beside TTT, so what lies further back reaches a token through the fast
    # weights only. recall: ponder/data/synthetic.py's associative recall, its queries
    # 241+ tokens after the store (evaluation adds recall_acc). Trained and scored on
    # the answers only (loss_on="recall", as MQAR in Zoology), with the M backbone's
    # conv on Q/K so a value's key view can hold the key one token before it: with the
    # loss on every token, or 16 pairs, nothing learned the lookup (WORKSPACE.md). No
    # RoPE: rotating Q and K by position mod the mini-batch misaligns a query with its
    # store, and Fixed-1 learned recall 2-4x slower with it (0.09 against 0.41 at 1,000).
    "recall": dict(
        model=dict(n_layer=2, n_embd=64, n_head=2, n_positions=256, ttt_positions=(1,),
                   attn_window=32, ttt_backbone="M", ttt_rope=False),
        data=dict(source="synthetic:recall", tokenizer="none", seq_len=256,
                  loss_on="recall"),
        trainer=dict(total_steps=1000, batch_size=16, log_every=20, eval_every=250,
                     ckpt_every=250),
        optim=dict(lr=3e-3, warmup_steps=50, weight_decay=0.1, b2=0.99)),
    # Tiny Shakespeare characters at 1024, the same window.
    "shakespeare_long": dict(
        model=dict(n_layer=4, n_embd=128, n_head=4, n_positions=1024, ttt_positions=(1, 3),
                   attn_window=32),
        data=dict(source="local:data/tinyshakespeare/input.txt", tokenizer="char",
                  seq_len=1024),
        trainer=dict(total_steps=1000, batch_size=8, eval_every=250, ckpt_every=250),
        optim=dict(lr=1e-3, warmup_steps=100, weight_decay=0.1, b2=0.99)),
    # WikiText-2 GPT-2 BPE at 512 (the wikitext2 preset's model), a 64-token window.
    "wikitext2_long": common.derive(
        gpt2_lm.PRESETS["wikitext2"],
        model=dict(n_positions=512, ttt_positions=(1, 3), attn_window=64),
        data=dict(seq_len=512), trainer=dict(total_steps=100, batch_size=8, eval_every=50,
                                             ckpt_every=50),
        optim=dict(warmup_steps=10)),
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
  c.model = common.lm_model(
      "ttt_lm",                    # models/ttt_lm.py
      ttt_positions=(1, 3),        # block indices that carry a TTT layer
      ttt_mode="add",              # add: TTT branch beside attention; replace: instead of it
      ttt_kind="linear",           # inner model: linear (TTT-Linear) | mlp (TTT-MLP)
      ttt_form="dual",             # dual (TTT-Linear only, faster) | grad (jax.grad, any kind)
      ttt_mini_batch=16,           # tokens per inner mini-batch (seq_len a multiple is fastest)
      ttt_steps=arg.k,             # k, inner steps per mini-batch in mode "fixed"
      steps_mode=arg.mode,         # fixed (k) | skip (k = 0) | adaptive (PonderTTT)
      ttt_heads=0,                 # TTT heads; 0 = n_head
      ttt_base_lr=0.0,             # base inner learning rate eta_base (/ head_dim); 0 = code's: linear 1, mlp 0.1
      ttt_base_lr_init=-1.0,       # its warm-up start; < 0 = code's: mlp 0.01, linear none
      ttt_base_lr_warmup=0.1,      # warm-up length as a fraction of total_steps (code: 480 / 4800)
      ttt_token_idx="inverse",     # row scale of a token's prefix update: inverse (1/i, code) | none (sum, paper)
      ttt_learnable_token_idx=True,  # learned offset on that scale per position (code)
      ttt_loss_scale=0.5,          # inner loss c ||.||^2: 0.5 (code) | 1 (paper)
      ttt_rope=True,               # RoPE on TTT's Q/K views at positions mod mini-batch (code)
      ttt_backbone="T",            # TTT layer of the T (Transformer) | M (Mamba: conv Q/K, gate) backbone
      attn_window=0,               # sliding-window attention over the last N positions; 0 = full causal
      ttt_allowed_steps=(0, 1, 2, 4),  # k values a per-mini-batch steps array may hold
      ponder_buckets=(1, 2, 4),    # adaptive: k of each difficulty bucket (easy -> hard)
      ponder_target=(0.3, 0.4, 0.3),  # adaptive: fraction of mini-batches per bucket
      ponder_thresholds=(),        # adaptive: fixed entropy thresholds; () = per batch
      ponder_budget=0.0,           # adaptive: max mean k (thresholds scaled up); 0 = none
      ponder_granularity="batch",  # adaptive: batch (one k per mini-batch) | example
      ponder_causal=True,          # adaptive: difficulty from positions each token sees
      ponder_gate="entropy",       # adaptive signal: entropy (SKIP first pass) | recon (needs thresholds)
  )
  c.model.update(p["model"])
  c.data = common.lm_data(
      eval_batches=16,             # evaluation batches of a synthetic source
      **p["data"])
  c.trainer = common.trainer(**p["trainer"])
  c.optim = common.optim(**p["optim"])
  c.mesh = common.mesh()
  if arg.smoke:
    c.model.update(n_layer=2, n_embd=32, n_head=2, n_positions=64, ttt_positions=(1,),
                   ttt_mini_batch=8, attn_window=min(c.model.attn_window, 8))
    if not c.data.source.startswith("synthetic:"):
      c.data.source = "builtin:smoke"
    c.data.update(seq_len=32, eval_batches=1)  # recall: 4 x 4 of store and queries.
    c.trainer.update(total_steps=3, batch_size=4, log_every=1, eval_every=3, ckpt_every=2)
    c.optim.update(warmup_steps=1)
  return c
