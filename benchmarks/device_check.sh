#!/usr/bin/env bash
# The kernels on a real accelerator, in one run of under 8 minutes:
#
#   benchmarks/device_check.sh OUT_DIR            # on a GPU (or TPU) machine
#   benchmarks/device_check.sh OUT_DIR --dry-run  # anywhere: the same steps, tiny, on CPU
#
# Steps, each under its own time limit (the sum, 460 s, stays under 8 min):
#   1. device.json: the date, nvidia-smi's GPUs and jax's devices and versions.
#   2. pytest tests/kernels/test_on_device.py tests/kernels/test_lowering.py (100 s):
#      the compiled kernels against their references (Triton's / Mosaic's compilers
#      see them here), and the cross-platform lowering checks.
#   3. python -m benchmarks.kernels --impl=pallas (240 s): compiled kernel against
#      dense attention (cuDNN where it takes the dtype, else XLA), sequences 1024-8192,
#      densities 1 / 0.5 / 0.25 / 0.1, float32 and bfloat16, forward and
#      forward+backward, and the goal computed from the figures -> kernels.json
#      (saved after each sequence, so a time limit keeps what was measured).
#   4. pytest on the rest of tests/kernels (100 s): the interpret-mode parity tests,
#      on the host CPU (JAX_PLATFORMS=cpu) as in CI.
# Everything lands in OUT_DIR: device.json, pytest_*.xml / .log, kernels.json,
# benchmark.log and summary.json (each step's exit code and seconds).
#
# LIMIT_SCALE multiplies every limit (default 1; 5 for --dry-run).
# Python: $PYTHON if set, else .venv/bin/python if present, else python. On a GPU it
# must be a jax with CUDA (jax[cuda12]); the script stops if jax sees no accelerator
# (outside --dry-run), since step 3 would then interpret the kernels for hours.
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
DRY_RUN=0
if [[ $# -eq 2 ]]; then
  [[ $2 == --dry-run ]] || usage
  DRY_RUN=1
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/kernels.json" "$OUT/summary.json"  # Never report a previous run's figures.
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python
fi
if (( DRY_RUN )); then
  export JAX_PLATFORMS=cpu
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The limits are for an idle accelerator machine; a dry run on a busy CPU scales them.
LIMIT_SCALE=${LIMIT_SCALE:-$(( DRY_RUN ? 5 : 1 ))}

STEPS=()
# run NAME LIMIT_S CMD...: runs CMD under a time limit, logs to OUT/NAME.log, records
# the exit code and seconds for summary.json.
run() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) start rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  STEPS+=("$name $rc $(( $(date +%s) - start ))")
  echo "== $name: exit $rc"
}

# 1. The device.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  > "$OUT/nvidia_smi.txt" 2>/dev/null || echo "not available" > "$OUT/nvidia_smi.txt"
run device 20 "$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
import jax
out = pathlib.Path(sys.argv[1])
import datetime
info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            jax_version=jax.__version__, backend=jax.default_backend(),
            devices=[str(d) for d in jax.devices()],
            device_kinds=sorted({d.device_kind for d in jax.devices()}),
            nvidia_smi=(out / "nvidia_smi.txt").read_text().splitlines())
(out / "device.json").write_text(json.dumps(info, indent=2))
print(json.dumps(info, indent=2))
EOF
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
if (( ! DRY_RUN )) && [[ $BACKEND != gpu && $BACKEND != tpu ]]; then
  echo "jax sees no GPU or TPU (backend: $BACKEND); install a CUDA jax" \
       "(pip install 'jax[cuda12]') or set PYTHON, or use --dry-run." >&2
  exit 3
fi

# 2. Compiled kernels and lowering.
run pytest_device 100 "$PY" -m pytest -q -p no:cacheprovider \
  tests/kernels/test_on_device.py tests/kernels/test_lowering.py \
  --junitxml="$OUT/pytest_device.xml"

# 3. The benchmark.
if (( DRY_RUN )); then
  BENCH_ARGS=(--quick --seqs=256 --dtypes=float32 --warmup=0)
else
  BENCH_ARGS=()
fi
run benchmark 240 "$PY" -m benchmarks.kernels --impl=pallas --out="$OUT/kernels.json" \
  "${BENCH_ARGS[@]}"

# 4. The interpret-mode tests, on the host CPU.
if (( DRY_RUN )); then
  STEPS+=("pytest_interpret skipped 0")
else
  run pytest_interpret 100 env JAX_PLATFORMS=cpu "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels --ignore=tests/kernels/test_on_device.py \
    --ignore=tests/kernels/test_lowering.py --junitxml="$OUT/pytest_interpret.xml"
fi

# Summary: each step's exit code and seconds; the benchmark's goal if it got there.
"$PY" - "$OUT" "$DRY_RUN" "${STEPS[@]}" <<'EOF'
import json, pathlib, sys
out, dry_run, steps = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
summary = dict(dry_run=dry_run, steps={})
for step in steps:
  name, rc, seconds = step.split()
  summary["steps"][name] = dict(exit=None if rc == "skipped" else int(rc),
                                seconds=int(seconds))
bench = out / "kernels.json"
if bench.exists():
  result = json.loads(bench.read_text())
  goal = result.get("attention_goal", {})
  summary["benchmark"] = dict(partial=result.get("partial", True),
                              goal_evaluated=goal.get("evaluated"),
                              goal_met=goal.get("met"),
                              goal_failed=goal.get("failed") if goal.get("evaluated")
                              else None)
summary["ok"] = all(s["exit"] in (0, None) for s in summary["steps"].values())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["ok"] else 1)
EOF
