"""Images on disk for ``vqfast encode`` / ``vqfast decode``: listing, reading, writing.

- Inputs are files or folders; folders are searched recursively for .png, .jpg, .jpeg, .webp and
  .bmp files (any case), following symbolic links to folders (not a link back to a folder it is
  in). An image's *name* is its path relative to the folder given (posix separators), or its file
  name when the file was given itself. The work list is sorted by name: it is the unit of sharding
  and resume. Every name is a row or a named skip: two names of one file (a link ``z.png ->
  a.png``) are two rows; a dangling or looping link, a FIFO or anything else that is not a regular
  file is skipped by name. The same file under the same name (given twice) counts once; two files
  with the same name, names that would decode to the same PNG (extensions differ), or to a file
  and a folder of it ("a.png" and "a.png/b.png"), are refused.
- A *scan* reads each file in 1 MiB blocks for its SHA-256 (what resume compares, so a rerun
  reuses a row only for an image whose content is unchanged) and reads its header, never
  decoding pixels nor holding the file whole. A file larger than any image under ``max_pixels``
  can be (``max_file_bytes``) is skipped by name unread, and so is a header of more than
  ``max_pixels`` pixels (``--max-pixels``, default 8192 x 8192); Pillow's own decompression-bomb
  limit is replaced by this one.
- Reading checks the bytes against the scan's hash (a file that changed meanwhile is skipped by
  name), applies the EXIF orientation and converts to 8-bit RGB, dropping any alpha channel. Modes
  with more than 8 bits per channel keep their whole range instead of being clipped to white:
  16-bit ("I;16*") from [0, 65535]; 32-bit integer ("I") from [0, 65535] when every value lies
  there (16-bit data often arrives in this mode), else from the image's own [min, max]; float
  ("F") from [0, 1] when every value lies there, else from the image's [min, max] (NaN as the
  minimum). With ``size`` it then resizes the shorter side to ``size`` (bicubic) and crops the
  centre to ``size`` x ``size``. Pixels become float32 in [-1, 1]: ``x / 127.5 - 1``.
- Writing maps [-1, 1] to uint8 as diffusers' image processor does, ``round(clamp(x / 2 + 0.5, 0, 1)
  * 255)``, and saves a PNG under a short temporary name in the same folder, then renames it, so an
  interrupted run never leaves a torn file under the final name. Each PNG carries a ``vqfast``
  text chunk (the *stamp*: which token file, row, model and batch size made it), which a rerun
  compares before treating the PNG as finished.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..models.atomic import write_atomically

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 8192 * 8192
#: The PNG text chunk holding a decoded image's stamp.
STAMP_KEY = "vqfast"


@dataclass(frozen=True)
class Item:
    """One input image: its name (relative, posix) and where it is."""

    name: str
    path: Path


class SkipImage(Exception):
    """An image that cannot go in this run (unreadable, wrong size): skipped and reported by name."""


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Item]:
    """The images under ``inputs`` (files or folders), sorted by name; see the module docstring.
    FileNotFoundError / ValueError naming the input for an input that is missing, a folder that
    cannot be listed, two files under one name, or names that decode could not write side by side."""
    by_name: dict[str, Item] = {}
    for given in inputs:
        root = Path(given)
        if root.is_dir():
            found = _walk(root, PurePosixPath(), set())
        elif root.is_file():
            found = [(root.name, root)]
        else:
            what = "a symbolic link to a missing file" if root.is_symlink() else "neither an image file nor a folder"
            raise FileNotFoundError(f"IMAGES: {str(given)!r} is {what}")
        for name, path in found:
            if name in by_name:
                if same_file(by_name[name].path, path):  # the same file given twice counts once
                    continue
                raise ValueError(
                    f"IMAGES: two inputs have the name {name!r} ({str(by_name[name].path)!r} and {str(path)!r}); "
                    "give their common parent folder instead"
                )
            by_name[name] = Item(name, path)
    if not by_name:
        raise FileNotFoundError(f"IMAGES: no {'/'.join(e[1:] for e in EXTENSIONS)} files in {list(map(str, inputs))}")
    check_unique_outputs(list(by_name))
    return [by_name[n] for n in sorted(by_name)]


def _walk(folder: Path, prefix: PurePosixPath, ancestors: set[tuple[int, int]]) -> list[tuple[str, Path]]:
    """(name, path) of every entry with an image extension under ``folder``, symbolic links to
    folders followed (a link back to a folder it is in is not: its images are listed already).
    An entry that is not a readable regular file (a dangling or looping link, a FIFO) is listed
    all the same, so that the scan skips it by name instead of it vanishing."""
    try:
        info = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise FileNotFoundError(f"IMAGES: the folder {str(folder)!r} cannot be listed ({e.strerror or e})") from e
    here = (info.st_dev, info.st_ino)
    if here in ancestors:
        return []
    found = []
    for entry in entries:
        name, path = prefix / entry.name, Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows links; False for a dangling or looping one
        except OSError:
            is_dir = False
        if is_dir:
            found += _walk(path, name, ancestors | {here})
        elif Path(entry.name).suffix.lower() in EXTENSIONS:
            found.append((name.as_posix(), path))
    return found


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (links followed); False when either cannot be reached."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
    """The output path of each name; ValueError naming two names that share one, or whose outputs
    could not both exist (one would be a file and a folder of the other, as "a.png" and
    "a.png/b.png")."""
    owner: dict[PurePosixPath, str] = {}
    paths = []
    for row, name in enumerate(names):
        out = output_path(name, row)
        if out in owner:
            raise ValueError(f"images {owner[out]!r} and {name!r} would both be decoded to {str(out)!r}")
        owner[out] = name
        paths.append(out)
    for out, name in owner.items():
        for parent in out.parents:
            if parent in owner:
                raise ValueError(f"images {owner[parent]!r} and {name!r} cannot both be decoded: {str(parent)!r} "
                                 "would be a PNG file and a folder; rename one of them")
    return paths


@dataclass(frozen=True)
class Header:
    """What a scan learns about one input without decoding its pixels: the hash of its bytes
    ("" when they could not be read), its (width, height) after EXIF orientation (None when the
    header is unreadable), and why it will be skipped (None when it will be read)."""

    digest: str
    size: tuple[int, int] | None
    problem: str | None


def digest(data: bytes) -> str:
    """32 hex digits of the SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()[:32]


def file_digest(path: Path) -> str:
    """``digest`` of a file's bytes, read in 1 MiB blocks ("" when it cannot be read)."""
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(2**20):
                hasher.update(block)
    except OSError:
        return ""
    return hasher.hexdigest()[:32]


def _open(source):
    """A PIL image from bytes or an open binary file."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the command enforces its own limit (max_pixels) before decoding
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _unreadable(e: Exception) -> str:
    """Why Pillow could not read an image, without the repr of the buffer or file object."""
    text = re.sub(r"<_io\.\w+ (object at 0x[0-9a-f]+|name=.*?)>", "the file", str(e))
    return f"not a readable image ({type(e).__name__}: {text})"


def _too_large(w: int, h: int, max_pixels: int) -> str | None:
    if w * h > max_pixels:
        return f"is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (--max-pixels)"
    return None


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file a run reads: 8 bytes per pixel (16-bit RGBA, the widest format
    these readers take, stored uncompressed) for ``max_pixels`` pixels, plus 64 MiB of metadata.
    A larger file cannot hold an image under the limit; it is skipped without being read."""
    return 8 * max_pixels + 64 * 2**20


def _unreadable_file(path: Path, max_pixels: int) -> str | None:
    """Why ``path`` will not be read as an image file (missing, a dangling link, not a regular
    file, larger than max_file_bytes), or None; one stat."""
    try:
        info = os.stat(path)
    except OSError as e:
        link = "is a symbolic link whose target cannot be reached" if Path(path).is_symlink() else "cannot be read"
        return f"{link} ({e.strerror or e})"
    if not stat.S_ISREG(info.st_mode):
        mode = info.st_mode
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" \
            if stat.S_ISSOCK(mode) else "a device"
        return f"is {kind}, not a regular file"
    if info.st_size > max_file_bytes(max_pixels):
        return (f"is {info.st_size} bytes, more than an image of --max-pixels {max_pixels} can take "
                f"({max_file_bytes(max_pixels)} bytes); not read")
    return None


def scan(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Hash the bytes of ``path`` (read in blocks) and read its header: no pixels are decoded and
    the file is never held in memory whole."""
    problem = _unreadable_file(path, max_pixels)
    if problem:
        return Header("", None, problem)
    hashed = file_digest(path)
    try:
        with open(path, "rb") as f:
            w, h, orientation, problem = _header(f, max_pixels)
    except OSError as e:
        if not hashed or e.errno is not None:
            return Header("", None, f"cannot be read ({e.strerror or e})")
        return Header(hashed, None, _unreadable(e))  # Pillow's own OSErrors carry no errno
    except Exception as e:  # PIL raises ValueError, SyntaxError...
        return Header(hashed, None, _unreadable(e))
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        w, h = h, w
    return Header(hashed, (w, h), problem)


def _header(file, max_pixels: int) -> tuple[int, int, int, str | None]:
    """(width, height, EXIF orientation, problem) from an open image file's header."""
    with _open(file) as image:
        w, h = image.size
        problem = _too_large(w, h, max_pixels)
        orientation = 1
        # Pillow reads a PNG's EXIF by decoding the whole image when no eXIf chunk precedes the
        # pixels: a header scan never does that (such a late chunk is read with the pixels).
        if problem is None and not (image.format == "PNG" and "exif" not in image.info):
            try:
                orientation = image.getexif().get(0x0112, 1)
            except Exception:  # a damaged EXIF block: reading the pixels will say more
                orientation = 1
    return w, h, orientation, problem


def _to_rgb(image):
    """A PIL image of any mode as 8-bit RGB, high-bit-depth modes scaled from their whole range
    (see the module docstring) rather than clipped."""
    from PIL import Image

    mode = image.mode
    if mode not in ("I", "F") and not mode.startswith("I;16"):
        return image.convert("RGB")
    if mode == "F":
        values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32).double()
        values = torch.nan_to_num(values, nan=float("-inf"))
        finite = values[values.isfinite()]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        values = values.clamp(lo, hi)
        if 0 <= lo and hi <= 1:
            lo, hi = 0.0, 1.0
    else:
        values = torch.frombuffer(bytearray(image.convert("I").tobytes()), dtype=torch.int32).double()
        lo, hi = (float(values.min()), float(values.max())) if values.numel() else (0.0, 0.0)
        if mode.startswith("I;16") or (0 <= lo and hi <= 65535):
            lo, hi = 0.0, 65535.0
    scaled = ((values - lo) / max(hi - lo, 1e-30) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.frombytes("L", image.size, tensor_bytes(scaled)).convert("RGB")


def load_image(path: Path, size: int | None, expected: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]; with ``size``, (3, size, size). Raises SkipImage when the file
    cannot be read as an image, is over ``max_pixels``, or its bytes no longer hash to
    ``expected`` (the scan's digest)."""
    problem = _unreadable_file(path, max_pixels)
    if problem:
        raise SkipImage(problem)
    try:
        with open(path, "rb") as f:
            data = f.read(max_file_bytes(max_pixels) + 1)
    except OSError as e:
        raise SkipImage(f"cannot be read ({e.strerror or e})") from e
    except MemoryError as e:
        raise SkipImage("does not fit in memory") from e
    if len(data) > max_file_bytes(max_pixels):
        raise SkipImage(f"has grown past {max_file_bytes(max_pixels)} bytes, more than an image of --max-pixels "
                        f"{max_pixels} can take")
    if expected is not None and digest(data) != expected:
        raise SkipImage("changed while this run was reading the inputs (its bytes no longer match the scan "
                        "at the start); rerun to encode its new content")
    return decode_image(data, size, max_pixels)


def decode_image(data: bytes, size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file's bytes as (3, H, W) float32 in [-1, 1] (with ``size``, resized and centre
    cropped to size x size); SkipImage when they are no image PIL reads, or one over max_pixels."""
    return to_unit_range(decode_pixels(data, size, max_pixels))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], as every image reaches the model."""
    return pixels.float() / 127.5 - 1


def decode_pixels(data: bytes, size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """decode_image's pixels before scaling: (3, H, W) uint8 (a quarter of the bytes to send back
    from a worker process)."""
    from PIL import Image, ImageOps

    if len(data) > max_file_bytes(max_pixels):
        raise SkipImage(f"is {len(data)} bytes, more than an image of --max-pixels {max_pixels} can take")
    try:
        with _open(data) as opened:
            problem = _too_large(*opened.size, max_pixels)
            if problem:
                raise SkipImage(problem)
            image = _to_rgb(ImageOps.exif_transpose(opened))
        if size is not None:
            image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    except SkipImage:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
        raise SkipImage(_unreadable(e)) from e
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def to_uint8(sample: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 3, H, W) floating in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    pixels = ((sample.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's elements as bytes, in row-major order (a copy; no numpy needed)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def save_png(pixels: torch.Tensor, target: Path, stamp: str | None = None) -> None:
    """pixels: (H, W, 3) uint8 -> ``target`` as PNG, written atomically (temporary name, rename),
    with ``stamp`` in its ``vqfast`` text chunk."""
    from PIL import Image, PngImagePlugin

    h, w, _ = pixels.shape
    image = Image.frombytes("RGB", (w, h), tensor_bytes(pixels))
    info = PngImagePlugin.PngInfo()
    if stamp is not None:
        info.add_text(STAMP_KEY, stamp)
    write_atomically(target, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_stamp(path: Path) -> str | None:
    """The stamp of a PNG written by ``save_png`` (None when there is none or the file is not a
    readable PNG); reads the header chunks only."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            stamp = image.info.get(STAMP_KEY)
    except Exception:  # not an image, unreadable, truncated...
        return None
    return stamp if isinstance(stamp, str) else None


def stream_batches(
    batches: Iterable[list[Item]],
    load: Callable[[Item], torch.Tensor],
    workers: int,
    pool: Executor | None = None,
) -> Iterator[tuple[list[Item], torch.Tensor | None, list[tuple[Item, str]]]]:
    """Read the images of ``batches`` in order on ``workers`` threads (or on ``pool``, kept open:
    a process pool, whose ``load`` must be picklable), at most two batches ahead, and yield per
    batch (items read, their images stacked (B, 3, H, W) or None, [(item, reason) skipped]). A
    batch holds exactly its items less those skipped: which images share a batch never depends on
    timing. Memory: about four batches of pixels, plus one undecoded original per worker."""
    own = pool is None
    if own:
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vqfast-read")
    try:
        queued: deque[list[tuple[Item, Future]]] = deque()
        todo = iter(batches)
        while True:
            while len(queued) < 2:
                batch = next(todo, None)
                if batch is None:
                    break
                queued.append([(item, pool.submit(load, item)) for item in batch])
            if not queued:
                break
            good: list[tuple[Item, torch.Tensor]] = []
            skipped: list[tuple[Item, str]] = []
            for item, future in queued.popleft():
                try:
                    good.append((item, future.result()))
                except SkipImage as e:
                    skipped.append((item, str(e)))
            yield [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, skipped
    finally:  # an interrupted run does not wait for the reads queued ahead
        if own:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            for batch in queued:
                for _, future in batch:
                    future.cancel()
