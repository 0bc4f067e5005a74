"""Codebook search at the real codebooks' shapes: vqfast against diffusers' VectorQuantizer and
against argmin(cdist), on this machine's device, with peak memory (``extra_info.peak_mib``).

On CPU vqfast runs its eager path; on a GPU, the Triton kernel.
"""

import pytest
import torch

import vqfast
from cases import CODEBOOKS, baselines, device, peak_mib, quantize_case

DEV = device()
NS = [4096, 65536]


@pytest.mark.parametrize("impl", ["vqfast", *baselines(), "cdist"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("codebook", sorted(CODEBOOKS))
def test_quantize(benchmark, codebook, n, impl):
    run = quantize_case(codebook, n, impl, DEV)
    K, D = CODEBOOKS[codebook]
    benchmark.group = f"quantize {codebook} K={K} D={D} N={n} {DEV}"
    benchmark.extra_info.update(device=DEV, peak_mib=peak_mib(run, "quantize_case", codebook, n, impl, DEV))
    if DEV == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()

    def timed():
        with torch.no_grad():
            run()
        if DEV == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=3 if n > 4096 else 5, iterations=1, warmup_rounds=1)
    vqfast.set_backend(None)
