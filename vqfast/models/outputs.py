"""Output containers that behave as diffusers' ``BaseOutput``: ordered dicts with attributes.

``out.sample``, ``out["sample"]``, ``out[0]``, ``out.to_tuple()``, ``keys() / values() / items()``
and ``isinstance(out, dict)`` all work; fields that are None are not keys and are left out of the
tuple view. Being dicts, they iterate over their keys, as diffusers' outputs do, so unpack with
``sample, commit_loss = out.to_tuple()`` (or ``return_dict=False``). Removing keys is refused.
They are registered as pytree nodes, so DistributedDataParallel and torch.compile see through them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.utils._pytree as pytree


class ModelOutput(OrderedDict):
    """Base of the dataclass outputs: the non-None fields, in field order, are the dict's items."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        pytree.register_pytree_node(
            cls,
            lambda out: (list(out.values()), list(out.keys())),
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                OrderedDict.__setitem__(self, f.name, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not None and any(f.name == name for f in fields(self)):
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} keeps its fields; build a new output instead")

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild through the dataclass constructor.
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields in order: ``(sample, commit_loss)``, ``(latents,)``."""
        return tuple(self.values())


@dataclass
class VQEncoderOutput(ModelOutput):
    """``latents``: (B, vq_embed_dim, H/f, W/f), the encoder output after quant_conv."""

    latents: torch.Tensor


@dataclass
class DecoderOutput(ModelOutput):
    """``sample``: (B, out_channels, H, W). ``commit_loss``: a 0-dim tensor when decode quantized,
    else zeros of shape (B,) in the input's dtype (diffusers' convention)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None
