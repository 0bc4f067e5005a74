"""Benchmark cases: each builder returns a zero-argument callable that runs one case once.

Builders take plain strings and ints so that a fresh process can rebuild a case to measure its
peak memory (see peak_mib).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch

#: (K, D) of the real codebooks.
CODEBOOKS = {"movq": (16384, 4), "ldm_f4": (8192, 3), "amused": (8192, 64), "vqgan_f16": (16384, 256)}
#: Real checkpoints' configs shipped in vqfast/configs.
MODELS = {"movq": "kandinsky-2-2-movq", "ldm_f4": "ldm-vq-f4", "amused": "amused-vqvae"}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def baselines() -> list[str]:
    """What vqfast is compared with here: diffusers when installed (a GPU machine may lack it),
    and vqfast's own eager path where it is not already what vqfast runs."""
    import importlib.util

    found = ["diffusers"] if importlib.util.find_spec("diffusers") else []
    return found + (["vqfast-eager"] if device() == "cuda" else [])


def real_config(name: str) -> dict:
    text = resources.files("vqfast").joinpath("configs", f"{MODELS[name]}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def quantize_case(codebook: str, n: int, impl: str, dev: str):
    """One codebook search of n latent vectors (16 images) through ``impl``: "vqfast"
    (VectorQuantizer on the automatic path: the kernel on GPU), "vqfast-eager" (forced eager),
    "diffusers" (its VectorQuantizer), or "cdist" (argmin of torch.cdist, the textbook way)."""
    K, D = CODEBOOKS[codebook]
    g = torch.Generator().manual_seed(0)
    book = torch.randn(K, D, generator=g).to(dev)
    side = int(round((n / 16) ** 0.5))
    z = torch.randn(16, D, side, side, generator=g).to(dev)
    if impl == "cdist":
        rows = z.permute(0, 2, 3, 1).reshape(-1, D)
        return lambda: torch.cdist(rows, book).argmin(dim=1)
    if impl == "diffusers":
        from diffusers.models.autoencoders.vae import VectorQuantizer
    else:
        import vqfast
        from vqfast import VectorQuantizer

        vqfast.set_backend("eager" if impl == "vqfast-eager" else None)
    q = VectorQuantizer(K, D, beta=0.25).to(dev)
    with torch.no_grad():
        q.embedding.weight.copy_(book)
    return lambda: q(z)


def decode_case(model: str, side: int, batch: int, impl: str, dev: str):
    """One decode (quantizing first, as VQModel.decode does by default) at side x side pixels."""
    import vqfast

    config = real_config(model)
    torch.manual_seed(0)
    vqfast.set_backend(None)
    if impl == "diffusers":
        import diffusers

        net = diffusers.VQModel(**config)
    else:
        net = vqfast.VQModel(**config)
    net = net.to(dev).eval()
    f = 2 ** (len(config["block_out_channels"]) - 1)
    D = config.get("vq_embed_dim") or config["latent_channels"]
    h = torch.randn(batch, D, side // f, side // f, device=dev)
    return lambda: net.decode(h).sample


def resident_peak_kib() -> int:
    """This process's resident-memory high-water mark (VmHWM). Unlike getrusage's ru_maxrss,
    which a child inherits from the parent it was forked from, VmHWM starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory needs Linux)")


def peak_mib(run, builder: str, *args) -> float:
    """Memory that one run of a case adds at its peak. On GPU: the CUDA allocator's high-water
    mark over a second run of ``run``, in this process. On CPU, where tensors have no allocator
    counter: the growth of the resident high-water mark over one run of the case rebuilt by
    ``builder(*args)`` in a fresh process (it includes a few MiB of one-time set-up)."""
    if torch.cuda.is_available():
        with torch.no_grad():
            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import cases
run = cases.{builder}(*{args!r})
with torch.no_grad():
    before = cases.resident_peak_kib()
    run()
    print((cases.resident_peak_kib() - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])
