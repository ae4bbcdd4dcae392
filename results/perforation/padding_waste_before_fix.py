"""The diagnostic behind padding_waste in sst2_perforated_seed1_before_fixes.json, kept as run:
`git worktree add ../before 46e2eaa && cd ../before && PYTHONPATH=. python
<this checkout>/results/perforation/padding_waste_before_fix.py WORKDIR` (after the fix it is 0 by construction).
Before the padding fix: how often a real query row of the perforated SST-2 model keeps a
padding key tile while dropping a real one (dev, selected parameters)."""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from train import trainer
from ponder.nn import perforation as P
workdir = sys.argv[1]
cfg, task, params, step, _ = trainer.restore_run(workdir, selected=True)
block = cfg.perforation.block
apply = jax.jit(lambda p, b: task.model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                b["token_type_ids"], train=False, mutable=["intermediates"])[1])
rows = cls_rows = wasted_rows = wasted_cls = 0
for b in task.test_batches():
  sown = apply(params, {k: jnp.asarray(v) for k, v in b.items()})
  hard = np.asarray(P.collect(sown["intermediates"], "perforation_hard"))  # [L, b, h, nq, nk]
  nb = hard.shape[-1]
  forced = P.forced_tiles(nb, cls_column=cfg.perforation.keep_cls_column, cls_row=False)
  for e in np.flatnonzero(b["mask"] > 0):
    real = -(-int(b["attention_mask"][e].sum()) // block)
    for i in range(real):
      h = hard[:, e, :, i, :]  # [L, heads, nk]
      waste = h[..., real:].any(-1) & ~h[..., :real].all(-1)
      rows += waste.size; wasted_rows += int(waste.sum())
      if i == 0:
        cls_rows += waste.size; wasted_cls += int(waste.sum())
print(json.dumps(dict(workdir=workdir, step=int(step), real_query_rows=rows,
                      rows_dropping_real_for_padding=wasted_rows / rows,
                      cls_rows=cls_rows, cls_rows_dropping_real_for_padding=wasted_cls / cls_rows)))
