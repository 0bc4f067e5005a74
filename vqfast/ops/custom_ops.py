"""The fused ops as torch.library custom ops: one schema, a fake for torch.compile, the autograd
formula, and an implementation that runs the Triton kernel or the eager reference.

The path is an argument (``use_triton``) so that the dispatcher's choice is made once, outside
the op, where torch.compile can see it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import reference, selfcheck
from .derived import derived


def _kernels():
    from ..kernels import codebook

    return codebook


def norm_layout(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels_last x (dense in that format, not in NCHW), else
    contiguous_format."""
    return torch.channels_last if reference.is_channels_last(x) else torch.contiguous_format


def _norm_strides(x: Tensor) -> tuple[int, ...]:
    """The strides F.group_norm gives its output: x's own when x is dense in its memory format
    (channels_last for a 4-D channels_last x, contiguous otherwise), else fresh ones in that
    format. The layers after a norm then see the layout they see in diffusers, which matters:
    matmuls and convolutions round by layout."""
    fmt = norm_layout(x)
    if x.is_contiguous(memory_format=fmt):
        return x.stride()
    return torch.empty(x.shape, device="meta", memory_format=fmt).stride()  # no memory


def _new_like(x: Tensor) -> Tensor:
    """An empty norm output for x, laid out as _norm_strides says."""
    return torch.empty_strided(x.shape, _norm_strides(x), dtype=x.dtype, device=x.device)


def in_norm_layout(out: Tensor, x: Tensor) -> Tensor:
    """out in the layout _new_like(x) has (what the fakes promise torch.compile, and what
    F.group_norm gives); a copy only when the eager op laid it out otherwise."""
    if reference.same_strides(out.shape, out.stride(), _norm_strides(x)):
        return out
    return _new_like(x).copy_(out)


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Kernels launch on the current CUDA device's current stream: make that t's device (a
    tensor on cuda:1 would otherwise be launched on cuda:0's stream). Nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(t: Tensor, fn, *args, **kwargs):
    """fn(*args, **kwargs) under t's device guard."""
    with device_guard(t):
        return fn(*args, **kwargs)


def _layout(x: Tensor) -> str:
    return "channels_last" if reference.is_channels_last(x) else "contiguous" if x.is_contiguous() else "strided"


def _search_case(z: Tensor, codebook: Tensor) -> tuple:
    """What picks the search kernel's compiled variant (selfcheck's specialisation)."""
    return (f"z {str(z.dtype).removeprefix('torch.')}", f"codebook {str(codebook.dtype).removeprefix('torch.')}",
            f"D={codebook.shape[1]}", str(z.device))


def _norm_case(x: Tensor, weight: Tensor | None, silu: bool) -> tuple:
    return (str(x.dtype).removeprefix("torch."), _layout(x), str(x.device), "silu" if silu else "no silu",
            "affine" if weight is not None else "no affine")


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def centred(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The centred codebook both search paths rank with, built once per codebook state."""
    return derived(reference.centred_codebook, codebook, reference.accumulator(z, codebook))


def _search(z: Tensor, codebook: Tensor, dim: int, write_zq: bool, c: tuple):
    """The Triton search, with the centred codebook's fp16 pieces (its tensor-core path) built
    once per codebook state, like the centred codebook itself, and only where that path runs."""
    kernels = _kernels()
    return _launch(z, kernels.nearest_code, z, codebook, dim, write_zq=write_zq, centred=c,
                   book_pieces=lambda: derived(kernels.split_pieces, c[1]))


@torch.library.custom_op("vqfast::nearest_code", mutates_args=())
def nearest_code(z: Tensor, codebook: Tensor, dim: int, use_triton: bool) -> Tensor:
    c = centred(z, codebook)
    if use_triton:
        return selfcheck.run(
            "nearest_code", _search_case(z, codebook),
            lambda: _search(z, codebook, dim, False, c)[0],
            lambda: reference.nearest_code(z, codebook, dim, centred=c),
            lambda indices: selfcheck.search_problem(z, codebook, dim, indices, None))
    return reference.nearest_code(z, codebook, dim, centred=c)


@nearest_code.register_fake
def _(z, codebook, dim, use_triton):
    return z.new_empty(z.movedim(dim, -1).shape[:-1], dtype=torch.long)


def quantize_impl(
    z: Tensor, codebook: Tensor, dim: int, z_weight: float, code_weight: float, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(z_q, indices, loss): z_q the nearest codes laid out like z, loss
    (z_weight + code_weight) * mean((code - z)^2) in z's dtype."""
    c = centred(z, codebook)
    if use_triton:
        indices, z_q, sse = selfcheck.run(
            "quantize", _search_case(z, codebook),
            lambda: _search(z, codebook, dim, True, c),
            lambda: reference.quantize(z, codebook, dim, centred=c),
            lambda out: selfcheck.search_problem(z, codebook, dim, out[0], out[1]))
    else:
        indices, z_q, sse = reference.quantize(z, codebook, dim, centred=c)
    loss = (sse * (z_weight + code_weight) / z.numel()).to(z.dtype)  # 0/0 = NaN for an empty z
    return z_q, indices, loss


@torch.library.custom_op("vqfast::quantize", mutates_args=())
def quantize(
    z: Tensor, codebook: Tensor, dim: int, z_weight: float, code_weight: float, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return quantize_impl(z, codebook, dim, z_weight, code_weight, use_triton)


@quantize.register_fake
def _(z, codebook, dim, z_weight, code_weight, use_triton):
    shape = z.movedim(dim, -1).shape[:-1]
    return torch.empty_like(z), z.new_empty(shape, dtype=torch.long), z.new_empty(())


def _setup_quantize(ctx, inputs, output):
    z, codebook, dim, z_weight, code_weight, _ = inputs
    z_q, indices, _ = output
    ctx.save_for_backward(z, z_q, indices)
    ctx.dim, ctx.z_weight, ctx.code_weight = dim, z_weight, code_weight
    ctx.book_shape, ctx.book_dtype = codebook.shape, codebook.dtype


def _backward_quantize(ctx, grad_zq, grad_indices, grad_loss):
    """Straight-through to z, plus the commitment loss's two stop-gradient halves:
    d/dz z_weight * mean((sg[e] - z)^2) and d/de code_weight * mean((e - sg[z])^2)."""
    z, z_q, indices = ctx.saved_tensors
    acc = reference.accumulator(z)
    diff = z_q.to(acc) - z.to(acc)  # e - z
    scale = 2.0 / max(1, z.numel())
    grad_z = grad_book = None
    if ctx.needs_input_grad[0]:
        grad_z = torch.zeros_like(z) if grad_zq is None else grad_zq.clone()
        if grad_loss is not None:
            grad_z += (grad_loss.to(acc) * (-ctx.z_weight * scale) * diff).to(z.dtype)
    if ctx.needs_input_grad[1]:
        grad_book = torch.zeros(ctx.book_shape, dtype=ctx.book_dtype, device=z.device)
        if grad_loss is not None:
            rows = (grad_loss.to(acc) * (ctx.code_weight * scale) * diff).movedim(ctx.dim, -1)
            grad_book.index_add_(0, indices.reshape(-1), rows.reshape(-1, ctx.book_shape[1]).to(ctx.book_dtype))
    return grad_z, grad_book, None, None, None, None


quantize.register_autograd(_backward_quantize, setup_context=_setup_quantize)


class EagerQuantize(torch.autograd.Function):
    """The quantize op's eager path with the same formula for gradients, without the custom-op
    dispatch: its first call would import torch._dynamo (about a second and 150 MiB), which a
    CPU user who never compiles does not need. Under torch.compile the custom op is used."""

    @staticmethod
    def forward(ctx, z, codebook, dim, z_weight, code_weight):
        output = quantize_impl(z, codebook, dim, z_weight, code_weight, False)
        _setup_quantize(ctx, (z, codebook, dim, z_weight, code_weight, False), output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_zq, grad_indices, grad_loss):
        return _backward_quantize(ctx, grad_zq, grad_indices, grad_loss)[:5]


# ---------------------------------------------------------------- GroupNorm and SpatialNorm
# Backward recomputes the forward through the eager reference and differentiates that: the
# kernels are forward-only, and a norm's backward needs its statistics again anyway.


@torch.library.custom_op("vqfast::group_norm", mutates_args=())
def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, silu: bool, use_triton: bool
) -> Tensor:
    eager = lambda: in_norm_layout(reference.group_norm(x, num_groups, weight, bias, eps, silu), x)  # noqa: E731
    if use_triton:
        from ..kernels import group_norm as kernel

        first = lambda dt: reference.group_norm(_cast(x[:1], dt), num_groups, _cast(weight, dt), _cast(bias, dt),  # noqa: E731
                                                eps, silu)
        return selfcheck.run(
            "group_norm", _norm_case(x, weight, silu),
            lambda: _launch(x, kernel.norm, _new_like(x), x, num_groups, weight, bias, eps, silu),
            eager, lambda out: selfcheck.norm_problem(out, first))
    return eager()


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu, use_triton):
    return _new_like(x)


@torch.library.custom_op("vqfast::spatial_norm", mutates_args=())
def spatial_norm(
    f: Tensor, scale: Tensor, shift: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
    eps: float, silu: bool, use_triton: bool,
) -> Tensor:
    eager = lambda: in_norm_layout(reference.spatial_norm(f, scale, shift, num_groups, weight, bias, eps, silu), f)  # noqa: E731
    if use_triton:
        from ..kernels import spatial_norm as kernel

        first = lambda dt: reference.spatial_norm(  # noqa: E731
            _cast(f[:1], dt), _cast(scale[:1], dt), _cast(shift[:1], dt), num_groups, _cast(weight, dt), _cast(bias, dt),
            eps, silu)
        return selfcheck.run(
            "spatial_norm", _norm_case(f, weight, silu),
            lambda: _launch(f, kernel.spatial_norm, _new_like(f), f, scale, shift, num_groups, weight, bias, eps, silu),
            eager, lambda out: selfcheck.norm_problem(out, first))
    return eager()


@spatial_norm.register_fake
def _(f, scale, shift, num_groups, weight, bias, eps, silu, use_triton):
    return _new_like(f)


def _setup_recompute(ctx, inputs, output):
    ctx.tensors = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensors))
    ctx.inputs = [None if isinstance(a, Tensor) else a for a in inputs]


def _recompute_backward(eager):
    def backward(ctx, grad):
        args = list(ctx.inputs)
        wanted = []
        with torch.enable_grad():
            for i, t in zip(ctx.tensors, ctx.saved_tensors):
                args[i] = t.detach().requires_grad_(ctx.needs_input_grad[i])
                if ctx.needs_input_grad[i]:
                    wanted.append(i)
            out = eager(*args[:-1])  # the last argument is use_triton
            grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        result = [None] * len(args)
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)

    return backward


group_norm.register_autograd(_recompute_backward(reference.group_norm), setup_context=_setup_recompute)
spatial_norm.register_autograd(_recompute_backward(reference.spatial_norm), setup_context=_setup_recompute)
