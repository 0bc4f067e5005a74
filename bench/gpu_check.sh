#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton present, no network, maybe no diffusers):
#   1. the kernel and model-layout tests, compiled for the GPU (TRITON_INTERPRET=0), on CUDA;
#   2. every kernel case of the static cost report measured beside its static estimate
#      (bench/kernel_resources.py --measure): achieved GB/s against this card's copy bandwidth
#      measured in the same run, (row, code) pairs/s against the FP32 issue limit, and PyTorch's
#      own ops, torch.compile of them and diffusers' modules as baselines -> $OUT/kernels/;
#   3. `vqfast bench` on the GPU: the ops (codebook search, GroupNorm+SiLU, SpatialNorm), the
#      target case (Kandinsky 2.2 MoVQ decode, 512x512, batch 8, fp16) against diffusers eager,
#      torch.compile of diffusers and vqfast's eager path, then the model grid.
# Baselines: diffusers when it imports. The GPU machine has no network: put diffusers' wheels in
# bench/wheels/ (`pip download diffusers -d bench/wheels` on a connected machine with the GPU
# machine's Python version) and carry that folder; they are installed offline here. Without them the baseline is vqfast's own eager path, and the JSON
# says so (its versions list no diffusers).
# Everything goes under $OUT (default bench/results/gpu-DATE): logs, JSON, the card's name.
# Budget: under 10 minutes; each step has its own timeout so a hang cannot eat the rest.
# Run it once before changing a kernel and once after; commit both result folders.
# Dry run on a CPU machine (QUICK=1 shrinks the cases): the same steps, kernels interpreted.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"

if ls bench/wheels/*.whl >/dev/null 2>&1 && ! python -c "import diffusers" 2>/dev/null; then
  python -m pip install -q --no-index --find-links bench/wheels diffusers > "$OUT/wheels.log" 2>&1 \
    || echo "diffusers wheels did not install (see wheels.log): eager baseline only"
fi

# vqfast without pip (no network for build dependencies): the repository root on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=0
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
  DEVICE_ARGS=()
else
  export TRITON_INTERPRET=1
  echo "no GPU: dry run on CPU (kernels in the interpreter)" > "$OUT/gpu.csv"
  DEVICE_ARGS=(--device cpu)
fi
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt" 2>&1

status=0
step() {  # step NAME TIMEOUT COMMAND...: run, log to $OUT/NAME.log, show the tail
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || { status=1; echo "$name failed or timed out"; }
  tail -n 3 "$OUT/$name.log"
}

TESTS=(tests/ops/test_codebook.py tests/ops/test_norms.py tests/ops/test_kernel_norm_paths.py
       tests/ops/test_dispatch.py tests/models/test_layout.py)
[ -n "${QUICK:-}" ] && TESTS=(tests/ops/test_dispatch.py)
step kernel-tests 180 python -m pytest -q -p no:cacheprovider "${TESTS[@]}"

if [ -n "${QUICK:-}" ]; then
  step kernel-cases 60 python bench/kernel_resources.py --measure "$OUT/kernels" --quick
else
  step kernel-cases 120 python bench/kernel_resources.py --measure "$OUT/kernels"
fi

if [ -n "${QUICK:-}" ]; then  # a dry run: smallest cases, to prove the plumbing
  step bench-ops 120 python -m vqfast bench "${DEVICE_ARGS[@]}" --kinds group_norm --repeat 1 --out "$OUT/ops"
  step bench-target 240 python -m vqfast bench "${DEVICE_ARGS[@]}" --kinds decode --models ldm_f4 --batch 1 \
    --size 64 --dtype float32 --repeat 1 --out "$OUT/target"
else
  step bench-ops 60 python -m vqfast bench "${DEVICE_ARGS[@]}" --kinds quantize spatial_norm group_norm \
    --codebooks movq amused vqgan_f16 --batch 16 --size 512 --dtype float32 float16 --out "$OUT/ops"
  step bench-target 100 python -m vqfast bench "${DEVICE_ARGS[@]}" --kinds decode --models movq --batch 8 \
    --size 512 --dtype float16 --layout nchw channels_last --compile --out "$OUT/target"
  step bench-grid 100 python -m vqfast bench "${DEVICE_ARGS[@]}" --kinds decode encode --batch 1 8 \
    --size 256 512 --dtype float16 --repeat 5 --warmup 2 --out "$OUT/grid"
fi

rm -rf "$STAGE"
echo "results in $OUT (status $status)"
exit $status
