"""``vqfast train``: the seeded script that trains the small embedded demo model.

It trains a vqfast.VQModel (so the quantizer's straight-through backward is what learns) on
random 64x64 crops of scikit-learn's two bundled sample photographs, holding out a vertical strip
of each photo, and writes a diffusers-format folder: config.json, the safetensors weights and
training.json (seed, steps, wall time, machine, versions, held-out PSNR, codebook usage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import VQModel, __version__

#: The embedded model's architecture: f4 (two downsamples), so a 64x64 crop is 16x16 tokens.
#: A SpatialNorm decoder (MoVQ's), because GroupNorm alone loses the colour of flat regions: with
#: "group" the held-out dahlia came back grey (18.3 dB at 750 steps, 22.9 dB with "spatial"). K=1024:
#: 24.5 dB at 1700 steps, where K=512 reached 24.0 dB at 1500, for 8 KiB more weights. No
#: attention in the mid block, and 32 channels at full resolution, to fit the steps into minutes.
CONFIG: dict[str, Any] = dict(
    block_out_channels=(32, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=1024,
    norm_num_groups=16,
    norm_type="spatial",
    mid_block_add_attention=False,
    sample_size=64,
)
CROP = 64
#: Columns [224, 416) of both 427x640 photos are never trained on: the temple's right half and
#: the lake in china.jpg, the middle of the dahlia in flower.jpg.
HOLDOUT = (224, 416)
STEPS, BATCH, LR, SEED = 1700, 8, 2e-3, 0
#: The default cap keeps a run on a busy 2-core machine, evaluation and saving included, within
#: 20 minutes; 1700 steps took 12.4 minutes there with the other core busy.
SECONDS = 1080.0
#: One thread: the weights then do not depend on the core count (reductions split by thread
#: round differently), and two threads ran 6x slower than one while another process used a core.
THREADS = 1
#: Dead codes (unused since the last check) are moved onto current latents this often, until
#: REINIT_UNTIL of the run: a code that no latent picks gets no gradient and never recovers.
REINIT_EVERY, REINIT_UNTIL = 100, 0.75
#: Held-out evaluation this often (a forward pass over the 36 held-out crops).
EVAL_EVERY = 250


def load_photos() -> list[torch.Tensor]:
    """scikit-learn's sample photographs (china.jpg, flower.jpg) as (3, H, W) floats in [-1, 1]."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise ImportError(
            "vqfast train takes its photographs from scikit-learn's bundled sample images; "
            "install it with: pip install 'vqfast[train]' (or pip install scikit-learn)"
        ) from None
    return [torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1 for a in load_sample_images().images]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of x and y, (B, C, H, W) in [-1, 1], measured on [0, 1] images."""
    a, b = ((t.clamp(-1, 1) + 1) / 2 for t in (x, y))
    mse = (a - b).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def heldout_crops(photos: list[torch.Tensor]) -> torch.Tensor:
    """The evaluation set: every 64x64 tile of the held-out strip, centred vertically."""
    crops = []
    for p in photos:
        rows = p.shape[1] // CROP
        top = (p.shape[1] - rows * CROP) // 2
        for y in range(top, top + rows * CROP, CROP):
            for x in range(HOLDOUT[0], HOLDOUT[1] - CROP + 1, CROP):
                crops.append(p[:, y : y + CROP, x : x + CROP])
    return torch.stack(crops)


def random_crops(photos: list[torch.Tensor], batch: int, g: torch.Generator) -> torch.Tensor:
    """``batch`` random 64x64 crops lying wholly left or right of the held-out strip, half of
    them flipped left-right. (Adding rotations and RGB permutations cost 3.8 dB of held-out PSNR
    at 750 steps: the small model spent its few steps on colours the photos never show.)"""
    crops = []
    for _ in range(batch):
        p = photos[int(torch.randint(len(photos), (1,), generator=g))]
        lefts = list(range(0, HOLDOUT[0] - CROP + 1)) + list(range(HOLDOUT[1], p.shape[2] - CROP + 1))
        x = lefts[int(torch.randint(len(lefts), (1,), generator=g))]
        y = int(torch.randint(p.shape[1] - CROP + 1, (1,), generator=g))
        crop = p[:, y : y + CROP, x : x + CROP]
        crops.append(crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop)
    return torch.stack(crops)


def step_loss(model: VQModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, token ids): MSE reconstruction plus the quantizer's commitment loss.

    Quantizes through model.quantize rather than model(x) to see the token ids; the gradient of
    the reconstruction reaches the encoder only through the quantizer's straight-through backward.
    """
    z = model.encode(x).latents
    z_q, commit, (_, _, ids) = model.quantize(z)
    recon = model.decode(z_q, force_not_quantize=True).sample
    return F.mse_loss(recon, x) + commit, recon, ids


@torch.no_grad()
def evaluate(model: VQModel, crops: torch.Tensor) -> dict[str, float]:
    """Held-out PSNR (mean of per-crop dB, and of the pooled MSE) and codebook usage."""
    model.eval()
    z = model.encode(crops).latents
    z_q, _, (_, _, ids) = model.quantize(z)
    recon = model.decode(z_q, force_not_quantize=True).sample
    model.train()
    per_crop = psnr(recon, crops)
    pooled = -10 * math.log10(torch.mean(10 ** (-per_crop / 10)).item())
    used = ids.unique().numel()
    return {"psnr_db": round(per_crop.mean().item(), 3), "psnr_pooled_db": round(pooled, 3),
            "codes_used": used, "codebook_usage": round(used / model.quantize.n_e, 4)}


@torch.no_grad()
def reinit_dead_codes(model: VQModel, counts: torch.Tensor, x: torch.Tensor, g: torch.Generator) -> int:
    """Move every code with a zero count onto a random current latent of batch x (plus a little
    noise, so that two codes never coincide); returns how many moved."""
    dead = (counts == 0).nonzero().flatten()
    if dead.numel():
        z = model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, model.quantize.vq_embed_dim)
        pick = torch.randint(z.shape[0], (dead.numel(),), generator=g)
        noise = 0.01 * z.std() * torch.randn(dead.numel(), z.shape[1], generator=g)
        model.quantize.embedding.weight[dead] = z[pick] + noise
    return dead.numel()


def checkpoint(model: VQModel, heldout: torch.Tensor, step: int, start: float, loss: torch.Tensor | None) -> dict:
    """One line of the training history: the held-out evaluation at ``step``."""
    return {"step": step, "seconds": round(time.perf_counter() - start, 1),
            "loss": None if loss is None else round(loss.item(), 5), **evaluate(model, heldout)}


def learning_rate(progress: float, lr: float) -> float:
    """Linear warm-up over the first 3%, then cosine decay to 5% of lr."""
    if progress < 0.03:
        return lr * (progress / 0.03)
    t = (progress - 0.03) / 0.97
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def machine() -> dict[str, Any]:
    """What the run ran on, for training.json: CPU model and count, threads, versions."""
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty there
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "system": platform.system(), "python": platform.python_version(),
            "torch": torch.__version__, "vqfast": __version__}


def train(
    out: str | os.PathLike,
    steps: int = STEPS,
    seconds: float | None = SECONDS,
    seed: int = SEED,
    batch: int = BATCH,
    lr: float = LR,
    config: dict[str, Any] | None = None,
    threads: int = THREADS,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Train, save the model and training.json into ``out``, return the training record.

    The run ends after ``steps`` steps or ``seconds`` of wall time, whichever comes first; the
    learning-rate schedule follows whichever is further along, so a time-capped run still anneals.
    Only a run that ends by ``steps`` is reproducible from its seed.
    """
    photos = load_photos()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(photos, Path(out), steps, seconds, seed, batch, lr, {**CONFIG, **(config or {})}, progress_bar)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    photos: list[torch.Tensor], out: Path, steps: int, seconds: float | None, seed: int, batch: int,
    lr: float, config: dict[str, Any], progress_bar: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = VQModel(**config).train()
    K = model.quantize.n_e
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    heldout = heldout_crops(photos)
    counts = torch.zeros(K, dtype=torch.long)
    history, moved, done, loss, timed = [], 0, 0, None, False
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training", disable=not progress_bar, file=sys.stdout)
    while done < steps:
        by_time = (time.perf_counter() - start) / seconds if seconds else 0.0
        # Once the run is behind the pace that ends all steps in time (judged after a few steps,
        # the first being slow), the clock, not the seed alone, drives the schedule.
        timed |= done >= 10 and by_time > done / steps
        progress = max(done / steps, by_time) if timed else done / steps
        if progress >= 1:
            break
        x = random_crops(photos, batch, g)
        if done % REINIT_EVERY == 0 and progress < REINIT_UNTIL:
            moved += reinit_dead_codes(model, counts, x, g)
            counts.zero_()
        for group in opt.param_groups:
            group["lr"] = learning_rate(progress, lr)
        loss, recon, ids = step_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counts += torch.bincount(ids, minlength=K)
        done += 1
        bar.update(1)
        if done % EVAL_EVERY == 0 and done < steps:
            history.append(checkpoint(model, heldout, done, start, loss))
            bar.set_postfix(loss=f"{loss.item():.4f}", heldout_psnr=f"{history[-1]['psnr_db']:.2f} dB")
    bar.close()
    wall = time.perf_counter() - start
    history.append(checkpoint(model, heldout, done, start, loss))
    result = {k: v for k, v in history[-1].items() if k not in ("step", "seconds", "loss")}
    record = {
        "seed": seed, "steps": done, "steps_requested": steps, "seconds_limit": seconds,
        "stopped_by": "steps" if done == steps else "seconds",
        "schedule_by": "wall time (not reproducible from the seed)" if timed else "steps",
        "batch": batch, "crop": CROP, "lr": lr,
        "wall_time_s": round(wall, 1), "codes_reinitialised": moved,
        "data": {"source": "sklearn.datasets.load_sample_images(): china.jpg, flower.jpg (427x640)",
                 "heldout_columns": list(HOLDOUT), "heldout_crops": heldout.shape[0],
                 "train": "random 64x64 crops outside the held-out columns, half flipped left-right"},
        "heldout": result, "history": history, "machine": machine(), "config": config,
    }
    model.eval().save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _run(args: argparse.Namespace) -> int:
    problems = [f"--{name} must be {want}, got {value}" for name, value, ok, want in (
        ("steps", args.steps, args.steps >= 0, "0 or more"),
        ("batch", args.batch, args.batch > 0, "a positive integer"),
        ("threads", args.threads, args.threads > 0, "a positive integer"),
        ("seconds", args.seconds, args.seconds > 0, "a positive number of seconds"),
        ("lr", args.lr, args.lr > 0, "a positive number"),
    ) if not ok]
    if problems:
        print(f"vqfast train: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        record = train(args.out, args.steps, args.seconds, args.seed, args.batch, args.lr, threads=args.threads)
    except ImportError as e:
        print(f"vqfast train: {e}", file=sys.stderr)
        return 2
    h = record["heldout"]
    print(f"{record['steps']} steps in {record['wall_time_s']:.0f} s (seed {record['seed']}), "
          f"stopped by {record['stopped_by']}")
    print(f"held-out PSNR {h['psnr_db']:.2f} dB on {record['data']['heldout_crops']} 64x64 crops "
          f"(pooled MSE: {h['psnr_pooled_db']:.2f} dB); "
          f"codebook usage {h['codes_used']}/{record['config']['num_vq_embeddings']}")
    print(f"wrote {args.out}: config.json, diffusion_pytorch_model.safetensors, training.json")
    return 0


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="train the small embedded demo model on scikit-learn's sample photos (seeded, CPU)")
    p.add_argument("--out", default="vqfast-demo-model", help="output folder (default vqfast-demo-model)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--seconds", type=float, default=SECONDS,
                   help=f"also stop after this much wall time, annealing by time when behind (default {SECONDS:.0f})")
    p.add_argument("--seed", type=int, default=SEED,
                   help=f"seed of weights, crops and codebook restarts (default {SEED})")
    p.add_argument("--batch", type=int, default=BATCH, help=f"crops per step (default {BATCH})")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"torch CPU threads; a seed gives the same weights only at the same count (default {THREADS})")
    p.add_argument("--lr", type=float, default=LR, help=f"peak Adam learning rate (default {LR})")
    p.set_defaults(run=_run)
