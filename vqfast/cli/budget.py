"""Batch sizing for ``vqfast encode`` / ``vqfast decode`` from a memory budget.

``--max-memory`` bounds the working memory of one batch (activations, the images or ids going in,
the pixels coming out), not the model's weights. The batch size is
``min(cap, budget // per_image)`` with ``cap`` = ``--batch-size`` (default 256: larger batches do
not run faster and make resume coarser); when one image alone needs more than the budget the
command refuses to start (vqfast.cli.tokens.choose_batch) rather than run over it.

Bytes per image:

- on CUDA, measured: the peak that one image adds (``torch.cuda.max_memory_allocated`` around a
  batch of one), which also counts fixed workspaces, so it over-estimates the per-image share;
- elsewhere, estimated from the config: ``H * W * itemsize * max(k * C, floor)`` with ``C`` the
  widest full-resolution layer, ``max(block_out_channels[:2])`` (the decoder's last upsample writes
  ``block_out_channels[1]`` channels at full size), and ``(k, floor)`` = (8, 1024) to encode,
  (12, 1536) to decode. The constants cover the resident memory measured on CPU (glibc, oneDNN)
  for the MoVQ, aMUSEd and LDM-f4 architectures at batch 1 to 8 with a margin of 1.3x to 3x:
  convolution scratch and allocator slack grow with the pixels more than with the channels.

Default budget: 70% of the GPU memory free once the model is loaded on CUDA; 2 GiB on CPU (per
process: under torchrun each rank has its own).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from ..models.messages import short_repr

CPU_DEFAULT_BUDGET = 2 * 2**30
CUDA_FREE_FRACTION = 0.7
DEFAULT_MAX_BATCH = 256
#: (k, floor) of the CPU estimate, per command; see the module docstring.
CPU_FACTORS = {"encode": (8, 1024), "decode": (12, 1536)}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1} | {
    f"{prefix}{suffix}": (1000 if suffix == "b" else 1024) ** power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix in ("", "i", "ib", "b")
}


def parse_size(text: str) -> int:
    """Bytes from "2GiB", "512MiB", "1.5G" or "1000000". K/M/G/T and KiB/MiB/GiB/TiB are binary
    (powers of 1024), KB/MB/GB/TB decimal (powers of 1000); case does not matter."""
    m = _SIZE.match(text)
    scale = _UNITS.get(m.group(2).lower()) if m else None
    value = float(m.group(1)) * scale if scale is not None else 0.0  # a float: 400 digits give inf
    if not 1 <= value < 2**63:
        raise ValueError(f"--max-memory must be a size from 1 byte to 8 EiB such as 2GiB, 512MiB or 1000000 "
                         f"(bytes), got {short_repr(text, 80)}")
    return int(value)


def format_size(n: int) -> str:
    """1536 -> "1.5 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def estimate_per_image(config: Any, height: int, width: int, dtype: torch.dtype, command: str) -> int:
    """CPU estimate of one image's working memory in bytes (see the module docstring).

    config: the model's config (``block_out_channels``); height, width: the image in pixels;
    dtype: the model's dtype; command: "encode" or "decode".
    """
    k, floor = CPU_FACTORS[command]
    widest = max(tuple(config["block_out_channels"])[:2])
    return height * width * dtype.itemsize * max(k * widest, floor)


def measure_per_image(run_one: Callable[[], Any], device: torch.device) -> int:
    """CUDA: the peak bytes that ``run_one`` (a batch of one image) allocates on ``device``."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_one()
    torch.cuda.synchronize(device)
    return max(1, torch.cuda.max_memory_allocated(device) - before)


def default_budget(device: torch.device) -> int:
    """70% of the free GPU memory on CUDA (call after loading the model), 2 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return CPU_DEFAULT_BUDGET


def batch_size(budget: int, per_image: int, cap: int | None = None) -> int:
    """max(1, min(cap, budget // per_image)); cap defaults to DEFAULT_MAX_BATCH."""
    return max(1, min(cap or DEFAULT_MAX_BATCH, budget // max(1, per_image)))
