"""Reading and writing diffusers-format model folders: config.json plus the weights file.

Every check runs before a model is touched, so a failed load raises and leaves nothing half-loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .atomic import write_atomically
from .config import validate_config

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
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
    if not isinstance(config, dict):
        raise ValueError(f"config file {file} must hold a JSON object, got {type(config).__name__}")
    validate_config({k: v for k, v in config.items() if not k.startswith("_")}, str(file))  # names the file
    return config


def weights_file(folder: Path, variant: str | None, use_safetensors: bool | None) -> Path:
    """The weights file to read: safetensors first, the .bin fallback unless told otherwise."""
    stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
    suffixes = {True: [".safetensors"], False: [".bin"], None: [".safetensors", ".bin"]}[use_safetensors]
    candidates = [folder / f"{stem}{s}" for s in suffixes]
    for file in candidates:
        if file.is_file():
            return file
    raise FileNotFoundError(
        f"no weights file in {folder}: looked for {', '.join(c.name for c in candidates)}"
    )


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .bin file through torch.load(weights_only=True)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
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
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": "VQModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    payload.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
    if safe_serialization:
        from safetensors.torch import save_file

        write_atomically(folder / f"{stem}.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    else:
        write_atomically(folder / f"{stem}.bin", lambda p: torch.save(tensors, p))
    write_atomically(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))
