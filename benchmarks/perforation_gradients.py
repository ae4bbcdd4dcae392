"""Gradient norms of the perforated MiniLM MLM loss around the switch to the hard mask.

  python -m benchmarks.perforation_gradients --out=DIR/gradients.json \
      [--wikitext=../shared/data/wikitext-2-valsplit] [--sparsity=0.5] [--batch=2]

The full-budget MLM run (configs/perforation.py:mlm_perforated) switches to the
straight-through hard mask at `perforation.hard_after`. This computes the loss gradient
on the real training batches of the last soft step and the first two hard steps and
writes its l2 norm in three groups: the block scorers (`perforation*` modules), the
attention query/key projections (what the scorer's gradient reaches first) and the rest
of the model. A gradient that jumps by orders of magnitude at the hard step makes the
global-norm clip scale every update to about zero (`masked_attention`'s docstring).
No training: the MiniLM weights with a fresh MLM head and scorers, as a run starts.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from benchmarks import perforation
from train import tasks

FLAGS = flags.FLAGS


def group(path) -> str:
  names = [str(getattr(k, "key", k)) for k in path]
  if any(n.startswith("perforation") for n in names):
    return "scorer"
  return "query_key" if any(n in ("query", "key") for n in names) else "rest"


def group_norms(grads) -> dict:
  squares = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    squares[group(path)] = squares.get(group(path), 0.0) + float(
        jnp.sum(jnp.square(g.astype(jnp.float32))))
  return {name: s ** 0.5 for name, s in sorted(squares.items())}


def main(argv):
  del argv
  cfg = perforation.mlm_config("mlm_perforated", FLAGS.sparsity, perforation.BUDGETS["full"],
                               FLAGS.wikitext)
  cfg.trainer.batch_size = FLAGS.batch
  task = tasks.build(cfg, None)
  params = jax.jit(task.init)(jax.random.key(cfg.seed))
  hard = cfg.perforation.hard_after

  @jax.jit
  def grad(params, batch, step):
    return jax.grad(lambda p: task.loss_fn(p, batch, jax.random.key(step), step=step,
                                           train=True)[0])(params)

  steps = {}
  for step in (hard - 1, hard, hard + 1):
    steps[str(step)] = group_norms(grad(params, task.train_batch(step), jnp.int32(step)))
    print(step, "hard" if step >= hard else "soft", steps[str(step)], flush=True)
  common.write_json(FLAGS.out, dict(
      machine=common.machine(), sparsity=FLAGS.sparsity, batch=FLAGS.batch,
      seq=cfg.data.seq_len, hard_after=hard, grad_norms=steps))


if __name__ == "__main__":
  flags.DEFINE_string("out", "results/perforation/gradients.json", "output JSON")
  flags.DEFINE_float("sparsity", 0.5, "target block sparsity")
  flags.DEFINE_integer("batch", 2, "windows per batch")
  flags.DEFINE_string("wikitext", "../shared/data/wikitext-2-valsplit",
                      "WikiText directory (train.txt, valid.txt)")
  app.run(main)
