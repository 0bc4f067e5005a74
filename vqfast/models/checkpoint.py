"""Reading and writing diffusers-format model folders: config.json plus the weights file.

Every check runs before a model is touched, so a failed load raises and leaves nothing half-loaded.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import write_atomically
from .config import validate_config

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
INDEX_SUFFIX = ".index.json"
#: diffusers' default largest shard (decimal gigabytes, as diffusers counts them).
DEFAULT_MAX_SHARD_SIZE = "10GB"
#: The diffusers release whose VQModel folder format this mirrors (and is tested against).
DIFFUSERS_FORMAT_VERSION = "0.42.1"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Attention parameters of checkpoints older than diffusers 0.15, renamed on load as diffusers does.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def resolve_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None,
    hub_kwargs: dict[str, Any],
) -> Path:
    """The local folder holding config.json: ``name_or_path/subfolder``, downloaded first when
    ``name_or_path`` is a hub repo id ("owner/name") that is not a local path."""
    path = Path(name_or_path)
    text = str(name_or_path)
    if not path.exists() and _REPO_ID.match(text) and not text.startswith((".", "~")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ImportError(
                f"{text!r} is not a local folder, and loading it from the Hugging Face Hub needs "
                "huggingface_hub: pip install 'vqfast[hub]' (or pip install huggingface_hub)"
            ) from None
        prefix = f"{subfolder}/" if subfolder else ""
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}  # None: the hub's default
        import inspect

        taken = inspect.signature(snapshot_download).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in taken.values())
        refused = [] if takes_any else sorted(k for k in hub_kwargs if k not in taken)
        if refused:
            raise ValueError(
                f"the installed huggingface_hub's snapshot_download does not take {refused} "
                "(for proxies, set HTTPS_PROXY in the environment)"
            )
        path = Path(
            snapshot_download(
                text, allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}{WEIGHTS_STEM}*"], **hub_kwargs
            )
        )
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OSError(f"could not read the config file {file}: {e}") from e
    except RecursionError as e:  # json's parser recurses once per nesting level
        raise OSError(f"could not read the config file {file}: its JSON is nested too deeply") from e
    if not isinstance(config, dict):
        raise ValueError(f"config file {file} must hold a JSON object, got {type(config).__name__}")
    validate_config({k: v for k, v in config.items() if not k.startswith("_")}, str(file))  # names the file
    return config


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
#: KB/MB/GB/TB are decimal (as in diffusers' max_shard_size="10GB"); KiB/MiB/GiB/TiB binary.
_UNITS = {"": 1, "b": 1} | {
    f"{p}{s}": base**power
    for power, p in enumerate("kmgt", start=1)
    for s, base in (("b", 1000), ("ib", 1024))
}


def parse_size(name: str, value: int | str) -> int:
    """Bytes from an int or a string such as "10GB", "500KB", "2GiB" (``name`` is the argument)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a number of bytes or a string such as '10GB' or '2GiB', got {value!r}")
    if isinstance(value, str):
        m = _SIZE.match(value)
        scale = _UNITS.get(m.group(2).lower()) if m else None
        if scale is None:
            raise ValueError(
                f"{name} must be a number of bytes or a string such as '10GB', '500KB' or '2GiB', got {value!r}"
            )
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {value}")
    return value


def _stem(variant: str | None) -> str:
    return f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM


def _index_name(suffix: str, variant: str | None) -> str:
    """diffusers puts the variant before the last extension: ``...safetensors.index.fp16.json``."""
    return f"{WEIGHTS_STEM}{suffix}.index.{variant}.json" if variant else f"{WEIGHTS_STEM}{suffix}{INDEX_SUFFIX}"


def weights_files(folder: Path, variant: str | None, use_safetensors: bool | None) -> list[Path]:
    """The weights to read, in the order diffusers looks for them: one safetensors file, a sharded
    safetensors checkpoint (``*.safetensors.index.json``), then the same for ``.bin`` (unless
    ``use_safetensors`` says otherwise). A sharded checkpoint gives its shards, in index order."""
    suffixes = {True: [".safetensors"], False: [".bin"], None: [".safetensors", ".bin"]}[use_safetensors]
    stem = _stem(variant)
    looked = []
    for suffix in suffixes:
        single, index = folder / f"{stem}{suffix}", folder / _index_name(suffix, variant)
        looked += [single.name, index.name]
        if single.is_file():
            return [single]
        if index.is_file():
            return _shards(index)
    others = sorted(p.name for p in folder.glob(f"{WEIGHTS_STEM}*") if p.is_file())
    raise FileNotFoundError(
        f"Error no file named {stem}{suffixes[-1]} found in directory {folder} "
        f"(variant={variant!r}, use_safetensors={use_safetensors!r}; looked for {', '.join(looked)}; "
        f"weights files present: {others or 'none'})"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            RecursionError) as e:
        raise OSError(f"could not read the shard index {index}: it must be JSON with a 'weight_map' object ({e!r})") from e
    shards = [index.parent / name for name in files]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the shard index {index} lists files that are not in {index.parent}: {missing}")
    return shards


def read_state_dict(
    files: list[Path],
    device: torch.device | str = "cpu",
    dtype_for: Callable[[str, torch.dtype], torch.dtype] | None = None,
    mmap: bool = True,
) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors files, or .bin files through torch.load(weights_only=True), on
    ``device``; each floating tensor is cast to ``dtype_for(name, dtype)`` as it is read, so at most
    one tensor exists in two dtypes at a time. ``mmap=False`` reads each file into memory first."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = _read_one(file, device, mmap)
        if dtype_for is not None:
            for name in list(part):
                if part[name].is_floating_point():
                    part[name] = part[name].to(dtype_for(name, part[name].dtype))
        duplicated = sorted(set(part) & set(state))
        if duplicated:
            raise OSError(f"the weights file {file} repeats tensors of an earlier shard: {duplicated[:5]}")
        state.update(part)
    return state


def _read_one(file: Path, device: torch.device | str, mmap: bool) -> dict[str, torch.Tensor]:
    device = str(device)
    try:
        if file.suffix == ".safetensors":
            import safetensors.torch

            if mmap:
                state = safetensors.torch.load_file(str(file), device=device)
            else:
                state = {k: v.to(device) for k, v in safetensors.torch.load(file.read_bytes()).items()}
        else:
            # torch maps only its zip format; files of torch.save's legacy format are read whole
            state = torch.load(file, map_location=device, weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except Exception as e:  # safetensors, pickle and zip errors share no base class
        raise OSError(f"could not read the weights file {file} (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OSError(f"the weights file {file} does not hold a flat dict of tensors")
    return state


def rename_deprecated_attention(state: dict[str, torch.Tensor], attention_paths: list[str]) -> dict:
    """query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0 under each attention module."""
    renamed = dict(state)
    for path in attention_paths:
        for old, new in _DEPRECATED_ATTENTION.items():
            for kind in ("weight", "bias"):
                key = f"{path}.{old}.{kind}"
                if key in renamed:
                    renamed[f"{path}.{new}.{kind}"] = renamed.pop(key)
    return renamed


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError listing every missing key, unexpected key and shape mismatch."""
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for key in sorted(set(expected) & set(given)):
        if expected[key].shape != given[key].shape:
            problems.append(
                f"size mismatch for {key}: the checkpoint has {tuple(given[key].shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
        elif not given[key].is_floating_point():
            problems.append(f"{key} must be a floating tensor, the checkpoint has {given[key].dtype}")
    if problems:
        raise ValueError(f"the weights in {source} do not fit this model's config:\n  " + "\n  ".join(problems))


def write_folder(
    folder: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    safe_serialization: bool,
    variant: str | None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[Path]:
    """config.json plus the weights: one file, or shards of at most ``max_shard_size`` bytes each
    (a tensor larger than that gets a shard of its own) with the index diffusers reads. Weights
    files of the same variant and format that an earlier save left (other shard counts, a stale
    index or single file) are removed, so the folder holds one checkpoint. Returns the files written."""
    limit = parse_size("max_shard_size", max_shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": "VQModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    payload.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    suffix = ".safetensors" if safe_serialization else ".bin"
    stem = _stem(variant)
    groups = _split(tensors, limit)
    names = (
        [f"{stem}{suffix}"] if len(groups) == 1
        else [f"{stem}-{i:05d}-of-{len(groups):05d}{suffix}" for i in range(1, len(groups) + 1)]
    )
    written = []
    for name, keys in zip(names, groups):
        part = {k: tensors[k] for k in keys}
        if safe_serialization:
            from safetensors.torch import save_file

            write_atomically(folder / name, lambda p, part=part: save_file(part, p, metadata={"format": "pt"}))
        else:
            write_atomically(folder / name, lambda p, part=part: torch.save(part, p))
        written.append(folder / name)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, keys in zip(names, groups) for k in keys},
        }
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        index_file = folder / _index_name(suffix, variant)
        write_atomically(index_file, lambda p: Path(p).write_text(index_text))
        written.append(index_file)
    write_atomically(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))
    _remove_other_checkpoints(folder, stem, suffix, {p.name for p in written}, _index_name(suffix, variant))
    return written + [folder / CONFIG_NAME]


def _split(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Tensor names grouped into shards in state-dict order, each shard at most ``limit`` bytes
    unless a single tensor is larger (huggingface_hub's rule, so shard counts match diffusers')."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if n > limit:
            groups.append([name])
            continue
        if size + n > limit:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current or not groups:
        groups.append(current)
    return groups


_SHARD = re.compile(r"^-\d{5}-of-\d{5}$")


def _remove_other_checkpoints(folder: Path, stem: str, suffix: str, keep: set[str], index: str) -> None:
    for path in folder.iterdir():
        name = path.name
        if name in keep or not path.is_file() or not name.startswith(stem):
            continue
        rest = name[len(stem):]
        if name == index or rest == suffix or (rest.endswith(suffix) and _SHARD.match(rest[: -len(suffix)])):
            path.unlink()
