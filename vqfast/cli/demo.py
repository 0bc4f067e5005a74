"""``vqfast demo``: the embedded model turns a photo into tokens and back.

Writes input | reconstruction | token map side by side, and prints the token grid, codebook
usage, PSNR and the time of vqfast against its eager path and against diffusers' VQModel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from .. import VQModel, backend_info, set_backend
from ..ops.dispatch import triton_problem
from .images import DEFAULT_MAX_PIXELS
from .main import UsageError
from .sharding import parse_device
from .train import psnr

#: Larger inputs are scaled down first: the eager CPU path takes seconds per megapixel.
MAX_SIDE = 512


class DemoError(UsageError):
    """A bad argument: printed as one line, exit code 2."""


def embedded(name: str) -> Path:
    """A file or folder under vqfast/assets (installed as package data, so a plain folder)."""
    return Path(str(resources.files("vqfast") / "assets" / name))


def load_model(model: str | None, subfolder: str | None, device: torch.device) -> tuple[VQModel, str]:
    """The --model folder (default: the embedded demo model) on ``device``, and its location."""
    where = str(embedded("demo-model")) if model is None else model
    label = f"--model {where!r}" if model is not None else f"the embedded demo model ({where})"
    try:
        vq = VQModel.from_pretrained(where, subfolder=subfolder).to(device)
    except (OSError, ValueError, TypeError, ImportError) as e:  # FileNotFoundError is an OSError
        raise DemoError(f"{label}: expected a diffusers-format VQModel folder (config.json "
                        f"and diffusion_pytorch_model.safetensors): {e}") from None
    from .tokens import check_finite

    check_finite(vq, label)
    c = vq.config
    if c.in_channels != 3 or c.out_channels != 3:
        raise DemoError(f"{label}: the demo needs RGB in and out (3 channels), got "
                        f"in_channels={c.in_channels}, out_channels={c.out_channels}")
    return vq, where


def load_image(path: str | None, factor: int, max_side: int) -> tuple[torch.Tensor, str]:
    """--image (default: the bundled photo) as (1, 3, H, W) in [-1, 1]: scaled so that its longer
    side is at most ``max_side`` (0: no limit), then centre-cropped to multiples of ``factor``."""
    from PIL import Image, UnidentifiedImageError

    file = image_file(path)
    Image.MAX_IMAGE_PIXELS = None  # replaced by the DEFAULT_MAX_PIXELS check on the header below
    try:
        with Image.open(file) as im:
            if im.width * im.height > DEFAULT_MAX_PIXELS:
                raise DemoError(f"--image {str(file)!r}: {im.width}x{im.height} pixels, more than the demo reads "
                                f"({DEFAULT_MAX_PIXELS} = 8192 x 8192): expected a smaller image")
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DemoError(f"--image {str(file)!r}: not an image Pillow can read ({e})") from None
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        lanczos = getattr(Image, "Resampling", Image).LANCZOS  # Image.Resampling is Pillow >= 9.1
        img = img.resize(tuple(max(factor, round(s * scale)) for s in img.size), lanczos)
    w, h = (s - s % factor for s in img.size)
    if w == 0 or h == 0:
        raise DemoError(f"--image {str(file)!r}: {img.width}x{img.height} pixels, smaller than the model's "
                        f"downsampling factor {factor} (expected at least {factor}x{factor})")
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return pixels.permute(2, 0, 1)[None].float() / 127.5 - 1, str(file)


def image_file(path: str | None) -> Path:
    """The --image file (default: the bundled photo), checked to exist."""
    file = embedded("demo.png") if path is None else Path(path)
    if not file.is_file():
        raise DemoError(f"--image {str(file)!r}: file not found (expected an image file: PNG, JPEG, ...)")
    return file


def to_rgb8(x: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()


def token_colours(ids: torch.Tensor) -> torch.Tensor:
    """(h, w) token ids -> (h, w, 3) uint8: one colour per id. Hue steps by the golden ratio so that
    nearby ids get distant hues; brightness varies too, so ids with close hues still differ."""
    ids = ids.double().cpu()
    hue = (ids * 0.6180339887498949) % 1.0
    value = 0.55 + 0.45 * ((ids * 0.7548776662466927) % 1.0)
    sat = 0.75
    channels = []
    for n in (5, 3, 1):  # the standard HSV -> RGB formula, one channel per n
        k = (n + hue * 6) % 6
        channels.append(value - value * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return (torch.stack(channels, -1) * 255).round().to(torch.uint8)


def side_by_side(panels: list[torch.Tensor], out: Path) -> tuple[int, int]:
    """Write (H, W, 3) uint8 panels left to right as one PNG; returns its (width, height)."""
    from PIL import Image

    row = torch.cat(panels, dim=1).contiguous()
    h, w = row.shape[:2]
    try:
        Image.frombytes("RGB", (w, h), bytes(row.flatten().tolist())).save(out, format="PNG")
    except OSError as e:
        raise DemoError(f"--out {str(out)!r}: could not write the PNG ({e})") from None
    return w, h


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int = 5) -> dict[str, float]:
    """Median seconds of each fn over ``rounds`` rounds, after one warm-up call each. The fns take
    turns within a round, so a neighbour's load on a shared machine hits them alike."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with vqfast's fused ops forced onto backend ``name``."""
    def run():
        set_backend(name)
        try:
            return fn()
        finally:
            set_backend(None)
    return run


def load_diffusers(where: str, subfolder: str | None, device: torch.device):
    """The same folder as a diffusers.VQModel, or None (saying why) when that cannot be done."""
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: no comparison with diffusers.VQModel")
        return None
    try:
        model = diffusers.VQModel.from_pretrained(where, subfolder=subfolder, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many types; the comparison is optional
        print(f"diffusers could not load {where!r} ({type(e).__name__}: {e}): no comparison")
        return None
    return model.to(device).eval()


@torch.no_grad()
def report_timing(vq: VQModel, theirs, x: torch.Tensor) -> None:
    """Time encode + decode (quantizing) with vqfast's automatic backend, its eager path when
    that differs, and diffusers' model when given; say which ran."""
    def run(model):
        return lambda: model.decode(model.encode(x).latents).sample

    auto_path = backend_info(x.device)["group_norm"]  # "eager" or "triton" (the search may add its C++ kernel)
    fns = {"vqfast": run(vq)}
    if auto_path != "eager":
        fns["vqfast eager"] = with_backend("eager", run(vq))
    if theirs is not None:
        fns["diffusers"] = run(theirs)
    t = median_times(fns, x.device)
    parts = [f"vqfast ({auto_path if auto_path == 'eager' else 'Triton kernels'}) {1e3 * t['vqfast']:.1f} ms"]
    if "vqfast eager" in t:
        parts.append(f"vqfast eager {1e3 * t['vqfast eager']:.1f} ms")
    if theirs is not None:
        ratio = t["diffusers"] / t["vqfast"]
        parts.append(f"diffusers.VQModel {1e3 * t['diffusers']:.1f} ms ({ratio:.2f}x vqfast's time)")
    print(f"time of encode + decode, median of 5: {', '.join(parts)}")
    if auto_path == "eager":
        why = "the Triton kernels run on CUDA only" if x.device.type != "cuda" else triton_problem()
        print(f"backends: on {x.device.type} vqfast's automatic backend is its eager PyTorch path "
              f"({why}), so that one number is both")


@torch.no_grad()
def report_agreement(vq: VQModel, theirs, latents: torch.Tensor, ids: torch.Tensor) -> None:
    """Compare with diffusers where they should agree (decoding the same latents) and where they
    may not (the chosen codes: diffusers' cdist can misrank nearly tied codes)."""
    a = vq.decode(latents, force_not_quantize=True).sample
    b = theirs.decode(latents, force_not_quantize=True).sample
    rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    _, _, (_, _, their_ids) = theirs.quantize(latents)
    differ = int((ids != their_ids).sum())
    print(f"diffusers agrees: decoding the same latents within {rel:.1e} relative; "
          f"its codebook search picks other codes for {differ} of {ids.numel()} tokens"
          + (" (near ties, which its cdist can misrank)" if differ else ""))


def demo(args: argparse.Namespace) -> None:
    try:
        device = parse_device(args.device)
    except ValueError as e:
        raise DemoError(str(e)) from None
    if not Path(args.out).resolve().parent.is_dir():
        raise DemoError(f"--out {args.out!r}: its folder does not exist (expected a path in an existing folder)")
    if args.max_side < 0:
        raise DemoError(f"--max-side {args.max_side}: expected 0 (no limit) or a positive number of pixels")
    image_file(args.image)  # a wrong path should not wait for the model to load
    vq, where = load_model(args.model, args.subfolder, device)
    factor = 2 ** (len(vq.config.block_out_channels) - 1)
    x, source = load_image(args.image, factor, args.max_side)
    x = x.to(device)
    with torch.no_grad():
        latents = vq.encode(x).latents
        _, _, (_, _, ids) = vq.quantize(latents)
        recon = vq.decode(latents).sample
    h, w = latents.shape[-2:]
    K, used = vq.quantize.n_e, ids.unique().numel()
    name = "embedded demo model" if args.model is None else where
    print(f"model: {name} ({sum(p.numel() for p in vq.parameters()) / 1e6:.2f} M parameters, "
          f"K={K} codes of D={vq.quantize.vq_embed_dim}, downsampling x{factor}) on {device}")
    print(f"image: {'bundled photo' if args.image is None else source}, {x.shape[-1]}x{x.shape[-2]}")
    print(f"tokens: {w}x{h} grid ({ids.numel()} tokens)")
    print(f"codebook usage: {used}/{K} codes ({100 * used / K:.1f}%)")
    print(f"PSNR: {psnr(recon, x).item():.2f} dB (reconstruction against input, pixels in [0, 1])")
    theirs = load_diffusers(where, args.subfolder, device)
    report_timing(vq, theirs, x)
    if theirs is not None:
        report_agreement(vq, theirs, latents, ids)
    # each token covers factor x factor pixels: nearest-neighbour upscaling is a repeat
    tokens = ids.view(h, w).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    size = side_by_side([to_rgb8(x), to_rgb8(recon), token_colours(tokens)], Path(args.out))
    print(f"wrote {args.out} ({size[0]}x{size[1]}: input | reconstruction | token map)")


def _run(args: argparse.Namespace) -> int:
    try:
        demo(args)
    except DemoError as e:
        print(f"vqfast demo: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub, name: str) -> None:
    d = sub.add_parser(name, help="encode and decode a photo with the embedded model; writes a side-by-side PNG")
    d.add_argument("--image", help="image file to encode (default: the bundled photo)")
    d.add_argument("--model", help="diffusers-format VQModel folder (default: the embedded demo model)")
    d.add_argument("--subfolder", help="subfolder of --model holding config.json (e.g. movq)")
    d.add_argument("--out", default="vqfast-demo.png", help="output PNG (default vqfast-demo.png)")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    d.add_argument("--max-side", type=int, default=MAX_SIDE,
                   help=f"scale larger images down to this longer side first; 0: never (default {MAX_SIDE})")
    d.set_defaults(run=_run)
