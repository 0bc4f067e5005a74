"""``vqfast encode`` and ``vqfast decode``: folders of images <-> one token file, for datasets.

``vqfast encode IMAGES_OR_DIR... --model DIR -o tokens.safetensors``

- Inputs: image files, and folders searched recursively for png/jpg/jpeg/webp/bmp. An image's
  name is its path relative to the folder given (its file name when given itself); work goes in
  name order. Images stream from disk on ``--workers`` threads, a batch or two ahead of the model.
  ``--size N`` resizes each (shorter side, bicubic) and crops the centre to N x N; without it every
  image must have the size of the first readable one. That size must be a multiple of the model's
  downsampling factor, 2**(len(block_out_channels) - 1), or the run is refused.
- Output: one safetensors file with ``tokens`` (N, h, w), int16 (int32 when K > 32768), the ids of
  ``model.quantize(model.encode(x).latents)``, and metadata: ``names`` (JSON list, row order), K,
  grid, image size, model digest, dtype, vqfast version. Next to it a manifest
  (``tokens.manifest.json`` for ``-o tokens.safetensors``): ``rows`` (name -> row), ``skipped``
  (name -> reason), counts, ``world_size``.
- An unreadable image, or one of another size, is reported by name on stderr, skipped and listed
  in the manifest. Exit status 0; 1 when no image could be encoded, or with ``--strict`` when
  any was skipped (the rest is still written); 2 when refused before any compute (arguments,
  model, sizes, an existing output of another run).
- Resume: finished batches go to ``<output>.parts/``, each written to a temporary name and
  renamed. Rerunning the command skips every image already in a part or in the output, so a
  finished run recomputes nothing; parts or an output made with another model, dtype, image size
  or ``--size`` are refused, never mixed (delete them or pick another ``-o``). At the end rank 0
  merges them into the output (atomically: the old output stays whole until replaced), writes the
  manifest and deletes the parts.

``vqfast decode tokens.safetensors --model DIR -o OUT_DIR``

- Refused before any compute (exit status 2; the message names the file, the tensor, what was
  seen and what was expected): no ``tokens`` tensor, a non-integer or non-3-D one, ids outside
  [0, K) for the model, metadata made for another K, or ``names`` that do not match the rows.
  Token files without vqfast metadata are accepted; their images are named by row number.
- Writes ``OUT_DIR/<name>.png`` per row (the name's extension replaced by .png; "..", leading
  dots and unusual characters replaced by "_"), each to a temporary name and renamed; a rerun
  skips the PNGs that exist. Rank 0 writes ``OUT_DIR/manifest.json`` (name -> PNG, counts).
  Pixels: round(clamp(x / 2 + 0.5, 0, 1) * 255), as diffusers' image processor.

Both: batches hold max(1, min(--batch-size, --max-memory // bytes per image)) images and the
batch size is printed. Bytes per image are measured on CUDA (the peak of one image) and estimated
on CPU (H * W * itemsize * max(k * max(block_out_channels[:2]), floor), k, floor = 8, 1024 to
encode and 12, 1536 to decode). --dtype auto is float16 on CUDA (float32 when the config sets
force_upcast) and float32 on CPU, where float16 is refused. The progress bar (images/s) shows on
rank 0 when stderr is a terminal. Under torchrun --nproc-per-node N (any number of nodes, one
shared output folder) rank r takes every N-th image (row) from r, on cuda:LOCAL_RANK with NCCL or
on CPU with gloo; the result is the same as one process's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from . import budget, images, sharding, tokenfile
from ..models.model import VQModel

DTYPES = ("auto", "float32", "float16", "bfloat16")


class NothingEncoded(Exception):
    """No input image could be read: exit status 1."""


# -------------------------------------------------------------------- the model


@torch.inference_mode()
def encode_ids(model: VQModel, x: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) in [-1, 1], the model's dtype and device -> token ids (B, h, w) int64."""
    latents = model.encode(x).latents
    _, _, (_, _, ids) = model.quantize(latents)
    return ids.view(x.shape[0], *latents.shape[-2:])


@torch.inference_mode()
def decode_ids(model: VQModel, ids: torch.Tensor) -> torch.Tensor:
    """ids: (B, h, w) int64 in [0, K) -> images (B, 3, h*f, w*f) in the model's dtype, about [-1, 1].

    A token-id decode for every VQModel: the codebook rows go to the decoder unquantized, which is
    what ``decode(latents)`` hands it after quantizing (vqfast's z_q holds exactly the codes)."""
    shape = (*ids.shape, model.quantize.vq_embed_dim)
    if model.config.lookup_from_codebook:
        return model.decode(ids, force_not_quantize=True, shape=shape).sample
    codes = model.quantize.get_codebook_entry(ids.reshape(-1), shape)
    return model.decode(codes, force_not_quantize=True).sample


def default_model() -> str:
    """The embedded demo model's folder."""
    return str(resources.files("vqfast") / "assets" / "demo-model")


def load_model(args: argparse.Namespace, device: torch.device) -> VQModel:
    """``--model`` / ``--subfolder`` on ``device`` in the ``--dtype`` the run uses."""
    try:
        model = VQModel.from_pretrained(args.model or default_model(), subfolder=args.subfolder)
    except FileNotFoundError as e:
        if args.model is None:
            raise FileNotFoundError(f"--model: the embedded demo model is not installed ({e}); "
                                    "pass --model DIR, a diffusers-format VQModel folder") from e
        raise FileNotFoundError(f"--model {args.model!r}: {e}") from e
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" and not model.config.force_upcast else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype float16 needs a CUDA device (got --device cpu): use float32 or bfloat16 on CPU")
    return model.to(device=device, dtype=dtype)


def downsampling(model: VQModel) -> int:
    """How many pixels per token along each side: 2**(len(block_out_channels) - 1)."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def choose_batch(args: argparse.Namespace, ranks: sharding.Ranks, model: VQModel, height: int, width: int,
                 command: str, run_one: Callable[[], object]) -> int:
    """The batch size for images of height x width under ``--max-memory`` (printed on rank 0)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    limit = budget.parse_size(args.max_memory) if args.max_memory else budget.default_budget(ranks.device)
    if ranks.device.type == "cuda":
        per_image, how = budget.measure_per_image(run_one, ranks.device), "measured"
    else:
        per_image, how = budget.estimate_per_image(model.config, height, width, model.dtype, command), "estimated"
    size = budget.batch_size(limit, per_image, args.batch_size)
    if ranks.is_main:
        given = "" if args.max_memory else " (default)"
        print(f"batch size {size}: --max-memory {budget.format_size(limit)}{given}, {budget.format_size(per_image)} "
              f"per {width}x{height} image ({how}, {str(model.dtype).removeprefix('torch.')} on {ranks.device})",
              flush=True)
    return size


def progress(ranks: sharding.Ranks, total: int, command: str):
    """A tqdm bar in images/s on rank 0 when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=command, disable=None if ranks.is_main else True, dynamic_ncols=True)


def report(command: str, message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"vqfast {command}: {message}", file=sys.stderr)


# -------------------------------------------------------------------- encode


def reference_size(items: list[images.Item], size: int | None, factor: int) -> tuple[int, int]:
    """(H, W) every image of the run must have: (size, size), or the first readable image's."""
    if size is not None:
        if size <= 0 or size % factor:
            raise ValueError(f"--size must be a positive multiple of {factor} (the model's downsampling "
                             f"factor), got {size}")
        return size, size
    unreadable = []
    for item in items:
        try:
            _, h, w = images.load_image(item.path, None).shape
        except images.SkipImage as e:
            unreadable.append(f"{item.name!r} ({item.path}): {e}")
            continue
        if h % factor or w % factor:
            raise ValueError(f"image {item.name!r} ({item.path}) is {w}x{h}, but without --size the image size "
                             f"must be a multiple of {factor} (the model's downsampling factor): "
                             "pass --size N to resize and crop")
        return h, w
    raise NothingEncoded(f"none of the {len(items)} images could be read:\n  " + "\n  ".join(unreadable))


def finished_rows(output: Path, key: tokenfile.Key) -> set[str]:
    """Names already encoded under ``key`` in the output and its parts; ValueError naming a file
    made under another key."""
    done: set[str] = set()
    for source in ([output] if output.exists() else []) + tokenfile.list_parts(tokenfile.parts_folder(output)):
        theirs, names = tokenfile.read_key(source)
        if theirs != key:
            diff = ", ".join(f"{k} {getattr(theirs, k)!r} (this run: {getattr(key, k)!r})"
                             for k in key.__dataclass_fields__ if getattr(theirs, k) != getattr(key, k))
            raise ValueError(f"-o: {source} holds tokens of another run: {diff}; delete it "
                             f"(and {tokenfile.parts_folder(output)}) or choose another -o")
        done.update(names)
    return done


def run_encode(args: argparse.Namespace, ranks: sharding.Ranks) -> int:
    output = Path(args.output)
    items = images.list_images(args.inputs)
    model = load_model(args, ranks.device)
    factor = downsampling(model)
    height, width = reference_size(items, args.size, factor)
    key = tokenfile.Key(
        model=tokenfile.fingerprint(model), num_vq_embeddings=model.quantize.n_e,
        grid=(height // factor, width // factor), image_size=(height, width),
        dtype=str(model.dtype).removeprefix("torch."), resize=str(args.size) if args.size else "none",
    )
    done = finished_rows(output, key)
    pending = [item for item in sharding.shard(items, ranks) if item.name not in done]
    dummy = torch.zeros(1, 3, height, width, device=ranks.device, dtype=model.dtype)
    batch = choose_batch(args, ranks, model, height, width, "encode", lambda: encode_ids(model, dummy))

    def load(item: images.Item) -> torch.Tensor:
        x = images.load_image(item.path, args.size)
        if tuple(x.shape[1:]) != (height, width):
            raise images.SkipImage(f"is {x.shape[2]}x{x.shape[1]}, the run's images are {width}x{height} "
                                   "(the first image's size; --size N resizes every image)")
        return x

    parts = tokenfile.parts_folder(output)
    skipped: dict[str, str] = {}
    with progress(ranks, len(pending), "encode") as bar:
        for chunk, x, bad in images.stream_batches(pending, batch, load, args.workers):
            for item, reason in bad:
                report("encode", f"skipped {item.name!r} ({item.path}): {reason}")
                skipped[item.name] = reason
            if x is not None:
                ids = encode_ids(model, x.to(ranks.device, model.dtype))
                tokenfile.write(tokenfile.next_part(parts, ranks.rank), ids, [i.name for i in chunk], key)
            bar.update(len(chunk) + len(bad))

    skipped = {k: v for part in sharding.gather(ranks, skipped) for k, v in part.items()}  # waits for every rank
    encoded = len(items) - len(skipped)
    if ranks.is_main:
        sources = ([output] if output.exists() else []) + tokenfile.list_parts(parts)
        rows = tokenfile.merge(output, sources, [i.name for i in items if i.name not in skipped], key)
        assert len(rows) == encoded, f"{encoded - len(rows)} encoded images are missing from the parts"
        from .. import __version__

        tokenfile.write_json(output.with_suffix(".manifest.json"), {
            "format": "vqfast.encode-manifest/1", "tokens": output.name, "vqfast_version": __version__,
            "images": len(items), "encoded": encoded, "skipped_count": len(skipped),
            "from_earlier_runs": len(done & {i.name for i in items}), "world_size": ranks.world,
            "key": dataclasses.asdict(key), "rows": rows, "skipped": dict(sorted(skipped.items())),
        })
        shutil.rmtree(parts, ignore_errors=True)
        print(f"{encoded} of {len(items)} images -> {output} ({key.grid[0]}x{key.grid[1]} tokens each)"
              + (f"; {len(skipped)} skipped, listed in {output.with_suffix('.manifest.json')}" if skipped else ""))
    sharding.barrier(ranks)  # the other ranks end once the output is in place
    return 1 if encoded == 0 or (args.strict and skipped) else 0


# -------------------------------------------------------------------- decode


def run_decode(args: argparse.Namespace, ranks: sharding.Ranks) -> int:
    source = Path(args.tokens)
    tokens, names, meta = tokenfile.open_for_decode(source)
    model = load_model(args, ranks.device)
    tokenfile.check_ids(source, tokens, meta, model.quantize.n_e)
    targets = images.check_unique_outputs(names)
    out_dir = Path(args.output)
    factor = downsampling(model)
    n, h, w = tokens.shape
    pending = [r for r in sharding.shard(range(n), ranks) if not (out_dir / targets[r]).exists()]
    dummy = torch.zeros(1, h, w, device=ranks.device, dtype=torch.long)
    batch = choose_batch(args, ranks, model, h * factor, w * factor, "decode", lambda: decode_ids(model, dummy))

    with progress(ranks, len(pending), "decode") as bar, ThreadPoolExecutor(max(1, args.workers)) as pool:
        writing: deque = deque()
        for start in range(0, len(pending), batch):
            chunk = pending[start : start + batch]
            pixels = images.to_uint8(decode_ids(model, tokens[chunk].to(ranks.device, torch.long)))
            writing.extend(pool.submit(images.save_png, p, out_dir / targets[r]) for r, p in zip(chunk, pixels))
            while len(writing) > 2 * batch:  # bound the decoded images waiting for the disk
                writing.popleft().result()
            bar.update(len(chunk))
        for future in writing:
            future.result()

    written = sum(sharding.gather(ranks, len(pending)))
    if ranks.is_main:
        tokenfile.write_json(out_dir / "manifest.json", {
            "format": "vqfast.decode-manifest/1", "tokens": source.name, "images": n,
            "written": written, "already_present": n - written, "world_size": ranks.world,
            "outputs": {name: str(t) for name, t in zip(names, targets)},
        })
        print(f"{n} images in {out_dir} ({written} written, {n - written} already there)")
    return 0


# -------------------------------------------------------------------- command line


def run(args: argparse.Namespace) -> int:
    """Run ``vqfast encode`` or ``vqfast decode``; the exit status (see the module docstring)."""
    ranks = None
    try:
        ranks = sharding.start(args.device)
        return (run_encode if args.command == "encode" else run_decode)(args, ranks)
    except (ValueError, OSError, NothingEncoded) as e:
        where = f"[rank {ranks.rank}] " if ranks and ranks.world > 1 else ""
        print(f"vqfast {args.command}: {where}error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NothingEncoded) else 2
    finally:
        if ranks is not None:
            sharding.stop(ranks)


def register(sub, name: str) -> None:
    """Add the parser of ``vqfast encode`` or ``vqfast decode`` (``name``) to ``sub``."""
    doc = __doc__.split("\n\n")
    if name == "encode":
        p = sub.add_parser(name, help="turn images (files or folders) into token ids",
                           description="\n\n".join(doc[1:3]), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR",
                       help="image files and folders (searched recursively for png/jpg/jpeg/webp/bmp)")
        p.add_argument("-o", "--output", required=True, help="the token file to write (.safetensors)")
        p.add_argument("--size", type=int, default=None,
                       help="resize the shorter side to N and crop the centre to N x N (default: keep the size)")
        p.add_argument("--strict", action="store_true", help="exit with status 1 when any image was skipped")
    else:
        p = sub.add_parser(name, help="turn a token file back into images",
                           description="\n\n".join(doc[3:5]), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("tokens", metavar="TOKENS", help="a token file written by vqfast encode")
        p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the PNG files")
    p.epilog = doc[5]
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a diffusers-format VQModel folder (default: the embedded demo model)")
    p.add_argument("--subfolder", default=None, help="the model's subfolder in DIR, e.g. movq or vqvae")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available); under torchrun cuda:LOCAL_RANK")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (default auto: float16 on CUDA unless the config sets force_upcast, "
                        "float32 on CPU; float16 is refused on CPU)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="working memory per process for one batch, e.g. 2GiB or 512MiB (default: 70%% of "
                        "free GPU memory on CUDA, 2GiB on CPU); the model's weights come on top")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"at most N images per batch (default {budget.DEFAULT_MAX_BATCH}); the budget may allow fewer")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads reading or writing image files (default: the CPU count, at most 8)")
    p.set_defaults(run=run)
