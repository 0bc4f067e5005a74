"""The pytest-benchmark suites' shared pieces. The cases themselves are vqfast.cli.bench's (the
``vqfast bench`` command), so both measure the same thing."""

from __future__ import annotations

import torch

from vqfast.cli.bench import CODEBOOKS, MODELS, Case, baselines, build, measure, real_config  # noqa: F401

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(benchmark, case: Case, rounds: int) -> None:
    """Time ``case`` with pytest-benchmark (in this process) and record its peak memory (a fresh
    process on CPU, see vqfast.cli.bench.measure) and the device in extra_info."""
    benchmark.group = f"{case.label} {DEV}"
    benchmark.extra_info.update(device=DEV, impl=case.impl, peak_mib=measure(case, repeat=0, warmup=1)["peak_mib"])
    if DEV == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark.pedantic(build(case), rounds=rounds, iterations=1, warmup_rounds=1)
