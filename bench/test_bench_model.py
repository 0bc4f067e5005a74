"""Whole-model encode and decode at the real checkpoints' configs (Kandinsky 2.2 MoVQ, aMUSEd,
LDM-f4): vqfast and torch.compile of vqfast against diffusers eager, torch.compile of diffusers
and, on GPU, vqfast's eager path, with peak memory.

The grid is batch {1, 8} x resolution {256, 512} x dtype {fp32, fp16, bf16}. On CPU only the
batch-1, 256x256, fp32 cases run (a 512x512 batch-8 MoVQ decode takes minutes here); the rest
are skipped with that reason.
"""

import pytest
import torch
from cases import DEV, MODELS, Case, baselines, run_case

GRID = [(b, s, dt) for b in (1, 8) for s in (256, 512) for dt in ("float32", "float16", "bfloat16")]


def _skip_reason(batch, size, dtype):
    if DEV == "cpu" and (batch, size, dtype) != (1, 256, "float32"):
        return "CPU runs the batch-1 256x256 fp32 subset; the full grid is a GPU case"
    if dtype == "bfloat16" and DEV == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    return None


@pytest.mark.parametrize("impl", ["vqfast", "vqfast-compile", *baselines(DEV, compile_baseline=True)])
@pytest.mark.parametrize("batch, size, dtype", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["decode", "encode"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_model(benchmark, model, kind, batch, size, dtype, impl):
    reason = _skip_reason(batch, size, dtype)
    if reason:
        pytest.skip(reason)
    run_case(benchmark, Case(kind, model, batch, size, dtype, impl, DEV), rounds=3 if DEV == "cpu" else 10)
