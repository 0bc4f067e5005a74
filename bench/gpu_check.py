"""The GPU check: what a lent GPU machine runs (bench/gpu_check.sh calls this), rehearsed on CPU.

    python bench/gpu_check.py --out OUT [--budget SECONDS] [--quick]

Five steps, most valuable first, each with its share of the budget; a step stops itself (taking
fewer cases) when its share is spent, and what a later step does not use is left to the next:
  correctness  the kernel tests (GPU_TESTS) on this device: every kernel against the eager
               reference, all dtypes and layouts, small shapes;
  kernels      every kernel case of the static cost report measured beside its estimate, with
               this device's copy bandwidth measured in the same run;
  target       MoVQ decode, 512x512, batch 8, fp16: vqfast, its eager path, diffusers and
               torch.compile(diffusers);
  dataset      a short bench/dataset.py: a generated webdataset tokenized end to end;
  grid         encode and decode of the real configs at batch 1 and 8, 256 and 512.
Everything goes to ONE file, OUT/gpu-check.json (card, driver, versions, date, and every
measurement), rewritten after each one, so a step that is killed keeps what it had; the wrapper
script writes the log beside it. Measurements of models run one case per process, under a
timeout of what is left of the step.

On a CPU machine (the rehearsal, --quick: CI runs it) the same code runs with the kernels in
Triton's interpreter and tiny cases.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

#: The GPU test selection: run on CUDA with TRITON_INTERPRET=0, every test passes or skips with a
#: reason (on a CPU machine the kernel cases skip: compiled kernels need CUDA).
GPU_TESTS = ["tests/ops/test_selfcheck.py", "tests/ops/test_codebook.py", "tests/ops/test_norms.py",
             "tests/ops/test_kernel_norm_paths.py", "tests/ops/test_dispatch.py", "tests/models/test_layout.py"]
#: The rehearsal's selection: one test of each kind, in the interpreter.
QUICK_TESTS = ["tests/ops/test_selfcheck.py", "tests/ops/test_dispatch.py",
               "tests/ops/test_codebook.py::test_duplicate_codes_in_different_tiles_go_to_the_lowest_index",
               "tests/ops/test_kernel_norm_paths.py::test_spatial_apply_picks_pytorchs_nearest_source"]
#: Shares of the whole budget; what a step leaves goes to the next.
SHARES = {"correctness": 0.3, "kernels": 0.2, "target": 0.2, "dataset": 0.05, "grid": 0.25}


class Results:
    """OUT/gpu-check.json, rewritten whole (through a temporary file) after every record."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "steps": {name: [] for name in SHARES}}
        self.save()

    def add(self, step: str, record: dict) -> None:
        self.data["steps"][step].append(record)
        self.save()
        print(f"[{step}] {json.dumps(record)[:400]}", flush=True)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def meta(device: str, budget: float, quick: bool) -> dict:
    import numpy
    import torch
    import triton

    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "numpy": numpy.__version__,
           "diffusers": _version("diffusers"), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
           "budget_s": budget, "quick": quick}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        out.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"sm_{props.major}{props.minor}", cuda=torch.version.cuda, driver=_driver())
    else:
        out.update(card=None, cpu=_cpu())
    return out


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    from importlib.metadata import version

    return version(name)


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu() -> str:
    from vqfast.cli.bench import _cpu_name

    return _cpu_name()


# ---------------------------------------------------------------------------------------------
# the steps: each takes the Results, its deadline (time.monotonic()) and the device


def correctness(res: Results, deadline: float, device: str, quick: bool) -> None:
    for target in QUICK_TESTS if quick else GPU_TESTS:
        left = deadline - time.monotonic()
        if left < 5:
            res.add("correctness", {"tests": target, "status": "not run: the step's budget was spent"})
            continue
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", target]
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(out[-3000:])
            res.add("correctness", {"tests": target, "status": "stopped at the step's budget",
                                    "seconds": round(time.monotonic() - start, 1)})
            continue
        print(run.stdout[-6000:] + run.stderr[-2000:], flush=True)
        res.add("correctness", {"tests": target, "status": "passed" if run.returncode == 0 else f"exit {run.returncode}",
                                "seconds": round(time.monotonic() - start, 1), **pytest_summary(run.stdout)})


def pytest_summary(text: str) -> dict:
    """Counts of pytest's last line, and the tests that failed or skipped (with the reasons)."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1] if text else "")}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    skipped = re.findall(r"^SKIPPED \[\d+\] (.+)$", text, flags=re.M)
    return {"counts": counts, "failed": failed[:50], "skipped": skipped[:20]}


def kernels(res: Results, deadline: float, device: str, quick: bool) -> None:
    import kernel_resources as kr

    env = kr.measure_env(device)
    res.add("kernels", {"yardsticks": env})
    done = 0
    for case in kr.measure_cases(device, quick, env["copy_gb_per_s"] * 1e9, env["fp32_issue_per_s"]):
        res.add("kernels", case)
        done += 1
        if time.monotonic() > deadline:
            res.add("kernels", {"status": f"stopped at the step's budget after {done} cases"})
            return


def _model_case(res: Results, step: str, case, deadline: float, repeat: int, warmup: int) -> bool:
    """Measure one model case in a process of its own, under a timeout of what is left; record it.
    False when the step's budget is spent."""
    left = deadline - time.monotonic()
    if left < 10:
        res.add(step, {"case": asdict(case), "status": "not run: the step's budget was spent"})
        return False
    code = ("import json; from vqfast.cli.bench import Case, measure_here; "
            f"print(json.dumps(measure_here(Case(**{asdict(case)!r}), {repeat}, {warmup})))")
    start = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        res.add(step, {"case": asdict(case), "label": case.label, "status": "stopped at the step's budget",
                       "seconds": round(time.monotonic() - start, 1)})
        return False
    record = {"case": asdict(case), "label": case.label, "seconds": round(time.monotonic() - start, 1)}
    if run.returncode:
        print(run.stderr[-3000:], flush=True)
        record.update(status="error", error=(run.stderr.strip().splitlines() or ["?"])[-1][:300])
    else:
        record.update(status="measured", **json.loads(run.stdout.strip().splitlines()[-1]))
    res.add(step, record)
    return True


def _impls(device: str, quick: bool) -> list[str]:
    """vqfast, on a GPU its eager path (the baseline without diffusers), then diffusers eager and
    compiled when diffusers is installed (compiling last: it is the slowest)."""
    has = importlib.util.find_spec("diffusers") is not None
    eager = ["vqfast-eager"] if device.startswith("cuda") else []  # on CPU vqfast is its eager path
    return ["vqfast", *eager] + (["diffusers"] + ([] if quick else ["diffusers-compile"]) if has else [])


def target(res: Results, deadline: float, device: str, quick: bool) -> None:
    from vqfast.cli.bench import Case

    name, batch, size, dtype = ("ldm_f4", 1, 64, "float32") if quick else ("movq", 8, 512, "float16")
    for impl in _impls(device, quick):
        if not _model_case(res, "target", Case("decode", name, batch, size, dtype, impl, device), deadline,
                           repeat=2 if quick else 10, warmup=1 if quick else 3):
            return


def grid(res: Results, deadline: float, device: str, quick: bool) -> None:
    from vqfast.cli.bench import Case

    if quick:
        cases = [Case("encode", "ldm_f4", 1, 64, "float32", impl, device) for impl in _impls(device, quick)[:1]]
    else:
        cases = [Case(kind, name, batch, size, "float16", impl, device)
                 for size, batch in ((512, 8), (256, 8), (512, 1), (256, 1))
                 for name in ("movq", "ldm_f4", "amused") for kind in ("decode", "encode")
                 if (kind, name, batch, size) != ("decode", "movq", 8, 512)  # the target step's
                 for impl in ("vqfast", "diffusers" if _version("diffusers") else "vqfast-eager")]
    for case in cases:
        if not _model_case(res, "grid", case, deadline, repeat=2 if quick else 5, warmup=1 if quick else 2):
            return


def dataset(res: Results, deadline: float, device: str, quick: bool) -> None:
    """bench/dataset.py, short: a generated webdataset tokenized end to end, beside the loader
    and the model alone."""
    import tempfile

    size = ["--images", "32", "--per-shard", "16", "--image-side", "96", "--size", "64"] if quick else \
        ["--images", "256", "--per-shard", "64", "--image-side", "384", "--size", "256"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "bench" / "dataset.py"), *size, "--device", device, "--out", tmp]
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            res.add("dataset", {"status": "stopped at the step's budget"})
            return
        print(run.stdout[-3000:] + run.stderr[-3000:], flush=True)
        found = list(Path(tmp).glob("dataset-*.json"))
        if run.returncode or not found:
            res.add("dataset", {"status": "error", "error": (run.stderr.strip().splitlines() or ["?"])[-1][:300]})
            return
        res.add("dataset", {"status": "measured", **json.loads(found[0].read_text())})


STEPS = {"correctness": correctness, "kernels": kernels, "target": target, "dataset": dataset, "grid": grid}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu-check.json (required but with --print-tests)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all steps (default 420)")
    p.add_argument("--quick", action="store_true", help="tiny cases (the CPU rehearsal)")
    p.add_argument("--print-tests", action="store_true", help="print the GPU test selection and exit")
    args = p.parse_args()
    if args.print_tests:
        print(" ".join(GPU_TESTS))
        return 0
    if args.out is None:
        p.error("the following argument is required: --out")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    res = Results(args.out / "gpu-check.json", meta(device, args.budget, args.quick))
    start = time.monotonic()
    for i, (name, step) in enumerate(STEPS.items()):
        # this step's share, plus whatever the earlier ones left
        deadline = start + args.budget * sum(list(SHARES.values())[: i + 1])
        try:
            step(res, deadline, device, args.quick)
        except Exception as e:  # a broken step is recorded and the next one still runs
            res.add(name, {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    res.data["meta"]["seconds"] = round(time.monotonic() - start, 1)
    res.save()
    failed = [r for rs in res.data["steps"].values() for r in rs
              if r.get("status") == "error" or str(r.get("status", "")).startswith("exit")]
    empty = [name for name, rs in res.data["steps"].items() if not rs]
    print(f"gpu-check: {len(failed)} failed records, steps without a record: {empty or 'none'}; results in {res.path}")
    return 1 if failed or empty else 0


if __name__ == "__main__":
    sys.exit(main())
