"""GroupNorm (+SiLU), and SpatialNorm's apply pass, in two kernels over any NCHW-like layout.

1. ``group_stats_kernel``: grid (B * G, S). Each program takes 1/S of one group's positions
   (all Cg channels) and writes its count, mean and centred sum of squares (M2), computed with
   a two-pass over each tile in registers and Chan's combine across tiles. Splitting the group
   over S programs is what fills the GPU at batch 1 (a 32-group decoder layer at 256x256 has
   32 groups of a million elements).
2. ``group_apply_kernel``: the same grid. Each program combines the group's S partials (Chan
   again: never E[x^2] - E[x]^2), then normalises its slice, applies the affine, for SpatialNorm
   multiplies and adds the low-resolution scale and shift gathered by the nearest rule, applies
   SiLU, and stores in the input's layout. Two reads and one write of x in all.

x is read through its strides (NCHW and channels_last alike); offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED


@triton.jit
def _tile_offsets(x_ptr, bb, c, p, W, sb, sc, sh, sw):
    """Pointers to x[b, c, p // W, p % W] for a [BLOCK_P, BLOCK_C] tile, 64-bit offsets."""
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    return x_ptr + bb * sb + c.to(tl.int64)[None, :] * sc + (h * sh + w * sw)[:, None]


@triton.jit
def _load_tile(x_ptr, bb, c0, ci, p0, p_end, W, sb, sc, sh, sw,
               CG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_P, BLOCK_C] tile of a group's channels c0 + ci... at positions p0...: its
    values in fp32 (0 where masked), positions, channels and mask."""
    p = p0 + tl.arange(0, BLOCK_P)
    c = c0 + ci + tl.arange(0, BLOCK_C)
    m = (p < p_end)[:, None] & (c < c0 + CG)[None, :]
    x = tl.load(_tile_offsets(x_ptr, bb, c, p, W, sb, sc, sh, sw), mask=m, other=0.0).to(tl.float32)
    return x, p, c, m


@triton.jit
def group_stats_kernel(
    x_ptr, part_ptr,  # part: (B * G, S, 3) float32 = (count, mean, M2)
    C, P, W, G, S, per_prog,  # channels, positions H * W, width, groups, splits, positions per program
    sb, sc, sh, sw,
    CG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    bb = (bg // G).to(tl.int64)
    c0 = (bg % G) * CG
    n = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    p_start = s * per_prog
    p_end = tl.minimum(p_start + per_prog, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        for ci in range(0, CG, BLOCK_C):
            x, p, c, m = _load_tile(x_ptr, bb, c0, ci, p0, p_end, W, sb, sc, sh, sw, CG, BLOCK_P, BLOCK_C)
            tn = tl.sum(m.to(tl.float32))
            tmean = tl.sum(x) / tn
            d = tl.where(m, x - tmean, 0.0)
            tm2 = tl.sum(d * d)
            # Chan's combine of (n, mean, m2) with the tile's (tn, tmean, tm2)
            tot = n + tn
            delta = tmean - mean
            mean = mean + delta * (tn / tot)
            m2 = m2 + tm2 + delta * delta * (n * tn / tot)
            n = tot
    out = part_ptr + (bg * S + s).to(tl.int64) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def group_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr,
    scale_ptr, shift_ptr, src_h_ptr, src_w_ptr,  # SpatialNorm only: (B, C, h, w) maps, nearest index maps
    C, P, W, G, S, per_prog, eps,
    sb, sc, sh, sw,  # x strides
    yb, yc, yh, yw,  # y strides
    mb, mc, mh, mw,  # scale / shift strides
    CG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    AFFINE: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    bb = (bg // G).to(tl.int64)
    c0 = (bg % G) * CG

    # The group's statistics from its S partials: n = sum n_i, mean = sum n_i mean_i / n,
    # M2 = sum M2_i + sum n_i (mean_i - mean)^2.
    base = part_ptr + bg.to(tl.int64) * S * 3
    total = tl.zeros([], tl.float32)
    weighted = tl.zeros([], tl.float32)
    for j0 in range(0, S, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        ni = tl.load(base + j * 3, mask=j < S, other=0.0)
        total += tl.sum(ni)
        weighted += tl.sum(ni * tl.load(base + j * 3 + 1, mask=j < S, other=0.0))
    mean = weighted / total
    m2 = tl.zeros([], tl.float32)
    for j0 in range(0, S, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        ni = tl.load(base + j * 3, mask=j < S, other=0.0)
        di = tl.load(base + j * 3 + 1, mask=j < S, other=0.0) - mean
        m2 += tl.sum(tl.load(base + j * 3 + 2, mask=j < S, other=0.0) + ni * di * di)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    p_start = s * per_prog
    p_end = tl.minimum(p_start + per_prog, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        for ci in range(0, CG, BLOCK_C):
            x, p, c, m = _load_tile(x_ptr, bb, c0, ci, p0, p_end, W, sb, sc, sh, sw, CG, BLOCK_P, BLOCK_C)
            p_ok = p < p_end
            c_ok = c < c0 + CG
            y = (x - mean) * rstd
            if AFFINE:
                wt = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
                bs = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
                y = y * wt[None, :] + bs[None, :]
            if SPATIAL:
                hs = tl.load(src_h_ptr + p // W, mask=p_ok, other=0)
                ws = tl.load(src_w_ptr + p % W, mask=p_ok, other=0)
                moff = bb * mb + c.to(tl.int64)[None, :] * mc + (hs.to(tl.int64) * mh + ws.to(tl.int64) * mw)[:, None]
                y = y * tl.load(scale_ptr + moff, mask=m, other=0.0).to(tl.float32)
                y = y + tl.load(shift_ptr + moff, mask=m, other=0.0).to(tl.float32)
            if SILU:
                y = y * tl.sigmoid(y)
            out = _tile_offsets(y_ptr, bb, c, p, W, yb, yc, yh, yw)
            tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m)


#: Programs to aim for in all, so that even batch 1 fills a GPU's SMs several times over. The
#: interpreter runs programs one by one, so there a few suffice (still more than one per group
#: for small batches, which keeps the split-and-combine path under test).
TARGET_PROGRAMS = 8 if INTERPRETED else 1024


def launch_config(B: int, G: int, CG: int, P: int) -> dict:
    """Tile and split sizes, fixed by shape (deterministic). BLOCK_C covers a group's channels
    up to 32 at a time; BLOCK_P keeps a tile near 1024 elements (larger
    tiles spill in the SpatialNorm gather); S splits each group so that
    B * G * S is near TARGET_PROGRAMS, with at least one tile per program."""
    block_c = min(32, triton.next_power_of_2(CG))
    block_p = max(16, min(1024, 1024 // block_c, triton.next_power_of_2(P)))
    tiles = triton.cdiv(P, block_p)
    splits = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, B * G)))
    per_prog = triton.cdiv(tiles, splits) * block_p
    splits = triton.cdiv(P, per_prog)
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, S=splits, per_prog=per_prog, num_warps=4)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(B, C, L) -> (B, C, 1, L); 4-D passes through (views only)."""
    return t.unsqueeze(2) if t.ndim == 3 else t


def norm(
    y: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    spatial: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """GroupNorm over x (B, C, H, W) or (B, C, L), then SpatialNorm's scale and shift when
    ``spatial`` = (scale, shift, src_h, src_w) is given, then SiLU, written into y (x's shape,
    any layout). Returns y."""
    if x.numel() == 0:
        return y
    x4, y4 = _as_4d(x), _as_4d(y)
    B, C, H, W = x4.shape
    G, P = num_groups, H * W
    cfg = launch_config(B, G, C // G, P)
    S, per_prog, num_warps = cfg.pop("S"), cfg.pop("per_prog"), cfg.pop("num_warps")
    if B * G * S >= 2**31 or P >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large for one launch; split the batch")
    partials = torch.empty(B * G, S, 3, dtype=torch.float32, device=x.device)
    grid = (B * G, S)
    group_stats_kernel[grid](x4, partials, C, P, W, G, S, per_prog, *x4.stride(), CG=C // G, num_warps=num_warps, **cfg)
    affine = weight is not None or bias is not None
    if affine:  # F.group_norm allows either alone
        weight = weight if weight is not None else torch.ones(C, device=x.device, dtype=x.dtype)
        bias = bias if bias is not None else torch.zeros(C, device=x.device, dtype=x.dtype)
    if spatial is not None:
        scale, shift, src_h, src_w = spatial
        maps = dict(scale_ptr=scale, shift_ptr=shift, src_h_ptr=src_h, src_w_ptr=src_w, mb=scale.stride(0),
                    mc=scale.stride(1), mh=scale.stride(2), mw=scale.stride(3))
    else:
        maps = dict(scale_ptr=x4, shift_ptr=x4, src_h_ptr=x4, src_w_ptr=x4, mb=0, mc=0, mh=0, mw=0)
    group_apply_kernel[grid](
        x4, y4, partials, weight if affine else x4, bias if affine else x4,
        C=C, P=P, W=W, G=G, S=S, per_prog=per_prog, eps=eps,
        sb=x4.stride(0), sc=x4.stride(1), sh=x4.stride(2), sw=x4.stride(3),
        yb=y4.stride(0), yc=y4.stride(1), yh=y4.stride(2), yw=y4.stride(3), **maps,
        CG=C // G, BLOCK_S=min(1024, triton.next_power_of_2(S)), AFFINE=affine, SPATIAL=spatial is not None,
        SILU=silu, num_warps=num_warps, **cfg,
    )
    return y


def aot_cases() -> list[tuple[torch.dtype, int, int, int, bool, bool]]:
    """(dtype, B, C, G, H*W, spatial) inputs reaching every launch_config branch (group widths
    4, 24 and 64 channels; splits from 1 to many) and every pointer type."""
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases += [(dtype, 1, 128, 32, 256 * 256, False), (dtype, 8, 512, 32, 64 * 64, True)]
    cases += [(torch.float32, 1, 768, 32, 32 * 32, False), (torch.float32, 2, 64, 1, 33 * 31, True),
              (torch.float32, 3, 6, 2, 5 * 7, False)]
    return cases


def compile_spec(dtype: torch.dtype, B: int, C: int, G: int, P: int, spatial: bool):
    """[(kernel, signature, constexprs, num_warps)] for the two launches ``norm`` makes; pointers
    are given as the torch dtype they point to (kernels/aot.py turns them into Triton types)."""
    cfg = launch_config(B, G, C // G, P)
    num_warps = cfg.pop("num_warps")
    S = cfg.pop("S")
    cfg.pop("per_prog")
    ints = ("C", "P", "W", "G", "S", "per_prog")
    stats_sig = {"x_ptr": dtype, "part_ptr": torch.float32,
                 **{n: "i32" for n in ints + ("sb", "sc", "sh", "sw")}}
    apply_sig = {"x_ptr": dtype, "y_ptr": dtype, "part_ptr": torch.float32,
                 "w_ptr": dtype, "b_ptr": dtype, "scale_ptr": dtype,
                 "shift_ptr": dtype, "src_h_ptr": torch.int32, "src_w_ptr": torch.int32,
                 **{n: "i32" for n in ints}, "eps": "fp32",
                 **{n: "i32" for n in ("sb", "sc", "sh", "sw", "yb", "yc", "yh", "yw", "mb", "mc", "mh", "mw")}}
    apply_const = dict(CG=C // G, BLOCK_S=min(1024, triton.next_power_of_2(S)), AFFINE=True,
                       SPATIAL=spatial, SILU=True, **cfg)
    return [(group_stats_kernel, stats_sig, dict(CG=C // G, **cfg), num_warps),
            (group_apply_kernel, apply_sig, apply_const, num_warps)]


def aot_launches(arch: int) -> list[dict]:
    """The launches of aot_cases() for kernels/aot.py (NCHW-contiguous inputs)."""
    out = []
    for dtype, B, C, G, P, spatial in aot_cases():
        cfg = launch_config(B, G, C // G, P)
        numel, elt = B * C * P, torch.empty((), dtype=dtype).element_size()
        case = dict(dtype=dtype, layout="nchw", B=B, C=C, G=G, HW=P, spatial=spatial)
        for i, (kernel, signature, constexprs, num_warps) in enumerate(compile_spec(dtype, B, C, G, P, spatial)):
            out.append(dict(kernel=kernel, case=case, signature=signature, constexprs=constexprs, num_warps=num_warps,
                            divisible=tuple(n for n, t in signature.items() if isinstance(t, torch.dtype)),
                            items_per_iteration=cfg["BLOCK_P"] * cfg["BLOCK_C"],
                            inner_trips=triton.cdiv(C // G, cfg["BLOCK_C"]), items=numel,
                            bytes=numel * elt * (1 if i == 0 else 2)))
    return out


def budget(row: dict) -> dict | None:
    """Limits on the compiled hot loop (sm_90) for a static cost report row, or None where no
    budget applies (the generic strided path). Why: an fp16 norm at an H200's 4.3 TB/s may spend
    ~45 instructions per element over all passes, so stats (one read) gets 6, apply (a read and
    a write) 10 with SiLU and 14 with SpatialNorm's gathered scale and shift; and 64-bit or wider
    global accesses, as scalar ones cannot keep up with the bandwidth."""
    if row["arch"] != "sm_90" or row.get("layout") not in ("nchw", "channels_last"):
        return None
    if row["kernel"] == "group_stats":
        limit = 6
    else:
        limit = 14 if row["spatial"] else 10
    return dict(loop_instructions_per_item=limit, loop_shuffles=0, loop_barriers=0, min_global_bits=64)
