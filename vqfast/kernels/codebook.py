"""Fused nearest-codebook search: indices, z_q and the squared error in one pass.

One program takes BLOCK_N rows of z, walks the (centred) codebook in BLOCK_K tiles keeping a
running (min, argmin) per row in registers, then gathers the winning codes into z_q and sums
(code - z)^2 for the commitment loss. Nothing of size N x K is ever written.

Distances are ranked as ||e - mu||^2 - 2 (z - mu).(e - mu) with mu the codebook mean: the
same order as ||z - e||^2, without the ||z||^2 term that swamps the differences in fp32.
Small D (MoVQ 4, LDM 3) runs on FMAs over one code dimension at a time. 8 < D <= 64 (aMUSEd 64)
runs on tensor cores: the launcher scales the centred vectors by powers of two and splits each
into two fp16 pieces (hi + lo, 22 significant bits), and three fp16 products with fp32
accumulation (hi.hi + hi.lo + lo.hi) rank the codes to fp32's accuracy, as 3xTF32 does; the
walk keeps each row's minimum and winning tile, and the winning tile is ranked again in fp32.
Wider D (VQGAN 256) goes through tl.dot in fp32 on FMAs, fp64 through a loop over D on FMAs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED

@triton.jit
def _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, d: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr):
    """-2 (z[:, d] - mu[d]) for the block's rows in the accumulator dtype (zeros past D): the
    ranking's factor -2 folded in once per row, exactly (a power of two)."""
    if d < D:
        v = tl.load(z_ptr + z_row + d * szd, mask=row_ok, other=0.0).to(ACC) - tl.load(mu_ptr + d)
    else:
        v = (z_row * 0).to(ACC)
    return v * -2.0


@triton.jit
def _code_col(code_ptrs, k_ok, d: tl.constexpr, MASKED: tl.constexpr):
    """e[:, d] of a codebook tile, given pointers to its codes (0 past K when MASKED)."""
    if MASKED:
        e = tl.load(code_ptrs + d, mask=k_ok, other=0.0)
    else:
        e = tl.load(code_ptrs + d)
    return e


@triton.jit
def _fma_col(acc, zc, code_ptrs, k_ok, d: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """acc + zc (x) e[:, d] over a codebook tile (one FMA per pair)."""
    if d < D:
        acc = acc + zc[:, None] * _code_col(code_ptrs, k_ok, d, MASKED)[None, :]
    return acc


@triton.jit
def _small_d_tile(best, best_k, k0, K, code_ptrs, norm_ptrs, offs_k, z0, z1, z2, z3, z4, z5, z6, z7,
                  D: tl.constexpr, MASKED: tl.constexpr):
    """One codebook tile for D <= 8: scores ||e||^2 - 2 z.e by D FMAs per pair (the first starts
    from the norm), then the running best per (row, slot) by one compare and two selects.
    Strict <: within a slot the earlier tile (the lower index) keeps a tie."""
    k_ok = k0 + offs_k < K
    if MASKED:  # codes past K score +inf and never win
        nrm = tl.load(norm_ptrs, mask=k_ok, other=float("inf"))
    else:
        nrm = tl.load(norm_ptrs)
    acc = nrm[None, :] + z0[:, None] * _code_col(code_ptrs, k_ok, 0, MASKED)[None, :]
    acc = _fma_col(acc, z1, code_ptrs, k_ok, 1, D, MASKED)
    acc = _fma_col(acc, z2, code_ptrs, k_ok, 2, D, MASKED)
    acc = _fma_col(acc, z3, code_ptrs, k_ok, 3, D, MASKED)
    acc = _fma_col(acc, z4, code_ptrs, k_ok, 4, D, MASKED)
    acc = _fma_col(acc, z5, code_ptrs, k_ok, 5, D, MASKED)
    acc = _fma_col(acc, z6, code_ptrs, k_ok, 6, D, MASKED)
    acc = _fma_col(acc, z7, code_ptrs, k_ok, 7, D, MASKED)
    take = acc < best
    return tl.where(take, acc, best), tl.where(take, k0, best_k)


@triton.jit
def _split_dot(acc, zh_ptrs, zl_ptrs, eh_ptrs, el_ptrs, row_ok, k_ok, d_left, BLOCK_D: tl.constexpr,
               EVEN_D: tl.constexpr, MASKED: tl.constexpr, MMA: tl.constexpr):
    """acc + (zh + zl).(eh + el) over one slice of D (d_left columns from the pointers on, the
    slice's BLOCK_D of them when EVEN_D), less the lo.lo term (below fp32's rounding): three
    fp16 products on tensor cores with fp32 accumulation (MMA), or, under the interpreter, the
    same exact products summed in one order for every code (numpy's matmul sums a column by
    its position in the BLAS micro-kernel, so equal codes could rank apart). z's slice is read
    again for every tile (from cache): held in registers across the walk, it would be stored to
    shared memory for the MMA on every trip."""
    ds = tl.arange(0, BLOCK_D)
    zh = tl.load(zh_ptrs, mask=row_ok[:, None] & (ds < d_left)[None, :], other=0.0)
    zl = tl.load(zl_ptrs, mask=row_ok[:, None] & (ds < d_left)[None, :], other=0.0)
    if MASKED or not EVEN_D:
        m = k_ok[:, None] & (ds < d_left)[None, :]
        eh = tl.load(eh_ptrs, mask=m, other=0.0)
        el = tl.load(el_ptrs, mask=m, other=0.0)
    else:
        eh = tl.load(eh_ptrs)
        el = tl.load(el_ptrs)
    if MMA:
        acc = tl.dot(zh, tl.trans(eh), acc)
        acc = tl.dot(zh, tl.trans(el), acc)
        acc = tl.dot(zl, tl.trans(eh), acc)
    else:
        zh32, zl32 = zh.to(tl.float32), zl.to(tl.float32)
        eh32, el32 = eh.to(tl.float32), el.to(tl.float32)
        acc += tl.sum(zh32[:, None, :] * eh32[None, :, :] + zh32[:, None, :] * el32[None, :, :]
                      + zl32[:, None, :] * eh32[None, :, :], axis=2)
    return acc


@triton.jit
def _mma_tile(best, best_t, k0, K, norm_ptrs, scale, zh_ptrs, zl_ptrs, eh_ptrs, el_ptrs, row_ok, offs_k,
              BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              MMA: tl.constexpr):
    """One codebook tile on the split products (all of D <= BLOCK_D in one slice), then per row the
    tile's minimum against the running one: an add and a min per pair. Which code won is not
    tracked here (that took a compare and two selects per pair): _rescan finds it in the
    winning tile, once. Strict <: of equal minima the earlier tile (lower indices) stays."""
    k_ok = k0 + offs_k < K
    if MASKED:
        nrm = tl.load(norm_ptrs, mask=k_ok, other=float("inf")) * scale
    else:
        nrm = tl.load(norm_ptrs) * scale
    acc = tl.zeros([BLOCK_N, offs_k.shape[0]], tl.float32)
    acc = _split_dot(acc, zh_ptrs, zl_ptrs, eh_ptrs, el_ptrs, row_ok, k_ok, D, BLOCK_D, D == BLOCK_D, MASKED, MMA)
    low = tl.min(acc + nrm[None, :], axis=1)
    take = low < best
    return tl.where(take, low, best), tl.where(take, k0, best_t)


@triton.jit
def _rescan(best_t, rows, row_ok, zc_ptr, centred_ptr, norms_ptr, K,
            D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RESCAN: tl.constexpr):
    """The first nearest code of each row inside its winning tile (codes best_t .. best_t +
    BLOCK_K), ranked again in fp32 on FMAs from the centred vectors, RESCAN codes at a time:
    BLOCK_K x D FMAs per row, once, against K x D products in the walk. Exactly equal codes
    score equally in any one arithmetic, so the lower index keeps a tie here too."""
    ridx = tl.zeros([BLOCK_N], tl.int32)
    rbest = tl.full([BLOCK_N], float("inf"), tl.float32)
    zc_rows = zc_ptr + rows.to(tl.int64) * D
    for j0 in range(0, BLOCK_K, RESCAN):
        js = best_t[:, None] + j0 + tl.arange(0, RESCAN)[None, :]
        ok = row_ok[:, None] & (js < K)
        sc = tl.load(norms_ptr + js, mask=ok, other=float("inf"))
        code_rows = centred_ptr + js.to(tl.int64) * D
        for d in range(0, D):
            zd = tl.load(zc_rows + d, mask=row_ok, other=0.0)
            sc += zd[:, None] * tl.load(code_rows + d, mask=ok, other=0.0)
        low = tl.min(sc, axis=1)
        first = tl.min(tl.where(sc == low[:, None], js, 2147483647), axis=1)
        take = low < rbest
        rbest = tl.where(take, low, rbest)
        ridx = tl.where(take, first, ridx)
    return ridx


@triton.jit
def _first_best(best, best_k, offs_k):
    """Once per block: the lowest index among the slots holding each row's minimum."""
    low = tl.min(best, axis=1)
    return tl.min(tl.where(best == low[:, None], best_k + offs_k[None, :], 2147483647), axis=1)


@triton.jit
def nearest_code_kernel(
    z_ptr, book_ptr, centred_ptr, norms_ptr, mu_ptr,  # inputs
    zc_ptr,  # PATH 1, 2: -2 (z - mu) in the accumulator dtype, (N, D) contiguous (else unused)
    zp_ptr, ep_ptr,  # PATH 3: the fp16 pieces (hi, lo) of scaled -2 (z - mu) and e - mu, (2, N, D) and (2, K, D)
    scale_ptr,  # PATH 3: their scale 2^(sz + se), fp32
    idx_ptr, zq_ptr, sse_ptr,  # outputs: indices (N,), z_q (z's strides), squared error per program
    N, K, R1, R2,  # rows, codes, and the sizes of row dims 1 and 2 (rows = R0 x R1 x R2)
    sz0, sz1, sz2, szd,  # z strides: the three row dims, then the code dim
    sq0, sq1, sq2, sqd,  # z_q strides, likewise
    sbk, sbd,  # codebook strides
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PATH: tl.constexpr,  # 0: D <= 8 unrolled on FMAs, 1: tl.dot tiles, 2: FMAs over a loop on D, 3: split fp16 products
    MMA: tl.constexpr,  # PATH 3: on tensor cores (tl.dot); False under the interpreter
    RESCAN: tl.constexpr,  # PATH 3: codes per step of _rescan
    WRITE_ZQ: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    # Row numbers fit 32 bits (the launcher checks N < 2^31; 64-bit division is a slow
    # subroutine on the GPU); element offsets are 64-bit, as strides times sizes may not fit.
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    i2 = (rows % R2).to(tl.int64)
    i1 = ((rows // R2) % R1).to(tl.int64)
    i0 = (rows // R2 // R1).to(tl.int64)
    z_row = i0 * sz0 + i1 * sz1 + i2 * sz2

    # A running best per (row, code slot): every tile is an elementwise compare-select, and the
    # block reduces across its slots once, after the walk (no shuffles or barriers per tile).
    # Strict <: within a slot the earlier tile (the lower index) keeps a tie.
    offs_k = tl.arange(0, BLOCK_K)
    # The tile's base is a pointer advanced tile by tile (64-bit, so K * D may pass 2^31);
    # offsets inside a tile stay 32-bit.
    tile_ptr = centred_ptr
    if PATH == 0:
        best = tl.full([BLOCK_N, BLOCK_K], float("inf"), ACC)
        best_k = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)  # the start of the winning tile; K < 2^31
        # The block's z rows, centred and scaled, stay in registers for the whole walk.
        z0 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 0, D, ACC)
        z1 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 1, D, ACC)
        z2 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 2, D, ACC)
        z3 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 3, D, ACC)
        z4 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 4, D, ACC)
        z5 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 5, D, ACC)
        z6 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 6, D, ACC)
        z7 = _z_col(z_ptr, z_row, row_ok, szd, mu_ptr, 7, D, ACC)
        row_nan = (z0 != z0) | (z1 != z1) | (z2 != z2) | (z3 != z3) | (z4 != z4) | (z5 != z5) | (z6 != z6) | (z7 != z7)
        # Full tiles without masks, then the partial last tile (if any) outside the hot loop.
        # Per-thread pointers advanced tile by tile (64-bit: K * D may pass 2^31).
        k_full = K - K % BLOCK_K
        code_ptrs = centred_ptr + offs_k * D
        norm_ptrs = norms_ptr + offs_k
        for k0 in range(0, k_full, BLOCK_K):
            best, best_k = _small_d_tile(best, best_k, k0, K, code_ptrs, norm_ptrs, offs_k,
                                         z0, z1, z2, z3, z4, z5, z6, z7, D, False)
            code_ptrs += BLOCK_K * D
            norm_ptrs += BLOCK_K
        if k_full < K:
            best, best_k = _small_d_tile(best, best_k, k_full, K, code_ptrs, norm_ptrs, offs_k,
                                         z0, z1, z2, z3, z4, z5, z6, z7, D, True)
        best_idx = _first_best(best, best_k, offs_k)
    elif PATH == 3:
        # The walk reads z's pieces slice by slice with every tile (see _split_dot), and
        # the codebook's tile by tile, full tiles without masks.
        zh_ptrs = zp_ptr + rows.to(tl.int64)[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
        zl_ptrs = zh_ptrs + N.to(tl.int64) * D
        # Rows holding a NaN, found once: a NaN in z stays a NaN in its hi piece (an
        # infinity's lo piece is 0, not NaN).
        nans = tl.zeros([BLOCK_N], tl.int32)
        for d0 in range(0, D, BLOCK_D):
            zt = tl.load(zh_ptrs + d0, mask=row_ok[:, None] & (d0 + tl.arange(0, BLOCK_D) < D)[None, :], other=0.0)
            nans += tl.sum((zt != zt).to(tl.int32), axis=1)
        row_nan = nans > 0
        k_full = K - K % BLOCK_K
        eh_ptrs = ep_ptr + offs_k[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
        el_ptrs = eh_ptrs + K.to(tl.int64) * D
        norm_ptrs = norms_ptr + offs_k
        scale = tl.load(scale_ptr)  # the pieces' scale 2^(sz + se), applied to the norms
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_t = tl.zeros([BLOCK_N], tl.int32)  # the start of the winning tile
        for k0 in range(0, k_full, BLOCK_K):
            best, best_t = _mma_tile(best, best_t, k0, K, norm_ptrs, scale, zh_ptrs, zl_ptrs, eh_ptrs, el_ptrs,
                                     row_ok, offs_k, BLOCK_N, D, BLOCK_D, False, MMA)
            eh_ptrs += BLOCK_K * D
            el_ptrs += BLOCK_K * D
            norm_ptrs += BLOCK_K
        if k_full < K:
            best, best_t = _mma_tile(best, best_t, k_full, K, norm_ptrs, scale, zh_ptrs, zl_ptrs, eh_ptrs, el_ptrs,
                                     row_ok, offs_k, BLOCK_N, D, BLOCK_D, True, MMA)
        best_idx = _rescan(best_t, rows, row_ok, zc_ptr, centred_ptr, norms_ptr, K, D, BLOCK_N, BLOCK_K, RESCAN)
    else:
        # z centred and scaled by the launcher (-2 (z - mu), rows of D contiguous): the tiles
        # go to the product as loaded, with no per-tile centring and full-width loads.
        zc_rows = zc_ptr + rows.to(tl.int64)[:, None] * D
        # Rows holding a NaN, found once (not per tile).
        nans = tl.zeros([BLOCK_N], tl.int32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            zt = tl.load(zc_rows + ds[None, :], mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)
            nans += tl.sum((zt != zt).to(tl.int32), axis=1)
        row_nan = nans > 0
        best = tl.full([BLOCK_N, BLOCK_K], float("inf"), ACC)
        best_k = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            acc = tl.zeros([BLOCK_N, BLOCK_K], ACC) + tl.load(norms_ptr + ks, mask=k_ok, other=float("inf"))[None, :]
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                zt = tl.load(zc_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                et = tl.load(tile_ptr + offs_k[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                if PATH == 1:
                    acc = tl.dot(zt, tl.trans(et), acc, input_precision="ieee")
                else:
                    acc += tl.sum(zt[:, None, :] * et[None, :, :], axis=2)
            take = acc < best
            best = tl.where(take, acc, best)
            best_k = tl.where(take, k0, best_k)
            tile_ptr += BLOCK_K * D
        best_idx = _first_best(best, best_k, offs_k)
    # torch.argmin's rule for NaN distances (a NaN is smaller than everything, the first one
    # wins) gives index 0 to a row containing NaN, and to every row when the codebook holds a
    # NaN or an infinity (then its mean, and every centred code, is NaN or infinite).
    bad = tl.zeros([BLOCK_D], tl.int32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mu = tl.load(mu_ptr + ds, mask=ds < D, other=0.0)
        bad |= (tl.abs(mu) == float("inf")).to(tl.int32) | (mu != mu).to(tl.int32)
    book_bad = tl.max(bad, axis=0) > 0
    best_idx = tl.where(row_nan | book_bad, 0, best_idx)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)

    if WRITE_ZQ:
        q_row = i0 * sq0 + i1 * sq1 + i2 * sq2
        sse = tl.zeros([BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            m = row_ok[:, None] & (ds < D)[None, :]
            code = tl.load(book_ptr + best_idx.to(tl.int64)[:, None] * sbk + ds[None, :] * sbd, mask=m, other=0.0)
            zt = tl.load(z_ptr + z_row[:, None] + ds[None, :] * szd, mask=m, other=0.0)
            tl.store(zq_ptr + q_row[:, None] + ds[None, :] * sqd, code.to(zq_ptr.dtype.element_ty), mask=m)
            diff = code.to(ACC) - zt.to(ACC)
            sse += tl.sum(diff * diff, axis=1)
        tl.store(sse_ptr + pid, tl.sum(sse, axis=0))


#: The largest code width unrolled on FMAs (z held in registers as one column per dimension).
SMALL_D = 8
#: The widest D on the split fp16 products (PATH 3), one slice of D per tile (aMUSEd's 64). Wider
#: D (VQGAN's 256) takes PATH 1: every tiling of it tried on tensor cores, with D in 32- or
#: 64-wide slices, spilled on sm_90 or left its hot loop over the budget.
MAX_DOT_D = 64


def launch_config(D: int, K: int, acc: torch.dtype, arch: int = 90) -> dict:
    """Tile sizes by code width and codebook size (fixed, so runs are deterministic).

    D <= 8 (MoVQ 4, LDM 3) unrolls the dimensions on FMAs (PATH 0: 32 rows x 64 codes, z in
    registers). 8 < D <= MAX_DOT_D in fp32, fp16 or bf16 ranks on tensor cores (PATH 3: 64 rows x
    128 codes, three fp16 products per tile, 4 warps: one warpgroup, so a row's minimum stays
    inside a warp; 128 codes amortise the tile's set-up). Wider D goes through tl.dot
    in fp32 on FMAs (PATH 1), and fp64 loops over D on FMAs (PATH 2). Every entry compiles for
    sm_80 and sm_90 without spilling and within the budgets of ``budget`` (tests/ops/
    test_kernel_compile.py); tuning them for speed needs a GPU.
    """
    block_k = min(64, max(16, triton.next_power_of_2(K)))
    if D <= SMALL_D:
        block_k = 64 if acc == torch.float32 else 32  # fp64 slots take twice the registers
        cfg = dict(BLOCK_N=32, BLOCK_K=min(block_k, max(16, triton.next_power_of_2(K))),
                   BLOCK_D=triton.next_power_of_2(D), PATH=0, num_warps=4)
    elif acc == torch.float32 and D <= MAX_DOT_D:
        cfg = dict(BLOCK_N=64, BLOCK_K=min(128, max(16, triton.next_power_of_2(K))),
                   BLOCK_D=max(16, triton.next_power_of_2(D)), PATH=3, num_warps=4)
    elif acc == torch.float32:
        # 64-wide slices of D where the registers allow (sm_90; sm_80 spills with wider slices).
        # Under the interpreter tl.dot is numpy's matmul, whose rounding depends on a column's
        # position (BLAS micro-kernels), so equal codes in different tiles could rank apart
        # there; it takes the same tiles with PATH 2's product, summed alike for every column.
        # On a GPU, tl.dot on FMAs sums every pair in the same order.
        cfg = dict(BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=64 if arch >= 90 else 16,
                   PATH=2 if INTERPRETED else 1, num_warps=8)
    else:
        cfg = dict(BLOCK_N=32, BLOCK_K=min(32, max(16, triton.next_power_of_2(K))), BLOCK_D=4, PATH=2, num_warps=4)
    cfg["MMA"] = cfg["PATH"] == 3 and not INTERPRETED
    cfg["RESCAN"] = 16  # PATH 3's rescan: a [BLOCK_N, 16] tile of codes per step
    return cfg


def aot_cases() -> list[tuple[torch.dtype, int, int, bool]]:
    """(dtype, D, K, write_zq) inputs that between them reach every entry of launch_config and
    every pointer type, for ahead-of-time compile checks and resource reports."""
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases += [(dtype, 4, 16384, True), (dtype, 8, 1000, True), (dtype, 64, 8192, True), (dtype, 256, 16384, False)]
    cases += [(torch.float32, 3, 8192, False), (torch.float32, 4, 7, True), (torch.float32, 8, 20, True),
              (torch.float32, 17, 7, True), (torch.float32, 1, 1, True), (torch.float32, 32, 100, True),
              (torch.float64, 4, 16384, True), (torch.float64, 64, 100, False)]
    return cases


def compile_spec(z_dtype: torch.dtype, book_dtype: torch.dtype, D: int, K: int, write_zq: bool, arch: int = 90):
    """(signature, constexprs, num_warps) of the launch ``nearest_code`` makes for these inputs,
    for ahead-of-time compilation (vqfast/kernels/aot.py). Pointers are given as the torch dtype they
    point to; sizes and strides as 32-bit ints."""
    acc = torch.float64 if torch.float64 in (z_dtype, book_dtype) else torch.float32
    cfg = launch_config(D, K, acc, arch)
    num_warps = cfg.pop("num_warps")
    signature = {
        "z_ptr": z_dtype, "book_ptr": book_dtype, "centred_ptr": acc,
        "norms_ptr": acc, "mu_ptr": acc, "zc_ptr": acc, "zp_ptr": torch.float16, "ep_ptr": torch.float16,
        "scale_ptr": torch.float32 if cfg["PATH"] == 3 else acc, "idx_ptr": torch.int64,
        "zq_ptr": z_dtype, "sse_ptr": acc,
        **{name: "i32" for name in ("N", "K", "R1", "R2", "sz0", "sz1", "sz2", "szd",
                                    "sq0", "sq1", "sq2", "sqd", "sbk", "sbd")},
    }
    constexprs = dict(D=D, WRITE_ZQ=write_zq, ACC=tl.float64 if acc == torch.float64 else tl.float32, **cfg)
    return signature, constexprs, num_warps


def device_arch(device: torch.device) -> int:
    """The compute capability the kernels compile for on ``device`` (90 for the interpreter)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _row_dims(shape: tuple[int, ...], *strides: tuple[int, ...]) -> tuple[list[int], list[list[int]]]:
    """Merge the row dimensions (all but the code dimension) into at most three, for every
    stride set at once; dims of size 1 are dropped. Returns sizes and one stride list per set."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(shape) if n != 1]
    merged: list = []
    for n, st in dims:
        if merged and all(prev == cur * n for prev, cur in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    while len(merged) < 3:
        merged.insert(0, (1, [0] * len(strides)))
    return [n for n, _ in merged], [[st[i] for _, st in merged] for i in range(len(strides))]


def split_pieces(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 pieces (2, *x.shape): hi and lo, the scale 2^s as a 0-dim fp32 tensor) of an fp32
    tensor: x 2^s = hi + lo to 22 significant bits, as 3xTF32 splits (fp16 and TF32 keep 11).
    2^s brings the largest finite |x| to [2^13, 2^14), inside fp16's range with room for the
    rounding, so only entries 2^24 below the largest lose bits (to the lo piece's subnormals).
    Powers of two scale exactly, and the ranking does not change under a positive scale. A NaN
    or infinity stays in hi with a lo of 0. On the device, no host sync."""
    finite = torch.where(torch.isfinite(x), x.abs(), 0).amax()
    _, e = torch.frexp(finite)  # finite = m 2^e with m in [0.5, 1) (0 for 0)
    scale = torch.ldexp(torch.ones((), device=x.device), 14 - e)
    xs = x * scale
    hi = xs.to(torch.float16)
    lo = torch.where(torch.isfinite(hi), xs - hi.float(), 0).to(torch.float16)
    return torch.stack((hi, lo)), scale


def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, dim: int, write_zq: bool, centred: tuple, book_pieces=None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the kernel. Returns (indices shaped like z without dim, z_q like z or None,
    the summed squared error (code - z)^2 as a 0-dim float32/float64 tensor or None).
    ``centred``: (mu, codebook - mu contiguous, its squared row norms) in the accumulator dtype;
    the caller builds it once per codebook (vqfast.ops.reference.centred_codebook).
    ``book_pieces``: a callable giving split_pieces(centred codebook), so that the caller may
    cache it per codebook (PATH 3 only; else it is split per call)."""
    acc = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    D, K = codebook.shape[1], codebook.shape[0]
    zm = z.movedim(dim, -1)
    indices = torch.empty(zm.shape[:-1], dtype=torch.long, device=z.device)
    z_q = torch.empty_like(z) if write_zq else None
    qm = z_q.movedim(dim, -1) if write_zq else zm
    sizes, (zs, qs) = _row_dims(tuple(zm.shape[:-1]), zm.stride()[:-1], qm.stride()[:-1])
    if len(sizes) > 3:
        # Rare: more than three row dims that no view can merge. Run on a contiguous copy
        # (whose rows merge into two dims), then lay z_q out like z.
        indices, dense_q, sse = nearest_code(z.contiguous(), codebook, dim, write_zq, centred, book_pieces)
        return indices, z_q.copy_(dense_q) if write_zq else None, sse
    N = indices.numel()
    if N >= 2**31:
        raise ValueError(f"z holds {N} vectors; the Triton kernel takes fewer than 2^31 per call, split z")
    sse = torch.zeros((), dtype=acc, device=z.device)
    if N == 0:
        return indices, z_q, sse if write_zq else None
    mu, centred, norms = centred
    cfg = launch_config(D, K, acc, device_arch(z.device))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    partial = torch.empty(grid[0], dtype=acc, device=z.device)
    # D > SMALL_D: z centred once here (the same fp32 or fp64 operations as in the kernel),
    # O(N D) extra memory; the small-D path holds its z columns in registers instead.
    zc = ((zm.to(acc) - mu) * -2.0).reshape(N, D) if D > SMALL_D else mu
    zp = ep = scale = mu
    if cfg["PATH"] == 3:
        # Both sides split into fp16 pieces; the scores, and so the norms, scale by 2^(sz + se).
        zp, z_scale = split_pieces(zc)
        ep, e_scale = book_pieces() if book_pieces is not None else split_pieces(centred)
        scale = z_scale * e_scale
    nearest_code_kernel[grid](
        zm, codebook, centred, norms, mu, zc, zp, ep, scale,
        indices, qm, partial,
        N, K, sizes[1], sizes[2],
        *zs, zm.stride(-1), *qs, qm.stride(-1),
        codebook.stride(0), codebook.stride(1),
        D=D, WRITE_ZQ=write_zq, ACC=tl.float64 if acc == torch.float64 else tl.float32, **cfg,
    )
    return indices, z_q, partial.sum() if write_zq else None


def budget(row: dict) -> dict | None:
    """Limits on the compiled hot loop for a static cost report row of this kernel, or None
    where no budget applies. Why these numbers: a pair costs D FMAs and one compare with two
    selects at the issue limit, so D <= 8 may spend 12 instructions on it (sm_90) and no shuffle
    or barrier (a cross-thread argmin per tile cost 78). On tensor cores (PATH 3, sm_80 and
    sm_90) the products leave the hot loop's other work as the cost: the norm's add and a
    minimum per pair, the tiles' loads and a row minimum's few shuffles, at most 8 instructions
    per pair; and the loop must hold MMA instructions. _rescan runs once after the walk (a loop
    nest the reader skips): BLOCK_K x D FMAs per row against the walk's K x D products. tl.dot tiles on FMAs (D > MAX_DOT_D) may spend 30% over D
    plus 8, padded D counting, and no shuffle. fp64 and tiles smaller than the full 64 codes
    (K < 64) are not budgeted."""
    if row["dtype"] == "float64" or row["BLOCK_K"] < 64:
        return None
    if row["PATH"] == 3:
        return dict(min_loop_mma=1, loop_other_instructions_per_item=8)
    if row["arch"] != "sm_90":
        return None
    if row["D"] <= SMALL_D:
        return dict(loop_instructions_per_item=12, loop_shuffles=0, loop_barriers=0)
    padded = triton.cdiv(row["D"], row["BLOCK_D"]) * row["BLOCK_D"]
    return dict(loop_instructions_per_item=1.3 * padded + 8, loop_shuffles=0)


#: Rows of z in the benchmark case behind each static estimate (a 512x512 MoVQ image has 4096
#: latent vectors; 16 images).
BENCH_ROWS = 65536


def aot_launches(arch: int) -> list[dict]:
    """The launches of aot_cases() for vqfast/kernels/aot.py: compile spec, what one hot-loop trip
    covers, and the benchmark case's items and bytes."""
    out = []
    for dtype, D, K, write_zq in aot_cases():
        signature, constexprs, num_warps = compile_spec(dtype, dtype, D, K, write_zq, arch)
        acc_bytes = 8 if dtype == torch.float64 else 4
        elt = torch.empty((), dtype=dtype).element_size()
        N = BENCH_ROWS
        out.append(dict(
            kernel=nearest_code_kernel, case=dict(dtype=dtype, D=D, K=K, N=N, write_zq=write_zq),
            signature=signature, constexprs=constexprs, num_warps=num_warps,
            divisible=tuple(n for n, t in signature.items() if isinstance(t, torch.dtype)),
            items_per_iteration=constexprs["BLOCK_N"] * constexprs["BLOCK_K"],
            inner_trips=None if constexprs["PATH"] == 0 or D <= constexprs["BLOCK_D"] else triton.cdiv(D, constexprs["BLOCK_D"]),
            items=N * K, bytes=N * D * elt * (2 if write_zq else 1) + N * 8 + K * D * acc_bytes,
        ))
    return out
