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
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_launch_configuration_is_covered(compiled):
    books = [r for r in compiled if r["kernel"] == "nearest_code"]
    assert len(books) == 2 * len(codebook.aot_cases())
    reached = {(r["PATH"], r["BLOCK_N"], r["BLOCK_K"], r["BLOCK_D"], r["dtype"] == "float64") for r in books}
    assert {path for path, *_ in reached} == {0, 1, 2, 3}
    assert {block_k for _, _, block_k, _, _ in reached} == {16, 32, 64, 128}
    assert any(fp64 for *_, fp64 in reached)
    norms = [r for r in compiled if r["kernel"] in ("group_stats", "group_apply")]
    assert len(norms) == 2 * 2 * len(group_norm.aot_cases())
    assert {r["path"] for r in norms} == {"nchw", "channels_last", "strided"}
    assert {r["BLOCK_C"] for r in norms if r["path"] == "strided"} >= {4, 32}
    assert {r["spatial"] for r in norms} == {True, False}
    # the rows of a path ran its kernels
    assert {r["kernel_function"] for r in norms if r["path"] == "nchw"} == {
        "slab_stats_kernel", "slab_apply_kernel", "slab_spatial_apply_kernel"}
    assert {r["kernel_function"] for r in norms if r["path"] == "channels_last"} == {
        "pixel_stats_kernel", "pixel_apply_kernel", "pixel_spatial_apply_kernel"}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_spills(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert rows
    for r in rows:
        assert r["local"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 255, r


REQUIRED = {"kernel", "dtype", "arch", "registers", "spill_stores", "spill_loads", "loop_instructions_per_item",
            "loop_shuffles", "loop_barriers", "global_load_bits", "global_store_bits", "estimate_us_h200"}


def test_report_rows_carry_the_static_cost(compiled):
    for r in compiled:
        assert REQUIRED <= set(r), r
        assert r["loop_instructions_per_item"] > 0 and r["estimate_us_h200"] >= 0, r
    assert {r["arch"] for r in compiled} == {"sm_80", "sm_90"}
    assert all({"D", "K", "N"} <= set(r) for r in compiled if r["kernel"] == "nearest_code")
    assert all({"layout", "B", "C", "G", "HW", "spatial"} <= set(r) for r in compiled if r["kernel"] != "nearest_code")


SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FFMA R9, R4, R5, R9 ;
        /*0040*/               @P0 BRA 0x30 ;
        /*0050*/                   SHFL.BFLY PT, R5, R4, 0x10, 0x1f ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   STG.E.64.LTC128B desc[UR4][R2.64], R4 ;
        /*0080*/              @!P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_sass_reader_counts_the_hot_loop():
    """The reader behind every budget: a loop at 0x10-0x80 holding an inner loop of 2
    instructions (0x30-0x40), run 5 times; the pad branch at the end is no loop."""
    from vqfast.kernels import aot

    instrs = aot.parse_sass(SASS)
    assert len(instrs) == 11 and instrs[4][1] == "BRA"
    assert sorted(aot.loops(instrs)) == [(1, 8), (3, 4)]
    loop = aot.hot_loop(instrs, inner_trips=5)
    assert loop["instructions"] == 8 - 2 + 5 * 2
    assert (loop["shuffles"], loop["barriers"]) == (1, 1)
    assert loop["load_bits"] == [16, 128] and loop["store_bits"] == [64]  # .LTC128B is a cache hint
    with pytest.raises(ValueError, match="inner trip count"):
        aot.hot_loop(instrs, inner_trips=None)
    assert aot.estimate_us(10.0, 32 * 132 * 4 * 1980, 0) == pytest.approx(10.0)  # 10 us of issue
    assert aot.estimate_us(0.0, 1, 43_000_000) == pytest.approx(10.0)  # 43 MB at 4.3 TB/s


def budget_misses(compiled) -> list[str]:
    """Every budgeted row's misses (sm_90): instruction, shuffle and barrier limits, and the
    narrowest global load and store of the hot loop. The budgets live beside the kernels."""
    limits = {"nearest_code": codebook.budget, "group_stats": group_norm.budget, "group_apply": group_norm.budget}
    misses, budgeted = [], set()
    for r in compiled:
        b = limits[r["kernel"]](r)
        if b is None:
            continue
        budgeted.add(r["kernel"])
        for key, limit in b.items():
            if key == "min_global_bits":
                widths = r["global_load_bits"] + r["global_store_bits"]
                if not widths or min(widths) < limit:
                    misses.append(f"{r}: global widths {widths} below {limit} bits")
            elif key == "min_loop_mma":
                if r["loop_mma"] < limit:
                    misses.append(f"{r}: {r['loop_mma']} MMA instructions in the hot loop, below {limit}")
            elif r[key] > limit:
                misses.append(f"{r}: {key} = {r[key]} over its budget {limit}")
    assert budgeted == set(limits), f"no budgeted row for {set(limits) - budgeted}"
    return misses


def test_hot_loops_hold_their_budgets(compiled):
    misses = budget_misses(compiled)
    assert not misses, "\n".join(misses)
