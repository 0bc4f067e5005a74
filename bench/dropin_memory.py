"""Memory (and time) of the drop-in features on a real-size Kandinsky 2.2 MoVQ, on CPU.

    python bench/dropin_memory.py [--batch 64] [--out bench/results] [--only load train decode]

Three comparisons, each case in a fresh Python process (glibc told to return every block of
128 KiB or more to the system when it is freed) whose peak resident memory is read from /proc
(VmHWM, reset just before the measured call; the number reported is the peak minus the resident
memory before the call):

- from_pretrained with low_cpu_mem_usage=True (meta-device build, weights adopted as read) vs
  False (random init, then a copy), random weights saved to a temporary folder first; the time
  and memory include reading every weight once (safetensors maps the file, so pages are read on
  first use);
- one training step (forward, loss, backward) of encoder + quantizer + decoder on 1x3x128x128,
  with and without gradient checkpointing (after one warm-up step);
- decode of a batch of 256x256 images from latents (force_not_quantize=True, as Kandinsky does),
  whole vs enable_slicing() (two images per slice).

Writes ``dropin-memory-<date>.json`` (machine, versions, date, results) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "vqfast" / "configs" / "kandinsky-2-2-movq.json"


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(call):
    """(seconds, bytes the call added at its peak) for call(), in this process."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return seconds, _rss("VmHWM") - before


def child(case: str, arg: str) -> dict:
    import torch

    import vqfast

    config = json.loads(CONFIG.read_text())
    if case.startswith("load"):
        low = case == "load-low"

        def load_and_touch(folder):
            # safetensors maps the file: weights are read when first used, so touch them all to
            # count what a model ready to run holds
            model = vqfast.VQModel.from_pretrained(folder, low_cpu_mem_usage=low)
            with torch.no_grad():
                return sum(float(p.sum()) for p in model.parameters())

        load_and_touch(Path(arg) / "tiny")  # warm-up: one-time import and first-call costs
        seconds, peak = _measure(lambda: load_and_touch(Path(arg) / "movq"))
        return {"seconds": seconds, "peak_bytes": peak}

    if case.startswith("train"):
        torch.manual_seed(0)
        model = vqfast.VQModel.from_config(config).train()
        if case == "train-checkpointed":
            model.enable_gradient_checkpointing()
        x = torch.randn(1, 3, 128, 128)

        def step():
            out = model(x)
            (torch.mean((out.sample - x) ** 2) + out.commit_loss).backward()

        step()  # warm-up: first-call costs are not what is measured
        model.zero_grad(set_to_none=False)
        seconds, peak = _measure(step)
        return {"seconds": seconds, "peak_bytes": peak}
    if case.startswith("decode"):
        torch.manual_seed(0)
        model = vqfast.VQModel.from_config(config).eval()
        z = torch.randn(int(arg), 4, 32, 32)
        with torch.no_grad():
            model.decode(z[:1, :, :4, :4], force_not_quantize=True)  # builds the derived-weight caches
            if case == "decode-sliced":
                model.enable_slicing()
            seconds, peak = _measure(lambda: model.decode(z, force_not_quantize=True))
        return {"seconds": seconds, "peak_bytes": peak}
    raise ValueError(case)


def _run(case: str, arg: str) -> dict:
    # Blocks of 128 KiB and more come from mmap and go back to the system when freed, so the
    # resident memory follows the live tensors instead of what glibc's heap keeps from earlier peaks.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--child", case, arg], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64, help="decode batch (256x256 images)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--only", nargs="+", choices=["load", "train", "decode"], help="rerun these comparisons")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import torch

    import vqfast

    out_file = args.out / f"dropin-memory-{datetime.date.today().isoformat()}.json"
    # --only reruns some comparisons and keeps today's other results
    results = json.loads(out_file.read_text())["results"] if args.only and out_file.is_file() else {}
    only = set(args.only or ["load", "train", "decode"])
    if "load" in only:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            vqfast.VQModel.from_config(json.loads(CONFIG.read_text())).save_pretrained(Path(folder) / "movq")
            vqfast.VQModel().save_pretrained(Path(folder) / "tiny")
            for case in ("load-low", "load-full"):
                results[case] = _run(case, folder)
    if "train" in only:
        for case in ("train-plain", "train-checkpointed"):
            results[case] = _run(case, "")
    if "decode" in only:
        for case in ("decode-whole", "decode-sliced"):
            results[case] = _run(case, str(args.batch))

    machine = "unknown CPU"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            machine = line.split(":", 1)[1].strip()
    record = {
        "machine": f"{machine}, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "vqfast": vqfast.__version__},
        "decode_batch": args.batch,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(record, indent=2) + "\n")
    mib = lambda r: f"{r['peak_bytes'] / 2**20:,.0f} MiB"  # noqa: E731
    rows = [
        ("from_pretrained, low_cpu_mem_usage True / False", "load-low", "load-full"),
        ("training step 1x3x128x128, checkpointing on / off", "train-checkpointed", "train-plain"),
        (f"decode {args.batch}x3x256x256, slicing on / off", "decode-sliced", "decode-whole"),
    ]
    print(f"| real-size Kandinsky 2.2 MoVQ ({record['machine']}, {record['date']}) | peak memory added | time |")
    print("|---|---|---|")
    for label, a, b in rows:
        ra, rb = results[a], results[b]
        print(f"| {label} | {mib(ra)} / {mib(rb)} | {ra['seconds']:.2f} s / {rb['seconds']:.2f} s |")


if __name__ == "__main__":
    main()
