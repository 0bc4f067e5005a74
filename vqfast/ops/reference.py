"""Eager PyTorch implementations of the fused ops: the CPU path, and the kernels' test reference."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import search_cpu

#: Most bytes of distances the eager codebook search holds at once.
SCRATCH_BYTES = 64 * 2**20


def tile_bytes(D: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Bytes of distances per tile: 1 MiB per 4 code dimensions, within the scratch budget.

    Small D is memory-bound: a tile that stays in cache between the matmul that writes it and
    the argmin that reads it ran 3.4x faster than 64 MiB tiles (0.76 s vs 2.6 s at K=16384,
    D=4, N=65536, 2 CPU cores). Large D is compute-bound and wants tall matmuls: at D=256 a
    1 MiB tile (16 rows) ran 3.5x slower than a 64 MiB one.
    """
    return min(scratch_bytes, 2**20 * -(-D // 4))


def accumulator(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def centred_codebook(codebook: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu (D,), codebook - mu (K, D) contiguous, its squared row norms (K,)), all in ``acc``:
    what both search paths rank with. Callers cache it per codebook state (vqfast.ops.derived)."""
    book = codebook.to(acc)
    mu = book.mean(dim=0)
    centred = (book - mu).contiguous()
    return mu, centred, (centred * centred).sum(dim=1)


#: Codes per block of the eager search's two-level minimum (see nearest_code).
BLOCK = 128


@torch.no_grad()
def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, dim: int, scratch_bytes: int = SCRATCH_BYTES, centred=None
) -> torch.Tensor:
    """Indices of the nearest codes, ranked on codebook-centred vectors in row chunks so that
    at most ``scratch_bytes`` of distances exist at once (see functional.nearest_code).
    ``centred``: centred_codebook(codebook, accumulator(z, codebook)), when the caller has it.

    torch.argmin over a row of K scores is a scalar loop (on a 2-core AVX-512 CPU it took 2.5x
    as long as the matmul that made the scores), while torch.amin is vectorised. So when K is a
    multiple of BLOCK (every real codebook) the search takes two levels: the minimum of each
    block of BLOCK codes (amin), the first block holding the row's minimum (argmin over K/BLOCK
    values), then the first minimum inside that block, from the same tile of scores. Ties
    still go to the lowest index and a NaN score still wins, as in torch.argmin."""
    D = codebook.shape[1]
    zm = z.movedim(dim, -1)
    acc = accumulator(z, codebook)
    mu, centred, norms = centred if centred is not None else centred_codebook(codebook, acc)
    if search_cpu.applies(z.device, acc, D):  # compiled: reads z where it lies, centres it itself
        return search_cpu.nearest(zm.to(acc), mu, centred, norms).view(zm.shape[:-1])
    rows = zm.reshape(-1, D)
    n, k = rows.shape[0], codebook.shape[0]
    chunk = max(1, min(n, tile_bytes(D, scratch_bytes) // (k * norms.element_size())))
    scores = torch.empty(chunk, k, dtype=acc, device=z.device)
    indices = torch.empty(n, dtype=torch.long, device=z.device)
    blocked = k % BLOCK == 0 and k > BLOCK
    if blocked:
        minima = torch.empty(chunk, k // BLOCK, dtype=acc, device=z.device)
        picks = torch.empty(chunk, BLOCK, dtype=acc, device=z.device)
        block_of = torch.empty(chunk, dtype=torch.long, device=z.device)
    centred_rows = rows.to(acc) - mu  # O(N D), the size of z
    for start in range(0, n, chunk):
        zc = centred_rows[start : start + chunk]
        tile = scores[: zc.shape[0]]
        torch.addmm(norms, zc, centred.t(), beta=1, alpha=-2, out=tile)
        if not blocked:
            torch.argmin(tile, dim=1, out=indices[start : start + chunk])
            continue
        r = zc.shape[0]
        blocks = tile.view(r, k // BLOCK, BLOCK)
        block_min = minima[:r]
        torch.amin(blocks, dim=2, out=block_min)
        torch.argmin(block_min, dim=1, out=block_of[:r])
        # the winning block of each row, gathered from this tile: (r, BLOCK)
        torch.gather(blocks, 1, block_of[:r, None, None].expand(r, 1, BLOCK), out=picks[:r, None])
        out = indices[start : start + r]
        torch.argmin(picks[:r], dim=1, out=out)
        out.add_(block_of[:r], alpha=BLOCK)
    return indices.view(zm.shape[:-1])


@torch.no_grad()
def quantize(
    z: torch.Tensor, codebook: torch.Tensor, dim: int, centred=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, z_q, sse): z_q the gathered codes laid out like z (torch.empty_like(z)), sse the
    summed squared error (code - z)^2 in the accumulator dtype."""
    indices = nearest_code(z, codebook, dim, centred=centred)
    codes = F.embedding(indices, codebook).movedim(-1, dim)
    z_q = torch.empty_like(z).copy_(codes)
    acc = accumulator(z, codebook)
    sse = ((z_q.to(acc) - z.to(acc)) ** 2).sum(dtype=torch.float64).to(acc)
    return indices, z_q, sse


def _group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, into: torch.Tensor | None = None) -> torch.Tensor:
    """F.group_norm without cancellation. PyTorch's CPU kernel for channels_last inputs takes
    the variance as E[x^2] - E[x]^2, which cancels: for a group of mean 3 and std 0.01 its
    output was off by 1.6 where the NCHW kernel's was off by 3e-5.

    On the eager path a channels_last x stays channels_last (the layout the CPU path runs its
    convolutions in): each group is first shifted by its sampled mean (_group_shift), which leaves
    nothing to cancel; fp32 and fp64 then take _shifted_statistics, 16-bit x F.group_norm. Under
    torch.compile: _group_norm_by_channels. ``into``: memory that may take the shifted x (see
    _shift)."""
    if torch.compiler.is_compiling():
        return _group_norm_by_channels(x, num_groups, weight, bias, eps)
    if _takes_shifted_statistics(x):
        y, rstd, centre = _shifted_statistics(x, num_groups, eps, into)
        if weight is not None:
            rstd, centre = rstd * weight.view(1, -1, 1, 1), centre * weight.view(1, -1, 1, 1)
        if bias is not None:
            centre = centre + bias.view(1, -1, 1, 1)
        return _addcmul(centre, y, rstd)
    if is_channels_last(x):
        x = _shift(x, _group_shift(x, num_groups), into)
    return F.group_norm(x, num_groups, weight, bias, eps)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D x dense in channels_last (and not in NCHW: a 1x1 image is both)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def same_strides(shape, strides, other) -> bool:
    """Whether two stride tuples of one shape lay it out alike: a size-1 dimension's stride says
    nothing about the layout (a view's may be anything)."""
    return all(n == 1 or a == b for n, a, b in zip(shape, strides, other))


def alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and layout (same_strides): one may stand in for the other."""
    return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) and same_strides(a.shape, a.stride(), b.stride())


def _takes_shifted_statistics(x: torch.Tensor) -> bool:
    return is_channels_last(x) and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


def _shifted_statistics(x: torch.Tensor, num_groups: int, eps: float, into: torch.Tensor | None = None):
    """(d, rstd, centre) with GroupNorm(x) = d * rstd + centre, for a channels_last fp32 or fp64
    x: d = x minus its groups' sampled means (_group_shift; a tensor the caller may overwrite,
    in ``into``'s memory when that is given, see _shift),
    rstd and centre (B, C, 1, 1) from batch norm's per-channel mean and variance of d (two passes,
    vectorised across channels: 2.8 ms for a 128-channel 256x256 fp32 tensor on a 2-core Xeon,
    where var_mean took 38) combined into groups by Chan's rule. The callers scale d in place, so
    a norm makes one full-size tensor; F.group_norm after the shift made two (29 ms against 20
    for that norm with its SiLU).

    The statistics run on one thread: for a channels_last input batch_norm_update_stats splits
    its sums across the threads, so another thread count rounded them otherwise (and a token in
    a near tie could change between one process and two, or between forwards the busy-CPU
    policy runs on fewer threads). On one thread they are also faster: 4.3 ms against 5.8 on 2
    threads for a 128-channel 256x256 fp32 image (2-core AMD EPYC Zen 3, AVX2).

    batch_norm_update_stats has no gradient. Under autograd the statistics keep their values
    (the output does not depend on the grad mode) and take the gradients of d's moments, added
    as (m - m.detach()), which is exactly zero."""
    B, C = x.shape[:2]
    d = _shift(x, _group_shift(x, num_groups), into)
    with torch.no_grad(), one_thread():
        stats = [torch.batch_norm_update_stats(d[i : i + 1], None, None, 0.0) for i in range(B)]  # biased var
    mean = torch.stack([m for m, _ in stats]).view(B, num_groups, -1)
    var = torch.stack([v for _, v in stats]).view(B, num_groups, -1)
    if d.requires_grad:
        m1 = d.mean(dim=(2, 3)).view(B, num_groups, -1)
        m2 = (d * d).mean(dim=(2, 3)).view(B, num_groups, -1) - m1 * m1
        mean, var = mean + (m1 - m1.detach()), var + (m2 - m2.detach())
    group_mean, group_var = _group_moments(mean, var)
    rstd = torch.rsqrt(group_var + eps)
    centre = -group_mean * rstd  # d's mean is near 0 (the shift took the bulk): no cancellation
    spread = (B, num_groups, C // num_groups)
    return d, rstd.expand(spread).reshape(B, C, 1, 1), centre.expand(spread).reshape(B, C, 1, 1)


@contextlib.contextmanager
def one_thread():
    """Run the block's ops on one intra-op thread (then restore the count): for reductions whose
    rounding would otherwise depend on the thread count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _group_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (B, G, C/G) means and biased variances -> the groups' (B, G, 1), by Chan's
    rule for equal counts: the group's variance is the mean of var_c + (mean_c - mean_g)^2."""
    group_mean = mean.mean(dim=2, keepdim=True)
    return group_mean, (var + (mean - group_mean) ** 2).mean(dim=2, keepdim=True)


def _addcmul(a: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + y * b, into y when y may be overwritten."""
    return torch.addcmul(a, y, b, out=y) if _in_place(a, y, b) else torch.addcmul(a, y, b)


def _group_norm_by_channels(x: torch.Tensor, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """F.group_norm from per-channel statistics (var_mean: Welford, in fp32, fp64 for fp64 x)
    combined into groups by Chan's rule, for torch.compile: inductor reads x once per pass,
    vectorised along whichever of channels or positions is contiguous. Its own group_norm reduces
    one group at a time, which on a channels_last bf16 activation meant 4 of 16 lanes per load
    and a strided pass over the tensor per group (a 128-channel 256x256 norm took 33 ms against
    eager's 6)."""
    B, C = x.shape[:2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=tuple(range(2, x.ndim)), correction=0)  # (B, C)
    group_mean, group_var = _group_moments(mean.view(B, num_groups, -1), var.view(B, num_groups, -1))
    rstd = torch.rsqrt(group_var.view(B, num_groups) + eps)  # (B, G)
    # Back to channels by a product with the (G, C) group indicator, which the compiler keeps as
    # a (B, C) tensor: broadcast instead, its c // CG index became a gather in every vector.
    spread = torch.kron(torch.eye(num_groups, dtype=acc, device=x.device),
                        torch.ones(1, C // num_groups, dtype=acc, device=x.device))
    scale = torch.mm(rstd, spread)
    centre = torch.mm(group_mean.view(B, num_groups), spread)
    if weight is not None:
        scale = scale * weight.to(acc)
    view = (B, C) + (1,) * (x.ndim - 2)
    # (x - mean) first, as F.group_norm does: x * scale - mean * scale cancels at large means
    y = (x.to(acc) - centre.view(view)) * scale.view(view)
    if bias is not None:
        y = y + bias.to(acc).view((1, C) + (1,) * (x.ndim - 2))
    return y.to(x.dtype)


def _group_shift(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(B, C, 1, 1): each group's mean over a grid of about 256 of its pixels, per channel. A
    shift only has to lie within a few standard deviations of the mean for nothing to cancel; 256
    pixels of every channel put it within a tenth of one. (A 4096-pixel grid's strided sum took
    1.3 ms of a 2.7 ms 128-channel 256x256 statistics pass; 256 pixels take 0.03.)"""
    B, C, H, W = x.shape
    step = max(1, int((H * W / 256) ** 0.5))
    k = x[:, :, ::step, ::step].mean(dim=(2, 3), dtype=torch.float32).view(B, num_groups, -1).mean(dim=2)
    return k.to(x.dtype).repeat_interleave(C // num_groups, dim=1).view(B, C, 1, 1)


def _shift(x: torch.Tensor, shift: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """x - shift, written into ``into`` (x itself, or a dead tensor like x that the caller gives
    up) when given and it may be overwritten. A new tensor of 32 MiB or more costs its page
    faults on first touch: the subtraction into a fresh 128-channel 256x256 fp32 tensor took
    10.5 ms on a 2-core Xeon, into x 1.5 ms."""
    if into is not None and _in_place(x, into):
        return torch.sub(x, shift, out=into)
    return x - shift


def _in_place(*tensors: torch.Tensor) -> bool:
    """Whether an op may overwrite its own intermediate: not while autograd records through
    it, and not under torch.compile (which fuses the functional form into the loop that made
    the tensor, where an in-place write would only add a copy)."""
    return not (torch.compiler.is_compiling() or any(t.requires_grad for t in tensors))


def _silu(y: torch.Tensor, silu: bool) -> torch.Tensor:
    return F.silu(y, inplace=_in_place(y)) if silu else y


def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, silu: bool, into: torch.Tensor | None = None) -> torch.Tensor:
    return _silu(_group_norm(x, num_groups, weight, bias, eps, into), silu)


def spatial_norm(f, scale, shift, num_groups: int, weight, bias, eps: float, silu: bool, into: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(f) * up(scale) + up(shift), up = nearest resize to f's (H, W).

    The norm's affine is folded into the low-resolution maps, (n w + b) s + t = n (w s) + (b s + t),
    so the full-size tensor takes one multiply-add. When H and W are integer multiples of the
    maps' size the maps are broadcast over a (h, H/h, w, W/w) view (the same nearest rule, which
    the tests check), so no full-size map is made."""
    scale, shift = scale.to(f.dtype), shift.to(f.dtype)  # the Triton path's maps are float32 pairs
    if bias is not None:
        shift = torch.addcmul(shift, scale, bias.view(1, -1, 1, 1))
    if weight is not None:
        scale = scale * weight.view(1, -1, 1, 1)
    if _takes_shifted_statistics(f):  # y * scale + shift = d * (rstd scale) + (centre scale + shift)
        y, rstd, centre = _shifted_statistics(f, num_groups, eps, into)
        scale, shift = scale * rstd, torch.addcmul(shift, scale, centre)
    else:
        y = _group_norm(f, num_groups, None, None, eps, into)
    (B, C, H, W), (h, w) = f.shape, scale.shape[-2:]
    if H % h == 0 and W % w == 0:
        y = y.view(B, C, h, H // h, w, W // w)
        scale, shift = scale[:, :, :, None, :, None], shift[:, :, :, None, :, None]
    else:
        scale, shift = (F.interpolate(m, size=(H, W), mode="nearest") for m in (scale, shift))
    y = _addcmul(shift, y, scale)  # y is ours: no second full-size tensor
    return _silu(y.reshape(B, C, H, W), silu)
