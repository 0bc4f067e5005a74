"""Tokenizing a webdataset end to end: images/s of `vqfast encode` on shards, beside the loader
alone and the model alone, with 1 and 2 processes.

    python bench/dataset.py                       # the demo model, 512 images at 256x256 -> --size 128
    python bench/dataset.py --config ldm_f4 --images 32 --size 256   # a real config (random weights)

Makes a webdataset in img2dataset's layout in a temporary folder (shards of --per-shard samples,
9-digit keys, .jpg + .txt + .json per sample; the JPEGs are smooth random images of
--image-side pixels, quality 90), then measures:
- loader: reading the shards and decoding + resizing every image (what the command's reader
  threads do), on --workers threads, without the model;
- model: encode_ids on batches of random pixels of the run's size, without the reader;
- end to end: `vqfast encode SHARDS --size N -o OUT` as a user runs it, in one process, then as
  two processes at once (--part 0/2 and 1/2, each with half the CPU threads), wall time from the
  first start to the last end; and the same runs' time inside their shards (the per-shard
  records' seconds: the rate once the processes are up) with the start-up cost beside it.
Writes bench/results/dataset-<date>-<model>.json with the machine (CPU and ISA, threads),
versions and every figure. On a GPU machine the model runs on CUDA (bench/gpu_check.py may call it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def make_dataset(folder: Path, images: int, per_shard: int, side: int) -> list[Path]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    shards = []
    for s in range(0, images, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(images, s + per_shard)):
                low = torch.randint(0, 256, (3, side // 16, side // 16), generator=g, dtype=torch.uint8).float()
                pixels = torch.nn.functional.interpolate(low[None], size=(side, side), mode="bilinear")[0]
                out = io.BytesIO()
                Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(out, format="JPEG", quality=90)
                key = f"{i:09d}"
                for ext, data in (("jpg", out.getvalue()), ("txt", f"caption {i}".encode()),
                                  ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def loader_rate(shards: list[Path], size: int, workers: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from vqfast.cli import images, shards as shard_io

    start = time.perf_counter()
    count = 0
    with ThreadPoolExecutor(workers) as pool:
        for path in shards:
            jpgs = [d for _, entries in shard_io.samples(path) for n, d in entries if n.endswith(".jpg")]
            count += sum(1 for _ in pool.map(lambda d: images.decode_image(d, size), jpgs))
    return count / (time.perf_counter() - start)


def model_rate(model_dir: str, size: int, batch: int, device: str) -> float:
    from vqfast import VQModel
    from vqfast.cli.tokens import encode_ids

    model = VQModel.from_pretrained(model_dir).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    with torch.inference_mode():
        encode_ids(model, x)  # warm-up (derived weights, first-call checks)
        start = time.perf_counter()
        for _ in range(3):
            encode_ids(model, x)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    return 3 * batch / (time.perf_counter() - start)


def end_to_end(shards_dir: Path, out: Path, model_dir: str, size: int, batch: int, processes: int,
               workers: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes)
    cmd = [sys.executable, "-m", "vqfast", "encode", f"{shards_dir}", "--model", model_dir, "--size", str(size),
           "--batch-size", str(batch), "--workers", str(workers), "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    runs = [subprocess.Popen(cmd + (["--part", f"{i}/{processes}"] if processes > 1 else []), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    for r in runs:
        _, err = r.communicate()
        if r.returncode:
            raise RuntimeError(f"vqfast encode failed: {err[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["demo", "movq", "amused", "ldm_f4"], default="demo")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--image-side", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    from vqfast.cli.bench import environment, real_config
    from vqfast.cli.tokens import default_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.config == "demo":
            model_dir = default_model()
        else:
            import vqfast

            torch.manual_seed(0)
            model_dir = str(tmp / "model")
            vqfast.VQModel(**real_config(args.config)).save_pretrained(model_dir)
        data = tmp / "data"
        data.mkdir()
        shards = make_dataset(data, args.images, args.per_shard, args.image_side)
        result = {"loader_images_per_s": loader_rate(shards, args.size, args.workers),
                  "model_images_per_s": model_rate(model_dir, args.size, args.batch, args.device)}
        for processes in (1, 2):
            out = tmp / f"out{processes}"
            seconds = end_to_end(data, out, model_dir, args.size, args.batch, processes, args.workers)
            result[f"end_to_end_{processes}_process_images_per_s"] = args.images / seconds
            # The command's own time in its shards (each shard's record holds its seconds): the rate
            # once the processes are up, and what starting them (imports, the model, the decoding
            # workers) cost on top.
            in_shards = max(sum(json.loads((out / f"{s.stem}.json").read_text())["seconds"]
                                for i, s in enumerate(shards) if i % processes == part) for part in range(processes))
            result[f"in_shards_{processes}_process_images_per_s"] = args.images / in_shards
            result[f"start_up_{processes}_process_s"] = seconds - in_shards
        same = all((tmp / "out1" / s.name).read_bytes() == (tmp / "out2" / s.name).read_bytes() for s in shards)
    env = environment(args.device)
    record = {**env, "model": args.config, "images": args.images, "per_shard": args.per_shard,
              "image_side": args.image_side, "size": args.size, "batch": args.batch, "workers": args.workers,
              "two_processes_wrote_the_same_bytes": same, **{k: round(v, 2) for k, v in result.items()}}
    for k, v in record.items():
        print(f"{k}: {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"dataset-{env['date'][:10]}-{args.config}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
