"""Fused nearest-codebook search: indices, z_q and the squared error in one pass.

One program takes BLOCK_N rows of z, walks the (centred) codebook in BLOCK_K tiles keeping a
running (min, argmin) per row in registers, then gathers the winning codes into z_q and sums
(code - z)^2 for the commitment loss. Nothing of size N x K is ever written.

Distances are ranked as ||e - mu||^2 - 2 (z - mu).(e - mu) with mu the codebook mean: the
same order as ||z - e||^2, without the ||z||^2 term that swamps the differences in fp32.
Small D (MoVQ 4, LDM 3) runs on FMAs over one code dimension at a time; D >= 16 (aMUSEd 64,
VQGAN 256) on tl.dot tiles with input_precision="ieee" (exact fp32, no tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def nearest_code_kernel(
    z_ptr, book_ptr, centred_ptr, norms_ptr, mu_ptr,  # inputs
    idx_ptr, zq_ptr, sse_ptr,  # outputs: indices (N,), z_q (z's strides), squared error per program
    N, K, R1, R2,  # rows, codes, and the sizes of row dims 1 and 2 (rows = R0 x R1 x R2)
    sz0, sz1, sz2, szd,  # z strides: the three row dims, then the code dim
    sq0, sq1, sq2, sqd,  # z_q strides, likewise
    sbk, sbd,  # codebook strides
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
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

    best = tl.full([BLOCK_N], float("inf"), ACC)
    best_idx = tl.zeros([BLOCK_N], tl.int32)  # K < 2^31; widened for addressing below
    offs_k = tl.arange(0, BLOCK_K)
    # The tile's base is a pointer advanced tile by tile (64-bit, so K * D may pass 2^31);
    # offsets inside a tile stay 32-bit.
    tile_ptr = centred_ptr
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        if USE_DOT:
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                zt = tl.load(
                    z_ptr + z_row[:, None] + ds[None, :].to(tl.int64) * szd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                ).to(tl.float32)
                zt = zt - tl.load(mu_ptr + ds, mask=d_ok, other=0.0)[None, :]
                et = tl.load(tile_ptr + offs_k[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                acc = tl.dot(zt, tl.trans(et), acc, input_precision="ieee")
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
            for d in range(D):
                zd = tl.load(z_ptr + z_row + d * szd, mask=row_ok, other=0.0).to(ACC) - tl.load(mu_ptr + d)
                ed = tl.load(tile_ptr + offs_k * D + d, mask=k_ok, other=0.0)
                acc += zd[:, None] * ed[None, :]
        norms = tl.load(norms_ptr + ks, mask=k_ok, other=float("inf"))
        scores = norms[None, :] - 2.0 * acc
        # torch.argmin's rule: a NaN is smaller than everything and the first NaN wins, so a row
        # containing NaN gets index 0 (and a NaN code, every row). -inf stands for NaN here.
        scores = tl.where(scores != scores, float("-inf"), scores)
        scores = tl.where(k_ok[None, :], scores, float("inf"))  # codes past K never win
        tile_best, tile_idx = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # strict <: on a tie the earlier tile (the lower index) keeps the row
        take = tile_best < best
        best = tl.where(take, tile_best, best)
        best_idx = tl.where(take, tile_idx + k0, best_idx)
        tile_ptr += BLOCK_K * D
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


def launch_config(D: int, K: int, acc: torch.dtype) -> dict:
    """Tile sizes by code width and codebook size (fixed, so runs are deterministic).

    D >= 16 in fp32 goes through tl.dot (64 rows x 32 codes, 16-wide slices of D; its tiles
    must be at least 16 wide); small D, and fp64, run on FMAs over 32 x 64 tiles (32 x 32 in
    fp64). These are the largest tiles found to compile for sm_80 and sm_90 without spilling
    (tests/test_kernel_compile.py checks every entry); tuning them for speed needs a GPU.
    """
    use_dot = D >= 16 and acc == torch.float32
    if use_dot:
        return dict(BLOCK_N=64, BLOCK_K=min(32, max(16, triton.next_power_of_2(K))), BLOCK_D=16,
                    USE_DOT=True, num_warps=8)
    block_k = 64 if acc == torch.float32 else 32
    return dict(BLOCK_N=32, BLOCK_K=min(block_k, max(16, triton.next_power_of_2(K))),
                BLOCK_D=min(16, triton.next_power_of_2(D)), USE_DOT=False, num_warps=4)


def aot_cases() -> list[tuple[torch.dtype, int, int, bool]]:
    """(dtype, D, K, write_zq) inputs that between them reach every entry of launch_config and
    every pointer type, for ahead-of-time compile checks and resource reports."""
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases += [(dtype, 4, 16384, True), (dtype, 64, 8192, True), (dtype, 256, 16384, False)]
    cases += [(torch.float32, 3, 8192, False), (torch.float32, 4, 7, True), (torch.float32, 8, 20, True),
              (torch.float32, 17, 7, True), (torch.float32, 1, 1, True),
              (torch.float64, 4, 16384, True), (torch.float64, 64, 100, False)]
    return cases


def compile_spec(z_dtype: torch.dtype, book_dtype: torch.dtype, D: int, K: int, write_zq: bool):
    """(signature, constexprs, num_warps) of the launch ``nearest_code`` makes for these inputs,
    for ahead-of-time compilation (kernels/aot.py). Pointers are given as the torch dtype they
    point to; sizes and strides as 32-bit ints."""
    acc = torch.float64 if torch.float64 in (z_dtype, book_dtype) else torch.float32
    cfg = launch_config(D, K, acc)
    num_warps = cfg.pop("num_warps")
    signature = {
        "z_ptr": z_dtype, "book_ptr": book_dtype, "centred_ptr": acc,
        "norms_ptr": acc, "mu_ptr": acc, "idx_ptr": torch.int64,
        "zq_ptr": z_dtype, "sse_ptr": acc,
        **{name: "i32" for name in ("N", "K", "R1", "R2", "sz0", "sz1", "sz2", "szd",
                                    "sq0", "sq1", "sq2", "sqd", "sbk", "sbd")},
    }
    constexprs = dict(D=D, WRITE_ZQ=write_zq, ACC=tl.float64 if acc == torch.float64 else tl.float32, **cfg)
    return signature, constexprs, num_warps


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


def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, dim: int, write_zq: bool, centred: tuple
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the kernel. Returns (indices shaped like z without dim, z_q like z or None,
    the summed squared error (code - z)^2 as a 0-dim float32/float64 tensor or None).
    ``centred``: (mu, codebook - mu contiguous, its squared row norms) in the accumulator dtype;
    the caller builds it once per codebook (vqfast.ops.reference.centred_codebook)."""
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
        indices, dense_q, sse = nearest_code(z.contiguous(), codebook, dim, write_zq, centred)
        return indices, z_q.copy_(dense_q) if write_zq else None, sse
    N = indices.numel()
    if N >= 2**31:
        raise ValueError(f"z holds {N} vectors; the Triton kernel takes fewer than 2^31 per call, split z")
    sse = torch.zeros((), dtype=acc, device=z.device)
    if N == 0:
        return indices, z_q, sse if write_zq else None
    mu, centred, norms = centred
    cfg = launch_config(D, K, acc)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    partial = torch.empty(grid[0], dtype=acc, device=z.device)
    nearest_code_kernel[grid](
        zm, codebook, centred, norms, mu,
        indices, qm, partial,
        N, K, sizes[1], sizes[2],
        *zs, zm.stride(-1), *qs, qm.stride(-1),
        codebook.stride(0), codebook.stride(1),
        D=D, WRITE_ZQ=write_zq, ACC=tl.float64 if acc == torch.float64 else tl.float32, **cfg,
    )
    return indices, z_q, partial.sum() if write_zq else None


#: Rows of z in the benchmark case behind each static estimate (a 512x512 MoVQ image has 4096
#: latent vectors; 16 images).
BENCH_ROWS = 65536


def aot_launches() -> list[dict]:
    """The launches of aot_cases() for kernels/aot.py: compile spec, what one hot-loop trip
    covers, and the benchmark case's items and bytes."""
    out = []
    for dtype, D, K, write_zq in aot_cases():
        signature, constexprs, num_warps = compile_spec(dtype, dtype, D, K, write_zq)
        acc_bytes = 8 if dtype == torch.float64 else 4
        elt = torch.empty((), dtype=dtype).element_size()
        N = BENCH_ROWS
        out.append(dict(
            kernel=nearest_code_kernel, case=dict(dtype=dtype, D=D, K=K, N=N, write_zq=write_zq),
            signature=signature, constexprs=constexprs, num_warps=num_warps,
            divisible=tuple(n for n, t in signature.items() if isinstance(t, torch.dtype)),
            items_per_iteration=constexprs["BLOCK_N"] * constexprs["BLOCK_K"],
            inner_trips=triton.cdiv(D, constexprs["BLOCK_D"]) if constexprs["USE_DOT"] else D,
            items=N * K, bytes=N * D * elt * (2 if write_zq else 1) + N * 8 + K * D * acc_bytes,
        ))
    return out
