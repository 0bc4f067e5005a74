"""Images on disk for ``vqfast encode`` / ``vqfast decode``: listing, reading, writing.

- Inputs are files or folders; folders are searched recursively for .png, .jpg, .jpeg, .webp and
  .bmp files (any case). An image's *name* is its path relative to the folder given (posix
  separators), or its file name when the file was given itself. The work list is sorted by name:
  it is the unit of sharding and resume. The same file given twice counts once; two files with
  the same name, or whose names differ only by extension (they would decode to the same PNG), are
  refused.
- Reading applies the EXIF orientation, converts to RGB (dropping any alpha channel) and, with ``size``, resizes the shorter side
  to ``size`` (bicubic) and crops the centre to ``size`` x ``size``. Pixels become float32 in
  [-1, 1]: ``x / 127.5 - 1``.
- Writing maps [-1, 1] to uint8 as diffusers' image processor does, ``round(clamp(x / 2 + 0.5, 0, 1)
  * 255)``, and saves a PNG under a temporary name in the same folder, then renames it, so an
  interrupted run never leaves a torn file under the final name.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..models.atomic import write_atomically

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    """One input image: its name (relative, posix) and where it is."""

    name: str
    path: Path


class SkipImage(Exception):
    """An image that cannot go in this run (unreadable, wrong size): skipped and reported by name."""


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Item]:
    """The images under ``inputs`` (files or folders), sorted by name; see the module docstring."""
    by_name: dict[str, Item] = {}
    seen: set[Path] = set()
    for given in inputs:
        root = Path(given)
        if root.is_dir():
            found = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                     if p.suffix.lower() in EXTENSIONS and p.is_file()]
        elif root.is_file():
            found = [(root.name, root)]
        else:
            raise FileNotFoundError(f"IMAGES: {str(given)!r} is neither an image file nor a folder")
        for name, path in found:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            if name in by_name:
                raise ValueError(
                    f"IMAGES: two inputs have the name {name!r} ({by_name[name].path} and {path}); "
                    "give their common parent folder instead"
                )
            by_name[name] = Item(name, path)
    if not by_name:
        raise FileNotFoundError(f"IMAGES: no {'/'.join(e[1:] for e in EXTENSIONS)} files in {list(map(str, inputs))}")
    check_unique_outputs(list(by_name))
    return [by_name[n] for n in sorted(by_name)]


def output_path(name: str, row: int) -> PurePosixPath:
    """Where image ``name`` (from a token file: not trusted) is decoded to, relative to OUT_DIR:
    the name with its extension replaced by .png, "\\" read as "/", empty and "." parts dropped,
    characters other than letters, digits and ``_ - . space`` replaced by "_", and so is a part's
    leading dot (".." becomes "_.": nothing lands outside OUT_DIR or hidden); a name with no parts
    left becomes the row number, ``{row:06d}.png``."""
    parts = []
    for part in re.split(r"[\\/]+", name):
        if part in ("", "."):
            continue
        part = re.sub(r"[^\w.\- ]", "_", part)
        parts.append("_" + part[1:] if part.startswith(".") else part)
    if not parts:
        parts = [f"{row:06d}"]
    stem = parts[-1].rsplit(".", 1)[0] if "." in parts[-1][1:] else parts[-1]
    return PurePosixPath(*parts[:-1], f"{stem}.png")


def check_unique_outputs(names: list[str]) -> list[PurePosixPath]:
    """The output path of each name; ValueError naming two names that share one."""
    owner: dict[PurePosixPath, str] = {}
    paths = []
    for row, name in enumerate(names):
        out = output_path(name, row)
        if out in owner:
            raise ValueError(f"images {owner[out]!r} and {name!r} would both be decoded to {str(out)!r}")
        owner[out] = name
        paths.append(out)
    return paths


def load_image(path: Path, size: int | None) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]; with ``size``, (3, size, size). Raises SkipImage when the file
    cannot be read as an image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        if size is not None:
            image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
        raise SkipImage(f"not a readable image ({type(e).__name__}: {e})") from e
    w, h = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(sample: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 3, H, W) floating in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    pixels = ((sample.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's elements as bytes, in row-major order (a copy; no numpy needed)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def save_png(pixels: torch.Tensor, target: Path) -> None:
    """pixels: (H, W, 3) uint8 -> ``target`` as PNG, written atomically (temporary name, rename)."""
    from PIL import Image

    h, w, _ = pixels.shape
    image = Image.frombytes("RGB", (w, h), tensor_bytes(pixels))
    write_atomically(target, lambda tmp: image.save(tmp, format="PNG"))


def stream_batches(
    items: list[Item],
    batch_size: int,
    load: Callable[[Item], torch.Tensor],
    workers: int,
) -> Iterator[tuple[list[Item], torch.Tensor | None, list[tuple[Item, str]]]]:
    """Read ``items`` in order on ``workers`` threads, at most two batches ahead, and yield
    (items read, their images stacked (B, 3, H, W) or None, [(item, reason) skipped]) per batch of
    ``batch_size`` readable images (the last batch may be smaller). Memory: about four batches of
    float32 pixels, plus one undecoded original per worker."""
    window = 2 * batch_size
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vqfast-read")
    try:
        queued: deque[tuple[Item, Future]] = deque()
        todo = iter(items)
        good: list[tuple[Item, torch.Tensor]] = []
        skipped: list[tuple[Item, str]] = []
        while True:
            for item in todo:
                queued.append((item, pool.submit(load, item)))
                if len(queued) >= window:
                    break
            if not queued:
                break
            item, future = queued.popleft()
            try:
                good.append((item, future.result()))
            except SkipImage as e:
                skipped.append((item, str(e)))
            if len(good) == batch_size:
                yield [i for i, _ in good], torch.stack([x for _, x in good]), skipped
                good, skipped = [], []
        if good or skipped:
            yield [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, skipped
    finally:  # an interrupted run does not wait for the reads queued ahead
        pool.shutdown(wait=True, cancel_futures=True)
