"""``vqfast encode`` on webdataset shards: one token shard per input shard, no merge, resume and
scale by shard.

``vqfast encode data/{00000..00999}.tar --size 256 --model DIR -o OUT_DIR``

- Inputs: tar files, folders of them (searched recursively for ``*.tar``) and brace patterns
  (``{00000..00999}``, ``{a,b}``), expanded here. Samples are read from each tar as webdataset
  defines them: a member ``dir/key.ext.more`` belongs to sample ``dir/key`` (the path up to the
  first dot of the file name), consecutive members with one key form one sample. The image is the
  sample's first entry among ``--image-ext`` (default jpg,jpeg,png,webp); every other entry is
  passed through untouched. Streams are read with Python's tarfile (no extra dependency; what
  needs a network, s3:// or pipe:, is not read: copy the shards locally first).
- ``--size N`` is required: shards hold images of many sizes; each is resized (shorter side,
  bicubic) and centre-cropped to N x N, as for image folders.
- Output, per input shard ``NAME.tar``: ``OUT_DIR/NAME.tar``, a webdataset tar holding per sample
  ``KEY.tokens.npy`` (uint16 when K <= 65536, else int32; shape (h, w)) and the passed-through
  entries, in the input's order; written under a temporary name and renamed when whole. Then
  ``OUT_DIR/NAME.json``: the model's fingerprint, dtype, size, image extensions, the input
  shard's size, mtime and SHA-256, counts, the skipped keys and why, the seconds it took. The JSON
  is written last: it is the shard's "done" mark. Members carry mtime 0 and no owner, so a shard
  encoded twice is the same bytes. When every shard is done, ``OUT_DIR/index.json`` lists the
  output shards with their counts (written by whichever process finishes last).
- A sample whose image cannot be decoded, or that has none, is skipped by key and listed in its
  shard's JSON; the others keep their order. A tar that cannot be read (truncated, corrupt) is
  reported by name and gets no output; the other shards go on, and the exit status is 1.
- Resume: a rerun skips every shard whose JSON matches its input (size and mtime, else its
  SHA-256) and the run's model, dtype, size, image extensions and batch size; the others are
  encoded again (pass the same --batch-size to resume on a machine with another memory budget).
  kill -9 loses at most the shards in flight (their temporary files are removed by the next run).
- Scale: shard i goes to worker i mod W, W = (torchrun ranks) x (--part's n), worker = part x
  ranks + rank: whole shards, never a padded sampler. Batches are cut inside a shard in sample
  order, so a shard's bytes do not depend on how many processes ran (at one intra-op thread count).
- Memory: one batch of images and one shard's output at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..models.atomic import remove_stale
from . import images, sharding, tokenfile
from .main import RunFailed, UsageError

FORMAT = "vqfast.token-shard/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> a00b a01b a02b (zero padding kept), ``{x,y}`` -> x y; nested and several
    groups expand left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        if hi < lo:
            raise UsageError(f"the brace range {{{body}}} in {pattern!r} runs backwards")
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [out for c in choices for out in expand_braces(head + c + tail)]


def is_shard_input(arg: str) -> bool:
    """A tar file, a brace pattern, or a folder holding tar files (and then no images)."""
    path = Path(arg)
    if _BRACE.search(arg) or arg.endswith(".tar"):
        return True
    return path.is_dir() and next(path.rglob("*.tar"), None) is not None


def list_shards(inputs: list[str]) -> list[Path]:
    """The shards the inputs name, in the order given (folders: sorted), each once; refused when
    one is missing or two would write the same output name."""
    found: list[Path] = []
    for arg in inputs:
        for name in expand_braces(arg):
            path = Path(name)
            if path.is_dir():
                found += sorted(p for p in path.rglob("*.tar") if p.is_file())
            elif path.is_file():
                found.append(path)
            else:
                raise UsageError(f"input {name!r} does not exist (expected a .tar shard, a folder of them or a "
                                 "brace pattern of them)")
    seen: dict[str, Path] = {}
    unique = []
    for path in found:
        other = seen.get(path.name)
        if other is not None and not images.same_file(other, path):
            raise UsageError(f"shards {str(other)!r} and {str(path)!r} would both write {path.name!r} in the output "
                             "folder; give them distinct names")
        if other is None:
            seen[path.name] = path
            unique.append(path)
    return unique


def split_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a member name under webdataset's rule, or None (no extension)."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else None


class ShardUnreadable(Exception):
    """A tar that cannot be read to its end."""


def samples(path: Path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(member name, bytes), ...]) per sample, streamed in the tar's order. Raises
    ShardUnreadable on a truncated or corrupt tar."""
    key, entries = None, []
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_key(member.name)
                if parts is None:
                    continue  # webdataset ignores a name without an extension too
                if parts[0] != key and entries:
                    yield key, entries
                    entries = []
                key = parts[0]
                entries.append((member.name, tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardUnreadable(f"cannot be read as a tar ({type(e).__name__}: {e})") from e
    if entries:
        yield key, entries


def file_facts(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class Plan:
    source: Path
    tar: Path  # the output shard
    json: Path  # its done mark


def plans(shards: list[Path], out_dir: Path) -> list[Plan]:
    return [Plan(s, out_dir / s.name, out_dir / (s.name.removesuffix(".tar") + ".json")) for s in shards]


def is_done(plan: Plan, settings: dict, form: str = FORMAT) -> bool:
    """Whether the output of ``plan`` is whole and made from this input with these settings."""
    try:
        import json

        done = json.loads(plan.json.read_text())
    except (OSError, ValueError):
        return False
    if done.get("format") != form or done.get("settings") != settings or not plan.tar.is_file():
        return False
    if plan.tar.stat().st_size != done.get("output_bytes"):
        return False
    facts = file_facts(plan.source)
    source = done.get("input", {})
    if facts == {k: source.get(k) for k in facts}:
        return True
    return facts["bytes"] == source.get("bytes") and images.file_digest(plan.source) == source.get("sha256")


def worker_of(part: tuple[int, int], ranks: sharding.Ranks) -> tuple[int, int]:
    """(this process's worker number, number of workers) over --part i/n and torchrun's ranks."""
    i, n = part
    return i * ranks.world + ranks.rank, n * ranks.world


def parse_part(value: str | None) -> tuple[int, int]:
    if value is None:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", value.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--part must be i/n with 0 <= i < n (this process's share of the shards), got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def token_bytes(ids: torch.Tensor, num_codes: int) -> bytes:
    """One sample's (h, w) ids as a .npy file: uint16 when every id fits, else int32."""
    out = io.BytesIO()
    np.save(out, ids.cpu().numpy().astype(np.uint16 if num_codes <= 65536 else np.int32), allow_pickle=False)
    return out.getvalue()


@dataclass(frozen=True)
class Job:
    """What a decoding worker gets: one sample's image bytes (None: it has none) and how to read
    them. The sample's other entries stay in this process."""

    index: int
    image: bytes | None
    size: int
    max_pixels: int
    exts: tuple[str, ...]


def decode_job(job: Job) -> torch.Tensor:
    """(3, size, size) uint8 pixels of a job's image (run in a worker process)."""
    if job.image is None:
        raise images.SkipImage(f"has no image (none of {', '.join('.' + e for e in job.exts)})")
    return images.decode_pixels(job.image, job.size, job.max_pixels)


def decoders(workers: int):
    """A pool of ``workers`` processes decoding images (JPEG decoding and resizing hold the GIL
    for part of their time: threads would slow the model's own Python). Spawned, not forked: a
    fork of a process whose OpenMP pool has run can hang."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(1,))


def encode_shard(plan: Plan, settings: dict, encode, batch: int, size: int, max_pixels: int, pool,
                 exts: tuple[str, ...], num_codes: int) -> dict:
    """Write plan.tar and plan.json from plan.source; return the JSON written. ``encode(x)``: the
    ids (B, h, w) of a batch of images; ``pool``: the image decoders (decoders())."""
    started = time.monotonic()
    facts = {**file_facts(plan.source), "sha256": images.file_digest(plan.source)}
    skipped: dict[str, str] = {}
    kept: dict[int, tuple[str, list[tuple[str, bytes]]]] = {}  # job index -> (key, entries to pass through)
    count = 0

    def chunks() -> Iterator[list[Job]]:
        chunk: list[Job] = []
        for i, (key, entries) in enumerate(samples(plan.source)):
            by_ext = {n[len(key) + 1:].lower(): (n, d) for n, d in entries}
            image = next((by_ext[e] for e in exts if e in by_ext), None)
            kept[i] = (key, [(n, d) for n, d in entries if image is None or n != image[0]])
            chunk.append(Job(i, image[1] if image else None, size, max_pixels, exts))
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def write(tmp: str) -> None:
        nonlocal count
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
            for chunk, x, bad in images.stream_batches(chunks(), decode_job, 0, pool):
                ids = encode(images.to_unit_range(x)) if x is not None else []
                for job, reason in bad:
                    skipped[kept.pop(job.index)[0]] = reason
                for job, row in zip(chunk, ids):
                    key, entries = kept.pop(job.index)
                    out.addfile(*_member(f"{key}.tokens.npy", token_bytes(row, num_codes)))
                    for name, data in entries:
                        out.addfile(*_member(name, data))
                    count += 1

    from ..models.atomic import write_atomically

    write_atomically(plan.tar, write)
    done = {"format": FORMAT, "input": {"name": plan.source.name, **facts}, "settings": settings,
            "samples": count + len(skipped), "encoded": count, "skipped_count": len(skipped),
            "skipped": dict(sorted(skipped.items())), "output": plan.tar.name,
            "output_bytes": plan.tar.stat().st_size, "seconds": round(time.monotonic() - started, 2),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tokenfile.write_json(plan.json, done)
    return done


def run(args, ranks: sharding.Ranks, model, encode, choose_batch, say, report) -> int:
    """vqfast encode on shards (tokens.run_encode hands over when the inputs are shards)."""
    from .tokens import downsampling

    if args.size is None:
        raise UsageError("--size is required when the inputs are shards (their images come in many sizes): "
                         "e.g. --size 256")
    exts = tuple(e.strip().lower().lstrip(".") for e in args.image_ext.split(",") if e.strip())
    if not exts:
        raise UsageError(f"--image-ext must list file extensions, e.g. jpg,png; got {args.image_ext!r}")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {str(out_dir)!r} is a file; with shards as inputs -o is the folder for the output shards")
    shards = list_shards(args.inputs)
    part = parse_part(args.part)
    me, workers = worker_of(part, ranks)
    factor = downsampling(model)
    if args.size % factor:
        raise UsageError(f"--size must be a multiple of the model's downsampling factor {factor}, got {args.size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in shards:
        if images.same_file(s.parent, out_dir):
            raise UsageError(f"-o {str(out_dir)!r} holds the input shard {str(s)!r}: its output would replace it; "
                             "write to another folder")
    batch = choose_batch(args.size, args.size)
    settings = {"model": tokenfile.fingerprint(model), "dtype": str(model.dtype).removeprefix("torch."),
                "size": args.size, "image_ext": list(exts), "num_vq_embeddings": model.quantize.n_e,
                "batch_size": batch}  # which samples share a batch can change a token in a near tie
    everything = plans(shards, out_dir)
    mine = [p for i, p in enumerate(everything) if i % workers == me]
    remove_stale([p.tar for p in mine] + [p.json for p in mine])
    todo = [p for p in mine if not is_done(p, settings)]
    if ranks.is_main and part == (0, 1):
        say(f"{len(everything)} shards; {len(everything) - len(todo) if workers == 1 else len(mine) - len(todo)} "
            f"already done; batches of {batch}")
    failed = []
    if todo and ranks.is_main:
        say(f"decoding images in {args.workers} worker processes (--workers)")
    with decoders(args.workers) if todo else contextlib.nullcontext() as pool:
        for plan in todo:
            try:
                done = encode_shard(plan, settings, encode, batch, args.size, args.max_pixels, pool, exts,
                                    model.quantize.n_e)
            except ShardUnreadable as e:
                report("encode", f"shard {str(plan.source)!r} {e}; it has no output")
                failed.append(plan.source.name)
                continue
            for key, reason in list(done["skipped"].items())[:20]:
                report("encode", f"skipped {plan.source.name}:{key!r}: {reason}")
            say(f"{plan.source.name}: {done['encoded']} of {done['samples']} samples -> {plan.tar}")
    failed = [name for part in sharding.gather(ranks, failed) for name in part]  # waits for every rank
    if ranks.is_main:
        write_index(everything, settings, out_dir, say)
    sharding.barrier(ranks)
    if failed:
        raise RunFailed(f"{len(failed)} shards could not be read: {', '.join(failed[:5])}")
    return 0


def write_index(everything: list[Plan], settings: dict, out_dir: Path, say) -> None:
    """OUT_DIR/index.json once every shard is done (else say how many are left)."""
    import json

    rows, left = [], 0
    for p in everything:
        try:
            done = json.loads(p.json.read_text())
        except (OSError, ValueError):
            left += 1
            continue
        if done.get("settings") != settings:
            left += 1
            continue
        rows.append({"shard": p.tar.name, "input": p.source.name, "samples": done["samples"],
                     "encoded": done["encoded"], "skipped": done["skipped_count"]})
    if left:
        say(f"{left} of {len(everything)} shards are not done yet (other parts, or unreadable): no index.json yet")
        return
    tokenfile.write_json(out_dir / "index.json", {
        "format": "vqfast.token-index/1", "settings": settings, "shards": rows,
        "samples": sum(r["samples"] for r in rows), "encoded": sum(r["encoded"] for r in rows)})
    say(f"index of {len(rows)} shards -> {out_dir / 'index.json'}")


# -------------------------------------------------------------------- decode: token shards -> image shards

DECODE_FORMAT = "vqfast.image-shard/1"


def png_bytes(pixels: torch.Tensor) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes."""
    from PIL import Image

    h, w, _ = pixels.shape
    out = io.BytesIO()
    Image.frombytes("RGB", (w, h), images.tensor_bytes(pixels)).save(out, format="PNG")
    return out.getvalue()


def read_ids(data: bytes, num_codes: int, where: str) -> torch.Tensor:
    """A .tokens.npy entry as (h, w) int64, refused (UsageError) when it is no 2-D integer array
    of ids in [0, num_codes)."""
    try:
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{where} is not a .npy array ({e})") from e
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise UsageError(f"{where} holds a {ids.dtype} array of shape {ids.shape}; expected 2-D integer ids")
    if ids.size and (ids.min() < 0 or ids.max() >= num_codes):
        raise UsageError(f"{where} holds ids in [{ids.min()}, {ids.max()}], outside [0, {num_codes}) for this model")
    return torch.from_numpy(ids.astype(np.int64))


def decode_shard(plan: Plan, settings: dict, decode, batch: int, num_codes: int) -> dict:
    """plan.source (a token shard) -> plan.tar: per sample KEY.png and its other entries."""
    started = time.monotonic()
    facts = {**file_facts(plan.source), "sha256": images.file_digest(plan.source)}
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
            chunk: list[tuple[str, torch.Tensor, list[tuple[str, bytes]]]] = []

            def flush():
                nonlocal count
                if not chunk:
                    return
                pixels = images.to_uint8(decode(torch.stack([ids for _, ids, _ in chunk])))
                for (key, _, rest), image in zip(chunk, pixels):
                    out.addfile(*_member(f"{key}.png", png_bytes(image)))
                    for name, data in rest:
                        out.addfile(*_member(name, data))
                    count += 1
                chunk.clear()

            for key, entries in samples(plan.source):
                tokens = [d for n, d in entries if n == f"{key}.tokens.npy"]
                if not tokens:
                    raise UsageError(f"{plan.source}: sample {key!r} has no {key}.tokens.npy: not a vqfast token shard")
                ids = read_ids(tokens[0], num_codes, f"{plan.source}: {key}.tokens.npy")
                if chunk and ids.shape != chunk[0][1].shape:
                    raise UsageError(f"{plan.source}: sample {key!r} has a {tuple(ids.shape)} token grid, "
                                     f"the shard's first has {tuple(chunk[0][1].shape)}")
                chunk.append((key, ids, [(n, d) for n, d in entries if n != f"{key}.tokens.npy"]))
                if len(chunk) == batch:
                    flush()
            flush()

    from ..models.atomic import write_atomically

    write_atomically(plan.tar, write)
    done = {"format": DECODE_FORMAT, "input": {"name": plan.source.name, **facts}, "settings": settings,
            "samples": count, "output": plan.tar.name, "output_bytes": plan.tar.stat().st_size,
            "seconds": round(time.monotonic() - started, 2),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tokenfile.write_json(plan.json, done)
    return done


def run_decode(args, ranks: sharding.Ranks, model, decode, choose_batch, say, report) -> int:
    """vqfast decode on token shards (tokens.run_decode hands over when its input is shards)."""
    import json

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {str(out_dir)!r} is a file; with token shards as input -o is the folder for the image shards")
    sources = list_shards([args.tokens])
    part = parse_part(getattr(args, "part", None))
    me, workers = worker_of(part, ranks)
    fingerprint = tokenfile.fingerprint(model)
    grid = None
    for s in sources:
        if images.same_file(s.parent, out_dir):
            raise UsageError(f"-o {str(out_dir)!r} holds the token shard {str(s)!r}: its output would replace it; "
                             "write to another folder")
        marks = s.with_name(s.name.removesuffix(".tar") + ".json")
        try:
            made = json.loads(marks.read_text()).get("settings", {})
        except (OSError, ValueError):
            made = {}
        if made.get("model") not in (None, fingerprint) and not args.force:
            raise UsageError(f"{s} was made by another model (weights fingerprint {made['model']}; this model's is "
                             f"{fingerprint}): pass the model that encoded it, or --force to decode anyway")
        if made.get("size") and grid is None:
            grid = made["size"]
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    side = grid or 256
    batch = choose_batch(side, side)
    settings = {"model": fingerprint, "dtype": str(model.dtype).removeprefix("torch."), "batch_size": batch}
    out_dir.mkdir(parents=True, exist_ok=True)
    everything = plans(sources, out_dir)
    mine = [p for i, p in enumerate(everything) if i % workers == me]
    remove_stale([p.tar for p in mine] + [p.json for p in mine])
    todo = [p for p in mine if not is_done(p, settings, DECODE_FORMAT)]
    if ranks.is_main and part == (0, 1):
        say(f"{len(everything)} token shards; {len(mine) - len(todo)} already done; batches of {batch} "
            f"(x{factor} upsampling)")
    failed = []
    for plan in todo:
        try:
            done = decode_shard(plan, settings, decode, batch, model.quantize.n_e)
        except ShardUnreadable as e:
            report("decode", f"shard {str(plan.source)!r} {e}; it has no output")
            failed.append(plan.source.name)
            continue
        say(f"{plan.source.name}: {done['samples']} images -> {plan.tar}")
    failed = [name for part_ in sharding.gather(ranks, failed) for name in part_]
    sharding.barrier(ranks)
    if failed:
        raise RunFailed(f"{len(failed)} token shards could not be read: {', '.join(failed[:5])}")
    return 0

