"""ASNN-Goose: an RWKV-4 student, dense or with ternary spikes at its matmul inputs,
distilled from a frozen GPT-2 teacher on WikiText-2 (train/goose.py).

  python -m train.main --config=configs/gpt2_lm.py:wikitext2 --workdir=runs/goose/teacher \
      --config.data.source=local:../shared/data/wikitext-2-valsplit
  python -m train.main --config=configs/goose.py:spiking_ctkd_fdd --workdir=runs/goose/fdd \
      --config.data.source=local:../shared/data/wikitext-2-valsplit \
      --config.distill.teacher_workdir=runs/goose/teacher
  python -m train.evaluate --workdir=runs/goose/fdd --spikes

Presets (the ablation of the issue): dense_ce (dense RWKV, labels only), spiking_ce
(spiking RWKV, labels only), spiking_kd (+ KD at a fixed T), spiking_ctkd (+ CTKD's
learnable temperature through the GRL), spiking_ctkd_fdd (+ CKA feature-dynamics
distillation after a warm-up, with its kill switch). Every preset stops early on
validation perplexity (policy "goose"). Arguments after the preset: `smoke` (3 steps of
a tiny student from a tiny random GPT-2 built in-process, on the packaged text),
`steps=N` (run length; 0 = the preset's), `spike=ternary|lif`, `ramp=cosine|late`.

The student matches the `gpt2_lm.py:wikitext2` teacher's shape (4 blocks of width 128,
GPT-2 BPE, 128-token windows, batch 16) and its optimizer recipe, so "how much does
spiking / distillation cost" compares like with like. RWKV's head is not tied to its
embedding, so the student has one more 50,257 x 128 matrix than the teacher.
"""

import ml_collections

from configs import common
from ponder import errors

PRESETS = {
    "dense_ce": dict(spike="none", mode="ce", fdd=0.0),
    "spiking_ce": dict(spike="ternary", mode="ce", fdd=0.0),
    "spiking_kd": dict(spike="ternary", mode="kd", fdd=0.0),
    "spiking_ctkd": dict(spike="ternary", mode="ctkd", fdd=0.0),
    "spiking_ctkd_fdd": dict(spike="ternary", mode="ctkd", fdd=0.1),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="spiking_ctkd_fdd", smoke=False, steps=0,
                         spike="", ramp="cosine")
  if arg.preset not in PRESETS:
    raise errors.unknown_key("goose preset", arg.preset, PRESETS)
  p = PRESETS[arg.preset]
  spike = arg.spike or p["spike"]
  c = ml_collections.ConfigDict()
  c.task = "lm_distillation"       # train/tasks.py entry (train/goose.py)
  c.seed = 0                       # PRNG seed: init and window order
  c.model = dict(
      name="rwkv",                 # models/rwkv.py
      preset="mini",               # rwkv.PRESETS entry the fields below override
      n_layer=4,                   # RWKV blocks
      n_embd=128,                  # width
      dim_att=0,                   # width of k, v, r and WKV; 0 = n_embd
      dim_ffn=0,                   # channel-mix hidden width; 0 = 4 * n_embd
      wkv="scan",                  # WKV sequence form: scan | chunked
      spike=spike,                 # none | ternary | lif
      spike_sites=["att_k", "att_v", "att_r", "ffn_k", "ffn_v"],  # spiked matmul inputs
      spike_matmul="dense",        # dense (training) | packed (ternary_matmul, inference)
      spike_alpha_init=1.0,        # ternary spike magnitude at init
      spike_theta_init=0.5,        # ternary threshold at init (inputs are LayerNormed)
      dtype=common.default_compute_dtype(),  # matmul operands: bf16 on GPU/TPU, else f32
  )
  c.data = common.lm_data(source="local:data/wikitext-2", tokenizer="gpt2_bpe",
                          seq_len=128, test_split="")
  c.distill = dict(
      mode=p["mode"],              # ce (labels only) | kd (fixed T) | ctkd (learned T)
      teacher_workdir="",          # train.main workdir of the GPT-2 teacher (kd, ctkd)
      random_teacher=dict(         # smoke runs: a random GPT-2 built in-process instead
          enabled=False,           # use it (ignores teacher_workdir)
          n_layer=1,               # its blocks
          n_embd=32,               # its width
          n_head=2),               # its heads
      kd_weight=1.0,               # weight of T^2 KL(teacher_T || student_T)
      ce_weight=1.0,               # weight of the hard-label cross-entropy
      temperature=2.0,             # kd: the temperature; ctkd: its initial value
      t_min=1.0,                   # ctkd: lowest temperature (the seed's tau_min)
      t_max=5.0,                   # ctkd: highest temperature (the seed's tau_max)
      lambda_ramp=arg.ramp,        # GRL strength schedule: cosine (CTKD) | late (seed)
      lambda_max=1.0,              # GRL strength after the ramp
      lambda_epochs=1.0,           # cosine: epochs to reach lambda_max
      lambda_warmup_ratio=0.25,    # late: fraction of training at lambda = 0 (v14.3)
      fdd_weight=p["fdd"],         # weight of mean (1 - CKA) of layer updates (FDD)
  )
  c.policy = dict(
      name="goose",                # train/goose.py:GoosePolicy
      fdd_warmup_steps=100,        # FDD switches on at the first evaluation from here
      fdd_kill_threshold=0.10,     # FDD off for good when val ppl > best * (1 + this)
      patience_steps=150,          # stop when val ppl has not improved for this long
      min_delta=0.0,               # an improvement must beat best * (1 - this)
  )
  c.trainer = common.trainer(total_steps=600, batch_size=16, log_every=10, eval_every=50,
                             ckpt_every=50)
  c.optim = common.optim(lr=2e-3, warmup_steps=50, weight_decay=0.1, b2=0.95)
  c.mesh = common.mesh()
  if arg.steps:
    c.trainer.total_steps = arg.steps
  if arg.smoke:
    c.model.update(n_layer=2, n_embd=32)
    c.data.update(source="builtin:smoke", tokenizer="char", seq_len=16)
    c.distill.random_teacher.enabled = True
    c.policy.update(fdd_warmup_steps=0, patience_steps=100)
    c.trainer.update(total_steps=3, batch_size=4, log_every=1, eval_every=3, ckpt_every=2)
    c.optim.update(warmup_steps=1)
  return c
