"""Benchmark helpers: the real checkpoints' configs and peak memory of a case."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import resources


def real_config(name: str) -> dict:
    """A real checkpoint's config (as shipped in vqfast/configs), without diffusers' bookkeeping keys."""
    text = resources.files("vqfast").joinpath("configs", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def peak_rss_growth_mib(setup: str, stmt: str) -> float:
    """Peak resident memory that ``stmt`` adds after ``setup``, measured in a fresh process
    (CPU tensors have no allocator counter; the process high-water mark is what a user sees)."""
    code = textwrap.dedent(setup) + textwrap.dedent(
        f"""
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {stmt}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])
