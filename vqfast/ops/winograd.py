"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3): the CPU's eager fp32 path for
wide layers.

oneDNN's direct 3x3 convolutions already run at the machine's fp32 multiply-add pace (230
GFLOP/s on a 2-core Xeon, sgemm's own), so fewer multiply-adds is the only way to go faster.
F(2x2, 3x3) computes each 2x2 output tile from its 4x4 input patch with 16 products per channel
pair where the direct form takes 36: the input patches go through ``B^T d B`` and the weights
through ``G g G^T`` (16 values each), the 16 positions multiply as 16 matrix products of (tiles x
C_in) by (C_in x C_out), and ``A^T m A`` folds the 16 results back into the tile. The transforms
are additions and subtractions only, done as whole-tensor ops over strips of tile rows small
enough to stay in cache. Measured against oneDNN on that Xeon (fp32, batch 1): 1.6x at 512
channels 32x32, 1.3x at 256 channels 64x64, 1.2x at 256 channels 128x128; at 128 channels the
transforms' memory traffic outweighs the saving (0.8x at 256x256), hence the channel floors
(MIN_CHANNELS, MIN_OUT_CHANNELS).

Numerics: the weight transform is computed in float64 and rounded once; the others add at most
four fp32 terms. Against a float64 reference its largest error was 3e-6 where oneDNN's direct
convolution's was 1e-5 to 2e-5 (outputs of magnitude 7, 256 to 512 input channels).
"""

from __future__ import annotations

import torch

#: Input and output channels from which a 3x3 convolution goes through conv3x3 (see the module
#: docstring; the caller applies them, via fits). Narrow outputs leave the products too small
#: to pay for the input's transform: 512 to 4 channels at 32x32 ran at 0.4x, 512 to 64 at 0.9x,
#: 512 to 128 at 1.2x.
MIN_CHANNELS = 256
MIN_OUT_CHANNELS = 128

#: About this many bytes of transformed input per strip of tile rows (the products' output is
#: as large again): small enough to stay in the caches between the transforms and the products.
STRIP_BYTES = 8 * 2**20

# G, the weight transform of F(2x2, 3x3): u = G g G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def weights(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) weights -> (16, I, O): for each of the 16 tile positions (4 * row + column)
    the (I, O) matrix the transformed input is multiplied by. Summed in float64 and rounded once
    to fp32, a block of output channels at a time, so that building it holds no more than a few
    MiB beside the result (these stay cached for the model's life, see vqfast.ops.derived)."""
    O, I = w.shape[:2]
    g = torch.tensor(_G, dtype=torch.float64, device=w.device)
    gg = torch.kron(g, g)  # (16, 9): [4k + l, 3a + b] = G[k, a] G[l, b]
    u = torch.empty(16, I, O, dtype=torch.float32, device=w.device)
    for o0 in range(0, O, 64):
        block = w[o0 : o0 + 64].detach().to(torch.float64).permute(2, 3, 1, 0).reshape(9, -1)  # (a b, i o)
        u[:, :, o0 : o0 + 64] = (gg @ block).view(16, I, -1)
    return u


def bias_rows(bias: torch.Tensor | None, out_channels: int, device: torch.device) -> torch.Tensor:
    """(16, 1, O): the bias at position 5 (row 1, column 1), zero elsewhere. ``A^T m A`` takes
    m[1][1] into all four outputs of a tile, each with coefficient 1, so adding the bias there
    adds it to every output."""
    rows = torch.zeros(16, 1, out_channels, dtype=torch.float32, device=device)
    if bias is not None:
        rows[5, 0] = bias.detach()
    return rows


def fits(x: torch.Tensor, out_channels: int) -> bool:
    """Whether conv3x3 takes x for a convolution to ``out_channels``: fp32, channels_last and
    dense, H and W even (whole 2x2 tiles), and wide enough to be faster."""
    return (
        x.ndim == 4 and x.dtype == torch.float32 and x.shape[1] >= MIN_CHANNELS and out_channels >= MIN_OUT_CHANNELS
        and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.shape[2] > 0 and x.shape[3] > 0
        and x.permute(0, 2, 3, 1).is_contiguous()
    )


@torch.no_grad()
def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """The 3x3 convolution (stride 1, zero padding 1) of a channels_last fp32 x (see fits) with
    weights u = weights(w) and bias = bias_rows(b), written into ``out`` (B, O, H, W)
    channels_last, or added to what it holds with ``accumulate``. Returns out."""
    B, C, H, W = x.shape
    O = u.shape[2]
    T, S = H // 2, W // 2
    n_max = max(1, min(T, STRIP_BYTES // (16 * S * max(C, O) * 4)))
    scratch = dict(dtype=x.dtype, device=x.device)
    r = torch.empty(4, n_max, W + 2, C, **scratch)  # rows transformed; zero padding columns at 0 and W + 1
    r[:, :, 0].zero_()
    r[:, :, W + 1].zero_()
    v = torch.empty(16, n_max * S, C, **scratch)
    m = torch.empty(16, n_max * S, O, **scratch)
    for b in range(B):
        xb = x[b].permute(1, 2, 0)  # (H, W, C)
        even, odd = xb[0::2], xb[1::2]  # rows 2t and 2t + 1, T each
        tiles = out[b].permute(1, 2, 0).view(T, 2, S, 2, O)
        for t0 in range(0, T, n_max):
            t1 = min(T, t0 + n_max)
            n = t1 - t0
            _rows(even, odd, t0, t1, r[:, :n, 1 : W + 1])
            vs = v[:, : n * S].view(4, 4, n, S, C)
            # The columns of the four transformed rows at once: B^T along W. Each step is one op over
            # the whole strip: every op is a parallel region, whose barrier waits for a thread the
            # OS has descheduled on a busy CPU, so fewer and larger ones.
            e, o = r[:, :n, 0::2], r[:, :n, 1::2]  # padded columns 2s and 2s + 1, S + 1 each
            torch.sub(e[:, :, :S], e[:, :, 1:], out=vs[:, 0])
            torch.add(o[:, :, :S], e[:, :, 1:], out=vs[:, 1])
            torch.sub(e[:, :, 1:], o[:, :, :S], out=vs[:, 2])
            torch.sub(o[:, :, :S], o[:, :, 1:], out=vs[:, 3])
            ms = m[:, : n * S]
            torch.baddbmm(bias, v[:, : n * S], u, out=ms)
            ms = ms.view(4, 4, n, S, O)
            # A^T along rows, in place: s0 = m0 + m1 + m2 into m0, s1 = m1 - m2 - m3 into m1
            ms[0].add_(ms[1]).add_(ms[2])
            ms[1].sub_(ms[2]).sub_(ms[3])
            # A^T along columns, both output rows 2t + a at once
            s = ms[:2].permute(2, 0, 1, 3, 4)  # (n, a, column position, S, O)
            y0, y1 = tiles[t0:t1, :, :, 0], tiles[t0:t1, :, :, 1]  # (n, a, S, O)
            if accumulate:
                y0.add_(s[:, :, 0]).add_(s[:, :, 1]).add_(s[:, :, 2])
                y1.add_(s[:, :, 1]).sub_(s[:, :, 2]).sub_(s[:, :, 3])
            else:
                torch.add(s[:, :, 0], s[:, :, 1], out=y0).add_(s[:, :, 2])
                torch.sub(s[:, :, 1], s[:, :, 2], out=y1).sub_(s[:, :, 3])
    return out


def _rows(even: torch.Tensor, odd: torch.Tensor, t0: int, t1: int, r: torch.Tensor) -> None:
    """B^T along H for tile rows t0..t1 into r (4, n, W, C). Tile t reads padded rows 2t..2t+3,
    which are x's rows 2t - 1 (odd[t - 1]), 2t (even[t]), 2t + 1 (odd[t]) and 2t + 2
    (even[t + 1]); row -1 and row H are the zero padding."""
    T = even.shape[0]
    torch.add(even[t0:t1], odd[t0:t1], out=r[1])
    torch.sub(odd[t0:t1], even[t0:t1], out=r[2])
    if t0 == 0:  # d0 is the padding row: r0 = -d2
        torch.neg(odd[0], out=r[0, 0])
        torch.sub(odd[0 : t1 - 1], odd[1:t1], out=r[0, 1:])
    else:
        torch.sub(odd[t0 - 1 : t1 - 1], odd[t0:t1], out=r[0])
    if t1 == T:  # d3 is the padding row: r3 = d1
        r[3, -1].copy_(even[T - 1])
        torch.sub(even[t0 : T - 1], even[t0 + 1 : T], out=r[3, :-1])
    else:
        torch.sub(even[t0:t1], even[t0 + 1 : t1 + 1], out=r[3])
