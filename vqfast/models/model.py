"""VQModel: a drop-in for diffusers.VQModel (same constructor, config, state dict, methods)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .blocks import Decoder, Encoder
from .config import FrozenConfig, init_args_from_config
from .layers import ACTIVATIONS, Attention, SpatialNorm, Upsample2D
from .outputs import DecoderOutput, VQEncoderOutput
from .quantizer import VectorQuantizer

#: The modules VQModel.exact switches (a plain attribute: the state dict does not change).
_EXACT_SWITCHED = (Upsample2D, SpatialNorm, Attention, nn.GroupNorm)

NORM_TYPES = ("group", "spatial")


class VQModel(nn.Module):
    r"""A VQ-VAE: encoder, codebook quantizer and decoder, as in diffusers.

    Arguments and defaults are diffusers.VQModel's; ``model.config.<name>`` reads each back.
    A SpatialNorm decoder (``norm_type="spatial"``, Kandinsky's MoVQ) is conditioned on the
    quantized latents. ``lookup_from_codebook=True`` (aMUSEd) makes
    ``decode(ids, force_not_quantize=True, shape=(B, H, W, D))`` take token ids.
    """

    config_name = ckpt.CONFIG_NAME

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ):
        super().__init__()
        args = dict(locals())
        del args["self"], args["__class__"]
        object.__setattr__(self, "_config", FrozenConfig(args))
        _check_config(args)
        self.encoder = Encoder(
            in_channels, latent_channels, down_block_types, block_out_channels, layers_per_block,
            norm_num_groups, act_fn, mid_block_add_attention,
        )
        vq_embed_dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, remap=None, sane_index_shape=False)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(
            latent_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
            norm_num_groups, act_fn, norm_type, mid_block_add_attention,
        )

    @property
    def config(self) -> FrozenConfig:
        return self._config

    @property
    def exact(self) -> bool:
        """True keeps diffusers' order of operations and layouts where vqfast changes them for
        speed or accuracy: the decoder's upsample-then-convolve (folded into one transposed
        convolution), SpatialNorm's affine (folded into its latent-resolution maps), attention's
        channels_last output and GroupNorm on channels_last activations (see
        reference._group_norm). Float32 outputs agree with diffusers within 1e-5 either way."""
        return all(getattr(m, "exact", False) for m in self.modules() if isinstance(m, _EXACT_SWITCHED))

    @exact.setter
    def exact(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, _EXACT_SWITCHED):
                m.exact = bool(value)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------- forward passes

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """x: (B, in_channels, H, W) floating -> latents (B, vq_embed_dim, H/f, W/f), not quantized."""
        _check_images("x", x, self.config.in_channels)
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(
        self,
        h: torch.Tensor,
        force_not_quantize: bool = False,
        return_dict: bool = True,
        shape: tuple[int, ...] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Latents (or token ids) to images.

        - default: h (B, D, h, w) floating is quantized first; commit_loss is the 0-dim loss;
        - force_not_quantize with lookup_from_codebook: h holds int token ids in [0, K) and
          ``shape`` = (B, h, w, D) says how to lay the looked-up codes out;
        - force_not_quantize otherwise: h (B, D, h, w) goes to the decoder as it is.
        In the last two commit_loss is zeros of shape (B,) in h's dtype, as in diffusers.
        """
        D = self.quantize.vq_embed_dim
        if not force_not_quantize:
            _check_images("h", h, D)
            quant, commit_loss, _ = self.quantize(h)
        elif self.config.lookup_from_codebook:
            _check_token_ids(h, shape, self.quantize.n_e, D)
            quant = self.quantize.get_codebook_entry(h, shape)
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            _check_images("h", h, D)
            quant = h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        dec = self.decoder(self.post_quant_conv(quant), quant if self.config.norm_type == "spatial" else None)
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """encode then decode (quantizing): sample (B, in_channels, H, W) -> DecoderOutput."""
        _check_images("sample", sample, self.config.in_channels)
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VQModel":
        """A model with fresh weights from a config dict (diffusers' bookkeeping keys are ignored)."""
        return cls(**init_args_from_config(cls.__init__, dict(config), cls.__name__))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        *,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        **hub_kwargs: Any,
    ) -> "VQModel":
        """Load a diffusers-format folder: config.json plus diffusion_pytorch_model.safetensors
        (or the .bin fallback, read with torch.load(weights_only=True)).

        A hub repo id ("owner/name") is downloaded through huggingface_hub when installed;
        ``hub_kwargs`` (revision, cache_dir, token, local_files_only, ...) go to it.
        Returns the model in eval mode, in ``torch_dtype`` when given (else float32).
        """
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise TypeError(f"torch_dtype must be a floating torch.dtype such as torch.float16, got {torch_dtype!r}")
        if hub_kwargs and Path(pretrained_model_name_or_path).exists():
            raise TypeError(f"from_pretrained got unexpected arguments for a local folder: {sorted(hub_kwargs)}")
        folder = ckpt.resolve_folder(pretrained_model_name_or_path, subfolder, hub_kwargs)
        config = ckpt.read_config(folder)
        file = ckpt.weights_file(folder, variant, use_safetensors)
        state = ckpt.read_state_dict(file)
        with torch.device("meta"):
            model = cls.from_config(config)
        state = ckpt.rename_deprecated_attention(
            state, [name for name, m in model.named_modules() if isinstance(m, Attention)]
        )
        ckpt.check_state_dict(model.state_dict(), state, str(file))
        model.load_state_dict(state, strict=True, assign=True)
        object.__setattr__(model, "_config", FrozenConfig({**model.config, "_name_or_path": str(pretrained_model_name_or_path)}))
        return model.to(torch_dtype or torch.float32).eval()

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None
    ) -> None:
        """Write config.json and the weights so that diffusers.VQModel.from_pretrained loads them."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        ckpt.write_folder(Path(save_directory), config, self.state_dict(), safe_serialization, variant)

    @classmethod
    def from_diffusers(cls, model: nn.Module) -> "VQModel":
        """A vqfast copy of a live diffusers.VQModel: same config, weights, dtype, device and mode."""
        param = next(model.parameters())
        with torch.device("meta"):
            ours = cls.from_config(dict(model.config))
        state = model.state_dict()
        ckpt.check_state_dict(ours.state_dict(), state, type(model).__name__)
        ours.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return ours.to(device=param.device, dtype=param.dtype).train(model.training)


# -------------------------------------------------------------------- argument checks


def _check_config(c: dict[str, Any]) -> None:
    if c["norm_type"] not in NORM_TYPES:
        raise ValueError(f"norm_type must be one of {list(NORM_TYPES)}, got {c['norm_type']!r}")
    if not isinstance(c["act_fn"], str) or c["act_fn"].lower() not in ACTIVATIONS:
        raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {c['act_fn']!r}")
    n = len(c["block_out_channels"])
    for name in ("down_block_types", "up_block_types"):
        if len(c[name]) != n:
            raise ValueError(f"{name} must have one entry per block_out_channels ({n}), got {len(c[name])}")
    vq_dim = c["vq_embed_dim"] if c["vq_embed_dim"] is not None else c["latent_channels"]
    if c["norm_type"] == "spatial" and vq_dim != c["latent_channels"]:
        raise ValueError(
            f"norm_type='spatial' conditions the decoder on the quantized latents, so vq_embed_dim "
            f"must equal latent_channels ({c['latent_channels']}), got {vq_dim}"
        )


def _check_images(name: str, x: Any, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (B, {channels}, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1), got shape {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} must have H and W of at least 1, got shape {tuple(x.shape)}")


def _check_token_ids(ids: Any, shape: Any, num_codes: int, dim: int) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"h must be a tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"h must hold integer token ids with lookup_from_codebook, got dtype {ids.dtype}")
    if shape is None:
        raise ValueError(f"decode with lookup_from_codebook needs shape=(B, H, W, {dim}), got shape=None")
    shape = tuple(shape)
    if len(shape) != 4 or shape[3] != dim or math.prod(shape[:3]) != ids.numel():
        raise ValueError(
            f"shape must be (B, H, W, {dim}) with B*H*W equal to the {ids.numel()} token ids in h "
            f"(h has shape {tuple(ids.shape)}), got shape={shape}"
        )
    if ids.numel():
        # The one host sync of a token-id decode: ids outside the codebook would otherwise
        # fail later as an opaque index error (a device-side assert on GPU).
        lo, hi = torch.aminmax(ids)
        if ((lo < 0) | (hi >= num_codes)).item():
            lo, hi = int(lo), int(hi)
            raise ValueError(f"token ids in h must lie in [0, {num_codes}), got values from {lo} to {hi}")
