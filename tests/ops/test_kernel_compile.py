"""Every launch configuration of the kernels (codebook search, GroupNorm/SpatialNorm) compiles for sm_80 and sm_90 without spills.

The interpreter runs programs the GPU compiler rejects and hides spills; this compiles the
real thing ahead of time, on CPU, with the ptxas and cuobjdump shipped in the triton wheel.
It runs in a separate process because the interpreter (on in this test session) patches
triton.language.
"""

import json
import os
import subprocess
import sys

import pytest

from vqfast.kernels import codebook, group_norm


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "vqfast.kernels.aot"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_launch_configuration_is_covered(compiled):
    books = [r for r in compiled if r["kernel"] == "nearest_code"]
    assert len(books) == 2 * len(codebook.aot_cases())
    reached = {(r["USE_DOT"], r["BLOCK_N"], r["BLOCK_K"], r["BLOCK_D"], r["dtype"] == "float64") for r in books}
    assert {use_dot for use_dot, *_ in reached} == {True, False}
    assert {block_k for _, _, block_k, _, _ in reached} == {16, 32, 64}
    assert any(fp64 for *_, fp64 in reached)
    norms = [r for r in compiled if r["kernel"] in ("group_stats", "group_apply")]
    assert len(norms) == 2 * 2 * len(group_norm.aot_cases())
    assert {r["BLOCK_C"] for r in norms} >= {4, 32} and {r["spatial"] for r in norms} == {True, False}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_spills(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert rows
    for r in rows:
        assert r["local"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 255, r
