"""Token files: what ``vqfast encode`` writes and ``vqfast decode`` reads.

A token file is a safetensors file holding one tensor, ``tokens``: (N, h, w) int16 (int32 when
the codebook has more than 32768 codes), row i the token ids of image ``names[i]``, with string
metadata:

- ``format``: "vqfast.tokens/1"; ``vqfast_version``;
- ``names``: JSON list of the N image names (relative to the inputs, see vqfast.images);
- ``num_vq_embeddings`` (K), ``grid`` (JSON [h, w]), ``image_size`` (JSON [H, W]);
- ``model`` (first 16 hex digits of the SHA-256 of the weights), ``dtype`` (the compute dtype),
  ``resize`` (``--size`` or "none"), ``batch_size`` (which images share a batch decides how the
  convolutions round, so it can change a token in a near tie): with the three above, the *key* of
  a run. Tokens made under another key are never mixed into a file.
- ``hashes``: JSON list, per row the hash of the image file's bytes it was made from
  (vqfast.cli.images.digest): a rerun reuses a row only for an unchanged image.

While encoding, each rank writes its batches to ``<output>.parts/rank{r}-{i:06d}.safetensors``
(the same format; a part also lists, in ``skipped``, the images of its batch that could not be
read, with their hash and why), each atomically; rank 0 merges the parts, and the rows of an
earlier output, into the output in name order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.atomic import PREFIX, SUFFIX, write_atomically
from .images import tensor_bytes

FORMAT = "vqfast.tokens/2"
TENSOR = "tokens"
_SAFETENSORS_DTYPES = {torch.int16: "I16", torch.int32: "I32"}
_UNSIGNED = tuple(getattr(torch, f"uint{b}") for b in (8, 16, 32, 64) if hasattr(torch, f"uint{b}"))
_PART = re.compile(r"^rank(\d+)-(\d+)\.safetensors$")


@dataclass(frozen=True)
class Key:
    """What must match for token rows of two runs to be interchangeable."""

    model: str
    num_vq_embeddings: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    dtype: str
    resize: str
    batch_size: int

    def metadata(self) -> dict[str, str]:
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Key":
        raw = {k: json.loads(meta[k]) for k in ("num_vq_embeddings", "grid", "image_size", "batch_size")}
        return cls(meta["model"], int(raw["num_vq_embeddings"]), tuple(raw["grid"]), tuple(raw["image_size"]),
                   meta["dtype"], meta["resize"], int(raw["batch_size"]))


def fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of the SHA-256 of the state dict (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor.detach().cpu()))
    return digest.hexdigest()[:16]


def token_dtype(num_codes: int) -> torch.dtype:
    """int16 when every id in [0, num_codes) fits, else int32."""
    return torch.int16 if num_codes <= 2**15 else torch.int32


@dataclass(frozen=True)
class Contents:
    """What a token file written by ``write`` says: its key, row names and their image hashes, and
    (parts only) the images of its batch that were skipped: name -> (hash, reason)."""

    key: Key
    names: list[str]
    hashes: list[str]
    skipped: dict[str, tuple[str, str]]


def write(path: Path, tokens: torch.Tensor, names: list[str], key: Key, hashes: list[str],
          skipped: dict[str, tuple[str, str]] | None = None) -> None:
    """tokens: (N, h, w) integer ids -> a token file at ``path``, written atomically; ``hashes``:
    per row the hash of its image; ``skipped`` (parts): name -> (hash, reason).

    The safetensors layout is written here rather than by safetensors.save_file, whose header
    lists the metadata in a different order on every call: the same tokens give the same bytes,
    so a resumed or sharded run can be compared with ``cmp``.
    """
    from .. import __version__

    assert len(hashes) == len(names) == tokens.shape[0]
    dtype = token_dtype(key.num_vq_embeddings)
    data = tensor_bytes(tokens.to("cpu", dtype))  # native order: little-endian, as safetensors wants, on x86 and ARM
    meta = {"format": FORMAT, "vqfast_version": __version__, "names": json.dumps(names),
            "hashes": json.dumps(hashes), **key.metadata()}
    if skipped:
        meta["skipped"] = json.dumps({k: list(v) for k, v in sorted(skipped.items())})
    entry = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tokens.shape), "data_offsets": [0, len(data)]}
    header = json.dumps({"__metadata__": meta, TENSOR: entry}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + data)

    write_atomically(path, save)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (empty when it has none); ValueError naming the file when
    it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_contents(path: Path) -> Contents:
    """The metadata of a token file written by ``write``; ValueError naming the file otherwise."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vqfast token file of this version (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    try:
        names, hashes = json.loads(meta["names"]), json.loads(meta["hashes"])
        skipped = {k: (str(v[0]), str(v[1])) for k, v in json.loads(meta.get("skipped", "{}")).items()}
        if not (isinstance(names, list) and isinstance(hashes, list) and len(names) == len(hashes)):
            raise ValueError("names and hashes must be lists of one entry per row")
        return Contents(Key.from_metadata(meta), names, hashes, skipped)
    except (KeyError, TypeError, ValueError, IndexError, RecursionError) as e:  # ValueError covers bad JSON
        raise ValueError(f"{path}: the metadata of this {FORMAT} file is incomplete or damaged "
                         f"({type(e).__name__})") from e


def read_tokens(path: Path) -> torch.Tensor:
    """The ``tokens`` tensor of a token file written by ``write``."""
    from safetensors.torch import load_file

    return load_file(str(path))[TENSOR]


def parts_folder(output: Path) -> Path:
    """Where the ranks put their batches while encoding to ``output``."""
    return output.with_name(output.name + ".parts")


def list_parts(folder: Path) -> list[Path]:
    """The finished parts in ``folder`` (temporary files are hidden and not listed)."""
    return sorted(p for p in folder.glob("rank*.safetensors") if _PART.match(p.name)) if folder.is_dir() else []


def remove_parts(folder: Path) -> None:
    """Delete the parts in ``folder`` and the temporary files of killed writers, then the folder
    when nothing else is left in it: a file of another program is never deleted."""
    if not folder.is_dir():
        return
    for path in [*list_parts(folder), *folder.glob(f"{PREFIX}*{SUFFIX}")]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # not empty: the user's files stay, and so does the folder
        pass


def next_part(folder: Path, rank: int) -> Path:
    """The next free part name of ``rank``: one past its highest number, so a resumed run never
    writes over a finished part."""
    numbers = [int(m.group(2)) for p in list_parts(folder) if (m := _PART.match(p.name)) and int(m.group(1)) == rank]
    return folder / f"rank{rank}-{max(numbers, default=-1) + 1:06d}.safetensors"


def merge(output: Path, rows: dict[str, tuple[Path, int]], names: list[str], hashes: dict[str, str],
          key: Key) -> dict[str, int]:
    """Write ``output`` with the rows of ``names`` (in that order), each taken from row i of token
    file p for ``rows[name] = (p, i)``; return name -> row."""
    tensors: dict[Path, torch.Tensor] = {}
    h, w = key.grid
    out = torch.empty(len(names), h, w, dtype=token_dtype(key.num_vq_embeddings))
    for i, name in enumerate(names):
        source, row = rows[name]
        if source not in tensors:
            tensors[source] = read_tokens(source)
        out[i] = tensors[source][row]
    write(output, out, names, key, [hashes[n] for n in names])
    return {n: i for i, n in enumerate(names)}


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON at ``path``, atomically."""
    text = json.dumps(value, indent=2) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _metadata_in(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes; ValueError naming ``path`` when the header is not
    a safetensors header."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size]) if 8 + size <= len(data) else None
        meta = header.get("__metadata__") or {} if isinstance(header, dict) else None
    except (struct.error, ValueError, RecursionError) as e:  # ValueError covers bad JSON and UTF-8
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__})") from e
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path} is not a readable safetensors file (its header is not a JSON object of "
                         "tensors with string metadata)")
    return meta


@dataclass(frozen=True)
class Decodable:
    """A token file as decode reads it: tokens (N, h, w), names, metadata, and the digest of the
    very bytes these came from (what the PNGs' stamps name)."""

    tokens: torch.Tensor
    names: list[str]
    meta: dict[str, str]
    digest: str


def open_for_decode(path: Path) -> Decodable:
    """A token file, read once, with its structure checked: ValueError naming the file, the
    tensor and what was seen and expected when ``tokens`` is missing, not an integer tensor or
    not 3-D, or ``names`` does not hold N strings. Files without vqfast metadata are accepted;
    their images are named by row number. The digest and the tensors come from one open file
    (its /dev/fd path where there is one, else its bytes read once), so the digest belongs to
    these tokens even when the file is replaced meanwhile."""
    from safetensors.torch import load, load_file

    if not path.is_file():
        raise FileNotFoundError(f"TOKENS: {str(path)!r} is " + ("a folder, not a token file" if path.is_dir()
                                                                 else "not a token file that exists"))
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        hasher = hashlib.sha256()
        while block := f.read(2**20):
            hasher.update(block)
        f.seek(0)
        head = f.read(8)
        header = len(head) == 8 and struct.unpack("<Q", head)[0]
        meta = _metadata_in(head + f.read(header) if 8 + header <= size else head, path)
        same_file = Path(f"/dev/fd/{f.fileno()}")  # this open file, whatever is at ``path`` now
        try:
            if same_file.exists():
                tensors = load_file(str(same_file))
            else:
                f.seek(0)
                tensors = load(f.read())
        except Exception as e:  # safetensors raises its own error types (truncated data, unknown dtype...)
            raise ValueError(f"{path}: the tensors cannot be read: {str(e).replace(str(same_file), str(path))}") from e
    digest = hasher.hexdigest()[:32]
    if TENSOR not in tensors:
        raise ValueError(f"{path} has no tensor {TENSOR!r} (it holds {sorted(tensors) or 'no tensors'})")
    tokens = tensors[TENSOR]
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{path}: tensor {TENSOR!r} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dtype in _UNSIGNED:  # ids of any integer width
        unsigned, tokens = tokens.dtype, tokens.to(torch.int64)
        if tokens.numel() and int(tokens.min()) < 0:  # uint64 values of 2**63 and more wrap around
            raise ValueError(f"{path}: tensor {TENSOR!r} {tuple(tokens.shape)} {unsigned} holds ids of 2**63 or "
                             "more, outside any codebook")
    if tokens.ndim != 3 or 0 in tokens.shape[1:]:
        raise ValueError(f"{path}: tensor {TENSOR!r} must be 3-D (N, h, w) with h, w >= 1, "
                         f"got shape {tuple(tokens.shape)}")
    n = tokens.shape[0]
    if "names" not in meta:
        return Decodable(tokens, [f"{i:06d}" for i in range(n)], meta, digest)
    try:
        names = json.loads(meta["names"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: metadata 'names' is not JSON of a list of names ({type(e).__name__})") from e
    if not (isinstance(names, list) and len(names) == n and all(isinstance(x, str) for x in names)):
        size = f" of {len(names)}" if isinstance(names, (list, dict, str)) else ""
        raise ValueError(f"{path}: metadata 'names' must be a list of {n} strings (one per row of "
                         f"{TENSOR!r} {tuple(tokens.shape)}), got {type(names).__name__}{size}")
    return Decodable(tokens, names, meta, digest)


def check_ids(path: Path, tokens: torch.Tensor, meta: dict[str, str], num_codes: int) -> None:
    """ValueError naming the file when the ids do not fit a codebook of ``num_codes`` codes: an id
    outside [0, num_codes), or metadata saying the file was made for another codebook size."""
    made_for = meta.get("num_vq_embeddings")
    if made_for is not None and made_for != str(num_codes):
        raise ValueError(f"{path} was made by a model with num_vq_embeddings={made_for}; "
                         f"this model has {num_codes}")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"{path}: tensor {TENSOR!r} {tuple(tokens.shape)} {tokens.dtype} holds ids from "
                             f"{lo} to {hi}; this model's ids lie in [0, {num_codes})")
