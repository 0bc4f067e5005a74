"""The ops the model calls, in eager PyTorch.

Each op here is also the reference its future Triton kernel is tested against, so it favours
exactness: the codebook search ranks on codebook-centred vectors and never holds more than a
fixed scratch budget of distances at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Bytes of distances the eager codebook search holds at once. Small on purpose: a tile that
#: stays in cache between the matmul that writes it and the argmin that reads it measured 3x
#: faster on CPU than 64 MiB tiles (0.76 s vs 2.6 s at K=16384, D=4, N=65536 on 2 cores),
#: and memory stays O(N).
SCRATCH_BYTES = 2**20

_ACTIVATIONS = (None, "silu")


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _rows_last(z: torch.Tensor, dim: int, codebook: torch.Tensor) -> torch.Tensor:
    """z as (N, D) rows, with the code dimension last (a copy only when z's layout needs one)."""
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise TypeError(f"z and codebook must be floating, got {z.dtype} and {codebook.dtype}")
    if z.ndim == 0 or not -z.ndim <= dim < z.ndim:
        raise ValueError(f"dim={dim} is out of range for z of shape {tuple(z.shape)}")
    if z.shape[dim] != codebook.shape[1]:
        raise ValueError(
            f"z.shape[{dim}] must equal the codebook's D={codebook.shape[1]}, got {z.shape[dim]}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (K >= 1)")
    return z.movedim(dim, -1).reshape(-1, codebook.shape[1])


@torch.no_grad()
def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, *, dim: int = 1, scratch_bytes: int = SCRATCH_BYTES
) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every vector of z along ``dim``.

    z: floating, any shape, D = z.shape[dim]. codebook: (K, D) floating.
    Returns int64 indices shaped like z without ``dim``.

    Ranks by ||e - mu||^2 - 2 (z - mu).(e - mu), mu the codebook mean: the same order as
    ||z - e||^2 in exact arithmetic, without the ||z||^2 term whose size swamps the differences
    in fp32. Accumulates in fp32 (fp64 for fp64 inputs). Ties go to the lowest index
    (torch.argmin's rule); a row containing NaN gets index 0, as torch.argmin gives on its
    all-NaN distances. Works through z in row chunks so that at most ``scratch_bytes`` of
    distances exist at once.
    """
    rows = _rows_last(z, dim, codebook)
    out_shape = z.movedim(dim, -1).shape[:-1]
    acc = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    book = codebook.to(acc)
    mu = book.mean(dim=0)
    centred = book - mu
    norms = (centred * centred).sum(dim=1)
    k = codebook.shape[0]
    n = rows.shape[0]
    chunk = max(1, min(n, scratch_bytes // (k * norms.element_size())))
    scores = torch.empty(chunk, k, dtype=acc, device=z.device)
    indices = torch.empty(n, dtype=torch.long, device=z.device)
    for start in range(0, n, chunk):
        zc = rows[start : start + chunk].to(acc) - mu
        tile = scores[: zc.shape[0]]
        torch.addmm(norms, zc, centred.t(), beta=1, alpha=-2, out=tile)
        torch.argmin(tile, dim=1, out=indices[start : start + chunk])
    return indices.view(out_shape)


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    legacy: bool = True,
    dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code quantization with the straight-through estimator and the commitment loss.

    Returns (z_q, indices, loss): z_q = z + (e[indices] - z).detach() in z's dtype and shape;
    indices as from :func:`nearest_code`; loss a 0-dim tensor, diffusers' commitment loss
    ``mean((sg[e] - z)^2) + beta * mean((e - sg[z])^2)`` (legacy=True; legacy=False swaps
    where beta sits). Gradients reach z (straight-through plus the first term) and the codebook
    (second term).
    """
    indices = nearest_code(z, codebook, dim=dim)
    codes = _same_layout(F.embedding(indices, codebook).movedim(-1, dim).to(z.dtype), z)
    commit = torch.mean((codes.detach() - z) ** 2)
    embed = torch.mean((codes - z.detach()) ** 2)
    loss = commit + beta * embed if legacy else beta * commit + embed
    z_q = z + (codes - z).detach()
    return z_q, indices, loss


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t laid out in memory like ref (NCHW stays NCHW, channels_last stays channels_last).

    The layout is not cosmetic: convolutions pick their algorithm by it, and a decoder fed the
    same values in another layout rounds differently.
    """
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = None,
) -> torch.Tensor:
    """GroupNorm over x (B, C, *), then SiLU when ``activation == "silu"``."""
    _check_activation(activation)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def spatial_norm(
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    activation: str | None = None,
) -> torch.Tensor:
    """GroupNorm(f) * up(scale) + up(shift), then SiLU when asked.

    f: (B, C, H, W). scale, shift: (B, C, h, w), conv_y(zq) and conv_b(zq) at the latent
    resolution; ``up`` is PyTorch's nearest resize to (H, W). When H and W are integer multiples
    of h and w the maps are broadcast over a (h, H/h, w, W/w) view instead of being upsampled,
    so no full-size scale or shift map is ever made.
    """
    _check_activation(activation)
    y = F.group_norm(f, num_groups, weight, bias, eps)
    (B, C, H, W), (h, w) = f.shape, scale.shape[-2:]
    if H % h == 0 and W % w == 0:
        y6 = y.view(B, C, h, H // h, w, W // w)
        y = (y6 * scale[:, :, :, None, :, None] + shift[:, :, :, None, :, None]).reshape(B, C, H, W)
    else:
        y = y * F.interpolate(scale, size=(H, W), mode="nearest") + F.interpolate(
            shift, size=(H, W), mode="nearest"
        )
    return F.silu(y) if activation == "silu" else y
