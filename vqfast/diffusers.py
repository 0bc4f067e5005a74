"""vqfast's VQModel as a diffusers model, for diffusers' pipelines.

diffusers' pipelines accept, save and reload only subclasses of its ``ModelMixin``, so
``vqfast.VQModel`` (a plain ``torch.nn.Module``, free of diffusers) cannot sit in a pipeline's
``movq`` / ``vqvae`` slot. This module's ``VQModel`` can: it is vqfast's model (same code, same
ops, same outputs) that is also a ``diffusers.ModelMixin``::

    from vqfast.diffusers import VQModel
    movq = VQModel.from_pretrained("kandinsky-community/kandinsky-2-2-decoder", subfolder="movq")
    pipe = KandinskyV22Pipeline.from_pretrained("kandinsky-community/kandinsky-2-2-decoder", movq=movq)

A pipeline saved with it records the component as ``["vqfast.diffusers", "VQModel"]`` in its
model_index.json, so ``from_pretrained`` of that folder builds vqfast's model again (and needs
vqfast installed); the component's own folder is an ordinary diffusers VQModel folder.
Importing this module imports diffusers; ``import vqfast`` never does.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin

from .models.config import FrozenConfig
from .models.model import VQModel as _VQModel

__all__ = ["VQModel", "from_vqfast"]


class VQModel(_VQModel, ModelMixin):
    """``vqfast.VQModel`` that is also a ``diffusers.ModelMixin`` (and ``ConfigMixin``).

    vqfast's methods come first (loading, saving, config, gradient checkpointing, slicing, dtype,
    device); ModelMixin supplies the rest of diffusers' model API (``num_parameters``, ``to`` with
    its checks, ...). ``enable_layerwise_casting`` is refused (see below); diffusers' offloading
    hooks (``enable_group_offload``, a pipeline's CPU offload) have not been tried with it.
    """

    @property
    def _internal_dict(self) -> FrozenConfig:
        # ConfigMixin's name for the config, read by parts of diffusers that bypass ``config``.
        return self._config

    def enable_layerwise_casting(self, *args: Any, **kwargs: Any) -> None:
        """Refused: diffusers casts each leaf module's weights in a hook around that module's
        forward, but vqfast's fused ops read the weights of norms, convolutions and the codebook
        directly (the folded upsample kernel, GroupNorm+SiLU, SpatialNorm), so they would see the
        storage dtype. Load in the dtype you want instead (``torch_dtype=torch.bfloat16``)."""
        raise NotImplementedError(
            "enable_layerwise_casting is not supported by vqfast's VQModel: its fused ops read weights "
            "outside the per-module casting hooks; load with torch_dtype=... instead"
        )


def from_vqfast(model: _VQModel) -> VQModel:
    """The same weights (shared, not copied), config, dtype, device and mode as a
    ``vqfast.VQModel``, as the pipeline-ready class. ``model`` itself is left as it is."""
    if not isinstance(model, _VQModel):
        raise TypeError(f"from_vqfast expects a vqfast.VQModel, got {type(model).__module__}.{type(model).__name__}")
    if isinstance(model, VQModel):
        return model
    config: dict[str, Any] = dict(model.config)
    with torch.device("meta"):
        bridged = VQModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    bridged.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    object.__setattr__(bridged, "_config", FrozenConfig(config))
    bridged.exact = model.exact
    bridged.use_slicing, bridged.slicing_max_memory = model.use_slicing, model.slicing_max_memory
    for theirs, ours in zip(model.modules(), bridged.modules()):
        if hasattr(theirs, "_gradient_checkpointing_func"):
            ours._gradient_checkpointing_func = theirs._gradient_checkpointing_func
        if hasattr(theirs, "gradient_checkpointing"):
            ours.gradient_checkpointing = theirs.gradient_checkpointing
    return bridged.train(model.training)
