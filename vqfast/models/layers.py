"""The building blocks of the VQ-VAE, with diffusers' attribute names so state dicts match.

Every normalisation goes through ``vqfast.functional`` (GroupNorm fused with the SiLU that
follows it, SpatialNorm with its 1x1 convolutions at the latent resolution), so faster kernels
slot in there without touching the module tree.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from ..ops import functional as vf
from ..ops import winograd
from ..ops.derived import derived
from ..ops.dispatch import use_triton
from ..ops.reference import is_channels_last
from .workspace import Workspace

ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(act_fn: str) -> nn.Module:
    if act_fn.lower() not in ACTIVATIONS:
        raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {act_fn!r}")
    return ACTIVATIONS[act_fn.lower()]()


def _fused_name(act: nn.Module | None) -> str | None:
    """The functional ops' name for ``act`` when they can fuse it, else None."""
    return "silu" if isinstance(act, nn.SiLU) else None


class SpatialNorm(nn.Module):
    """GroupNorm(f) scaled and shifted by 1x1 convolutions of the quantized latents zq.

    diffusers upsamples zq to f's size and then runs both convolutions at full resolution. A 1x1
    convolution commutes with nearest upsampling, so we run them at zq's resolution (up to
    (H/h)(W/w) times less work) and let the functional op broadcast the result, with the norm's
    affine folded into the maps. ``exact = True`` (VQModel.exact) keeps diffusers' order of
    operations instead, bit for bit. Always 32 groups, as in diffusers.
    """

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=32, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, kernel_size=1, stride=1, padding=0)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, kernel_size=1, stride=1, padding=0)
        self.exact = False

    def forward(self, f: torch.Tensor, zq: torch.Tensor, activation: str | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """``into``: f, or a dead tensor like f, whose memory may take the result
        (vqfast.functional.group_norm)."""
        n = self.norm_layer
        if getattr(self, "exact", False):  # diffusers' own module, patched, has no flag
            up = lambda t: F.interpolate(t, size=f.shape[-2:], mode="nearest")  # noqa: E731
            y = n(f) * up(self.conv_y(zq)) + up(self.conv_b(zq))
            return F.silu(y) if activation == "silu" else y
        scale, shift = spatial_maps(self, zq, f)
        return vf.spatial_norm(f, scale, shift, n.num_groups, None, None, n.eps, activation, into)


def _folded_map_weights(wy, by, wb, bb, weight, bias) -> tuple[torch.Tensor, ...]:
    """SpatialNorm's conv_y and conv_b (1x1, (C, Z, 1, 1)) with the GroupNorm affine (w, b)
    folded in, as (Z, C) matrices and (C,) offsets: (scale matrix, scale offset, shift matrix,
    shift offset) for scale = w * conv_y(zq) and shift = conv_b(zq) + b * conv_y(zq), since
    (n w + b) y + c = n (w y) + (b y + c). In float32 (float64 for float64 weights)."""
    acc = torch.float64 if wy.dtype == torch.float64 else torch.float32
    C = wy.shape[0]
    wy, wb = wy.reshape(C, -1).to(acc), wb.reshape(C, -1).to(acc)
    by = by.to(acc) if by is not None else wy.new_zeros(C)
    bb = bb.to(acc) if bb is not None else wy.new_zeros(C)
    w = weight.to(acc) if weight is not None else wy.new_ones(C)
    b = bias.to(acc) if bias is not None else wy.new_zeros(C)
    return (wy * w[:, None]).t(), by * w, (wb + wy * b[:, None]).t(), bb + by * b


def spatial_map_weights(wy, by, wb, bb, weight, bias) -> tuple[torch.Tensor, ...]:
    """_folded_map_weights rounded once to the weights' dtype."""
    return tuple(t.to(wy.dtype).contiguous() for t in _folded_map_weights(wy, by, wb, bb, weight, bias))


def spatial_pair_weights(wy, by, wb, bb, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """_folded_map_weights as one float32 (Z, 2C) matrix whose columns alternate scale and shift,
    and its (2C,) offset: one product gives the (scale, shift) pairs the Triton kernels gather."""
    sm, so, tm, to = _folded_map_weights(wy, by, wb, bb, weight, bias)
    Z, C = sm.shape
    return torch.stack((sm, tm), -1).reshape(Z, 2 * C).float(), torch.stack((so, to), -1).reshape(2 * C).float()


def spatial_maps(norm: nn.Module, zq: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A SpatialNorm's scale and shift maps at zq's resolution, (B, C, h, w) each in the memory
    format of ``like`` (the tensor it normalises), with the norm's affine folded in: one small
    matrix product each, in place of two 1x1 convolutions and two broadcast ops; the folded
    weights are built once per weight state (vqfast.ops.derived).

    On the Triton path the two maps are the halves of float32 (scale, shift) pairs, as the
    kernels gather them (one 64-bit load per element): (B, C, h, w, 2) for an NCHW ``like``,
    (B, h, w, C, 2) for a channels_last one."""
    cy, cb, n = norm.conv_y, norm.conv_b, norm.norm_layer
    weights = (cy.weight, cy.bias, cb.weight, cb.bias, n.weight, n.bias)
    B, Z, h, w = zq.shape
    channels_last = memory_format_of(like) == torch.channels_last
    if use_triton(zq.device):
        matrix, offset = derived(spatial_pair_weights, *weights)
        C = offset.shape[0] // 2
        rows = zq.float().permute(0, 2, 3, 1).reshape(B, h * w, Z)
        pairs = torch.baddbmm(offset, rows, matrix.expand(B, -1, -1)).view(B, h, w, C, 2).permute(0, 3, 1, 2, 4)
        if not channels_last:
            pairs = pairs.contiguous()  # (B, C, h, w, 2): a channel's map is one run
        return pairs[..., 0], pairs[..., 1]
    folded = derived(spatial_map_weights, *weights)
    C = folded[1].shape[0]
    if torch.compiler.is_compiling() and zq.dtype in (torch.bfloat16, torch.float16):
        # 16-bit maps as 1x1 convolutions, which inductor lays out with the decoder's other
        # convolutions (channels_last on CPU). A product's fixed NCHW output would meet those
        # channels_last activations in the fused norm loop, which then transposes tiles with
        # PyTorch's AVX-512 transpose_mxn<BFloat16>; GCC 12's -O3 SLP vectoriser compiles that,
        # inlined into an inductor kernel, into code that leaves most of each 32x32 tile
        # unwritten: the compiled bf16 decode came out all NaN (-O2 or -fno-tree-slp-vectorize
        # compile it right). fp32 keeps the products: the convolutions' channels_last maps made
        # a compiled NCHW SpatialNorm+SiLU 1.2x slower than eager (strided map reads).
        return tuple(
            F.conv2d(zq, matrix.t().to(zq.dtype).reshape(C, Z, 1, 1), offset.to(zq.dtype))
            for matrix, offset in (folded[:2], folded[2:])
        )
    maps = []
    for matrix, offset in (folded[:2], folded[2:]):  # (Z, C), (C,)
        matrix, offset = matrix.to(zq.dtype), offset.to(zq.dtype)
        if channels_last:  # (B, hw, Z) @ (Z, C), laid out (B, h, w, C): channels_last strides
            rows = zq.transpose(1, 2).transpose(2, 3).reshape(B, h * w, Z)
            m = torch.baddbmm(offset, rows, matrix.expand(B, -1, -1))
            maps.append(m.view(B, h, w, C).transpose(2, 3).transpose(1, 2))
        else:  # (C, Z) @ (B, Z, hw)
            m = torch.baddbmm(offset[:, None], matrix.t().expand(B, -1, -1), zq.reshape(B, Z, h * w))
            maps.append(m.view(B, C, h, w))
    return maps[0], maps[1]


def norm_act(
    norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None, act: nn.Module | None, into: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(norm(x))`` for a GroupNorm or a SpatialNorm, fusing the activation when it is SiLU.
    A GroupNorm marked ``exact`` (VQModel.exact) runs as the plain module, in PyTorch's kernel
    for x's layout, as diffusers runs it. ``into``: x, or a dead tensor like x, whose memory may
    take the result (vqfast.functional.group_norm)."""
    fused = _fused_name(act)
    if getattr(norm, "exact", False) and isinstance(norm, nn.GroupNorm):
        y = norm(x)
        return y if act is None else act(y)
    if hasattr(norm, "conv_y"):  # a SpatialNorm: ours, or diffusers' patched by vqfast.patch
        y = SpatialNorm.forward(norm, x, zq, activation=fused, into=into)
    else:
        y = vf.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation=fused, into=into)
    return y if act is None or fused else act(y)


class ResnetBlock2D(nn.Module):
    """norm1 -> act -> conv1 -> norm2 -> act -> dropout -> conv2, plus the (1x1) shortcut.

    ``spatial=True`` gives diffusers' ResnetBlockCondNorm2D (SpatialNorm conditioned on zq).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        eps: float,
        act_fn: str,
        zq_channels: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if zq_channels is not None:
            self.norm1 = SpatialNorm(in_channels, zq_channels)
        else:
            self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if zq_channels is not None:
            self.norm2 = SpatialNorm(out_channels, zq_channels)
        else:
            self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(act_fn)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor | None = None, *_, temb: torch.Tensor | None = None,
        overwrite: bool = False, workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W); zq (diffusers calls it temb): the quantized latents, for SpatialNorm.
        ``overwrite``: the caller gives x up, so the sum may be written into it (the towers
        pass their own activations; a plain call leaves x alone). ``workspace``: the tower's
        dead activations (see Workspace), which norm1, conv1 and the shortcut write into; the
        block's own go there once dead. Given only with ``overwrite``."""
        zq = zq if zq is not None else temb
        if self.conv_shortcut is None:
            residual = x
            into = workspace.take_like(x) if workspace else None
            h = norm_act(self.norm1, x, zq, self.nonlinearity, into=into)
        else:  # the shortcut first: then norm1 may take x's memory (the decoder's 64 MiB upsampled one)
            residual = conv_into(self.conv_shortcut, x, workspace)
            h = norm_act(self.norm1, x, zq, self.nonlinearity, into=x if overwrite else None)
            overwrite = not hooked(self.conv_shortcut)  # the sum may go into the shortcut's output
        h1 = conv_into(self.conv1, h, workspace)
        if workspace:  # norm1's output (in x's memory or the workspace's), dead once conv1 has read it
            workspace.give(h)
        # h1 is this block's own, seen by no one else unless conv1 runs hooks (conv())
        h1 = norm_act(self.norm2, h1, zq, self.nonlinearity, into=None if hooked(self.conv1) else h1)
        out = conv_add(self.conv2, self.dropout(h1), residual, overwrite)
        if workspace:
            workspace.give(h1)
        return out


#: What nn.Module.__call__ checks before it runs hooks: the module's own dicts and the global
#: ones (private names of torch.nn.modules.module, read with a default so a rename cannot break us).
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks, its own or global ones: what such a module returns
    may be kept by a hook, so nothing writes over it."""
    return any(getattr(module, name, None) for name in _HOOKS) or any(
        getattr(_nn_module, name, None) for name in _GLOBAL_HOOKS
    )


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _channels_last(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous(memory_format=torch.channels_last)


def _eager_cpu_channels_last(x: torch.Tensor) -> bool:
    # (under torch.compile inductor lays weights out itself)
    return x.device.type == "cpu" and memory_format_of(x) == torch.channels_last and not torch.compiler.is_compiling()


def conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``. A channels_last x on the CPU meets channels_last weights, built once per
    weight state (vqfast.ops.derived): with NCHW weights oneDNN reorders them and copies its
    output on every call (a 19 ms copy beside an 81 ms 128-channel 256x256 convolution here).
    Wide 3x3 convolutions go through Winograd instead (_by_winograd). Where conv_add and
    conv_into may sum in place (_sums_in_place), it runs the same oneDNN op without the sum, so
    in-place and out-of-place give the same values on every CPU by construction (aten's own
    convolution picks another kernel for small batch-1 inputs: im2col and the BLAS, whose
    summation order differs between AVX2 and AVX-512). A module with hooks is called as one, so
    they run."""
    if not _eager_cpu_channels_last(x) or type(module) is not nn.Conv2d or hooked(module):
        return module(x)
    if _by_winograd(module, x):
        return _winograd(module, x, torch.empty(_conv_shape(module, x), dtype=x.dtype, memory_format=torch.channels_last))
    if _sums_in_place(module, x):  # the op whose in-place sum conv_add and conv_into run: the same values
        return torch.ops.mkldnn._convolution_pointwise(
            x, derived(_channels_last, module.weight), module.bias, list(module.padding), list(module.stride),
            list(module.dilation), module.groups, "none", [], None)
    return module._conv_forward(x, derived(_channels_last, module.weight), module.bias)


def _conv_shape(module: nn.Conv2d, x: torch.Tensor) -> tuple[int, int, int, int]:
    (B, _, H, W), (kh, kw) = x.shape, module.kernel_size
    (ph, pw), (sh, sw), (dh, dw) = module.padding, module.stride, module.dilation
    return B, module.out_channels, (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _by_winograd(module: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``module(x)`` goes through vqfast.ops.winograd (2.25x fewer multiply-adds than
    oneDNN's direct convolution): a 3x3 stride-1 convolution that _plain_without_grad allows,
    wide enough and shaped as winograd.fits says."""
    return (
        _plain_without_grad(module, x) and module.kernel_size == (3, 3) and module.stride == (1, 1)
        and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
        and winograd.fits(x, module.out_channels)
    )


def _plain_without_grad(module: nn.Conv2d, x: torch.Tensor) -> bool:
    """What both in-place convolution paths (Winograd, oneDNN's sum) need: a plain zero-padded
    Conv2d without hooks on the eager CPU channels_last path, and no gradient to record (they
    write into buffers, which autograd cannot follow)."""
    params = [module.weight] if module.bias is None else [module.weight, module.bias]
    return (
        _eager_cpu_channels_last(x) and type(module) is nn.Conv2d and not hooked(module)
        and module.padding_mode == "zeros" and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))
    )


def _winograd(module: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """module(x) by winograd.conv3x3 into ``out`` (or added to it), its weights transformed once
    per weight state."""
    u = derived(winograd.weights, module.weight)
    bias = derived(winograd.bias_rows, module.bias, module.out_channels, x.device)
    return winograd.conv3x3(x, u, bias, out, accumulate)


def conv_into(module: nn.Conv2d, x: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """``module(x)``, written into memory from ``workspace``: by Winograd where _by_winograd
    says so, which writes every output; else where oneDNN's in-place sum runs (_sums_in_place),
    that memory zeroed, then the convolution summed into it, the values of oneDNN's convolution
    into a new tensor (each output is its fp32 result plus 0). Either way without a new
    tensor's page faults (see Workspace)."""
    if workspace is None:
        return conv(module, x)
    if _by_winograd(module, x):  # writes every output: no zeroing
        return _winograd(module, x, workspace.take(_conv_shape(module, x), x, torch.channels_last))
    if not _sums_in_place(module, x):
        return conv(module, x)
    return _conv_sum_(module, x, workspace.take(_conv_shape(module, x), x, torch.channels_last).zero_())


def _conv_sum_(module: nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out += module(x), in out, by oneDNN."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, derived(_channels_last, module.weight), module.bias, list(module.padding),
        list(module.stride), list(module.dilation), module.groups, "add", 1.0, None, [], None,
    )


def conv_add(module: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """``residual + module(x)``. With ``overwrite`` (the caller gives residual up) on the eager
    CPU channels_last fp32 path, oneDNN adds the residual as the convolution writes its output,
    into residual: no new full-size tensor (whose first touch costs page faults: 9 ms of a
    128-channel 256x256 fp32 one on a 2-core Xeon) and no separate pass for the sum. Same values:
    each output is the fp32 convolution result plus the residual, rounded once either way. A
    convolution that _by_winograd takes adds its tile sums into residual instead (the same sum,
    rounded in another order)."""
    if overwrite and memory_format_of(residual) == torch.channels_last and residual.dtype == torch.float32 \
            and not (torch.is_grad_enabled() and residual.requires_grad):
        if _by_winograd(module, x):
            return _winograd(module, x, residual, accumulate=True)
        if _sums_in_place(module, x):
            return _conv_sum_(module, x, residual)
    y = conv(module, x)
    if y.requires_grad or residual.requires_grad or hooked(module):  # (a hook may keep y)
        return residual + y
    return y.add_(residual)  # y is ours: no third full-size tensor


#: oneDNN's in-place convolution-plus-sum is an x86-64 oneDNN op here (tested there; on ARM
#: PyTorch's oneDNN goes through the Arm Compute Library, where it is not checked), on CPUs with
#: AVX2 or more: with oneDNN capped to SSE4.1 it crashed (a segmentation fault inside the op,
#: in the model's encoder, torch 2.13's oneDNN 3.12).
_X86_ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _sums_in_place(module: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether oneDNN's in-place convolution-plus-sum may run ``module`` on x (into a
    channels_last fp32 tensor, conv_add and conv_into): a plain zero-padded Conv2d without hooks
    on the eager CPU channels_last path (where conv() runs oneDNN) of an x86-64 CPU, fp32 (the
    op's 16-bit forms round the sum once, not twice as the unfused path does; float64 it lacks),
    no gradient to record (the op has no autograd formula): _plain_without_grad."""
    # _plain_without_grad first: it is False under torch.compile, which must not trace is_available
    return (
        _X86_ONEDNN and _plain_without_grad(module, x) and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and not isinstance(module.padding, str)
    )


def runs_channels_last(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether an encoder or decoder runs its activations channels_last inside: on the CPU's eager
    path, where oneDNN's channels_last convolutions (with the norms' shifted statistics, see
    reference._group_norm) beat NCHW ones, 1.6x for a 128-channel 3x3 at 256x256 and 2.2x for
    the folded upsample on a 2-core Xeon. Not under torch.compile (inductor picks layouts
    itself), not on the Triton path, not in ``exact`` mode (diffusers' layouts, bit for bit)."""
    return (
        x.device.type == "cpu" and x.ndim == 4 and not getattr(module, "exact", False)
        and not torch.compiler.is_compiling() and not vf.use_triton(x.device)
    )


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    The deprecated-attention-block layout of diffusers: ``group_norm`` (or ``spatial_norm`` in a
    SpatialNorm decoder), ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``.
    """

    def __init__(self, channels: int, eps: float, norm_num_groups: int | None, zq_channels: int | None):
        super().__init__()
        self.heads = 1
        self.group_norm = None
        if norm_num_groups is not None:
            self.group_norm = nn.GroupNorm(num_channels=channels, num_groups=norm_num_groups, eps=eps, affine=True)
        self.spatial_norm = SpatialNorm(channels, zq_channels) if zq_channels is not None else None
        self.to_q = nn.Linear(channels, channels, bias=True)
        self.to_k = nn.Linear(channels, channels, bias=True)
        self.to_v = nn.Linear(channels, channels, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, bias=True), nn.Dropout(0.0)])
        self.exact = False

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); zq (diffusers calls it temb): the quantized latents, for SpatialNorm."""
        zq = zq if zq is not None else temb
        residual = x
        if self.spatial_norm is not None:
            x = self.spatial_norm(x, zq)
        B, C, H, W = x.shape
        h = x.reshape(B, C, H * W)
        if self.group_norm is not None:
            h = norm_act(self.group_norm, h, None, None)
        h = h.transpose(1, 2)
        # (B, 1, HW, C) views laid out as diffusers lays them: SDPA's CPU kernel rounds by layout.
        q, k, v = (proj(h).view(B, H * W, 1, C).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        h = self.to_out[1](self.to_out[0](h.transpose(1, 2).reshape(B, H * W, C)))
        h = h.transpose(1, 2).reshape(B, C, H, W)  # channels_last strides
        # A sum takes its first operand's layout. diffusers' order (h first) makes the sum, and
        # every layer after it, channels_last: what exact mode keeps, and what inductor runs
        # fastest (it fuses the norms in any layout; the MoVQ decode compiled took 2.39 s this
        # way, 2.69 s NCHW, on one AMD EPYC thread). Eagerly, the residual first keeps an NCHW
        # model NCHW, so its norms need no layout round trip (reference._group_norm): 2.56 s
        # against 2.98 s. Same values either way.
        if getattr(self, "exact", False) or torch.compiler.is_compiling():
            return h + residual
        return residual + h


class Downsample2D(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 convolution (diffusers with padding=0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """``workspace`` (see Workspace): the tower's dead activations, for the output; x goes
        there once read. Given only by a tower that owns x."""
        unpadded = _eager_cpu_channels_last(x) and x.dtype == torch.float32 and min(x.shape[-2:]) >= 3
        if not unpadded or hooked(self.conv):
            return conv(self.conv, F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        out = _downsample_unpadded(self.conv, x, workspace)
        if workspace:
            workspace.give(x)
        return out


def _downsample_unpadded(module: nn.Conv2d, x: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """``module(F.pad(x, (0, 1, 0, 1)))`` for a stride-2 3x3 ``module`` without padding, without
    the padded copy of x (a fresh tensor: with its page faults, 34 ms against 20 for a 128-channel
    256x256 fp32 x on a 2-core Xeon). The zero row and column only reach the last output row
    and column, and only when H or W is even: the convolution of x itself gives the rest, and the
    two-row and two-column edges of x, padded, give those. fp32 only: in bf16, oneDNN's stride-2
    convolution with a one-column output (the column edge) reads memory it never wrote (NaN after
    a NaN-filled tensor was freed, torch 2.13 on a Xeon; a test holds the fp32 path to it).
    ``workspace``: memory for the output (see Workspace)."""
    inner = conv_into(module, x, workspace)  # (B, C, (H - 1) // 2, (W - 1) // 2)
    (B, C, H, W), (h, w) = x.shape, inner.shape[-2:]
    if (h, w) == (H // 2, W // 2):
        return inner
    shape = (B, inner.shape[1], H // 2, W // 2)
    if workspace:
        out = workspace.take(shape, inner, torch.channels_last)
    else:
        out = torch.empty(shape, dtype=inner.dtype, device=inner.device, memory_format=torch.channels_last)
    out[:, :, :h, :w] = inner
    if workspace:
        workspace.give(inner)
    if H % 2 == 0:  # the last output row, every column
        out[:, :, h:, :] = conv(module, F.pad(x[:, :, H - 2 :, :], (0, 1, 0, 1)))
    if W % 2 == 0:  # the last output column, the rows above
        out[:, :, :h, w:] = conv(module, F.pad(x[:, :, : 2 * h + 1, W - 2 :], (0, 1, 0, 0)))
    return out


#: How a 3-tap kernel axis collapses after nearest 2x upsampling, as the 4 taps of a stride-2
#: transposed convolution (padding 1): output 2i sees x[i-1] * w0 + x[i] * (w1 + w2), output
#: 2i+1 sees x[i] * (w0 + w1) + x[i+1] * w2, and tap k of the transposed kernel is what input
#: row r gives output row p = 2r - 1 + k.
_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsample_conv_weights(w: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(O, I, 3, 3) conv weights -> (I, O, 4, 4) weights of ``conv_transpose2d(stride=2,
    padding=1)`` computing conv3x3(nearest_upsample_2x(x)), laid out in ``memory_format``.
    Summed in float32 (or float64) and rounded once to w's dtype."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    taps = torch.tensor(_TAPS, dtype=acc, device=w.device)
    return torch.einsum("ka,lb,oiab->iokl", taps, taps, w.to(acc)).to(w.dtype).contiguous(memory_format=memory_format)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution.

    Computed as one stride-2 transposed convolution with a 4x4 kernel folded from the 3x3 one
    (the same function: each output pixel sees 2x2 low-res pixels through summed taps), so the
    upsampled tensor never exists and each output pixel costs 4 instead of 9 multiply-adds per
    input channel. The folded kernel is built once per state of the weights (vqfast.ops.derived).
    ``exact = True`` (VQModel.exact) keeps diffusers' upsample-then-convolve order, bit for bit.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.exact = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "exact", False):  # diffusers' own module, patched, has no flag
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # channels_last for a channels_last x on the CPU, as in conv(): oneDNN reorders an
        # NCHW (I, O, 4, 4) kernel on every call (+10 ms on a 512-channel 32x32 input here).
        # Built in that layout, not copied into it: one derived kernel per weight state.
        layout = torch.channels_last if _eager_cpu_channels_last(x) else torch.contiguous_format
        weight = derived(upsample_conv_weights, self.conv.weight, layout)
        return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)
