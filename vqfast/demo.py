"""``vqfast demo``: the Kandinsky 2.2 MoVQ architecture, image -> tokens -> image."""

from __future__ import annotations

import json
import time
from importlib import resources

import torch

from . import VQModel, reference


def _config(name: str) -> dict:
    return json.loads(resources.files("vqfast").joinpath("configs", f"{name}.json").read_text())


def demo(size: int, seed: int) -> None:
    torch.manual_seed(seed)
    config = _config("kandinsky-2-2-movq")
    model = VQModel.from_config(config).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # spread like a trained codebook
    params = sum(p.numel() for p in model.parameters())
    print(f"vqfast {__import__('vqfast').__version__}, torch {torch.__version__}, device cpu")
    print(f"model: Kandinsky 2.2 MoVQ architecture, {params / 1e6:.1f} M parameters, random weights "
          f"(no checkpoint is downloaded); K={config['num_vq_embeddings']}, D={config['vq_embed_dim']}")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([xx, yy, torch.sin(6 * xx * yy)])[None]
    with torch.no_grad():
        t0 = time.perf_counter()
        latents = model.encode(image).latents
        t1 = time.perf_counter()
        _, _, (_, _, tokens) = model.quantize(latents)
        t2 = time.perf_counter()
        sample = model.decode(latents).sample
        t3 = time.perf_counter()
    grid = tuple(latents.shape[-2:])
    n, k = tokens.numel(), config["num_vq_embeddings"]
    print(f"image {tuple(image.shape)} -> latents {tuple(latents.shape)} -> {grid[0]}x{grid[1]} tokens "
          f"({tokens.unique().numel()} distinct codes) -> image {tuple(sample.shape)}")
    print(f"encode {t1 - t0:.2f} s, codebook search {1e3 * (t2 - t1):.1f} ms, decode {t3 - t2:.2f} s")
    full = n * k * 4
    print(f"codebook search scratch: at most {min(full, reference.tile_bytes(config['vq_embed_dim'])) / 2**20:.1f} MiB "
          f"(the full {n} x {k} distance matrix would be {full / 2**20:.1f} MiB)")


def register(sub, name: str) -> None:
    d = sub.add_parser(name, help="encode and decode one image with the MoVQ architecture")
    d.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=lambda args: demo(args.size, args.seed))
