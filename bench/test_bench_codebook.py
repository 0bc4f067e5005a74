"""Codebook search at the real codebooks' shapes: vqfast against diffusers' VectorQuantizer (and,
on GPU, vqfast's eager path), FAISS's exact flat index when installed and torch.cdist + argmin
(the search alone, on rows made ready), with peak memory. On CPU vqfast runs its eager path; on a GPU, the
Triton kernel. 16 images of latents: N = 16 * (side / 8)^2 vectors."""

import pytest
from cases import CODEBOOKS, DEV, Case, baselines, run_case

import vqfast


@pytest.mark.parametrize("impl", ["vqfast", *baselines(DEV, compile_baseline=False, kind="quantize")])
@pytest.mark.parametrize("side", [128, 512])
@pytest.mark.parametrize("codebook", sorted(CODEBOOKS))
def test_quantize(benchmark, codebook, side, impl):
    run_case(benchmark, Case("quantize", codebook, 16, side, "float32", impl, DEV), rounds=3)
    vqfast.set_backend(None)
