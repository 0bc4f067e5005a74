"""GroupNorm (+SiLU), and SpatialNorm's apply pass: a statistics pass, then an apply pass.

Statistics: grid (B * G, S). Each program takes 1/S of one group and writes its count, mean and
M2; the apply pass combines a group's S partials with Chan's formula (never E[x^2] - E[x]^2).
Splitting a group over S programs is what fills the GPU at batch 1 (a 32-group decoder layer at
256x256 has 32 groups of a million elements).

Three paths, chosen by the launcher (layout_path):
- "nchw", x and y contiguous: a group is one slab. slab_stats_kernel keeps a Welford (mean, M2)
  per register slot (one reciprocal per trip, no division or reduction per element) and reduces
  once per program; slab_apply_kernel runs one channel per program: one FMA per element, SiLU;
  slab_spatial_apply_kernel walks rows, gathering SpatialNorm's scale and shift.
- "channels_last": a group is CG contiguous channels at every pixel; pixel_*_kernel do the same
  over [pixels, CG] tiles.
SpatialNorm's apply kernels compute each row's and column's source under PyTorch's nearest rule
(no index loads) and gather its scale and shift as one int64 holding the fp32 pair
(spatial_pairs): one 64-bit load per element on NCHW, CG pairs in 128-bit runs on channels_last.
- "strided", any other view (sliced, misaligned, odd group width): group_stats_kernel and
  group_apply_kernel read x through its strides (64-bit offsets), exact but slower.
The vector paths pass sizes as multiples of constexprs so that the compiler can prove 16-byte
alignment: their global accesses are 128 bits (64 for 4-channel fp16 groups).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
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
def _group_moments(part_ptr, bg, S, eps, BLOCK_S: tl.constexpr):
    """Mean and 1 / sqrt(var + eps) of group bg from its S <= BLOCK_S partials (count, mean, M2):
    n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2 (Chan)."""
    base = part_ptr + bg.to(tl.int64) * S * 3
    j = tl.arange(0, BLOCK_S)
    ni = tl.load(base + j * 3, mask=j < S, other=0.0)
    mi = tl.load(base + j * 3 + 1, mask=j < S, other=0.0)
    total = tl.sum(ni)
    mean = tl.sum(ni * mi) / total
    di = mi - mean
    m2 = tl.sum(tl.load(base + j * 3 + 2, mask=j < S, other=0.0) + ni * di * di)
    return mean, 1.0 / tl.sqrt(m2 / total + eps)


@triton.jit
def _slot_step(mean, m2, x, inv):
    """Welford's update of per-slot (mean, M2) by one value per slot; inv = 1 / the slots' new
    count, the same for every slot of a full tile (a scalar, so no division per element)."""
    d = x - mean
    mean = mean + d * inv
    return mean, m2 + d * (x - mean)


@triton.jit
def _pair_step(mean, q, a, b, t):
    """Welford's update by two values per slot at once (Chan's combine of the pair (a, b) into
    slots holding 2t values each): 3.5 instructions per value instead of 4. q is twice M2; the
    pair's weight 1 / (t + 1) is one scalar reciprocal per trip."""
    inv = _rcp(t + 1.0)
    dd = a - b
    delta = (a + b) * 0.5 - mean
    mean = mean + delta * inv
    q = q + dd * dd
    return mean, q + (delta * (4.0 * t * inv)) * delta


@triton.jit
def _store_partial(part_ptr, bg, s, S, full, ok, x, mean, m2):
    """Add the partial last tile x (valid where ok) to the per-slot (mean, M2) of ``full`` full
    tiles, then combine the slots into the program's partial (count, mean, M2) by Chan's
    formula: the one reduction of a program."""
    cnt = full + ok.to(tl.float32)
    d = tl.where(ok, x - mean, 0.0)
    mean = mean + d / tl.maximum(cnt, 1.0)
    m2 = m2 + d * (x - mean)
    n = tl.sum(cnt)
    pmean = tl.sum(cnt * mean) / n
    d = mean - pmean
    pm2 = tl.sum(m2 + cnt * d * d)
    out = part_ptr + (bg * S + s).to(tl.int64) * 3
    tl.store(out, n)
    tl.store(out + 1, pmean)
    tl.store(out + 2, pm2)


#: On a GPU, reciprocals are one MUFU.RCP (rcp.approx.ftz: 1 ulp) instead of a division with
#: range fixups; the interpreter cannot run inline PTX and divides.
_PTX: tl.constexpr = tl.constexpr(not INTERPRETED)


@triton.jit
def _rcp(x):
    """1 / x, approximate to 1 ulp (flushing denormals)."""
    if _PTX:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = 1.0 / x
    return r


@triton.jit
def _f32(x):
    """x in fp32. bf16 pairs unpack at one instruction per value (the low half shifted up, the
    high half masked) where the compiler's conversion spends 1.5 (a byte permute, then a shift)."""
    if _PTX and x.dtype == tl.bfloat16:
        r = tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=2)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def _silu(y, HALF: tl.constexpr):
    """y * sigmoid(y). fp32 output: y / (1 + 2^(-y log2 e)) with the hardware's exp2 and
    reciprocal (a few ulp; below -88 it gives -0.0, the limit). fp16/bf16 output (HALF): h + h *
    tanh(h), h = y / 2, with the hardware's tanh (error about 2^-11 of y, under an fp16 ulp of
    the result); three instructions instead of five."""
    if _PTX and HALF:
        h = y * 0.5
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32,
                                      is_pure=True, pack=1)
        r = h + h * t
    else:
        r = y * _rcp(1.0 + tl.exp2(y * -1.4426950408889634))
    return r


@triton.jit
def slab_stats_kernel(
    x_ptr, part_ptr,  # x contiguous NCHW: group bg is the slab of CG * P elements from bg * CG * P
    PV, S, per_blocks,  # positions H * W / VEC, splits per group, slab elements per program / BLOCK
    CG: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    """Partial statistics of 1/S of a group's slab: one value per slot per trip, Welford per slot
    (no reduction and no division per element), one reduction per program."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    # Sizes passed as multiples of constexprs, so the compiler knows every run starts 16-byte
    # aligned (the launcher guarantees H * W * itemsize % 16 == 0 and aligned pointers).
    P = PV * VEC
    per_prog = per_blocks * BLOCK
    start = s * per_prog
    length = tl.minimum(per_prog, CG * P - start)
    offs = tl.arange(0, BLOCK)
    # offsets from the trip number (not a pointer carried through the loop), so that the
    # compiler sees contiguous, aligned runs and issues vector loads
    base = x_ptr + bg.to(tl.int64) * (CG * P) + start
    mean = tl.zeros([BLOCK], tl.float32)
    m2 = tl.zeros([BLOCK], tl.float32)
    full = length // BLOCK
    for t in range(full // 2):
        a = _f32(tl.load(base + (2 * t) * BLOCK + offs))
        b = _f32(tl.load(base + (2 * t + 1) * BLOCK + offs))
        mean, m2 = _pair_step(mean, m2, a, b, t)
    m2 = m2 * 0.5
    if full % 2 == 1:
        mean, m2 = _slot_step(mean, m2, _f32(tl.load(base + (full - 1) * BLOCK + offs)), _rcp(full + 0.0))
    ok = offs < length - full * BLOCK
    x = tl.load(base + full * BLOCK + offs, mask=ok, other=0.0).to(tl.float32)
    _store_partial(part_ptr, bg, s, S, full, ok, x, mean, m2)


@triton.jit
def pixel_stats_kernel(
    x_ptr, part_ptr,  # x channels_last: group g is CG contiguous channels at every pixel
    P, G, S, per_blocks,  # positions H * W, groups, splits, pixels per program / BLOCK_P
    CG: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """As slab_stats_kernel, over [BLOCK_P pixels, CG channels] tiles of a channels_last x."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    C = G * CG  # a multiple of CG, as the compiler then knows: CG-wide aligned vectors
    per_prog = per_blocks * BLOCK_P
    start = s * per_prog
    length = tl.minimum(per_prog, P - start)
    pix = tl.arange(0, BLOCK_P)
    ch = tl.arange(0, CG)
    bb = (bg // G).to(tl.int64)
    c0 = (bg % G) * CG
    base = x_ptr + bb * P * C + start.to(tl.int64) * C + c0
    tile = pix[:, None] * C + ch[None, :]  # 32-bit inside a tile: BLOCK_P * C < 2^31
    mean = tl.zeros([BLOCK_P, CG], tl.float32)
    m2 = tl.zeros([BLOCK_P, CG], tl.float32)
    full = length // BLOCK_P
    for t in range(full // 2):
        a = _f32(tl.load(base + (2 * t) * (BLOCK_P * C) + tile))  # < P * C < 2^31
        b = _f32(tl.load(base + (2 * t + 1) * (BLOCK_P * C) + tile))
        mean, m2 = _pair_step(mean, m2, a, b, t)
    m2 = m2 * 0.5
    if full % 2 == 1:
        x = _f32(tl.load(base + (full - 1) * (BLOCK_P * C) + tile))
        mean, m2 = _slot_step(mean, m2, x, _rcp(full + 0.0))
    ok = (pix < length - full * BLOCK_P)[:, None] & (ch < CG)[None, :]
    x = tl.load(base + full * (BLOCK_P * C) + tile, mask=ok, other=0.0).to(tl.float32)
    _store_partial(part_ptr, bg, s, S, full, ok, x, mean, m2)


@triton.jit
def slab_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr,  # x, y contiguous NCHW
    C, PV, G, S, per_blocks, eps,  # H * W / VEC; positions of one channel per program / BLOCK
    CG: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    AFFINE: tl.constexpr, SILU: tl.constexpr,
):
    """Grid (B * C, splits of H * W): one channel's contiguous run per program, so its scale and
    shift (rstd * w, b - mean * rstd * w) are two scalars and every element one FMA."""
    bc = tl.program_id(0)
    s = tl.program_id(1)
    P = PV * VEC  # see slab_stats_kernel
    per_prog = per_blocks * BLOCK
    c = bc % C
    mean, rstd = _group_moments(part_ptr, (bc // C) * G + c // CG, S, eps, BLOCK_S)
    a = rstd
    shift = -mean * rstd
    if AFFINE:
        wc = tl.load(w_ptr + c).to(tl.float32)
        a = rstd * wc
        shift = tl.load(b_ptr + c).to(tl.float32) - mean * a
    start = s * per_prog
    length = tl.minimum(per_prog, P - start)
    offs = tl.arange(0, BLOCK)
    base = bc.to(tl.int64) * P + start
    xp = x_ptr + base
    yp = y_ptr + base
    full = length // BLOCK
    for t in range(full):
        y = tl.load(xp + t * BLOCK + offs).to(tl.float32) * a + shift
        if SILU:
            y = _silu(y, y_ptr.dtype.element_ty != tl.float32)
        tl.store(yp + t * BLOCK + offs, y.to(y_ptr.dtype.element_ty))
    ok = offs < length - full * BLOCK
    y = tl.load(xp + full * BLOCK + offs, mask=ok, other=0.0).to(tl.float32) * a + shift
    if SILU:
        y = _silu(y, y_ptr.dtype.element_ty != tl.float32)
    tl.store(yp + full * BLOCK + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _group_channels(part_ptr, w_ptr, b_ptr, bg, G, S, eps, CG: tl.constexpr, BLOCK_S: tl.constexpr,
                    AFFINE: tl.constexpr):
    """For group bg of a channels_last apply: its batch index (64-bit), first channel, channel
    offsets [CG], and per channel the scale rstd w and shift b - mean rstd w of y = x a + shift."""
    mean, rstd = _group_moments(part_ptr, bg, S, eps, BLOCK_S)
    c0 = (bg % G) * CG
    ch = tl.arange(0, CG)
    a = tl.zeros([CG], tl.float32) + rstd
    shift = tl.zeros([CG], tl.float32) - mean * rstd
    if AFFINE:
        a = rstd * tl.load(w_ptr + c0 + ch).to(tl.float32)
        shift = tl.load(b_ptr + c0 + ch).to(tl.float32) - mean * a
    return (bg // G).to(tl.int64), c0, ch, a, shift


@triton.jit
def _nearest(dst, ratio, n_src):
    """Source index of output positions dst (fp32, exact integers below 2^24) under
    F.interpolate(mode="nearest"), PyTorch's own arithmetic: min(floor(dst * ratio), n_src - 1)
    in fp32, ratio = fp32(n_src) / n_dst. Computed, not loaded: no index table in the hot loop."""
    return tl.minimum(tl.floor(dst * ratio).to(tl.int32), n_src - 1)


@triton.jit
def _unpair(v):
    """SpatialNorm's (scale, shift) from one int64 holding the fp32 pair (scale in the low half):
    one 64-bit gather per element instead of two scalar ones."""
    return v.to(tl.int32).to(tl.float32, bitcast=True), (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _spatial_tile(xs, ys, pairs, m, a, shift0, SILU: tl.constexpr):
    """y = (x a + shift0) scale + shift (+ SiLU) on one tile; the pairs' pointers are always in
    bounds (clamped source indices), x and y masked by m (None on full tiles)."""
    scale, shift = _unpair(tl.load(pairs))
    y = (tl.load(xs, mask=m).to(tl.float32) * a + shift0) * scale + shift
    if SILU:
        y = _silu(y, ys.dtype.element_ty != tl.float32)
    tl.store(ys, y.to(ys.dtype.element_ty), mask=m)


@triton.jit
def _tile(rows, cols, COLS_FIRST: tl.constexpr):
    """The [ROWS, BLOCK_W] tile rows[:, None] + cols[None, :], stored column-major when
    COLS_FIRST (then [BLOCK_W, ROWS]): see GATHER_COLS_FIRST."""
    if COLS_FIRST:
        tile = rows[None, :] + cols[:, None]
    else:
        tile = rows[:, None] + cols[None, :]
    return tile


@triton.jit
def slab_spatial_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr, pair_ptr,  # x, y contiguous NCHW; pairs (B, C, h, w) int64
    C, H, WV, G, S, rows_per_prog, eps,  # WV = W / VEC
    h, w, ratio_h, ratio_w,  # the maps' size; fp32(h) / H and fp32(w) / W (the nearest rule)
    CG: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    EVEN_W: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr,  # EVEN_W: W == BLOCK_W
    EVEN_H: tl.constexpr, COLS_FIRST: tl.constexpr,  # EVEN_H: every trip is ROWS whole rows
):
    """SpatialNorm's apply for a contiguous NCHW f: grid (B * C, splits of H), a program walks its
    rows of one channel, ROWS rows of W <= BLOCK_W per trip. The source columns are computed once
    per program, the source rows once per trip; per element, one 64-bit gather of the (scale,
    shift) pair from the latent-resolution map."""
    bc = tl.program_id(0)
    s = tl.program_id(1)
    W = WV * VEC  # a multiple of VEC: rows start 16-byte aligned
    c = bc % C
    mean, rstd = _group_moments(part_ptr, (bc // C) * G + c // CG, S, eps, BLOCK_S)
    a = rstd
    shift0 = -mean * rstd
    if AFFINE:
        a = rstd * tl.load(w_ptr + c).to(tl.float32)
        shift0 = tl.load(b_ptr + c).to(tl.float32) - mean * a
    col = tl.arange(0, BLOCK_W)
    r = tl.arange(0, ROWS)
    off = _tile(r * W, col, COLS_FIRST)
    src_col = _nearest(col.to(tl.float32), ratio_w, w)
    mp = pair_ptr + bc.to(tl.int64) * (h * w)
    h0 = s * rows_per_prog
    n_rows = tl.minimum(rows_per_prog, H - h0)
    base = bc.to(tl.int64) * H * W + h0 * W
    xp = x_ptr + base
    yp = y_ptr + base
    col_ok = _tile(r * 0, col, COLS_FIRST) < W
    full = n_rows // ROWS
    rows = (r + h0).to(tl.float32)  # fp32, carried: one add per row and trip
    for t in range(full):
        # a pointer per source row, then a 64-bit add per element to reach the column
        pairs = _tile(mp + _nearest(rows, ratio_h, h) * w, src_col, COLS_FIRST)
        if EVEN_W:  # every column is real: no mask
            _spatial_tile(xp + t * (ROWS * W) + off, yp + t * (ROWS * W) + off, pairs, None, a, shift0, SILU)
        else:
            _spatial_tile(xp + t * (ROWS * W) + off, yp + t * (ROWS * W) + off, pairs, col_ok, a, shift0, SILU)
        rows += ROWS
    if not EVEN_H:  # a last, partial trip (its code after the loop costs the loop ~1 instruction per element)
        pairs = _tile(mp + _nearest(rows, ratio_h, h) * w, src_col, COLS_FIRST)
        ok = col_ok & (_tile(r, col * 0, COLS_FIRST) < n_rows - full * ROWS)
        _spatial_tile(xp + full * (ROWS * W) + off, yp + full * (ROWS * W) + off, pairs, ok, a, shift0, SILU)


@triton.jit
def pixel_spatial_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr, pair_ptr,  # x, y channels_last; pairs (B, h, w, C) int64
    H, W, G, S, rows_per_prog, eps,
    h, w, ratio_h, ratio_w,  # as slab_spatial_apply_kernel
    CG: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
    EVEN_W: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr,
):
    """SpatialNorm's apply for a channels_last f: grid (B * G, splits of H), [ROWS x BLOCK_W
    pixels, CG channels] tiles, the group's CG pairs gathered per pixel as contiguous vectors."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    C = G * CG  # see pixel_stats_kernel
    bb, c0, ch, a, shift0 = _group_channels(part_ptr, w_ptr, b_ptr, bg, G, S, eps, CG, BLOCK_S, AFFINE)
    q = tl.arange(0, ROWS * BLOCK_W)
    r = q // BLOCK_W  # powers of two: shifts and masks, once per program
    col = q % BLOCK_W
    off = (r * W + col)[:, None] * C + ch[None, :]  # 32-bit inside an image: P * C < 2^31
    src_col = _nearest(col.to(tl.float32), ratio_w, w)
    mp = pair_ptr + bb * h * w * C + c0
    h0 = s * rows_per_prog
    n_rows = tl.minimum(rows_per_prog, H - h0)
    base = bb * H * W * C + h0.to(tl.int64) * W * C + c0
    xp = x_ptr + base
    yp = y_ptr + base
    col_ok = (col < W)[:, None] & (ch < CG)[None, :]
    full = n_rows // ROWS
    rows = (r + h0).to(tl.float32)
    for t in range(full):
        pairs = mp + ((_nearest(rows, ratio_h, h) * w + src_col) * C)[:, None] + ch[None, :]
        step = t * (ROWS * W * C)
        if EVEN_W:
            _spatial_tile(xp + step + off, yp + step + off, pairs, None, a[None, :], shift0[None, :], SILU)
        else:
            _spatial_tile(xp + step + off, yp + step + off, pairs, col_ok, a[None, :], shift0[None, :], SILU)
        rows += ROWS
    pairs = mp + ((_nearest(rows, ratio_h, h) * w + src_col) * C)[:, None] + ch[None, :]
    ok = col_ok & (r < n_rows - full * ROWS)[:, None]
    step = full * (ROWS * W * C)
    _spatial_tile(xp + step + off, yp + step + off, pairs, ok, a[None, :], shift0[None, :], SILU)


@triton.jit
def pixel_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr,  # x, y channels_last
    P, G, S, per_blocks, eps,  # per_blocks: pixels per program / BLOCK_P
    CG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    AFFINE: tl.constexpr, SILU: tl.constexpr,
):
    """Grid (B * G, splits of H * W): [BLOCK_P pixels, CG channels] tiles, the group's CG scales
    and shifts loaded once per program."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    C = G * CG  # see pixel_stats_kernel
    per_prog = per_blocks * BLOCK_P
    bb, c0, ch, a, shift = _group_channels(part_ptr, w_ptr, b_ptr, bg, G, S, eps, CG, BLOCK_S, AFFINE)
    start = s * per_prog
    length = tl.minimum(per_prog, P - start)
    pix = tl.arange(0, BLOCK_P)
    off = bb * P * C + start.to(tl.int64) * C + c0
    xp = x_ptr + off
    yp = y_ptr + off
    tile = pix[:, None] * C + ch[None, :]  # 32-bit inside a tile: BLOCK_P * C < 2^31
    full = length // BLOCK_P
    for t in range(full):
        step = t * (BLOCK_P * C)  # < P * C < 2^31 (the launcher's guard)
        y = tl.load(xp + step + tile).to(tl.float32) * a[None, :] + shift[None, :]
        if SILU:
            y = _silu(y, y_ptr.dtype.element_ty != tl.float32)
        tl.store(yp + step + tile, y.to(y_ptr.dtype.element_ty))
    ok = (pix < length - full * BLOCK_P)[:, None] & (ch < CG)[None, :]
    step = full * (BLOCK_P * C)
    y = tl.load(xp + step + tile, mask=ok, other=0.0).to(tl.float32) * a[None, :] + shift[None, :]
    if SILU:
        y = _silu(y, y_ptr.dtype.element_ty != tl.float32)
    tl.store(yp + step + tile, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def group_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr,
    scale_ptr, shift_ptr, src_h_ptr, src_w_ptr,  # SpatialNorm only: (B, C, h, w) maps, nearest index maps
    C, P, W, G, SP, per_prog, eps,  # SP: partials per group (the stats pass's splits)
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

    mean, rstd = _group_moments(part_ptr, bg, SP, eps, BLOCK_S)

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
#: Elements per tile of the layout-specialised kernels: 16 per thread at 4 warps (the stats
#: pass reads two tiles per trip); two to four 128-bit accesses per thread and tile, so a
#: trip's fixed cost is spread thin.
BLOCK_STATS = 2048
BLOCK = 2048
NUM_WARPS = 4


def _splits(items: int, block: int, others: int) -> tuple[int, int]:
    """(programs, items per program) splitting ``items`` in whole blocks so that others x programs
    is near TARGET_PROGRAMS, with at least one block per program."""
    tiles = triton.cdiv(items, block)
    splits = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, others)))
    per_prog = triton.cdiv(tiles, splits) * block
    return triton.cdiv(items, per_prog), per_prog


def launch_config(B: int, G: int, CG: int, P: int) -> dict:
    """The generic (strided) path's tiles and splits, fixed by shape (deterministic). BLOCK_C
    covers a group's channels up to 32 at a time; BLOCK_P keeps a tile near 1024 elements (larger
    tiles spill in the SpatialNorm gather); S splits each group so that B * G * S is near
    TARGET_PROGRAMS, with at least one tile per program."""
    block_c = min(32, triton.next_power_of_2(CG))
    block_p = max(16, min(1024, 1024 // block_c, triton.next_power_of_2(P)))
    splits, per_prog = _splits(P, block_p, B * G)
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, S=splits, per_prog=per_prog, num_warps=4)


def path_for(layout: str, G: int, CG: int, P: int, itemsize: int) -> str:
    """Which kernels run for an aligned x and y of this layout: "nchw" (contiguous: a group is one
    slab), "channels_last" (a group is CG contiguous channels at every pixel) or "strided" (any
    other view). SpatialNorm's apply takes the path's own kernel where spatial_config allows it,
    else the strided one. The specialised paths need rows that keep the vectors aligned (H * W * itemsize a multiple of 16 for nchw; for channels_last CG a power of two of at least
    8 bytes, and an image of fewer than 2^31 elements: 32-bit offsets), so that their global
    accesses are 64 or 128 bits wide."""
    if layout == "nchw" and P * itemsize % 16 == 0:
        return "nchw"
    if layout == "channels_last" and CG & (CG - 1) == 0 and 8 <= CG * itemsize and CG <= 256 and P * CG * G < 2**31:
        return "channels_last"
    return "strided"


def layout_path(x4: torch.Tensor, y4: torch.Tensor, CG: int) -> str:
    """path_for x and y, guarded: both must be in the same layout and 16-byte aligned (a
    misaligned view takes the strided path)."""
    if x4.data_ptr() % 16 or y4.data_ptr() % 16:
        return "strided"
    if x4.is_contiguous() and y4.is_contiguous():
        layout = "nchw"
    elif x4.is_contiguous(memory_format=torch.channels_last) and y4.is_contiguous(memory_format=torch.channels_last):
        layout = "channels_last"
    else:
        return "strided"
    return path_for(layout, x4.shape[1] // CG, CG, x4.shape[2] * x4.shape[3], x4.element_size())


def specialised_config(path: str, B: int, C: int, G: int, P: int, elt: int) -> dict:
    """Splits and tiles of the nchw / channels_last kernels: (stats grid, stats constexprs and
    per_prog, apply grid, apply constexprs and per_prog)."""
    CG = C // G
    if path == "nchw":
        s_stats, per_stats = _splits(CG * P, BLOCK_STATS, B * G)
        s_apply, per_apply = _splits(P, BLOCK, B * C)
        return dict(stats_grid=(B * G, s_stats), stats_per=per_stats,
                    stats_const=dict(CG=CG, BLOCK=BLOCK_STATS, VEC=16 // elt),
                    apply_grid=(B * C, s_apply), apply_per=per_apply,
                    apply_const=dict(CG=CG, BLOCK=BLOCK, VEC=16 // elt, BLOCK_S=triton.next_power_of_2(s_stats)))
    block_p = max(1, BLOCK_STATS // CG)
    s, per = _splits(P, block_p, B * G)
    block_pa = max(1, BLOCK // CG)
    s_apply, per_apply = _splits(P, block_pa, B * G)
    return dict(stats_grid=(B * G, s), stats_per=per, stats_const=dict(CG=CG, BLOCK_P=block_p),
                apply_grid=(B * G, s_apply), apply_per=per_apply,
                apply_const=dict(CG=CG, BLOCK_P=block_pa, BLOCK_S=triton.next_power_of_2(s)))


#: Elements of one SpatialNorm apply tile at most (a row of W pixels, times CG channels for
#: channels_last): 32 per thread at 4 warps, beyond which registers run out. Wider rows take
#: the strided kernel.
MAX_SPATIAL_TILE = 4096
# The NCHW SpatialNorm tile's axis order. Its pairs are gathered (no contiguity on either axis),
# and triton's coalescing breaks that tie toward dim 0 before 3.7 and toward the last dim since.
# The x tile must agree with it, else every trip converts the pairs' layout through shared
# memory (4-8 barriers, 15+ instructions per element on 3.6). So before 3.7 the tile is stored
# [BLOCK_W, ROWS], columns on dim 0, where x is contiguous: one layout, 0 barriers on both.
GATHER_COLS_FIRST = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)


def spatial_config(path: str, B: int, C: int, G: int, H: int, W: int, itemsize: int) -> dict | None:
    """Grid and tiles of the SpatialNorm apply kernel of a path (slab_spatial_apply_kernel, a
    program per channel, for "nchw"; pixel_spatial_apply_kernel, a program per group, for
    "channels_last"): whole rows of W <= BLOCK_W pixels, ROWS of them per trip, split over H.
    None where it does not apply (NCHW rows that would not start 16-byte aligned; a row tile
    over MAX_SPATIAL_TILE elements)."""
    block_w = triton.next_power_of_2(W)
    per_row = block_w * (C // G if path == "channels_last" else 1)
    if per_row > MAX_SPATIAL_TILE or (path == "nchw" and W * itemsize % 16):
        return None
    rows = max(1, BLOCK // per_row)
    programs = B * (G if path == "channels_last" else C)
    splits, per_prog = _splits(H, rows, programs)
    const = dict(ROWS=rows, BLOCK_W=block_w, EVEN_W=block_w == W)
    if path == "nchw":
        # programs take whole trips (_splits), so H % rows == 0 leaves no partial one
        const.update(VEC=16 // itemsize, EVEN_H=H % rows == 0, COLS_FIRST=GATHER_COLS_FIRST)
    return dict(grid=(programs, splits), rows_per_prog=per_prog, const=const)


def nearest_source(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """Source index of each of n_out positions under F.interpolate(mode="nearest") from n_in:
    derived from PyTorch itself, so the strided kernel gathers exactly what diffusers' upsample
    picks."""
    src = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in)
    return F.interpolate(src, size=n_out, mode="nearest").view(n_out).to(torch.int32)


def nearest_ratio(n_in: int, n_out: int) -> float:
    """PyTorch's nearest-resize scale, fp32(n_in) / n_out rounded to fp32, which the vector
    kernels multiply output positions by (_nearest)."""
    return float(np.float32(n_in) / np.float32(n_out))  # host arithmetic: no tensor op per launch


def spatial_pairs(scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """SpatialNorm's maps as one int64 tensor whose elements are fp32 (scale, shift) pairs: (B, C,
    h, w) contiguous for an NCHW f (a channel's map is one run), (B, h, w, C) for a channels_last
    f (a group's pairs at a pixel are one run). When scale and shift already are the two halves of
    such pairs (what the model's spatial_maps makes) this is a view; else they are copied
    (latent-resolution sized)."""
    dims = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)  # the pairs' memory order
    shape = [scale.shape[d] for d in dims] + [2]
    dense = torch.empty(shape, device="meta").stride()
    want = tuple(dense[dims.index(d)] for d in range(4))
    if (scale.dtype == shift.dtype == torch.float32 and scale.stride() == want == shift.stride()
            and shift.untyped_storage().data_ptr() == scale.untyped_storage().data_ptr()
            and shift.storage_offset() == scale.storage_offset() + 1 and scale.data_ptr() % 8 == 0):
        pairs = scale.as_strided(shape, dense)
    else:
        pairs = torch.empty(shape, dtype=torch.float32, device=scale.device)
        pairs[..., 0].copy_(scale.permute(dims))
        pairs[..., 1].copy_(shift.permute(dims))
    return pairs.view(torch.int64).squeeze(-1)


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
    spatial: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """GroupNorm over x (B, C, H, W) or (B, C, L), then SpatialNorm's scale and shift when
    ``spatial`` = (scale, shift), (B, C, h, w) maps resized to (H, W) by PyTorch's nearest rule,
    is given, then SiLU, written into y (x's shape, any layout). Returns y."""
    if x.numel() == 0:
        return y
    x4, y4 = _as_4d(x), _as_4d(y)
    B, C, H, W = x4.shape
    G, P = num_groups, H * W
    CG = C // G
    # Offsets inside a group and program counts are 32-bit; offsets across groups are 64-bit.
    if CG * P >= 2**31 or B * C >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} holds {CG * P} elements per group and {B * C} (batch, channel) "
                         "pairs; the Triton kernels take fewer than 2^31 of each per launch: split the batch or the image")
    affine = weight is not None or bias is not None
    if affine:  # F.group_norm allows either alone
        weight = weight if weight is not None else torch.ones(C, device=x.device, dtype=x.dtype)
        bias = bias if bias is not None else torch.zeros(C, device=x.device, dtype=x.dtype)
    path = layout_path(x4, y4, CG)
    wb = (weight, bias) if affine else (x4, x4)
    if path != "strided":
        cfg = specialised_config(path, B, C, G, P, x.element_size())
        SP = cfg["stats_grid"][1]
        partials = torch.empty(B * G, SP, 3, dtype=torch.float32, device=x.device)
        sc, ac = cfg["stats_const"], cfg["apply_const"]
        if path == "nchw":
            PV = P // sc["VEC"]
            slab_stats_kernel[cfg["stats_grid"]](x4, partials, PV, SP, cfg["stats_per"] // sc["BLOCK"], num_warps=NUM_WARPS, **sc)
            if spatial is not None and _spatial_apply(path, x4, y4, partials, wb, spatial, G, eps, affine, silu):
                return y
            if spatial is None:
                slab_apply_kernel[cfg["apply_grid"]](x4, y4, partials, *wb, C, PV, G, SP, cfg["apply_per"] // BLOCK, eps,
                                                     AFFINE=affine, SILU=silu, num_warps=NUM_WARPS, **ac)
                return y
        else:
            pixel_stats_kernel[cfg["stats_grid"]](x4, partials, P, G, SP, cfg["stats_per"] // sc["BLOCK_P"],
                                                  num_warps=NUM_WARPS, **sc)
            if spatial is not None and _spatial_apply(path, x4, y4, partials, wb, spatial, G, eps, affine, silu):
                return y
            if spatial is None:
                pixel_apply_kernel[cfg["apply_grid"]](x4, y4, partials, *wb, P, G, SP, cfg["apply_per"] // ac["BLOCK_P"],
                                                      eps, AFFINE=affine, SILU=silu, num_warps=NUM_WARPS, **ac)
                return y
    cfg = launch_config(B, G, CG, P)
    S, per_prog, num_warps = cfg.pop("S"), cfg.pop("per_prog"), cfg.pop("num_warps")
    if path == "strided":
        SP = S
        partials = torch.empty(B * G, SP, 3, dtype=torch.float32, device=x.device)
        group_stats_kernel[(B * G, S)](x4, partials, C, P, W, G, S, per_prog, *x4.stride(), CG=CG, num_warps=num_warps, **cfg)
    if spatial is not None:
        scale, shift = spatial
        src_h, src_w = nearest_source(H, scale.shape[2], x.device), nearest_source(W, scale.shape[3], x.device)
        maps = dict(scale_ptr=scale, shift_ptr=shift, src_h_ptr=src_h, src_w_ptr=src_w, mb=scale.stride(0),
                    mc=scale.stride(1), mh=scale.stride(2), mw=scale.stride(3))
    else:
        maps = dict(scale_ptr=x4, shift_ptr=x4, src_h_ptr=x4, src_w_ptr=x4, mb=0, mc=0, mh=0, mw=0)
    group_apply_kernel[(B * G, S)](
        x4, y4, partials, *wb,
        C=C, P=P, W=W, G=G, SP=SP, per_prog=per_prog, eps=eps,
        sb=x4.stride(0), sc=x4.stride(1), sh=x4.stride(2), sw=x4.stride(3),
        yb=y4.stride(0), yc=y4.stride(1), yh=y4.stride(2), yw=y4.stride(3), **maps,
        CG=CG, BLOCK_S=triton.next_power_of_2(SP), AFFINE=affine, SPATIAL=spatial is not None,
        SILU=silu, num_warps=num_warps, **cfg,
    )
    return y


def _spatial_apply(path: str, x4, y4, partials, wb, spatial, G: int, eps: float, affine: bool, silu: bool) -> bool:
    """SpatialNorm's apply pass on a vector path (nchw or channels_last), or False where its
    kernel does not apply (spatial_config)."""
    B, C, H, W = x4.shape
    scale, _ = spatial
    h, w = scale.shape[2:]
    cfg = spatial_config(path, B, C, G, H, W, x4.element_size())
    if cfg is None:
        return False
    pairs = spatial_pairs(*spatial, channels_last=path == "channels_last")
    SP = partials.shape[1]
    common = dict(CG=C // G, BLOCK_S=triton.next_power_of_2(SP), AFFINE=affine, SILU=silu, num_warps=NUM_WARPS, **cfg["const"])
    sizes = (h, w, nearest_ratio(h, H), nearest_ratio(w, W))
    if path == "nchw":
        slab_spatial_apply_kernel[cfg["grid"]](x4, y4, partials, *wb, pairs, C, H, W // cfg["const"]["VEC"], G, SP,
                                               cfg["rows_per_prog"], eps, *sizes, **common)
    else:
        pixel_spatial_apply_kernel[cfg["grid"]](x4, y4, partials, *wb, pairs, H, W, G, SP, cfg["rows_per_prog"], eps,
                                                *sizes, **common)
    return True


def aot_cases() -> list[tuple[torch.dtype, str, int, int, int, int, bool]]:
    """(dtype, layout, B, C, G, H*W, spatial) inputs reaching every path and launch_config branch
    (group widths 2 to 64 channels; splits from 1 to many) and every pointer type. "strided" is
    a sliced view; SpatialNorm takes the strided kernels in every layout."""
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in ("nchw", "channels_last"):
            cases += [(dtype, layout, 1, 128, 32, 256 * 256, False), (dtype, layout, 8, 512, 32, 64 * 64, True)]
        cases += [(dtype, "strided", 1, 128, 32, 256 * 256, False)]
    cases += [(torch.float16, "channels_last", 1, 512, 32, 128 * 128, False),
              (torch.float32, "nchw", 1, 768, 32, 32 * 32, False), (torch.float32, "channels_last", 1, 768, 32, 32 * 32, False),
              (torch.float32, "nchw", 2, 64, 1, 33 * 32, False), (torch.float32, "channels_last", 2, 64, 32, 33 * 31, False),
              (torch.float32, "strided", 2, 64, 1, 33 * 31, True), (torch.float32, "strided", 3, 6, 2, 5 * 7, False)]
    return cases


def compile_spec(dtype: torch.dtype, layout: str, B: int, C: int, G: int, P: int, spatial: bool):
    """[(kernel, signature, constexprs, num_warps, items per hot-loop trip, inner trips, divisible)]
    for the two launches ``norm`` makes on an x of this layout (aligned, as layout_path requires
    for the specialised paths); pointers are given as the torch dtype they point to."""
    CG = C // G
    elt = torch.empty((), dtype=dtype).element_size()
    path = path_for(layout, G, CG, P, elt)
    ptrs = lambda sig: tuple(n for n, t in sig.items() if isinstance(t, torch.dtype))
    flags = dict(AFFINE=True, SILU=True)
    wb = {"x_ptr": dtype, "y_ptr": dtype, "part_ptr": torch.float32, "w_ptr": dtype, "b_ptr": dtype}
    launches = []
    if path != "strided":
        cfg = specialised_config(path, B, C, G, P, elt)
        SP = cfg["stats_grid"][1]
        if path == "nchw":
            stats_sig = {"x_ptr": dtype, "part_ptr": torch.float32, **{n: "i32" for n in ("PV", "S", "per_blocks")}}
            apply_sig = {**wb, **{n: "i32" for n in ("C", "PV", "G", "S", "per_blocks")}, "eps": "fp32"}
            launches += [(slab_stats_kernel, stats_sig, cfg["stats_const"], NUM_WARPS, 2 * BLOCK_STATS, None, ptrs(stats_sig)),
                         (slab_apply_kernel, apply_sig, {**cfg["apply_const"], **flags}, NUM_WARPS, BLOCK, None,
                          ptrs(apply_sig))]
        else:
            stats_sig = {"x_ptr": dtype, "part_ptr": torch.float32, **{n: "i32" for n in ("P", "G", "S", "per_blocks")}}
            apply_sig = {**wb, **{n: "i32" for n in ("P", "G", "S", "per_blocks")}, "eps": "fp32"}
            launches += [(pixel_stats_kernel, stats_sig, cfg["stats_const"], NUM_WARPS,
                          2 * cfg["stats_const"]["BLOCK_P"] * CG, None, ptrs(stats_sig)),
                         (pixel_apply_kernel, apply_sig, {**cfg["apply_const"], **flags}, NUM_WARPS,
                          cfg["apply_const"]["BLOCK_P"] * CG, None, ptrs(apply_sig))]
        if not spatial:
            return launches
        launches = launches[:1]
        W = math.isqrt(P)  # the aot cases' SpatialNorm images are square
        sp_cfg = spatial_config(path, B, C, G, P // W, W, elt)
        if sp_cfg is not None:
            sig = {**wb, "pair_ptr": torch.int64}
            if path == "nchw":
                kernel, sizes = slab_spatial_apply_kernel, ("C", "H", "WV", "G", "S", "rows_per_prog")
            else:
                kernel, sizes = pixel_spatial_apply_kernel, ("H", "W", "G", "S", "rows_per_prog")
            sig.update({n: "i32" for n in sizes}, eps="fp32", h="i32", w="i32", ratio_h="fp32", ratio_w="fp32")
            const = dict(CG=CG, BLOCK_S=triton.next_power_of_2(SP), **sp_cfg["const"], **flags)
            per_trip = sp_cfg["const"]["ROWS"] * W * (CG if path == "channels_last" else 1)
            return launches + [(kernel, sig, const, NUM_WARPS, per_trip, None, ptrs(sig))]
    cfg = launch_config(B, G, CG, P)
    num_warps = cfg.pop("num_warps")
    S = cfg.pop("S")
    cfg.pop("per_prog")
    tile, trips = cfg["BLOCK_P"] * cfg["BLOCK_C"], triton.cdiv(CG, cfg["BLOCK_C"])
    if path == "strided":
        SP = S
        stats_sig = {"x_ptr": dtype, "part_ptr": torch.float32,
                     **{n: "i32" for n in ("C", "P", "W", "G", "S", "per_prog", "sb", "sc", "sh", "sw")}}
        # a strided view may sit anywhere: no alignment assumed
        launches.append((group_stats_kernel, stats_sig, dict(CG=CG, **cfg), num_warps, tile, trips, ()))
    apply_sig = {"x_ptr": dtype, "y_ptr": dtype, "part_ptr": torch.float32,
                 "w_ptr": dtype, "b_ptr": dtype, "scale_ptr": dtype,
                 "shift_ptr": dtype, "src_h_ptr": torch.int32, "src_w_ptr": torch.int32,
                 **{n: "i32" for n in ("C", "P", "W", "G", "SP", "per_prog")}, "eps": "fp32",
                 **{n: "i32" for n in ("sb", "sc", "sh", "sw", "yb", "yc", "yh", "yw", "mb", "mc", "mh", "mw")}}
    apply_const = dict(CG=CG, BLOCK_S=triton.next_power_of_2(SP), SPATIAL=spatial, **flags, **cfg)
    launches.append((group_apply_kernel, apply_sig, apply_const, num_warps, tile, trips, ()))
    return launches


def _note(layout: str, path: str, CG: int, P: int, itemsize: int, spatial: bool) -> str:
    """Why a row runs the strided kernels (they miss the budgets: per-element division, scalar
    accesses, a reduction per tile)."""
    if path != "strided":
        return ""
    if layout == "strided":
        return "strided path: a sliced view"
    if layout == "nchw":
        return f"strided path: H*W*itemsize = {P * itemsize} is not a multiple of 16"
    return f"strided path: a group of {CG} channels is not a power of two of at least 8 bytes"


def aot_launches(arch: int) -> list[dict]:
    """The launches of aot_cases() for vqfast/kernels/aot.py, with the benchmark case's bytes: the stats
    pass reads x once, the apply pass reads x and writes y."""
    out = []
    for dtype, layout, B, C, G, P, spatial in aot_cases():
        numel, elt = B * C * P, torch.empty((), dtype=dtype).element_size()
        path = path_for(layout, G, C // G, P, elt)
        case = dict(dtype=dtype, layout=layout, B=B, C=C, G=G, HW=P, spatial=spatial, path=path,
                    note=_note(layout, path, C // G, P, elt, spatial))
        for i, (kernel, sig, const, warps, per_trip, trips, divisible) in enumerate(
                compile_spec(dtype, layout, B, C, G, P, spatial)):
            if i == 1 and spatial and kernel is group_apply_kernel:
                case = dict(case, path="strided")
            out.append(dict(kernel=kernel, name="group_stats" if i == 0 else "group_apply", case=case,
                            signature=sig, constexprs=const, num_warps=warps, divisible=divisible,
                            items_per_iteration=per_trip, inner_trips=trips, items=numel,
                            bytes=numel * elt * (1 if i == 0 else 2)))
    return out


def budget(row: dict) -> dict | None:
    """Limits on the compiled hot loop (sm_90) for a static cost report row, or None where no
    budget applies (the generic strided path). Why: an fp16 norm at an H200's 4.3 TB/s may spend
    ~45 instructions per element over all passes, so stats (one read) gets 6, apply (a read and
    a write) 10 with SiLU and 14 with SpatialNorm's gathered scale and shift; and 64-bit or wider
    global accesses, as scalar ones cannot keep up with the bandwidth."""
    if row["arch"] != "sm_90" or row["layout"] not in ("nchw", "channels_last"):
        return None
    if row["path"] == "strided" and not (row["spatial"] and row["kernel"] == "group_apply"):
        return None  # a view the vector paths cannot read (its row's note says why)
    if row["kernel"] == "group_stats":
        limit = 6
    else:
        limit = 14 if row["spatial"] else 10
    return dict(loop_instructions_per_item=limit, loop_shuffles=0, loop_barriers=0, min_global_bits=64)
