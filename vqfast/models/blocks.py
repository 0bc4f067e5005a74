"""Encoder and decoder: the down/up blocks, the mid block, and the two towers.

Module and attribute names follow diffusers (``down_blocks.0.resnets.1.conv2``, ...), so a
diffusers state dict loads without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from . import tower_op
from .layers import (
    Attention, Downsample2D, ResnetBlock2D, SpatialNorm, Upsample2D, conv, conv_into, hooked, memory_format_of,
    norm_act, runs_channels_last,
)
from .workspace import Workspace

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
EPS = 1e-6


class _Block(nn.Module):
    """Resnets (each optionally followed by attention), then an optional resampler.

    One class serves all four diffusers block types; the resampler sits in ``downsamplers`` or
    ``upsamplers`` as diffusers names it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        act_fn: str,
        attention: bool,
        zq_channels: int | None,
        resample: str | None,
    ):
        super().__init__()
        # attentions before resnets: diffusers' registration (and state-dict) order
        if attention:
            attn_groups = None if zq_channels is not None else groups
            self.attentions = nn.ModuleList(
                Attention(out_channels, EPS, attn_groups, zq_channels) for _ in range(num_layers)
            )
        else:
            self.attentions = None
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, EPS, act_fn, zq_channels)
            for i in range(num_layers)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor | None = None, overwrite: bool = False,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """``overwrite``: x, and every activation the block makes, may be written over (see
        _Checkpointed._tower); the resnets and the downsampler then write into dead activations
        (``workspace``, the tower's; a block called alone makes its own)."""
        if workspace is None:
            workspace = Workspace.for_owner(overwrite, x)
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq, overwrite=overwrite, workspace=workspace)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        for sampler in getattr(self, "downsamplers", None) or ():
            x = sampler(x, workspace=workspace)
        for sampler in getattr(self, "upsamplers", None) or ():
            if workspace:  # its output is larger than any dead activation: they are freed first
                workspace.clear()
            x = sampler(x)
        return x


class MidBlock(nn.Module):
    """resnet, then (attention, resnet): diffusers' UNetMidBlock2D with one layer."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool, zq_channels: int | None):
        super().__init__()
        attn_groups = None if zq_channels is not None else groups
        # diffusers keeps a None placeholder when attention is off; it has no parameters either way.
        self.attentions = nn.ModuleList(
            [Attention(channels, EPS, attn_groups, zq_channels) if add_attention else None]
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, groups, EPS, act_fn, zq_channels) for _ in range(2)
        )

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor | None = None, overwrite: bool = False,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """``overwrite`` and ``workspace`` as in _Block.forward."""
        if workspace is None:
            workspace = Workspace.for_owner(overwrite, x)
        x = self.resnets[0](x, zq, overwrite=overwrite, workspace=workspace)
        if self.attentions[0] is not None:
            x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq, overwrite=overwrite, workspace=workspace)


class _Checkpointed(nn.Module):
    """A tower whose blocks can be recomputed in the backward pass (gradient checkpointing).

    ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` are diffusers' names: its
    ModelMixin and VQModel.enable_gradient_checkpointing set them on every module that has them."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self._tower_key = tower_op.register(self)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._tower_key = tower_op.register(self)  # a copy, or unpickled: its own key

    def _run(self, block: nn.Module, *args: torch.Tensor | None, overwrite: bool, workspace: Workspace | None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args, overwrite=overwrite, workspace=workspace)

    def _tower(self, x: torch.Tensor, zq: torch.Tensor | None, blocks) -> torch.Tensor:
        """conv_in, the blocks, the output norm and conv_out; channels_last inside where
        runs_channels_last says so, handing back x's layout.

        From conv_in on, x is the tower's own, so each block may write over its input (see
        ResnetBlock2D), and on the CPU dead activations take later ones (Workspace): unless a
        hook could have kept one of the activations. The output is a new tensor of its own.
        Under torch.compile in fp32 on an x86-64 CPU all this runs eagerly, as one op (see
        tower_op)."""
        if tower_op.runs_opaque(self, x):
            return tower_op.eager_tower(x, zq, self._tower_key)
        layout, inside_cl = memory_format_of(x), runs_channels_last(self, x)
        if inside_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        own = not any(hooked(m) for m in self.modules())
        workspace = Workspace.for_owner(own, x)
        x = conv_into(self.conv_in, x, workspace)
        for block in blocks:
            args = (x,) if zq is None else (x, zq)
            x = self._run(block, *args, overwrite=own, workspace=workspace)
        x = norm_act(self.conv_norm_out, x, zq, self.conv_act, into=x if own else None)
        del workspace
        out = conv(self.conv_out, x)
        return out.contiguous(memory_format=layout) if inside_cl else out


def _check_types(kind: str, given, allowed: tuple[str, ...]) -> None:
    for t in given:
        if t not in allowed:
            raise ValueError(f"{kind} contains {t!r}; allowed block types are {list(allowed)}")


class Encoder(_Checkpointed):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_block_types,
        block_out_channels,
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        mid_block_add_attention: bool,
    ):
        super().__init__()
        _check_types("down_block_types", down_block_types, DOWN_BLOCK_TYPES)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            out = block_out_channels[i]
            last = i == len(block_out_channels) - 1
            self.down_blocks.append(
                _Block(prev, out, layers_per_block, norm_num_groups, act_fn,
                       attention=block_type == "AttnDownEncoderBlock2D", zq_channels=None,
                       resample=None if last else "down")
            )
            prev = out
        top = block_out_channels[-1]
        self.mid_block = MidBlock(top, norm_num_groups, act_fn, mid_block_add_attention, None)
        self.conv_norm_out = nn.GroupNorm(num_channels=top, num_groups=norm_num_groups, eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(top, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tower(x, None, [*self.down_blocks, self.mid_block])

    def output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """forward(x)'s shape: H and W halved (rounding down) by each downsampler."""
        f = 2 ** sum(hasattr(b, "downsamplers") for b in self.down_blocks)
        return (x.shape[0], self.conv_out.out_channels, x.shape[2] // f, x.shape[3] // f)


class Decoder(_Checkpointed):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        up_block_types,
        block_out_channels,
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        norm_type: str,
        mid_block_add_attention: bool,
    ):
        super().__init__()
        _check_types("up_block_types", up_block_types, UP_BLOCK_TYPES)
        # diffusers sizes the SpatialNorm convolutions by the decoder's input channels.
        zq_channels = in_channels if norm_type == "spatial" else None
        top = block_out_channels[-1]
        self.conv_in = nn.Conv2d(in_channels, top, kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' state-dict order
        self.mid_block = MidBlock(top, norm_num_groups, act_fn, mid_block_add_attention, zq_channels)
        reversed_channels = list(reversed(block_out_channels))
        prev = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            out = reversed_channels[i]
            last = i == len(block_out_channels) - 1
            self.up_blocks.append(
                _Block(prev, out, layers_per_block + 1, norm_num_groups, act_fn,
                       attention=block_type == "AttnUpDecoderBlock2D", zq_channels=zq_channels,
                       resample=None if last else "up")
            )
            prev = out
        if zq_channels is not None:
            self.conv_norm_out = SpatialNorm(block_out_channels[0], zq_channels)
        else:
            self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return self._tower(x, zq, [self.mid_block, *self.up_blocks])

    def output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """forward(x, zq)'s shape: H and W doubled by each upsampler."""
        f = 2 ** sum(hasattr(b, "upsamplers") for b in self.up_blocks)
        return (x.shape[0], self.conv_out.out_channels, x.shape[2] * f, x.shape[3] * f)
