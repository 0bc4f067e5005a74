"""SpatialNorm: GroupNorm(f) * up(scale) + up(shift) (+ SiLU), with ``up`` PyTorch's nearest
resize from the latent resolution, gathered inside group_norm's apply pass: the upsampled zq,
the full-size scale and shift maps and the normalised f never exist."""

from __future__ import annotations

import torch

from . import group_norm


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
    return group_norm.norm(y, f, num_groups, weight, bias, eps, silu, spatial=(scale, shift))
