"""Learned attention perforation on MiniLM (issue 20, DendriticBERT part 2), in the seed's
three phases: masked LM dense (the reference), sparsity-aware masked LM, SST-2.

  python -m train.main --config=configs/perforation.py:mlm_perforated,sparsity=0.5 \
      --workdir=runs/perf_mlm_50 --config.data.source=local:../shared/data/wikitext-2-valsplit
Presets:
  mlm_dense        MiniLM + a new MLM head (tied to the word table), dense attention
  mlm_perforated   the same with the learned, input-dependent block mask (Eq. 1 of
                   ponder/nn/perforation.py) and the seed's sparsity regulariser
  mlm_static       "no importance scoring": a learned per-head static block mask
  mlm_random       fixed random block masks at the same density
  mlm_band_global  fixed local band + global first block
  mlm_bigbird      fixed BigBird-like band + global + random
  sst2_perforated  SST-2 fine-tuning with the learned mask (sentences are ~a dozen
                   tokens: at block 64 the mask has one tile, so this checks the wiring
                   and the whole-model cost, not attention savings)
Arguments: `sparsity=S` (target block sparsity, default 0.5), `block=B` (tile side;
default 64 at seq 512, as the issue's 8 x 8 mask), `seq=N` (MLM window; 512),
`freeze` (train only the scorers and the MLM head, as the seed's phase 2 freezes the
base), `steps=N`, and `smoke` (seconds-long offline run: random tiny BERT, the text
shipped in the package, seq 32, block 8).

Data: `data.source` local:DIR with WikiText's train.txt / valid.txt (the workspace's
../shared/data/wikitext-2-valsplit) for the MLM presets; SST-2 as configs/dendritic_bert.py.
"""

import ml_collections

from configs import common
from configs import dendritic_bert
from ponder import errors

# Steps of the MLM budget at batch 8 x 512 tokens: one train step of MiniLM there is
# ~0.3 TFLOP, several seconds on 2 loaded cores, so the sweep's 10 runs fit ~4 hours.
_MLM_BUDGET = dict(total_steps=150, batch_size=8, log_every=10, eval_every=75,
                   ckpt_every=25)
# Fine-tuning MiniLM (Devlin et al. Sec. A.3 range); the scorer's few parameters
# (per-head bias and temperature, or the static tables) take a 1000x learning rate, so
# the mask can move from near dense to the target within the short budget.
_OPTIM = dict(lr=5e-5, warmup_steps=15, weight_decay=0.01)
_SCORER_LR_SCALE = 1000.0
# models/bert.py module names that hold the encoder's weights (not the scorers').
_ENCODER_MODULES = ("embeddings", "query", "key", "value", "output", "intermediate",
                    "pooler")

_MLM_MODES = {"mlm_dense": "none", "mlm_perforated": "learned", "mlm_static": "static",
              "mlm_random": "random", "mlm_band_global": "band_global",
              "mlm_bigbird": "bigbird"}
PRESETS = (*_MLM_MODES, "sst2_perforated")


def perforation_block(mode: str, *, sparsity: float, block: int, steps: int) -> dict:
  """The perforation block: ponder.nn.perforation.PerforationSpec's fields, schedules
  scaled to the run (target ramp over half of it, hard mask from two thirds)."""
  return dict(
      mode=mode,                        # none (dense) | learned | static | random | band_global | bigbird
      block=block,                      # tile side (query and key)
      target_sparsity=sparsity,         # final share of tiles skipped
      initial_sparsity=0.0,             # start of the linear target ramp
      sparsity_warmup_steps=max(steps // 2, 1),  # steps of the target ramp
      temperature_init=1.0,             # relaxation temperature at step 0
      temperature_floor=0.2,            # ... annealed geometrically to this floor
      anneal_steps=max(2 * steps // 3, 1),  # steps of the temperature annealing
      hard_after=max(2 * steps // 3, 1),    # straight-through hard mask from this step on
      keep_cls_column=True,             # every query block keeps key block 0 ([CLS])
      keep_cls_row=False,               # query block 0 keeps all (makes the CPU path dense)
      bias_init=2.0,                    # per-head score bias at init (sigmoid(2) = 0.88 kept)
      lambda_sparse=1.0,                # weight of (achieved - target sparsity)^2
      lambda_l1=0.0,                    # weight of mean |m| (seed: 0.001)
      lambda_entropy=0.0,               # weight of -row entropy (seed: 0.0001)
      lambda_consistency=0.001,         # weight of the std of per-layer sparsity (seed's)
      seed=0,                           # draws of the fixed random / BigBird patterns
  )


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="mlm_perforated", smoke=False, steps=0, sparsity=0.5,
                         block=0, seq=512, freeze=False)
  if arg.preset not in PRESETS:
    raise errors.unknown_key("perforation preset", arg.preset, PRESETS)
  sst2 = arg.preset == "sst2_perforated"
  if sst2:
    c = dendritic_bert.get_config("minilm" + (",smoke" if arg.smoke else "")
                                  + (f",steps={arg.steps}" if arg.steps else ""))
    c.task = "perforated_text_classification"  # train/tasks.py entry
    mode = "learned"
  else:
    c = ml_collections.ConfigDict()
    c.task = "masked_lm"             # train/tasks.py entry that builds the step functions
    c.seed = 0                       # PRNG seed: head/scorer init, windows, masking, noise
    c.model = dict(
        name="bert_mlm",             # models/bert.py BertForMaskedLM (recorded, not dispatched)
        init_from="minilm",          # minilm (the installed package) | DIR | hub id | "" = random
        preset="",                   # bert.PRESETS sizes for random init ("" with init_from)
        hidden_dropout=0.1,          # dropout on embeddings and residual branches
        attention_dropout=0.1,       # dropout on attention probabilities (masked path too)
        dtype=common.default_compute_dtype(),  # matmul operands: bf16 on GPU/TPU, else f32
    )
    c.data = dict(
        source="local:data/wikitext-2",  # local:DIR (train.txt, valid.txt) | builtin:smoke
        tokenizer="checkpoint",      # checkpoint (init_from's vocab.txt) | corpus:N | path
        cache_dir="",                # encoded corpora ("" = ~/.cache/ponder/tokens)
        seq_len=arg.seq,             # window: [CLS] + seq_len - 2 word pieces + [SEP]
        mask_rate=0.15,              # share of inner tokens masked (80/10/10)
        eval_batch_size=8,           # windows per evaluation batch
        eval_windows=48,             # validation windows scored (0 = the whole split)
    )
    c.reference = ""                 # the result to expect (WORKSPACE.md), printed at the end
    c.trainer = common.trainer(**common.with_steps(_MLM_BUDGET, arg.steps))
    c.optim = common.optim(**_OPTIM)
    c.mesh = common.mesh()
    mode = _MLM_MODES[arg.preset]
  if arg.smoke:
    c.model.update(init_from="", preset="tiny")
    if not sst2:
      c.data.update(source="builtin:smoke", tokenizer="corpus:200", seq_len=32,
                    eval_batch_size=2, eval_windows=1)
      c.trainer.update(total_steps=3, batch_size=2, log_every=1, eval_every=3, ckpt_every=2)
      c.optim.update(warmup_steps=1)
  block = arg.block or (8 if arg.smoke else 64)
  c.perforation = perforation_block(mode, sparsity=arg.sparsity, block=block,
                                    steps=c.trainer.total_steps)
  # train/trainer.py scale_by_module matches module-name prefixes: the scorers' fast lr;
  # with `freeze`, every encoder module but the scorers (ConfigDict sorts its keys, so
  # no prefix may match a scorer's path); the MLM head's transform and bias still train.
  c.optim.lr_scales = dict(perforation=_SCORER_LR_SCALE)
  if arg.freeze:
    c.optim.lr_scales.update({name: 0.0 for name in _ENCODER_MODULES})
  return c
