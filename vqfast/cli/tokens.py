"""``vqfast encode`` and ``vqfast decode``: folders of images <-> one token file, for datasets.

``vqfast encode IMAGES_OR_DIR... --model DIR -o tokens.safetensors``

- Inputs: image files, and folders searched recursively for png/jpg/jpeg/webp/bmp (links to
  folders followed). An image's name is its path relative to the folder given (its file name when
  given itself); work goes in name order; every name is a row or a named skip (a link to another
  input is its own row; a dangling link, a FIFO is skipped). A first pass hashes every file
  (SHA-256, read in blocks) and reads its header without decoding pixels: headers over
  ``--max-pixels`` (default 8192 x 8192), files larger than such an image can be, and unreadable
  files are skipped by name. ``--size N`` resizes each image (shorter side, bicubic) and crops the centre to
  N x N; without it all readable images must have one size: mixed sizes are refused, listed.
  The size must be a multiple of the model's downsampling factor, 2**(len(block_out_channels)
  - 1), and one image's working memory must fit ``--max-memory``, or the run is refused.
- Output: one safetensors file with ``tokens`` (N, h, w), int16 (int32 when K > 32768), the ids of
  ``model.quantize(model.encode(x).latents)``, and metadata: ``names`` (JSON list, row order), the
  hash of each row's image file, K, grid, image size, model digest, dtype, batch size, vqfast
  version. Next to it a manifest named after the whole output name
  (``tokens.safetensors.manifest.json``):
  ``rows`` (name -> row), ``skipped`` (name -> reason), counts, ``world_size``.
- An image that cannot be read is reported by name on stderr, skipped and listed in the manifest.
  Exit status 0; 1 when no image could be encoded, or with ``--strict`` when any was skipped (the
  rest is still written); 2 when refused before any compute (arguments, model, sizes, an output
  of another run or in use by another run).
- Reruns: the rows of the existing output and of an interrupted run's parts are reused for images
  whose name and bytes are unchanged, so a finished run recomputes nothing and new inputs are
  added. An output or parts made with another model, dtype, image size, ``--size`` or batch size,
  holding images that are not among the inputs, or whose images changed, are refused (naming what
  differs), never mixed or silently dropped: ``--overwrite`` deletes them and encodes from scratch,
  once every argument and input has been checked, and only vqfast's own files (a file at ``-o``
  that is not a token file is refused, never deleted). An output that is, or would replace, an
  input image is refused.
  Without ``--batch-size`` a rerun takes the earlier run's batch size when the budget allows.
- Resume: batches go to ``<output>.parts/``, each written under a temporary name and renamed. At
  the end rank 0 merges them into the output (atomically: the old output stays whole until
  replaced), writes the manifest and deletes the parts.

``vqfast decode tokens.safetensors --model DIR -o OUT_DIR``

- Refused before any compute (exit status 2; the message names the file, the tensor, what was
  seen and what was expected): no ``tokens`` tensor, a non-integer or non-3-D one, ids outside
  [0, K) for the model, metadata made for another K, ``names`` that do not match the rows or whose
  PNGs could not all be written (a file and a folder of it), a token file made by another model
  (its weights' fingerprint differs; ``--force`` decodes anyway), or PNG paths that would replace
  the token file, a source image it was encoded from (even with ``--overwrite``), or are taken by a
  folder.
  Token files without vqfast metadata are accepted; their images are named by row number.
- Writes ``OUT_DIR/<name>.png`` per row (the name's extension replaced by .png; "..", leading
  dots and unusual characters replaced by "_"), each to a temporary name and renamed. Each PNG
  carries a stamp (the hash of the token file's bytes this run read, the row, the model, dtype and
  batch size); a rerun
  skips the PNGs whose stamp matches and refuses to start when OUT_DIR holds other PNGs under
  these names (``--overwrite`` replaces them). Rank 0 writes ``OUT_DIR/manifest.json`` (name ->
  PNG, counts). Pixels: round(clamp(x / 2 + 0.5, 0, 1) * 255), as diffusers' image processor.

Both: batches hold min(--batch-size, --max-memory // bytes per image) images (refused when one
image does not fit) and the batch size is printed. Bytes per image are measured on CUDA (the peak
of one image) and estimated on CPU (H * W * itemsize * max(k * max(block_out_channels[:2]), floor),
k, floor = 8, 1024 to encode and 12, 1536 to decode). --dtype auto is float16 on CUDA (float32 when
the config sets force_upcast) and float32 on CPU, where float16 is refused. Weights holding NaN or
inf are refused, naming the tensor. The progress bar (images/s) shows on rank 0 when stderr is a
terminal. Under torchrun --nproc-per-node N (any number of nodes, one shared output folder) the
work is cut into batches in name order and rank r takes batches r, r + N, ..., on cuda:LOCAL_RANK
or on CPU, the ranks meeting through torchrun's store (no process group): the same batches as one
process, so the same bytes. One run at a time per output: a second refuses to start (a lock file
that a killed run does not hold), and temporary files of killed runs are removed by the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from . import budget, images, shards, sharding, tokenfile
from ..models.atomic import remove_stale, tag
from ..models.messages import one_line
from ..models.model import VQModel
from .main import RunFailed, UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16")


class NothingEncoded(RunFailed):
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


def check_finite(model: torch.nn.Module, label: str) -> None:
    """UsageError naming the tensors of ``model`` that hold NaN or inf (the outputs would be
    garbage); ``label`` names the model."""
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        raise UsageError(f"{label}: weights hold NaN or inf in {str(next(iter(model.parameters())).dtype)[6:]}: "
                         f"{', '.join(bad[:5])}{f' and {len(bad) - 5} more tensors' if len(bad) > 5 else ''}")


def load_model(args: argparse.Namespace, device: torch.device) -> VQModel:
    """``--model`` / ``--subfolder`` on ``device`` in the ``--dtype`` the run uses."""
    label = f"--model {args.model!r}" if args.model else "the embedded demo model"
    try:
        model = VQModel.from_pretrained(args.model or default_model(), subfolder=args.subfolder)
    except (OSError, ValueError, TypeError, ImportError) as e:  # FileNotFoundError is an OSError
        raise UsageError(f"{label}" + (f" (--subfolder {args.subfolder!r})" if args.subfolder else "")
                         + f": {e}") from e
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" and not model.config.force_upcast else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("--dtype float16 needs a CUDA device (got --device cpu): use float32 or bfloat16 on CPU")
    key = "in_channels" if args.command == "encode" else "out_channels"
    if model.config[key] != 3:
        raise UsageError(f"{label}: vqfast {args.command} {'reads' if key == 'in_channels' else 'writes'} RGB "
                         f"images, but the model has {key}={model.config[key]} (expected 3)")
    model = model.to(device=device, dtype=dtype)
    check_finite(model, label)
    return model


def downsampling(model: VQModel) -> int:
    """How many pixels per token along each side: 2**(len(block_out_channels) - 1)."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def choose_batch(args: argparse.Namespace, ranks: sharding.Ranks, model: VQModel, height: int, width: int,
                 command: str, run_one: Callable[[], object], earlier: set[int], what: str) -> int:
    """The batch size for images of height x width under ``--max-memory``, the same on every rank:
    the earlier run's (``earlier``, the batch sizes found in ``what``) when there is one and the
    budget allows it, else the budget's. UsageError when one image does not fit the budget, or
    the earlier run's batch size cannot be kept."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    limit = budget.parse_size(args.max_memory) if args.max_memory else budget.default_budget(ranks.device)
    factor = downsampling(model)
    estimate = budget.estimate_per_image(model.config, height, width, model.dtype, command)
    per_image, how = estimate, "estimated"
    if ranks.device.type == "cuda" and estimate <= 4 * limit:  # measuring a hopeless size would only run out
        try:
            per_image, how = budget.measure_per_image(run_one, ranks.device), "measured"
        except torch.cuda.OutOfMemoryError:
            per_image, how = estimate, "estimated; measuring one image ran out of memory"
    given = "" if args.max_memory else " (default)"
    size = sharding.all_min(ranks, budget.batch_size(limit, per_image, args.batch_size) if per_image <= limit else 0)
    if size == 0:  # every rank refuses together (a measured size may differ between GPUs)
        grid = "" if command == "encode" else f" (a token grid of {width // factor}x{height // factor})"
        raise UsageError(f"one {width}x{height} image{grid} needs about {budget.format_size(per_image)} to {command} "
                         f"({how}), more than --max-memory {budget.format_size(limit)}{given}: raise --max-memory"
                         + (" or choose a smaller --size" if command == "encode" else ""))
    note = ""
    if len(earlier) > 1:
        raise UsageError(f"{what} hold work of several batch sizes {sorted(earlier)}; pass --overwrite to start over")
    if earlier:
        (theirs,) = earlier
        if theirs != size and args.batch_size is None and theirs <= size:
            size, note = theirs, " (the batch size of the earlier run, kept so that its work is reused)"
        elif theirs != size:
            raise UsageError(
                f"{what} were made with batch size {theirs}, this run's is {size}: which images share a "
                f"batch can change a token in a near tie, so work of two batch sizes is never mixed; "
                f"pass --batch-size {theirs} (and a --max-memory that allows it) to resume, or --overwrite")
    if ranks.is_main:
        say(f"batch size {size}{note}: --max-memory {budget.format_size(limit)}{given}, "
            f"{budget.format_size(per_image)} per {width}x{height} image ({how}, "
            f"{str(model.dtype).removeprefix('torch.')} on {ranks.device})")
    return size


def progress(ranks: sharding.Ranks, total: int, command: str):
    """A tqdm bar in images/s on rank 0 when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=command, disable=None if ranks.is_main else True, dynamic_ncols=True)


def report(command: str, message: str) -> None:
    """A warning on stderr, in one line (see vqfast.models.messages.one_line)."""
    from tqdm import tqdm

    tqdm.write(f"vqfast {command}: {one_line(message)}", file=sys.stderr)


def say(message: str) -> None:
    """A progress line on stdout, in one line."""
    print(one_line(message, 4000), flush=True)


def examples(names, count: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def check_name_lengths(paths: list[Path], what: str) -> None:
    """UsageError before any compute when a file name this run would write exceeds 255 bytes
    (the limit of common file systems), instead of failing after the compute."""
    for path in paths:
        for part in Path(path).parts:
            size = len(part.encode("utf-8", "surrogateescape"))
            if size > 255:
                raise UsageError(f"{what}: the file name {part[:40]!r}... would be {size} bytes long; "
                                 "file systems allow 255")


def check_workers(value: int) -> None:
    if value < 1:
        raise UsageError(f"--workers must be at least 1, got {value}")


def check_max_pixels(value: int) -> int:
    if value < 1:
        raise UsageError(f"--max-pixels must be a positive number of pixels, got {value}")
    return value


def scan_all(items: list, ranks: sharding.Ranks, scan_one: Callable, workers: int) -> list:
    """scan_one(item) for every item, each rank scanning its share on ``workers`` threads; the
    results in item order, on every rank."""
    mine = sharding.shard(items, ranks)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="vqfast-scan") as pool:
        results = list(pool.map(scan_one, mine))
    shares = sharding.gather(ranks, results)
    out = [None] * len(items)
    for r, share in enumerate(shares):
        out[r :: ranks.world] = share
    return out


# -------------------------------------------------------------------- encode


def run_size(readable: list[tuple[images.Item, images.Header]], size: int | None, factor: int) -> tuple[int, int]:
    """(H, W) every image of the run gets: (size, size), or the one size all readable images
    share; UsageError listing the sizes when they differ."""
    if size is not None:
        if size <= 0 or size % factor:
            raise UsageError(f"--size must be a positive multiple of {factor} (the model's downsampling "
                             f"factor), got {size}")
        return size, size
    by_size: dict[tuple[int, int], list[str]] = {}
    for item, header in readable:
        by_size.setdefault(header.size, []).append(item.name)
    if len(by_size) > 1:
        listed = "; ".join(f"{w}x{h}: {len(n)} ({examples(n, 3)})"
                           for (w, h), n in sorted(by_size.items(), key=lambda kv: -len(kv[1])))
        raise UsageError(f"IMAGES: the images have {len(by_size)} different sizes ({listed}); pass --size N "
                         "to resize and crop every image to N x N")
    (w, h), names = next(iter(by_size.items()))
    if h % factor or w % factor:
        raise UsageError(f"image {names[0]!r} is {w}x{h}, but without --size the image size must be a multiple "
                         f"of {factor} (the model's downsampling factor): pass --size N to resize and crop")
    return h, w


@dataclasses.dataclass
class Earlier:
    """What earlier runs left for this output: token files (the output, parts) with their contents."""

    files: list[tuple[Path, tokenfile.Contents]]

    def batch_sizes(self) -> set[int]:
        return {c.key.batch_size for _, c in self.files}


def read_earlier(output: Path, overwrite: bool) -> Earlier:
    """The token files earlier runs left for ``output`` (it, and its parts). UsageError when one
    of them is not a vqfast token file: it is never read as one, and never deleted either, not
    even by --overwrite (the file may be the user's)."""
    sources = ([output] if output.exists() else []) + tokenfile.list_parts(tokenfile.parts_folder(output))
    files = []
    for source in sources:
        try:
            files.append((source, tokenfile.read_contents(source)))
        except ValueError as e:
            advice = ("--overwrite replaces only vqfast token files: move it away yourself" if overwrite
                      else "choose another -o, or move it away")
            raise UsageError(f"-o: {e}; {advice}") from e
    return Earlier(files)


def reusable(earlier: Earlier, key: tokenfile.Key, output: Path, hashes: dict[str, str]):
    """(rows: name -> (file, row), skips: name -> reason) of earlier work this run can keep;
    UsageError naming what differs when earlier work belongs to another run."""
    rows: dict[str, tuple[Path, int]] = {}
    skips: dict[str, str] = {}
    missing: set[str] = set()
    changed: set[str] = set()
    hint = (f"; rerun with the same inputs and options, choose another -o, or pass --overwrite to delete "
            f"{output} and {tokenfile.parts_folder(output)} and encode from scratch")
    for source, contents in earlier.files:
        theirs = contents.key
        if theirs != key:
            diff = ", ".join(f"{k} {getattr(theirs, k)!r} (this run: {getattr(key, k)!r})"
                             for k in key.__dataclass_fields__ if getattr(theirs, k) != getattr(key, k))
            raise UsageError(f"-o: {source} holds tokens of another run: {diff}{hint}")
        for i, (name, digest) in enumerate(zip(contents.names, contents.hashes)):
            if name not in hashes:
                missing.add(name)
            elif hashes[name] != digest:
                changed.add(name)
            else:
                rows[name] = (source, i)
        for name, (digest, reason) in contents.skipped.items():
            if hashes.get(name) == digest:
                skips[name] = reason
    if missing:
        raise UsageError(f"-o: {output} (or its parts) holds {len(missing)} images that are not among the inputs: "
                         f"{examples(missing)}; this run would drop them{hint}")
    if changed:
        raise UsageError(f"-o: {len(changed)} inputs changed since they were encoded into {output} (or its parts): "
                         f"{examples(changed)}{hint}")
    return rows, skips


def manifest_of(output: Path) -> Path:
    """The manifest beside token file ``output``: named after its whole file name, so that two
    outputs in one folder (``ds.train``, ``ds.val``) never share one."""
    return output.with_name(output.name + ".manifest.json")


def check_outputs_spare_inputs(items: list[images.Item], output: Path) -> None:
    """UsageError when a file this run writes or deletes (the token file, its manifest, its parts
    folder) is one of the input images, or holds one: vqfast never writes over its inputs."""
    parts = Path(os.path.realpath(tokenfile.parts_folder(output)))
    mine = [p for p in (output, manifest_of(output)) if p.exists()]
    for item in items:
        path = Path(os.path.realpath(item.path))  # never raises, links that loop included
        if any(images.same_file(item.path, p) for p in mine) or parts in path.parents:
            raise UsageError(f"-o {str(output)!r}: the run would write over the input image {item.name!r} "
                             f"({str(item.path)!r}); vqfast never writes over its inputs: choose another -o")


def check_manifest(path: Path, command: str) -> None:
    """UsageError when ``path`` exists and is not a manifest written by vqfast ``command``: writing
    the run's manifest would replace a file that is not the command's."""
    if not path.exists():
        return
    try:  # vqfast writes the format first: its head says, however large the manifest
        with open(path, "rb") as f:
            ours = f'"format": "vqfast.{command}-manifest'.encode() in f.read(256)
    except OSError:
        ours = False
    if not ours:
        raise UsageError(f"-o: {str(path)!r}, where this run writes its manifest, is not a vqfast {command} "
                         "manifest; move it away or choose another -o")


def run_encode(args: argparse.Namespace, ranks: sharding.Ranks) -> int:
    if any(shards.is_shard_input(a) for a in args.inputs):
        return run_encode_shards(args, ranks)
    if args.part is not None:
        raise UsageError("--part splits webdataset shards between processes; the inputs are images (use torchrun)")
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"-o {str(output)!r} is a folder; expected the path of the token file to write")
    check_workers(args.workers)
    max_pixels = check_max_pixels(args.max_pixels)
    parts, manifest_path = tokenfile.parts_folder(output), manifest_of(output)
    check_name_lengths([Path(output.name), Path(parts.name), Path(manifest_path.name)], "-o")
    items = images.list_images(args.inputs)
    check_outputs_spare_inputs(items, output)
    model = load_model(args, ranks.device)
    factor = downsampling(model)
    lock = output.parent / f".vqfast-{tag(output.name)}.lock"
    with sharding.exclusive(lock, ranks, f"-o {output}"):
        if ranks.is_main:
            remove_stale([output, manifest_path])
            for stale in parts.glob(".vqfast-*.tmp") if parts.is_dir() else ():
                stale.unlink(missing_ok=True)
        sharding.barrier(ranks)
        return encode_locked(args, ranks, model, items, factor, max_pixels, output, manifest_path)


def run_encode_shards(args: argparse.Namespace, ranks: sharding.Ranks) -> int:
    """Shards in, one token shard per input shard out (shards.py)."""
    plain = [a for a in args.inputs if not shards.is_shard_input(a)]
    if plain:
        raise UsageError(f"the inputs mix webdataset shards and images ({examples(plain)}): encode them in two runs")
    check_workers(args.workers)
    check_max_pixels(args.max_pixels)
    model = load_model(args, ranks.device)

    def batch_for(height: int, width: int) -> int:
        probe = lambda: encode_ids(model, torch.zeros(1, 3, height, width, device=ranks.device, dtype=model.dtype))  # noqa: E731
        return choose_batch(args, ranks, model, height, width, "encode", probe, set(), f"-o {args.output}")

    return shards.run(args, ranks, model, lambda x: encode_ids(model, x.to(ranks.device, model.dtype)), batch_for,
                      say, report)


def encode_locked(args, ranks, model, items, factor, max_pixels, output, manifest_path) -> int:
    headers = scan_all(items, ranks, lambda item: images.scan(item.path, max_pixels), args.workers)
    hashes = {item.name: header.digest for item, header in zip(items, headers)}
    skipped = {item.name: header.problem for item, header in zip(items, headers) if header.problem}
    readable = [(item, header) for item, header in zip(items, headers) if not header.problem]
    check_manifest(manifest_path, "encode")
    earlier = read_earlier(output, args.overwrite)  # read even when --overwrite: it deletes only vqfast's files
    if args.overwrite:
        earlier = Earlier([])
    if not readable and not earlier.files:
        raise NothingEncoded(f"none of the {len(items)} images could be read: "
                             + "; ".join(f"{n!r} {r}" for n, r in list(skipped.items())[:5])
                             + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    if readable or args.size:
        height, width = run_size(readable, args.size, factor)
    else:  # every input was read before: the earlier run's size (the key check below still applies)
        height, width = earlier.files[0][1].key.image_size
    batch = choose_batch(args, ranks, model, height, width, "encode",
                         lambda: encode_ids(model, torch.zeros(1, 3, height, width, device=ranks.device,
                                                               dtype=model.dtype)),
                         earlier.batch_sizes(), f"-o {output} (and its parts)")
    key = tokenfile.Key(
        model=tokenfile.fingerprint(model), num_vq_embeddings=model.quantize.n_e,
        grid=(height // factor, width // factor), image_size=(height, width),
        dtype=str(model.dtype).removeprefix("torch."), resize=str(args.size) if args.size else "none",
        batch_size=batch,
    )
    rows, earlier_skips = reusable(earlier, key, output, hashes)
    # Everything is validated: only now may --overwrite delete the earlier run's files.
    parts = tokenfile.parts_folder(output)
    if args.overwrite and ranks.is_main and (output.exists() or parts.exists()):
        say(f"--overwrite: deleting {output}" + (f" and the parts in {parts}" if parts.exists() else ""))
        output.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)
        tokenfile.remove_parts(parts)
    sharding.barrier(ranks)
    # an earlier row for the same bytes stays (e.g. under a lower --max-pixels): nothing is dropped
    skipped = {name: reason for name, reason in skipped.items() if name not in rows}
    todo = [item for item, _ in readable if item.name not in rows and item.name not in earlier_skips]
    if ranks.is_main:
        for name, reason in skipped.items():
            report("encode", f"skipped {name!r}: {reason}")
        if rows and todo:
            say(f"{len(rows)} images are already encoded in {output} or its parts; encoding the other {len(todo)}")

    def load(item: images.Item) -> torch.Tensor:
        x = images.load_image(item.path, args.size, hashes[item.name], max_pixels)
        if tuple(x.shape[1:]) != (height, width):
            raise images.SkipImage(f"is {x.shape[2]}x{x.shape[1]} once read, the run's images are {width}x{height}")
        return x

    mine = sharding.shard(sharding.batches(todo, batch), ranks)
    new_skips: dict[str, str] = {}
    with progress(ranks, sum(map(len, mine)), "encode") as bar:
        for chunk, x, bad in images.stream_batches(mine, load, args.workers):
            for item, reason in bad:
                report("encode", f"skipped {item.name!r} ({str(item.path)!r}): {reason}")
                new_skips[item.name] = reason
            ids = encode_ids(model, x.to(ranks.device, model.dtype)) if x is not None else torch.zeros(0, *key.grid)
            tokenfile.write(tokenfile.next_part(parts, ranks.rank), ids, [i.name for i in chunk], key,
                            [hashes[i.name] for i in chunk],
                            {i.name: (hashes[i.name], reason) for i, reason in bad})
            bar.update(len(chunk) + len(bad))

    for part in sharding.gather(ranks, new_skips):  # waits for every rank
        skipped.update(part)
    skipped.update((n, r) for n, r in earlier_skips.items() if n not in skipped)
    if ranks.is_main:
        finish_encode(args, ranks, items, skipped, rows, hashes, key, output, manifest_path)
    sharding.barrier(ranks)  # the other ranks end once the output is in place
    encoded = len(items) - len(skipped)
    return 1 if encoded == 0 or (args.strict and skipped) else 0


def finish_encode(args, ranks, items, skipped, reused, hashes, key, output, manifest_path) -> None:
    """Rank 0: merge the earlier rows and the parts into the output, write the manifest."""
    from .. import __version__

    parts = tokenfile.parts_folder(output)
    rows: dict[str, tuple[Path, int]] = dict(reused)
    for part in tokenfile.list_parts(parts):
        contents = tokenfile.read_contents(part)
        rows.update((name, (part, i)) for i, name in enumerate(contents.names))
    names = [i.name for i in items if i.name not in skipped]
    lost = [n for n in names if n not in rows]
    if lost:
        raise RunFailed(f"{len(lost)} encoded images are missing from {parts}: {examples(lost)} "
                        "(was it changed by another program?); rerun to encode them again")
    if names:
        merged = tokenfile.merge(output, rows, names, hashes, key)
    else:
        merged = {}
        output.unlink(missing_ok=True)  # no row: no token file, the manifest says why
    kept = sum(1 for n in names if n in reused)
    tokenfile.write_json(manifest_path, {
        "format": "vqfast.encode-manifest/2", "tokens": output.name, "vqfast_version": __version__,
        "images": len(items), "encoded": len(names), "skipped_count": len(skipped),
        "from_earlier_runs": kept, "world_size": ranks.world,
        "key": dataclasses.asdict(key), "rows": merged, "skipped": dict(sorted(skipped.items())),
    })
    tokenfile.remove_parts(parts)
    if names:
        say(f"{len(names)} of {len(items)} images -> {output} ({key.grid[0]}x{key.grid[1]} tokens each"
            + (f"; {kept} kept from earlier runs" if kept else "") + ")"
            + (f"; {len(skipped)} skipped, listed in {manifest_path}" if skipped else ""))
    else:
        report("encode", f"none of the {len(items)} images could be encoded; reasons in {manifest_path}")


# -------------------------------------------------------------------- decode


def stamp(digest: str, row: int, name: str, model: str, dtype: str, batch: int) -> str:
    """What a decoded PNG carries to prove which token file, row, model and batch size made it."""
    return json.dumps({"tokens": digest, "row": row, "name": name, "model": model, "dtype": dtype,
                       "batch_size": batch}, sort_keys=True, separators=(",", ":"))


def read_png_stamp(path: Path) -> dict | str | None:
    """A PNG's stamp as a dict; None when there is no file; "foreign" when there is a file
    without a readable vqfast stamp; "not a file" when something else (a folder) is there."""
    if not path.exists():
        return "not a file" if path.is_symlink() else None
    if not path.is_file():
        return "not a file"
    text = images.read_stamp(path)
    try:
        value = json.loads(text) if text else None
    except (json.JSONDecodeError, RecursionError):
        value = None
    return value if isinstance(value, dict) else "foreign"


def check_outputs_spare_source(source: Path, out_dir: Path, targets: list[PurePosixPath]) -> None:
    """UsageError when a file decode writes (a PNG, the manifest) is the token file itself, or
    when a PNG's folder exists as a file: found before any compute, instead of failing after it.
    A stat per distinct folder, not per PNG."""
    writes = [*targets, PurePosixPath("manifest.json")]
    if Path(os.path.realpath(source)).is_relative_to(os.path.realpath(out_dir)):  # only then can a write hit it
        for target in writes:
            if images.same_file(out_dir / target, source):
                raise UsageError(f"-o {str(out_dir)!r}: the run would write over the token file {str(source)!r} "
                                 f"({str(target)!r}); vqfast never writes over its inputs: choose another -o")
    for folder in sorted({parent for target in writes for parent in target.parents if parent.parts}):
        if (out_dir / folder).exists() and not (out_dir / folder).is_dir():
            raise UsageError(f"-o {str(out_dir)!r}: {str(out_dir / folder)!r} is a file, where PNGs need a "
                             "folder; move it away or choose another -o")


def run_decode(args: argparse.Namespace, ranks: sharding.Ranks) -> int:
    check_workers(args.workers)
    if shards.is_shard_input(args.tokens):
        return run_decode_shards(args, ranks)
    if args.part is not None:
        raise UsageError("--part splits token shards between processes; the input is a token file (use torchrun)")
    source = Path(args.tokens)
    read = tokenfile.open_for_decode(source)
    tokens, names, meta = read.tokens, read.names, read.meta
    model = load_model(args, ranks.device)
    tokenfile.check_ids(source, tokens, meta, model.quantize.n_e)
    fingerprint = tokenfile.fingerprint(model)
    made_by = meta.get("model")
    if made_by is not None and made_by != fingerprint and not args.force:
        raise UsageError(f"{source} was made by another model (weights fingerprint {made_by}; this model's is "
                         f"{fingerprint}): its ids index another codebook; pass the model that encoded it, or "
                         "--force to decode anyway")
    targets = images.check_unique_outputs(names)
    check_name_lengths(targets, f"{source} (the names of its images)")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {str(out_dir)!r} is a file; expected a folder for the PNG files")
    check_outputs_spare_source(source, out_dir, targets)
    check_manifest(out_dir / "manifest.json", "decode")
    with sharding.exclusive(out_dir / ".vqfast-decode.lock", ranks, f"-o {out_dir}"):
        if ranks.is_main:
            remove_stale([out_dir / t for t in targets] + [out_dir / "manifest.json"])
        sharding.barrier(ranks)
        return decode_locked(args, ranks, model, tokens, names, meta, targets, out_dir, source, read.digest,
                             fingerprint)


def run_decode_shards(args: argparse.Namespace, ranks: sharding.Ranks) -> int:
    """Token shards in, one image shard per token shard out (shards.py)."""
    model = load_model(args, ranks.device)
    factor = downsampling(model)

    def batch_for(height: int, width: int) -> int:
        grid = (height // factor, width // factor)
        probe = lambda: decode_ids(model, torch.zeros(1, *grid, dtype=torch.long, device=ranks.device))  # noqa: E731
        return choose_batch(args, ranks, model, height, width, "decode", probe, set(), f"-o {args.output}")

    return shards.run_decode(args, ranks, model, lambda ids: decode_ids(model, ids.to(ranks.device)), batch_for,
                             say, report)


def source_hashes(meta: dict[str, str]) -> set[str]:
    """The hashes of the image files a vqfast token file was encoded from (empty for others)."""
    try:
        hashes = json.loads(meta.get("hashes", "[]"))
    except (json.JSONDecodeError, RecursionError):
        return set()
    return {h for h in hashes if isinstance(h, str) and h} if isinstance(hashes, list) else set()


def decode_locked(args, ranks, model, tokens, names, meta, targets, out_dir, source, digest, fingerprint) -> int:
    factor = downsampling(model)
    n, h, w = tokens.shape
    dtype = str(model.dtype).removeprefix("torch.")
    found = scan_all(list(range(n)), ranks, lambda r: read_png_stamp(out_dir / targets[r]), args.workers)
    # batch sizes of PNGs made from this token file's rows by this model: a rerun keeps one
    earlier = {s.get("batch_size") for r, s in enumerate(found)
               if isinstance(s, dict) and (s.get("tokens"), s.get("row"), s.get("model"), s.get("dtype"))
               == (digest, r, fingerprint, dtype)}
    earlier = {b for b in earlier if isinstance(b, int)}
    if args.overwrite:
        earlier = set()
    dummy = torch.zeros(1, h, w, device=ranks.device, dtype=torch.long)
    batch = choose_batch(args, ranks, model, h * factor, w * factor, "decode", lambda: decode_ids(model, dummy),
                         earlier, f"the PNGs in {out_dir}")
    expected = [stamp(digest, r, names[r], fingerprint, dtype, batch) for r in range(n)]
    done = [isinstance(s, dict) and json.dumps(s, sort_keys=True, separators=(",", ":")) == expected[r]
            for r, s in enumerate(found)]
    foreign = [r for r, s in enumerate(found) if s is not None and not done[r]]
    blocked = [r for r in foreign if found[r] == "not a file"]
    if blocked:
        raise UsageError(f"-o {out_dir}: {len(blocked)} PNG paths are taken by something that is not a file, such as "
                         f"a folder ({examples(str(targets[r]) for r in blocked)}); move them away or choose another -o")
    # files without a vqfast stamp only: a PNG decode wrote is not a source image (and is not hashed)
    unstamped = [r for r in foreign if found[r] == "foreign"]
    originals = source_hashes(meta) if unstamped else set()
    sources = [r for r in unstamped if originals and images.file_digest(out_dir / targets[r]) in originals]
    if sources:  # decoding into the images' own folder: --overwrite would replace the photos themselves
        raise UsageError(f"-o {out_dir} holds {len(sources)} of the images this token file was encoded from, under the "
                         f"names decode writes ({examples(str(targets[r]) for r in sources)}); vqfast never writes "
                         "over them, not even with --overwrite: choose another -o")
    if foreign and not args.overwrite:
        first, theirs = foreign[0], found[foreign[0]]
        if isinstance(theirs, dict):
            mine = json.loads(expected[first])
            why = ", ".join(f"{k} {theirs.get(k)!r} (this run: {v!r})" for k, v in mine.items() if theirs.get(k) != v)
        else:
            why = "it has no vqfast stamp"
        raise UsageError(f"-o {out_dir} already holds {len(foreign)} PNGs that were not decoded from this token file "
                         f"by this model, dtype and batch size ({examples(names[r] for r in foreign)}; "
                         f"{targets[first]}: {why}); choose another -o, or pass --overwrite to replace them")
    pending = [chunk for chunk in sharding.batches(list(range(n)), batch) if not all(done[r] for r in chunk)]
    mine = sharding.shard(pending, ranks)
    written = 0
    with progress(ranks, sum(map(len, mine)), "decode") as bar, ThreadPoolExecutor(max(1, args.workers)) as pool:
        writing: deque = deque()
        for chunk in mine:
            pixels = images.to_uint8(decode_ids(model, tokens[chunk].to(ranks.device, torch.long)))
            for r, p in zip(chunk, pixels):
                if not done[r]:
                    writing.append(pool.submit(images.save_png, p, out_dir / targets[r], expected[r]))
                    written += 1
            while len(writing) > 2 * batch:  # bound the decoded images waiting for the disk
                writing.popleft().result()
            bar.update(len(chunk))
        for future in writing:
            future.result()

    written = sum(sharding.gather(ranks, written))
    if ranks.is_main:
        tokenfile.write_json(out_dir / "manifest.json", {
            "format": "vqfast.decode-manifest/2", "tokens": source.name, "tokens_sha256": digest,
            "model": fingerprint, "images": n, "written": written, "already_present": n - written,
            "replaced": len(foreign), "world_size": ranks.world, "batch_size": batch,
            "outputs": {name: str(t) for name, t in zip(names, targets)},
        })
        say(f"{n} images in {out_dir} ({written} written, {n - written} already there"
            + (f"; {len(foreign)} PNGs of another run replaced (--overwrite)" if foreign else "") + ")")
    return 0


# -------------------------------------------------------------------- command line


def run(args: argparse.Namespace) -> int:
    """Run ``vqfast encode`` or ``vqfast decode``; the exit status (see the module docstring)."""
    ranks = None
    try:
        ranks = sharding.start(args.device)
        return (run_encode if args.command == "encode" else run_decode)(args, ranks)
    except BaseException as e:
        if ranks is not None:
            sharding.fail(ranks, e)
        raise
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
                       help="image files and folders (searched recursively for png/jpg/jpeg/webp/bmp), or "
                            "webdataset shards: .tar files, folders of them, brace patterns (data/{00000..00099}.tar)")
        p.add_argument("-o", "--output", required=True,
                       help="the token file to write (.safetensors); with shards, the folder for the token shards")
        p.add_argument("--image-ext", default=",".join(shards.IMAGE_EXTS), metavar="EXTS",
                       help="shards: a sample's image is its first entry with one of these extensions "
                            f"(default {','.join(shards.IMAGE_EXTS)})")
        p.add_argument("--part", default=None, metavar="I/N",
                       help="shards: take every N-th shard from the I-th (a SLURM array task: "
                            "--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), combined with torchrun's ranks")
        p.add_argument("--size", type=int, default=None,
                       help="resize the shorter side to N and crop the centre to N x N (default: keep the size; "
                            "all images must then have one size)")
        p.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"skip images whose header says more than N pixels, before decoding them "
                            f"(default {images.DEFAULT_MAX_PIXELS} = 8192 x 8192)")
        p.add_argument("--strict", action="store_true", help="exit with status 1 when any image was skipped")
        p.add_argument("--overwrite", action="store_true",
                       help="delete an existing output (and parts) of another run or other inputs and start over")
    else:
        p = sub.add_parser(name, help="turn a token file back into images",
                           description="\n\n".join(doc[3:5]), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("tokens", metavar="TOKENS", help="a token file written by vqfast encode, or its token "
                       "shards (a folder of them, a .tar, a brace pattern)")
        p.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                       help="folder for the PNG files (with token shards: for the image shards)")
        p.add_argument("--part", default=None, metavar="I/N",
                       help="token shards: take every N-th shard from the I-th, combined with torchrun's ranks")
        p.add_argument("--force", action="store_true",
                       help="decode a token file made by another model (its weights' fingerprint differs)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace PNGs in OUT_DIR that were not decoded from this token file by this model")
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
                   help=f"at most N images per batch (default {budget.DEFAULT_MAX_BATCH}); the budget may allow "
                        "fewer. Part of the resume key: a rerun keeps the earlier run's batch size")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads reading or writing image files (default: the CPU count, at most 8)")
    p.set_defaults(run=run)
