#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton present, no network, maybe no diffusers):
#   1. the kernel tests, compiled for the GPU (TRITON_INTERPRET=0), on CUDA tensors;
#   2. the GPU benchmarks: the codebook kernel against vqfast's eager path, argmin(cdist) and,
#      when installed, diffusers, with peak memory; the norm kernels against eager PyTorch and
#      torch.compile of it, with GB/s.
# Everything goes under $OUT (default bench/results/gpu-DATE): logs, pytest-benchmark JSON, the
# card's name. Budget: under 8 minutes; each step has its own timeout so a hang cannot eat the rest.
# Dry run on a CPU machine: the same steps run on CPU (the kernel tests in the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"

# vqfast without pip (no network for build dependencies): vqfast/ plus kernels/ as vqfast.kernels.
STAGE=$(mktemp -d)
cp -r vqfast "$STAGE/vqfast"
cp -r kernels "$STAGE/vqfast/kernels"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=0
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
else
  export TRITON_INTERPRET=1
  echo "no GPU: dry run on CPU (kernels in the interpreter)" > "$OUT/gpu.csv"
fi
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt" 2>&1

status=0
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_codebook.py tests/test_norms.py tests/test_dispatch.py \
  > "$OUT/kernel-tests.log" 2>&1 || status=1
tail -n 3 "$OUT/kernel-tests.log"

BENCH_FILTER=${BENCH_FILTER:-}  # e.g. "movq" for a shorter dry run
timeout 300 python -m pytest -q -p no:cacheprovider bench/test_bench_codebook.py --benchmark-only \
  ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-columns=mean,min,max,rounds \
  --benchmark-json="$OUT/bench-codebook.json" > "$OUT/bench-codebook.log" 2>&1 || status=1
tail -n 3 "$OUT/bench-codebook.log"

timeout 180 python -m pytest -q -p no:cacheprovider bench/test_bench_norms.py --benchmark-only \
  ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-columns=mean,min,max,rounds \
  --benchmark-json="$OUT/bench-norms.json" > "$OUT/bench-norms.log" 2>&1 || status=1
tail -n 3 "$OUT/bench-norms.log"

rm -rf "$STAGE"
echo "results in $OUT (status $status)"
exit $status
