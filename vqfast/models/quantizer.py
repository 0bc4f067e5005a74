"""The codebook: diffusers' VectorQuantizer on vqfast's memory-safe nearest-code search."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import functional as vf


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through output and the commitment loss.

    Same constructor, parameter (``embedding.weight``, (n_e, vq_embed_dim)) and outputs as
    diffusers' VectorQuantizer. ``remap`` (a numpy file of used indices) is not supported:
    no VQModel uses it.
    """

    def __init__(
        self,
        n_e: int,
        vq_embed_dim: int,
        beta: float,
        remap=None,
        unknown_index: str = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        if remap is not None:
            raise ValueError(f"remap must be None (vqfast does not support index remapping), got {remap!r}")
        self.n_e = n_e
        self.vq_embed_dim = vq_embed_dim
        self.beta = beta
        self.legacy = legacy
        self.remap = None
        self.re_embed = n_e
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, vq_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """z: (B, D, H, W). Returns (z_q, loss, (perplexity, min_encodings, indices)).

        z_q has z's shape and dtype; loss is 0-dim; perplexity and min_encodings are None (as in
        diffusers); indices are int64 of shape (B*H*W,), or (B, H, W) with sane_index_shape.
        """
        if z.ndim != 4 or z.shape[1] != self.vq_embed_dim:
            raise ValueError(
                f"z must be (B, {self.vq_embed_dim}, H, W) for this codebook, got shape {tuple(z.shape)}"
            )
        z_q, indices, loss = vf.quantize(z, self.embedding.weight, beta=self.beta, legacy=self.legacy, dim=1)
        indices = indices if self.sane_index_shape else indices.reshape(-1)
        # diffusers hands the decoder a contiguous z_q whatever z's layout; convolutions round
        # differently per layout, so matching it keeps decode identical.
        return z_q.contiguous(), loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Codebook rows for ``indices``; with ``shape`` = (B, H, W, D), returned as (B, D, H, W)."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
