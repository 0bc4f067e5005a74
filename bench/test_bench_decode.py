"""Whole-model decode at the real checkpoints' configs: vqfast against diffusers, same device."""

import pytest
import torch
from cases import MODELS, baselines, decode_case, device, peak_mib

DEV = device()


@pytest.mark.parametrize("impl", ["vqfast", *[b for b in baselines() if b == "diffusers"]])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_decode(benchmark, model, impl):
    run = decode_case(model, 256, 1, impl, DEV)
    benchmark.group = f"decode {model} 256x256 batch 1 fp32 {DEV}"
    benchmark.extra_info.update(device=DEV, peak_mib=peak_mib(run, "decode_case", model, 256, 1, impl, DEV))

    def timed():
        with torch.no_grad():
            run()
        if DEV == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
