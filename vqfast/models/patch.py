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
from .model import VQModel
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


def _from_diffusers(obj: object, name: str) -> bool:
    """True when ``obj`` is an instance of diffusers' class ``name`` or of a subclass of it."""
    return any(c.__name__ == name and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def _models(target: object, verb: str) -> list[nn.Module]:
    """The diffusers VQModels that ``target`` is or holds (a pipeline's components)."""
    if isinstance(target, nn.Module) and _from_diffusers(target, "VQModel"):
        return [target]
    if _from_diffusers(target, "DiffusionPipeline"):
        components = dict(target.components)
        found = [m for m in components.values() if isinstance(m, nn.Module) and _from_diffusers(m, "VQModel")]
        # vqfast's own model (vqfast.diffusers.VQModel in a pipeline) runs vqfast's ops already
        fast = [m for m in components.values() if isinstance(m, VQModel)]
        if not found and not fast:
            raise TypeError(
                f"{verb} found no VQModel among the components of {type(target).__name__}: "
                f"{sorted(k for k, v in components.items() if v is not None)}"
            )
        return found
    kind = f"{type(target).__module__}.{type(target).__name__}"
    hint = " (a vqfast.VQModel needs no patching)" if isinstance(target, VQModel) else ""
    raise TypeError(
        f"{verb} expects a diffusers VQModel (or a subclass of it) or a diffusers pipeline holding one, "
        f"got {kind}{hint}"
    )


def patch(target):
    """Make a live diffusers VQModel, any subclass of it, or every VQModel among a diffusers
    pipeline's components (``pipe.movq``, ``pipe.vqvae``) run vqfast's ops: fused GroupNorm+SiLU
    and SpatialNorm, the exact memory-safe codebook search, the folded upsample+convolution.
    Returns ``target``. Modules vqfast does not cover keep diffusers' code; a module patched already
    is left as it is. Weights, module tree and config do not change, so the model (and the
    pipeline) saves and reloads as before; a reloaded one runs diffusers' code until patched again."""
    for model in _models(target, "patch"):
        for module in model.modules():
            if _supported(module) and not getattr(module, _MARK, False):
                module.forward = types.MethodType(_FORWARDS[type(module).__name__], module)
                setattr(module, _MARK, True)
    return target


def unpatch(target):
    """Undo :func:`patch` on the same kinds of target: every module runs diffusers' own forward
    again. Returns ``target``."""
    for model in _models(target, "unpatch"):
        for module in model.modules():
            if getattr(module, _MARK, False):
                del module.forward
                delattr(module, _MARK)
    return target
