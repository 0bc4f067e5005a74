"""Accelerate a diffusers VQModel that is already loaded (``pipe.movq``, ``pipe.vqvae``) in place.

vqfast's layers use diffusers' attribute names, so their forward methods run unchanged on
diffusers' modules: ``patch`` binds them as instance attributes of the matching modules (the
state dict, parameters and module tree stay exactly as they were) and ``unpatch`` deletes
those attributes, which brings back diffusers' own methods.
"""

from __future__ import annotations

import types

from torch import nn

from .layers import Attention, ResnetBlock2D, SpatialNorm
from .quantizer import VectorQuantizer

# diffusers class name -> the vqfast forward that replaces its own
_FORWARDS = {
    "ResnetBlock2D": ResnetBlock2D.forward,
    "ResnetBlockCondNorm2D": ResnetBlock2D.forward,
    "SpatialNorm": SpatialNorm.forward,
    "Attention": Attention.forward,
    "VectorQuantizer": VectorQuantizer.forward,
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
    return name in _FORWARDS


def patch(model: nn.Module) -> nn.Module:
    """Make a live diffusers VQModel run vqfast's ops: fused GroupNorm+SiLU and SpatialNorm, the
    exact memory-safe codebook search. Returns the same model. Modules vqfast does not cover
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
