"""VQModel: a drop-in for diffusers.VQModel (same constructor, config, state dict, methods)."""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from . import checkpoint as ckpt
from .blocks import Decoder, Encoder
from .config import FrozenConfig, init_args_from_config
from .layers import ACTIVATIONS, Attention, SpatialNorm, Upsample2D, memory_format_of
from .outputs import DecoderOutput, VQEncoderOutput
from .quantizer import VectorQuantizer
from .threads import FAIR_THREADS

#: The modules VQModel.exact switches (a plain attribute: the state dict does not change).
_EXACT_SWITCHED = (Upsample2D, SpatialNorm, Attention, nn.GroupNorm, Encoder, Decoder)

NORM_TYPES = ("group", "spatial")


class VQModel(nn.Module):
    r"""A VQ-VAE: encoder, codebook quantizer and decoder, as in diffusers.

    Arguments and defaults are diffusers.VQModel's; ``model.config.<name>`` reads each back.
    A SpatialNorm decoder (``norm_type="spatial"``, Kandinsky's MoVQ) is conditioned on the
    quantized latents. ``lookup_from_codebook=True`` (aMUSEd) makes
    ``decode(ids, force_not_quantize=True, shape=(B, H, W, D))`` take token ids.
    """

    config_name = ckpt.CONFIG_NAME
    # diffusers' ModelMixin class attributes, with VQModel's values where diffusers sets them.
    _supports_gradient_checkpointing = True
    #: Module names whose floating weights from_pretrained keeps in float32 whatever torch_dtype
    #: says (a list, or one name as a str); none for the VQ-VAE, as in diffusers. Subclasses may set it.
    _keep_in_fp32_modules: list[str] | str | None = None
    #: None as in diffusers: vqfast keeps the whole model on one device, so no module is split.
    _no_split_modules: list[str] | None = None
    _skip_layerwise_casting_patterns = ["quantize"]

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
        self.use_slicing = False
        self.slicing_max_memory: int | None = None

    def __getattr__(self, name: str) -> Any:
        # parameters, buffers and submodules first (nn.Module keeps them outside __dict__)
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        config = self.__dict__.get("_config")
        if config is not None and name in config:
            warnings.warn(
                f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute "
                f"is deprecated (as in diffusers); read model.config.{name} instead.",
                FutureWarning, stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def register_to_config(self, **kwargs: Any) -> None:
        """Add or replace config entries (diffusers' ConfigMixin.register_to_config); they are
        written by save_pretrained. Entries that the constructor takes do not rebuild the model."""
        object.__setattr__(self, "_config", FrozenConfig({**self.config, **kwargs}))

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

    # ---------------------------------------------------------------- training and memory

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """Recompute the encoder's and decoder's blocks in the backward pass instead of keeping
        their activations (``torch.utils.checkpoint``, non-reentrant unless a function is given).
        Gradients are those of the plain run; only memory and time change."""
        func = gradient_checkpointing_func or functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = func
                module.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_slicing(self, max_memory: int | str | None = None) -> None:
        """Run encode and decode (and forward) over a batch in slices: two images at a time, or as
        many as fit in ``max_memory`` bytes of activations ("2GiB", "500MB", an int) by the estimate
        of :meth:`activation_bytes`. Slices are balanced and never hold a single image of a larger
        batch: PyTorch runs a one-image convolution on CPU through another kernel than a batched
        one, and its last bits would differ (so a slice may hold one image more than the budget
        says). Outputs equal the unsliced call's bit for bit on the eager path: each image goes
        through the same ops, and the quantizer (whose commit loss averages over the whole batch)
        still sees the whole batch of latents, which are small."""
        self.slicing_max_memory = None if max_memory is None else ckpt.parse_size("max_memory", max_memory)
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def activation_bytes(self, kind: str, height: int, width: int, dtype: torch.dtype | None = None) -> int:
        """An upper estimate of the working memory one image adds to ``kind`` ("encode" or
        "decode") at an image size of height x width: eight tensors of the widest full-resolution
        activation (``max(block_out_channels[:2])`` channels; the decoder's last upsample writes
        ``block_out_channels[1]`` of them at full size), which covers the input and output of a
        convolution, the norm's temporaries and the convolution's scratch memory."""
        if kind not in ("encode", "decode"):
            raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")
        itemsize = (dtype or self.dtype).itemsize
        widest = max(self.config.block_out_channels[:2])
        return 8 * widest * height * width * itemsize

    def _slice_size(self, kind: str, x: torch.Tensor, factor: int) -> int:
        if self.slicing_max_memory is None:
            return 2
        per_image = self.activation_bytes(kind, x.shape[2] * factor, x.shape[3] * factor, x.dtype)
        return max(2, self.slicing_max_memory // per_image)

    def _sliced(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
        """run(x) on CPU threads the machine gives (threads.py); a compiled graph does not hold the
        policy (it would break the graph), its caller may."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return self._in_slices(run, x, n)
        with FAIR_THREADS():
            return self._in_slices(run, x, n)

    def _in_slices(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
        """run(x) computed in balanced slices of about n images (none of a single image unless the
        batch is one), written into one preallocated output (no concatenation copy)."""
        batch = x.shape[0]
        count = max(1, min(-(-batch // n), batch // 2))
        if not self.use_slicing or count == 1:
            return run(x)
        base, extra = divmod(batch, count)
        out, start = None, 0
        for size in [base + 1] * extra + [base] * (count - extra):
            y = run(x[start : start + size])
            if out is None:
                out = torch.empty((batch, *y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=memory_format_of(y))
            out[start : start + size] = y
            start += size
        return out

    # ---------------------------------------------------------------- forward passes

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """x: (B, in_channels, H, W) floating -> latents (B, vq_embed_dim, H/f, W/f), not quantized."""
        _check_images("x", x, self.config.in_channels)
        h = self._sliced(lambda part: self.quant_conv(self.encoder(part)), x, self._slice_size("encode", x, 1))
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
        spatial = self.config.norm_type == "spatial"
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        dec = self._sliced(
            lambda q: self.decoder(self.post_quant_conv(q), q if spatial else None),
            quant, self._slice_size("decode", quant, factor),
        )
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """encode then decode (quantizing): sample (B, in_channels, H, W) -> DecoderOutput."""
        _check_images("sample", sample, self.config.in_channels)
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_config(cls, config: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A model with fresh weights from a config dict; ``kwargs`` override its entries, as in
        diffusers. diffusers' bookkeeping keys ("_class_name", ...) are ignored; other keys the
        constructor does not know are dropped with a warning (or returned with
        ``return_unused_kwargs=True``, as ``(model, unused)``)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (such as model.config), got {type(config).__name__}")
        merged = {**config, **kwargs}
        model = cls(**init_args_from_config(cls.__init__, merged, cls.__name__))
        if return_unused_kwargs:
            used = set(inspect.signature(cls.__init__).parameters)
            return model, {k: v for k, v in kwargs.items() if k not in used}
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        *,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool | None = None,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        output_loading_info: bool = False,
        disable_mmap: bool = False,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        offload_state_dict: bool | None = None,
        ignore_mismatched_sizes: bool = False,
        use_flashpack: bool = False,
        quantization_config: Any = None,
        **hub_kwargs: Any,
    ):
        """Load a diffusers-format folder: config.json plus ``diffusion_pytorch_model.safetensors``,
        a sharded ``*.safetensors.index.json`` checkpoint, or the ``.bin`` forms of both (read with
        ``torch.load(weights_only=True)``). Returns the model in eval mode.

        - ``torch_dtype`` (or its alias ``dtype``): floating parameters are cast as they are read
          (float32 when not given); modules named in ``_keep_in_fp32_modules`` stay float32.
        - ``low_cpu_mem_usage`` (default True): build the model on the meta device and adopt the
          read tensors as its parameters: no random initialisation and one copy of the weights.
          False initialises a full model first and copies the weights into it (slower, twice the memory).
        - ``device_map``: a device ("cpu", "cuda:1", 0, torch.device) or ``{"": device}`` reads the
          weights straight onto it; "auto" is the first CUDA device when there is one, else the CPU.
          vqfast puts the whole model on one device: splitting it is refused.
        - ``output_loading_info=True`` returns ``(model, info)`` with diffusers' keys; since every
          weight must load (anything else raises), its lists are empty.
        - ``variant``, ``use_safetensors``, ``subfolder`` as in diffusers. With low_cpu_mem_usage
          the weights of a safetensors file stay mapped from it (read on first use, shared with the
          page cache), as in diffusers; ``disable_mmap=True`` reads each file into memory instead
          (for files that may be rewritten in place while the model lives).
        - a hub repo id ("owner/name") is downloaded through huggingface_hub when installed, with
          ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``,
          ``proxies``. For a local folder these are accepted and have nothing to do (as in diffusers).
        ``max_memory``, ``offload_folder``, ``offload_state_dict``, ``ignore_mismatched_sizes``,
        ``use_flashpack`` and ``quantization_config`` are accepted at their defaults (diffusers'
        pipelines pass them) and refused otherwise. Any other argument raises TypeError.
        """
        unknown = sorted(set(hub_kwargs) - HUB_ARGUMENTS)
        if unknown:
            raise TypeError(
                f"from_pretrained got unexpected keyword arguments {unknown}; "
                f"it takes the hub arguments {sorted(HUB_ARGUMENTS)} besides those in its signature"
            )
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype} and its alias dtype={dtype} disagree; pass one of them")
        torch_dtype = torch_dtype if torch_dtype is not None else dtype
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise TypeError(f"torch_dtype must be a floating torch.dtype such as torch.float16, got {torch_dtype!r}")
        _refuse_unsupported(
            max_memory=(max_memory, None), offload_folder=(offload_folder, None),
            offload_state_dict=(offload_state_dict, (None, False)), ignore_mismatched_sizes=(ignore_mismatched_sizes, False),
            use_flashpack=(use_flashpack, False), quantization_config=(quantization_config, None),
        )
        device = _device_from_map(device_map)
        if low_cpu_mem_usage is None:
            low_cpu_mem_usage = True
        elif not low_cpu_mem_usage and device_map is not None:
            raise ValueError(f"device_map={device_map!r} needs low_cpu_mem_usage=True (the default), got False")
        if Path(pretrained_model_name_or_path).exists():
            ignored = {k: v for k, v in hub_kwargs.items() if k in ("revision", "force_download") and v}
            if ignored:
                warnings.warn(
                    f"{', '.join(f'{k}={v!r}' for k, v in ignored.items())} does nothing for the local folder "
                    f"{pretrained_model_name_or_path}: it is loaded as it is",
                    UserWarning, stacklevel=2,
                )
            hub_kwargs = {}
        folder = ckpt.resolve_folder(pretrained_model_name_or_path, subfolder, hub_kwargs)
        config = ckpt.read_config(folder)
        files = ckpt.weights_files(folder, variant, use_safetensors)
        keep = _as_list(cls._keep_in_fp32_modules)
        target = torch_dtype or torch.float32

        def dtype_for(name: str, _: torch.dtype) -> torch.dtype:
            return torch.float32 if keep and set(name.split(".")) & set(keep) else target

        state = ckpt.read_state_dict(
            files, device if low_cpu_mem_usage else "cpu", dtype_for, mmap=not disable_mmap
        )
        source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
        if low_cpu_mem_usage:
            with torch.device("meta"):
                model = cls.from_config(config)
        else:
            model = cls.from_config(config)
        state = ckpt.rename_deprecated_attention(
            state, [name for name, m in model.named_modules() if isinstance(m, Attention)]
        )
        ckpt.check_state_dict(model.state_dict(), state, source)
        if low_cpu_mem_usage:
            model.load_state_dict(state, strict=True, assign=True)
        else:
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if t.is_floating_point():
                    t.data = t.data.to(dtype_for(name, t.dtype))
            model.load_state_dict(state, strict=True)
            model.to(device)
        del state
        object.__setattr__(model, "_config", FrozenConfig({**model.config, "_name_or_path": str(pretrained_model_name_or_path)}))
        model.eval()
        if output_loading_info:
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
            return model, info
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Any = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = ckpt.DEFAULT_MAX_SHARD_SIZE,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write config.json and the weights so that diffusers.VQModel.from_pretrained loads them:
        one file, or shards of at most ``max_shard_size`` ("10GB", "500MB", an int of bytes) with a
        ``*.index.json``. ``safe_serialization=False`` writes ``.bin``; ``variant`` names the files
        ``diffusion_pytorch_model.<variant>.*``. ``is_main_process=False`` writes nothing (the other
        ranks of a distributed run). Every file is written under a temporary name and renamed.
        ``save_function`` and ``push_to_hub`` are diffusers' and are refused unless left at their
        defaults (use huggingface_hub's upload_folder on the saved folder); other arguments raise TypeError."""
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)}")
        _refuse_unsupported(save_function=(save_function, None), push_to_hub=(push_to_hub, False))
        if Path(save_directory).is_file():
            raise NotADirectoryError(f"save_directory must be a folder, got the file {save_directory}")
        if not is_main_process:
            return
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        ckpt.write_folder(Path(save_directory), config, self.state_dict(), safe_serialization, variant, max_shard_size)

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


#: Arguments of from_pretrained that only matter for a hub repo id (passed to snapshot_download).
HUB_ARGUMENTS = frozenset({"revision", "cache_dir", "local_files_only", "token", "force_download", "proxies"})


def _refuse_unsupported(**given: tuple[Any, Any]) -> None:
    """Each argument name -> (value, accepted default or tuple of them): raise naming the first
    that differs."""
    for name, (value, default) in given.items():
        allowed = default if isinstance(default, tuple) else (default,)
        if not any(value is a or (a is not None and not isinstance(value, torch.Tensor) and value == a) for a in allowed):
            raise ValueError(
                f"{name}={value!r} is not supported by vqfast (see docs/drop-in.md, the differences "
                f"from diffusers); leave it at {' or '.join(repr(a) for a in allowed)}"
            )


def _device_from_map(device_map: Any) -> torch.device:
    """The one device a device_map names: a device, an int (CUDA index), {"": device} or "auto"."""
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                f"device_map must put the whole model on one device ({{'': device}}), "
                f"got a map over {sorted(device_map)[:5]}"
            )
        device_map = device_map[""]
    if isinstance(device_map, bool) or (isinstance(device_map, int) and device_map < 0):
        raise ValueError(f"device_map must be a device, a CUDA index >= 0, {{'': device}} or 'auto', got {device_map!r}")
    try:
        return torch.device("cuda", device_map) if isinstance(device_map, int) else torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device_map must be a device such as 'cpu' or 'cuda:0', a CUDA index, {{'': device}} or 'auto' "
            f"('balanced' and 'sequential' split a model over devices, which vqfast does not), got {device_map!r}"
        ) from None


def _as_list(modules: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if modules is None:
        return []
    return [modules] if isinstance(modules, str) else list(modules)


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
