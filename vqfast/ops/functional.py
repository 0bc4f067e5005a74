"""The ops the model calls. Each checks its arguments, asks the dispatcher for the path, and
runs it: a Triton kernel (vqfast.kernels) or the eager reference (vqfast.ops.reference).

The Triton path goes through torch.library custom ops (vqfast.ops.custom_ops), which
torch.compile keeps as opaque calls. The eager path of the two norms calls the reference's
PyTorch ops directly, with no custom-op boundary, so that torch.compile sees and fuses them
(inductor turns GroupNorm + SpatialNorm's multiply-add + SiLU into one or two loops); their
autograd is PyTorch's own. The codebook search is a custom op under torch.compile (its loop
over row tiles must not be unrolled into a graph) and on the Triton path; in eager CPU mode it
runs the reference directly (with the custom op's gradient formula), since a custom op's first
call imports torch._dynamo.
"""

from __future__ import annotations

import torch

from . import custom_ops, reference
from .dispatch import use_triton

_ACTIVATIONS = (None, "silu")


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _check_codes(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> int:
    """Validate the codebook-search arguments; return dim as a non-negative index."""
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise TypeError(f"z and codebook must be floating, got {z.dtype} and {codebook.dtype}")
    if z.ndim == 0 or not -z.ndim <= dim < z.ndim:
        raise ValueError(f"dim={dim} is out of range for z of shape {tuple(z.shape)}")
    if z.shape[dim] != codebook.shape[1]:
        raise ValueError(f"z.shape[{dim}] must equal the codebook's D={codebook.shape[1]}, got {z.shape[dim]}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (K >= 1)")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on one device, got {z.device} and {codebook.device}")
    return dim % z.ndim


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, *, dim: int = 1) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every vector of z along ``dim``.

    z: floating, any shape and layout (NCHW, channels_last, a sliced view, (N, D)), D =
    z.shape[dim]; read through its strides. codebook: (K, D) floating.
    Returns int64 indices shaped like z without ``dim``.

    Ranks by ||e - mu||^2 - 2 (z - mu).(e - mu), mu the codebook mean: the same order as
    ||z - e||^2 in exact arithmetic, without the ||z||^2 term whose size swamps the differences
    in fp32. Accumulates in fp32 (fp64 for fp64 inputs). Ties go to the lowest index
    (torch.argmin's rule); a row containing NaN gets index 0, as torch.argmin gives on its
    all-NaN distances. No N x K distance matrix is ever held: extra memory is O(N).
    """
    dim = _check_codes(z, codebook, dim)
    if use_triton(z.device) or torch.compiler.is_compiling():
        return custom_ops.nearest_code(z.detach(), codebook.detach(), dim, use_triton(z.device))
    return reference.nearest_code(z.detach(), codebook.detach(), dim, centred=custom_ops.centred(z, codebook))


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    legacy: bool = True,
    dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code quantization with the straight-through estimator and the commitment loss.

    Returns (z_q, indices, loss). z_q holds exactly the chosen codes, in z's dtype, shape and
    memory format, with the straight-through gradient of ``z + (z_q - z).detach()`` (identity
    to z). indices as from :func:`nearest_code`. loss is diffusers' commitment loss, a 0-dim
    tensor in z's dtype: ``mean((sg[e] - z)^2) + beta * mean((e - sg[z])^2)`` with
    legacy=True, beta on the first term with legacy=False. Gradients reach z and the codebook.
    """
    dim = _check_codes(z, codebook, dim)
    z_weight, code_weight = (1.0, float(beta)) if legacy else (float(beta), 1.0)
    if use_triton(z.device) or torch.compiler.is_compiling():
        return custom_ops.quantize(z, codebook, dim, z_weight, code_weight, use_triton(z.device))
    return custom_ops.EagerQuantize.apply(z, codebook, dim, z_weight, code_weight)


def _plain_ops(x: torch.Tensor) -> bool:
    """Whether a norm runs as plain PyTorch ops (the eager path, visible to torch.compile)
    rather than through its custom op (the Triton path)."""
    return not use_triton(x.device)


def _check_norm(x: torch.Tensor, num_groups: int, name: str) -> None:
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} must be (B, C, H, W) or (B, C, L), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating, got {x.dtype}")
    if num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {x.shape[1]} channels of {name}")


def _check_into(into: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if into is None or into is x or reference.alike(into, x):
        return
    given, want = (into.shape, into.stride(), into.dtype, into.device), (x.shape, x.stride(), x.dtype, x.device)
    raise ValueError(f"into must be {name} or a tensor of {name}'s shape, strides, dtype and device "
                     f"{tuple(want[0]), want[1], want[2], str(want[3])}, got {tuple(given[0]), given[1], given[2], str(given[3])}")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm over x (B, C, H, W) or (B, C, L), then SiLU when ``activation == "silu"``.
    Output in x's dtype and memory format; statistics in fp32.

    ``into`` gives up a tensor: x itself, or one of x's shape, strides, dtype and device that
    nothing reads again. Its memory may take the result (the eager CPU path then makes no new
    full-size tensor), so it holds garbage afterwards. Ignored where autograd records x or
    ``into``, under torch.compile, and on the Triton path."""
    _check_activation(activation)
    _check_norm(x, num_groups, "x")
    _check_into(into, x, "x")
    silu = activation == "silu"
    if not _plain_ops(x):
        return custom_ops.group_norm(x, num_groups, weight, bias, float(eps), silu, use_triton(x.device))
    return custom_ops.in_norm_layout(reference.group_norm(x, num_groups, weight, bias, float(eps), silu, into), x)


def spatial_norm(
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    activation: str | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm(f) * up(scale) + up(shift), then SiLU when asked. ``into``: f, or a dead
    tensor like f, whose memory may take the result, as in :func:`group_norm`.

    f: (B, C, H, W). scale, shift: (B, C, h, w), conv_y(zq) and conv_b(zq) at the latent
    resolution; ``up`` is PyTorch's nearest resize to (H, W) (what diffusers' upsampling of zq
    picks), for any h and H, integer ratio or not. No full-size scale or shift map is made.
    """
    _check_activation(activation)
    _check_norm(f, num_groups, "f")
    if f.ndim != 4 or scale.shape != shift.shape or scale.shape[:2] != f.shape[:2] or scale.ndim != 4:
        raise ValueError(
            f"spatial_norm needs f (B, C, H, W) and scale, shift (B, C, h, w) of one shape, got "
            f"{tuple(f.shape)}, {tuple(scale.shape)}, {tuple(shift.shape)}"
        )
    _check_into(into, f, "f")
    silu = activation == "silu"
    if not _plain_ops(f):
        return custom_ops.spatial_norm(f, scale, shift, num_groups, weight, bias, float(eps), silu, use_triton(f.device))
    return custom_ops.in_norm_layout(
        reference.spatial_norm(f, scale, shift, num_groups, weight, bias, float(eps), silu, into), f
    )
