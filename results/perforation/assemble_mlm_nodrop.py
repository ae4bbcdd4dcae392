"""How perforation_full.json was assembled on 2026-12-02, kept as run:
`python results/perforation/assemble_mlm_nodrop.py OLD NEW_SEED0 NEW_SEED1 OUT`.

The MLM budget gained `mlm_attention_dropout=0` (2ae7c90): every MLM run, dense or
masked, now trains without attention dropout. The masked runs of OLD already did (the
masked path did not apply it before 80164d7), so their records stand for the new budget;
the dense runs of OLD trained with 0.1 and are replaced by NEW_SEED0 / NEW_SEED1 (runs of
`benchmarks.perforation --only=mlm_dense,...` at the new budget). NEW_SEED0 also retrains
mlm_perforated_50 at seed 0 under the current code: its record replaces OLD's, and the
difference between the two is printed (the check that OLD's masked records are what the
current code gives). SST-2 records (their own configs, unchanged) are kept."""
import json
import sys

old_path, seed0_path, seed1_path, out_path = sys.argv[1:]
with open(old_path) as f:
  old = json.load(f)
new = []
for path in (seed0_path, seed1_path):
  with open(path) as f:
    later = json.load(f)
  new += [r for r in later["quality"] if "reused_from" not in r]
fresh = {(r["run"], r["seed"]) for r in new}
check = [(o, r) for o in old["quality"] for r in new
         if (o["run"], o["seed"]) == (r["run"], r["seed"]) and o["run"] != "mlm_dense"]
for o, r in check:
  print(f"{o['run']} seed {o['seed']}: OLD {o['mlm_loss']:.6f} (achieved "
        f"{o['achieved_sparsity']:.4f}), rerun {r['mlm_loss']:.6f} ({r['achieved_sparsity']:.4f})")
kept = [dict(r, reused_from=old_path) for r in old["quality"]
        if (r["run"], r["seed"]) not in fresh and r["run"] != "mlm_dense"]
with open(seed0_path) as f:
  result = json.load(f)
result["quality"] = new + kept
result.pop("goals", None)  # Recomputed from the assembled records by the next --reuse run.
with open(out_path, "w") as f:
  json.dump(result, f, indent=1)
print(f"wrote {out_path}: {len(new)} new records, {len(kept)} kept")
