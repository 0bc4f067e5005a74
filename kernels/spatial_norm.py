"""SpatialNorm: GroupNorm(f) * up(scale) + up(shift) (+ SiLU), with ``up`` PyTorch's nearest
resize from the latent resolution, gathered inside group_norm's apply pass: the upsampled zq,
the full-size scale and shift maps and the normalised f never exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .group_norm import norm


def nearest_source(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """Source index of each of n_out positions under F.interpolate(mode="nearest") from n_in:
    derived from PyTorch itself, so the kernel gathers exactly what diffusers' upsample picks."""
    src = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in)
    return F.interpolate(src, size=n_out, mode="nearest").view(n_out).to(torch.int32)


def spatial_norm(
    y: torch.Tensor,
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    (H, W), (h, w) = f.shape[-2:], scale.shape[-2:]
    maps = (scale, shift, nearest_source(H, h, f.device), nearest_source(W, w, f.device))
    return norm(y, f, num_groups, weight, bias, eps, silu, spatial=maps)
