"""Output containers: dataclasses that also index and unpack like tuples.

diffusers' outputs are OrderedDicts; ours are plain dataclasses with the same fields and the same
``out[0]``, ``out["sample"]`` and ``out.to_tuple()``. Fields that are None are left out of the
tuple view, as in diffusers. Iterating yields the values, so ``sample, loss = out`` works.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch


class _TupleLike:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclass
class VQEncoderOutput(_TupleLike):
    """``latents``: (B, vq_embed_dim, H/f, W/f), the encoder output after quant_conv."""

    latents: torch.Tensor


@dataclass
class DecoderOutput(_TupleLike):
    """``sample``: (B, out_channels, H, W). ``commit_loss``: a 0-dim tensor when decode quantized,
    else zeros of shape (B,) in the input's dtype (diffusers' convention)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None
