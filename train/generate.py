"""Samples text from the newest checkpoint of a language-model run.

  python -m train.generate --workdir=runs/gpt2_wt2 --prompt="The" --max_new_tokens=50 \
      --seed=0 [--temperature=0.8 --top_k=40 --top_p=0.95]

--temperature=0 decodes greedily. The same seed gives the same text (the sampling key
of step i is fold_in(key(seed), i)). Decoding uses the key/value cache; for TTT LMs
(configs/ttt_lm.py runs) also each TTT layer's recurrent state (`ttt_lm.generate`), with
the run's k inner steps or --ttt_steps=K (needed for runs trained with mode=adaptive).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from ponder import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.main --workdir of a language model.")
_PROMPT = flags.DEFINE_string("prompt", "The", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set with this probability mass.")
_TTT_STEPS = flags.DEFINE_integer("ttt_steps", -1, "TTT LMs: inner steps k; -1 = the run's.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp
  from models import gpt2
  from models import ttt_lm
  from train import tasks
  from train import trainer
  try:
    cfg = trainer.load_config(_WORKDIR.value)
    if cfg.task != "language_model":
      raise errors.ConfigError(f"{_WORKDIR.value} is a {cfg.task!r} run, not a language model.")
    cfg, task, params, _, _ = trainer.restore_run(_WORKDIR.value)
    tok = tasks.build_tokenizer(cfg.data)
    prompt = tok.encode(_PROMPT.value)
    if not prompt:
      raise errors.ConfigError("the prompt encodes to no tokens; give a non-empty --prompt.")
    kw = dict(key=jax.random.key(_SEED.value), max_new_tokens=_MAX_NEW.value,
              temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    ids = jnp.asarray([prompt], jnp.int32)
    if isinstance(task.model, ttt_lm.TTTLM):
      steps = None if _TTT_STEPS.value < 0 else _TTT_STEPS.value
      out = ttt_lm.generate(task.model, params, ids, steps=steps, **kw)
    else:
      out = gpt2.generate(task.model, params, ids, **kw)
  except errors.PonderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(tok.decode([int(t) for t in out[0]]))


if __name__ == "__main__":
  app.run(main)
