"""GPT-2 language modelling (Radford et al. 2019) on WikiText-2, Tiny Shakespeare or any text.

  python -m train.main --config=configs/gpt2_lm.py:wikitext2 --workdir=runs/gpt2_wt2 \
      --config.data.source=local:/path/to/wikitext-2
  python -m train.main --config=configs/gpt2_lm.py:smoke --workdir=/tmp/gpt2_smoke
Presets: wikitext2 (GPT-2 BPE; a directory with train.txt/valid.txt[/test.txt]),
shakespeare (characters; one text file, last 10% = valid). `smoke` trains 3 steps of a
tiny model on the text shipped in the package. Then:
  python -m train.evaluate --workdir=DIR --split=valid
  python -m train.generate --workdir=DIR --prompt=The --max_new_tokens=20 --seed=0
The wikitext2 preset is the small GPT-2 of WORKSPACE.md's results (the teacher and base
model of later experiments): 4 blocks of width 128 trained for 600 steps of 16 x 128
tokens, about 22 minutes on 2 CPU cores, where the 50,257-way output layer is most of
the cost.
"""

import ml_collections

from configs import common
from ponder import errors

PRESETS = {
    "wikitext2": dict(
        model=dict(preset="mini", n_layer=4, n_embd=128, n_head=4, n_positions=256),
        data=dict(source="local:data/wikitext-2", tokenizer="gpt2_bpe", seq_len=128),
        trainer=dict(total_steps=600, batch_size=16, log_every=10, eval_every=100,
                     ckpt_every=100),
        optim=dict(lr=2e-3, warmup_steps=50, weight_decay=0.1, b2=0.95)),
    "shakespeare": dict(
        model=dict(preset="mini", n_layer=4, n_embd=256, n_head=4, n_positions=256),
        data=dict(source="local:data/tinyshakespeare/input.txt", tokenizer="char", seq_len=256),
        trainer=dict(total_steps=3000, batch_size=32, eval_every=500, ckpt_every=500),
        optim=dict(lr=1e-3, warmup_steps=200, weight_decay=0.1, b2=0.99)),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="wikitext2", smoke=False)
  if arg.preset not in PRESETS:
    raise errors.unknown_key("gpt2_lm preset", arg.preset, PRESETS)
  p = PRESETS[arg.preset]
  c = ml_collections.ConfigDict()
  c.task = "language_model"        # train/tasks.py entry that builds the step functions
  c.seed = 0                       # PRNG seed: init, window order, dropout
  c.model = common.lm_model("gpt2", **p["model"])  # models/gpt2.py
  # Matmul operands: float32 | bfloat16 (f32 accumulation forward and backward, f32
  # params/LayerNorm/softmax/loss); the default is bf16 on GPU/TPU and float32 on CPU,
  # where bf16 ran ~0.5x float32 (AVX2 CPUs without AVX512_BF16).
  c.model.dtype = common.default_compute_dtype()
  c.data = common.lm_data(**p["data"])
  c.trainer = common.trainer(**p["trainer"])
  c.optim = common.optim(**p["optim"])
  c.mesh = common.mesh()
  if arg.smoke:
    c.model.update(n_layer=1, n_embd=32, n_head=2, n_positions=64)
    c.data.update(source="builtin:smoke", seq_len=32)
    c.trainer.update(total_steps=3, batch_size=4, log_every=1, eval_every=3, ckpt_every=2)
    c.optim.update(warmup_steps=1)
  return c
