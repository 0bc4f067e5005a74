"""Accelerate a diffusers VQModel that is already loaded (``pipe.movq``, ``pipe.vqvae``) in place.

vqfast's layers use diffusers' attribute names, so their forward methods run unchanged on
diffusers' modules: ``patch`` binds them as instance attributes of the matching modules (the
state dict, parameters and module tree stay exactly as they were) and ``unpatch`` deletes
those attributes, which brings back diffusers' own methods.
"""

from __future__ import annotations

import types

from torch import nn

from .layers import Attention, ResnetBlock2D, SpatialNorm, Upsample2D
from .quantizer import VectorQuantizer


def _upsample_forward(self: nn.Module, hidden_states, output_size=None, *args, **kwargs):
    """diffusers' Upsample2D signature; the folded transposed convolution for the 2x case."""
    if output_size is not None:  # an explicit size: not a plain 2x upsample
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    return Upsample2D.forward(self, hidden_states)

# diffusers class name -> the vqfast forward that replaces its own
_FORWARDS = {
    "ResnetBlock2D": ResnetBlock2D.forward,
    "ResnetBlockCondNorm2D": ResnetBlock2D.forward,
    "SpatialNorm": SpatialNorm.forward,
    "Attention": Attention.forward,
    "VectorQuantizer": VectorQuantizer.forward,
    "Upsample2D": _upsample_forward,
}
_MARK = "_vqfast_patched"


def _supported(module: nn.Module) -> bool:
    name = type(module).__name__
    if name == "ResnetBlock2D":  # only the VAE's form: no time embedding, pre-norm, no resampling
        return module.time_emb_proj is None and module.upsample is None and module.downsample is None \
            and module.output_scale_factor == 1.0
    if name == "ResnetBlockCondNorm2D":
        return module.time_embedding_norm == "spatial" and module.upsample is None and module.downsample is None \
            and module.output_scale_factor == 1.0
    if name == "Attention":  # the VAE's single-head self-attention with a residual
        return getattr(module, "_from_deprecated_attn_block", False) and module.heads == 1 \
            and module.residual_connection and module.rescale_output_factor == 1.0
    if name == "VectorQuantizer":
        return module.remap is None
    if name == "Upsample2D":  # nearest 2x, then the 3x3 "conv" with padding 1
        conv = getattr(module, "conv", None)
        return module.use_conv and not module.use_conv_transpose and module.interpolate and module.norm is None \
            and module.name == "conv" and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) \
            and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
    return name in _FORWARDS


def patch(model: nn.Module) -> nn.Module:
    """Make a live diffusers VQModel run vqfast's ops: fused GroupNorm+SiLU and SpatialNorm, the
    exact memory-safe codebook search, the folded upsample+convolution. Returns the same model. Modules vqfast does not cover
    keep diffusers' code; a module patched already is left as it is."""
    if type(model).__name__ != "VQModel" or not type(model).__module__.startswith("diffusers."):
        raise TypeError(
            f"patch expects a diffusers VQModel, got {type(model).__module__}.{type(model).__name__} "
            "(a vqfast.VQModel needs no patching)"
        )
    for module in model.modules():
        if _supported(module) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_FORWARDS[type(module).__name__], module)
            setattr(module, _MARK, True)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every module runs diffusers' own forward again. Returns the model."""
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
    return model
