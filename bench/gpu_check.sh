#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton present, no network, maybe no diffusers):
#   bash bench/gpu_check.sh              # OUT defaults to bench/results/gpu-DATE
# It runs bench/gpu_check.py (its docstring lists the steps: kernel correctness on CUDA, the
# kernel cases beside their static estimates, the MoVQ decode target, the grid) under a budget of
# BUDGET seconds (default 420) that the steps share and stop themselves at, plus a hard stop at
# BUDGET + 60. Exactly two files come back, directly in $OUT: gpu-check.json (card, driver,
# versions, date and every measurement, rewritten as each arrives) and gpu-check.log.
# Baselines: diffusers when it imports. The GPU machine has no network: make its wheels on a
# connected machine with the GPU machine's Python (3.12) and carry the git-ignored folder:
#   pip download diffusers --no-deps --python-version 3.12 --only-binary=:all: -d bench/wheels
# Without them the baseline is vqfast's own eager path (the JSON's versions list no diffusers).
# Rehearsal on a CPU machine (CI runs it): QUICK=1 bash bench/gpu_check.sh -- the same steps,
# kernels in Triton's interpreter, tiny cases, a 240 s budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: > "$LOG"

if ls bench/wheels/*.whl >/dev/null 2>&1 && ! python -c "import diffusers" 2>/dev/null; then
  python -m pip install -q --no-index --find-links bench/wheels diffusers >> "$LOG" 2>&1 \
    || echo "diffusers wheels did not install (see the log): eager baseline only" | tee -a "$LOG"
fi

# vqfast without pip (no network for build dependencies): the repository root on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
QUICK_ARGS=()
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=0
  BUDGET=${BUDGET:-420}
  nvidia-smi >> "$LOG" 2>&1
else
  export TRITON_INTERPRET=1
  BUDGET=${BUDGET:-240}
  QUICK_ARGS=(--quick)
  echo "no GPU: the rehearsal (kernels in Triton's interpreter, tiny cases)" | tee -a "$LOG"
fi
[ -n "${QUICK:-}" ] && QUICK_ARGS=(--quick)

timeout $((BUDGET + 60)) python bench/gpu_check.py --out "$OUT" --budget "$BUDGET" "${QUICK_ARGS[@]}" >> "$LOG" 2>&1
status=$?
tail -n 3 "$LOG"
echo "results in $OUT/gpu-check.json and $OUT/gpu-check.log (status $status)"
exit $status
