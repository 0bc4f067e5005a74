"""``vqfast bench``: vqfast against diffusers (and, on GPU, its own eager path) on the real
checkpoints' shapes, with time and peak memory. ``--compile`` adds torch.compile of diffusers
(what a performance-minded user runs instead of vqfast) and torch.compile of vqfast, which is
set against vqfast itself and against compiled diffusers.

Prints a markdown table (case, device, vqfast, baseline, speed-up, peak memory) and writes a JSON
file with the device, the versions and the date to ``--out`` (default bench/results/). The README's
benchmark table is generated from those files (bench/table.py).

Timing: the median of ``--repeat`` runs after warm-up runs (CUDA: synchronised around each run).
Peak memory: what one run adds above the inputs and weights. On CUDA it is the allocator's
high-water mark; on CPU, where tensors have no allocator counter, every case runs in a fresh
process and the growth of its resident high-water mark (Linux's VmHWM) over one run is taken.
Weights are random (no checkpoint is downloaded), with a codebook spread like a trained one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

#: (K, D) of the real codebooks.
CODEBOOKS = {"movq": (16384, 4), "ldm_f4": (8192, 3), "amused": (8192, 64), "vqgan_f16": (16384, 256)}
#: Real checkpoints' configs shipped in vqfast/configs.
MODELS = {"movq": "kandinsky-2-2-movq", "ldm_f4": "ldm-vq-f4", "amused": "amused-vqvae"}
#: The SpatialNorm / GroupNorm shape of the largest MoVQ decoder layer at 256x256: (C, side).
NORM_SHAPE = (128, 256)


@dataclass(frozen=True)
class Case:
    """One measurement. ``kind``: encode | decode (whole model), quantize (codebook search),
    group_norm (GroupNorm+SiLU) or spatial_norm (SpatialNorm+SiLU). ``impl``: vqfast (its
    automatic path), vqfast-eager, vqfast-compile, diffusers, diffusers-compile (the -compile
    ones under torch.compile, default mode; compilation happens in the warm-up run)."""

    kind: str
    name: str  # model or codebook name
    batch: int
    size: int  # image side in pixels (vectors for quantize: batch * (size/8)^2)
    dtype: str
    impl: str
    device: str
    channels_last: bool = False

    @property
    def label(self) -> str:
        layout = " channels_last" if self.channels_last else ""
        if self.kind == "quantize":
            K, D = CODEBOOKS[self.name]
            what = f"K={K} D={D} N={self.batch * (self.size // 8) ** 2}"
        elif self.kind in ("encode", "decode"):
            what = f"batch {self.batch} {self.size}x{self.size}"
        else:
            C, side = NORM_SHAPE
            what = f"{self.batch}x{C}x{side}x{side}"
        return f"{self.kind} {self.name} {what} {self.dtype}{layout}"


def real_config(name: str) -> dict:
    text = resources.files("vqfast").joinpath("configs", f"{MODELS[name]}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _vqfast(impl: str):
    import vqfast

    vqfast.set_backend("eager" if impl == "vqfast-eager" else None)
    return vqfast


def _model_case(case: Case) -> Callable[[], object]:
    config = real_config(case.name)
    torch.manual_seed(0)
    if case.impl.startswith("diffusers"):
        import diffusers

        net = diffusers.VQModel(**config)
    else:
        net = _vqfast(case.impl).VQModel(**config)
    with torch.no_grad():
        net.quantize.embedding.weight.normal_()
    dtype = getattr(torch, case.dtype)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    net = net.to(case.device, dtype).to(memory_format=fmt).eval()
    f = 2 ** (len(config["block_out_channels"]) - 1)
    D = config.get("vq_embed_dim") or config["latent_channels"]
    if case.kind == "encode":
        fn, x = net.encode, torch.randn(case.batch, config["in_channels"], case.size, case.size)
    else:
        fn, x = net.decode, torch.randn(case.batch, D, case.size // f, case.size // f)
    x = x.to(case.device, dtype).contiguous(memory_format=fmt)
    if case.impl.endswith("-compile"):
        fn = torch.compile(fn)
    return lambda: fn(x)


def search_inputs(case: Case, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (batch, D, side, side), codebook (K, D)) of a quantize case, random normal plus
    ``offset`` (far from the origin: the case that rounding in a distance's expansion gets wrong)."""
    K, D = CODEBOOKS[case.name]
    g = torch.Generator().manual_seed(0)
    side = case.size // 8
    z = torch.randn(case.batch, D, side, side, generator=g)
    return z + offset, torch.randn(K, D, generator=g) + offset


#: Most bytes of the N x K distance matrix the cdist baseline may hold (beyond it, not run).
CDIST_BYTES = 4 * 2**30


def _searcher(case: Case, z: torch.Tensor, book: torch.Tensor) -> tuple[Callable[[], object], Callable]:
    """(run, indices): ``run()`` one search of ``z`` in ``book`` as ``case.impl`` does it,
    ``indices(run())`` its codes (N,) in row order (batch, then height, then width). The
    quantizers (vqfast, diffusers) permute z, search, gather z_q and take the loss; what users
    would run instead of vqfast's search (faiss: FAISS's exact flat index, k=1; cdist:
    torch.cdist + argmin) takes the rows ready made and returns indices: the search alone."""
    dtype = getattr(torch, case.dtype)
    D = book.shape[1]
    rows = z.permute(0, 2, 3, 1).reshape(-1, D)
    if case.impl == "faiss":  # float32 only: half cases are searched in float32
        import faiss

        if case.device.startswith("cuda"):
            import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in and out)

            index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), D)
            index.add(book.to(case.device))
            rows = rows.to(case.device).contiguous()
            return (lambda: index.search(rows, 1)[1]), lambda out: out.reshape(-1).cpu()
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(D)
        index.add(book.numpy())
        rows_np = rows.contiguous().numpy()
        return (lambda: index.search(rows_np, 1)[1]), lambda out: torch.from_numpy(out).reshape(-1)
    if case.impl == "cdist":
        if rows.shape[0] * book.shape[0] * 4 > CDIST_BYTES:
            raise RuntimeError(f"not run: its N x K distance matrix would take "
                               f"{rows.shape[0] * book.shape[0] * 4 / 2**30:.0f} GiB")
        rows, book = rows.to(case.device, dtype).contiguous(), book.to(case.device, dtype)
        return (lambda: torch.cdist(rows, book).argmin(1)), lambda out: out.cpu()
    if case.impl.startswith("diffusers"):
        from diffusers.models.autoencoders.vae import VectorQuantizer
    else:
        VectorQuantizer = _vqfast(case.impl).VectorQuantizer
    q = VectorQuantizer(book.shape[0], D, beta=0.25)
    with torch.no_grad():
        q.embedding.weight.copy_(book)
    q = q.to(case.device, dtype)
    fn = torch.compile(q) if case.impl.endswith("-compile") else q
    z = z.to(case.device, dtype)
    return (lambda: fn(z)), lambda out: out[2][2].reshape(-1).cpu()


def _quantize_case(case: Case) -> Callable[[], object]:
    return _searcher(case, *search_inputs(case))[0]


def float64_nearest(rows: torch.Tensor, book: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmin, clear): float64's nearest code per row, and whether it is a clear winner (the
    top-2 distances apart by more than 1e-4 of the nearest: rounding may pick either otherwise)."""
    book = book.double()
    best, clear = [], []
    for start in range(0, rows.shape[0], chunk):
        top2 = torch.cdist(rows[start:start + chunk].double(), book).topk(2, dim=1, largest=False)
        best.append(top2.indices[:, 0])
        clear.append(top2.values[:, 1] - top2.values[:, 0] > 1e-4 * top2.values[:, 0].clamp_min(1e-30))
    return torch.cat(best), torch.cat(clear)


#: The offset case's shift and rows checked (the first ones).
WRONG_CODES_OFFSET, WRONG_CODES_ROWS = 20.0, 8192


def wrong_codes(case: Case) -> dict:
    """{"wrong_codes", "rows_checked", "offset"}: rows of the offset case (z and codebook + 20)
    where ``case.impl`` picks another code than float64's clear winner."""
    z, book = search_inputs(case, WRONG_CODES_OFFSET)
    run, indices = _searcher(case, z, book)
    with torch.no_grad():
        got = indices(run())[:WRONG_CODES_ROWS]
    want, clear = float64_nearest(z.permute(0, 2, 3, 1).reshape(-1, book.shape[1])[:WRONG_CODES_ROWS], book)
    return {"wrong_codes": int(((got != want) & clear).sum()), "rows_checked": int(got.numel()),
            "offset": WRONG_CODES_OFFSET}


def _norm_case(case: Case) -> Callable[[], object]:
    C, side = NORM_SHAPE
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, C, side, side, generator=g).to(case.device, dtype)
    zq = torch.randn(case.batch, 4, side // 8, side // 8, generator=g).to(case.device, dtype)
    silu = torch.nn.SiLU()
    if case.impl.startswith("diffusers"):
        if case.kind == "spatial_norm":
            from diffusers.models.attention_processor import SpatialNorm

            norm = SpatialNorm(C, 4).to(case.device, dtype)
            fn = lambda: silu(norm(x, zq))  # noqa: E731
        else:
            norm = torch.nn.GroupNorm(32, C, eps=1e-6).to(case.device, dtype)
            fn = lambda: silu(norm(x))  # noqa: E731
        return torch.compile(fn) if case.impl == "diffusers-compile" else fn
    _vqfast(case.impl)
    from vqfast.models.layers import SpatialNorm, norm_act

    norm = (SpatialNorm(C, 4) if case.kind == "spatial_norm" else torch.nn.GroupNorm(32, C, eps=1e-6)).to(case.device, dtype)
    fn = lambda: norm_act(norm, x, zq, silu)  # noqa: E731
    return torch.compile(fn) if case.impl.endswith("-compile") else fn


BUILDERS = {"encode": _model_case, "decode": _model_case, "quantize": _quantize_case,
            "group_norm": _norm_case, "spatial_norm": _norm_case}


def build(case: Case) -> Callable[[], object]:
    """A zero-argument callable running the case once (no grad)."""
    run = BUILDERS[case.kind](case)

    def once():
        with torch.no_grad():
            out = run()
        if case.device.startswith("cuda"):
            torch.cuda.synchronize(case.device)  # the device the case runs on, not the current one
        return out

    return once


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` processes that spin on a core each (a data loader, another job) for the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def resident_peak_kib() -> int:
    """This process's resident-memory high-water mark (VmHWM): unlike ru_maxrss, which a child
    inherits from its parent, it starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status: CPU peak memory needs Linux")


def fma_peak_gflops(threads: int) -> float | None:
    """This CPU's fp32 FMA peak in GFLOP/s on ``threads`` cores, measured: a loop of independent
    FMAs (the compiled search's library, at its vector width) on each thread at once, summed.
    (/proc/cpuinfo's "cpu MHz" is the nominal clock: a Zen 3 EPYC ran 1.4x above it.) None
    without the compiled library."""
    from vqfast.ops import search_cpu

    lib = search_cpu.library()
    if lib is None:
        return None
    fn = lib.vqfast_fma_gflops
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64]
    fn(20_000_000)  # the clock ramps up
    with ThreadPoolExecutor(threads) as pool:  # the best of three: another process may take a turn
        return max(sum(pool.map(fn, [100_000_000] * threads)) for _ in range(3))


def search_pairs(case: Case) -> int:
    """(row, code) pairs a quantize case ranks: N x K."""
    return case.batch * (case.size // 8) ** 2 * CODEBOOKS[case.name][0]


def search_flops(case: Case) -> float:
    """Multiply-adds of a quantize case's distance ranking, as flops: N x K x D x 2."""
    return search_pairs(case) * CODEBOOKS[case.name][1] * 2


def measure_here(case: Case, repeat: int, warmup: int, threads: int | None = None) -> dict:
    """{"ms": median ms (None when repeat is 0), "runs_ms": [...], "peak_mib": memory one run
    adds, and for a quantize case "pairs_per_s", the offset case's wrong codes (wrong_codes) and
    on CPU "gflops" achieved} in this process,
    on ``threads`` CPU threads (None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    run = build(case)
    cuda = case.device.startswith("cuda")
    if case.impl.endswith("-compile"):
        run()  # compilation, outside the timed runs
    if cuda:
        torch.cuda.synchronize(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        base = torch.cuda.memory_allocated(case.device)
    else:
        base = resident_peak_kib()
    run()  # the first run: peak memory (and compilation, for the compiled baseline)
    peak = ((torch.cuda.max_memory_allocated(case.device) - base) / 2**20 if cuda
            else (resident_peak_kib() - base) / 1024)
    for _ in range(max(0, warmup - 1)):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - t0))
    if case.impl.endswith("-compile") and not cuda:
        peak = None  # compilation already set this process's high-water mark (see _mib)
    out = {"ms": statistics.median(times) if times else None, "runs_ms": times, "peak_mib": peak}
    if case.kind == "quantize" and times:
        out["pairs_per_s"] = search_pairs(case) / (out["ms"] / 1e3)
        if not cuda:
            out["gflops"] = search_flops(case) / (out["ms"] * 1e6)
        out.update(wrong_codes(case))
    return out


def measure(case: Case, repeat: int, warmup: int, threads: int | None = None) -> dict:
    """measure_here, in a fresh process on CPU (so that the resident high-water mark is this
    case's own) and in this one on CUDA."""
    if case.device.startswith("cuda"):
        return measure_here(case, repeat, warmup, threads)
    code = (
        "import json, sys; from vqfast.cli.bench import Case, measure_here; "
        f"print(json.dumps(measure_here(Case(**{asdict(case)!r}), {repeat}, {warmup}, {threads!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{case.label} ({case.impl}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baselines(device: str, compile_baseline: bool, kind: str | None = None) -> list[str]:
    """What vqfast is compared with: diffusers when installed (a GPU machine may lack it), on
    GPU vqfast's eager path, when asked torch.compile of diffusers, and for the codebook
    search FAISS (when installed; on GPU its GPU index, when that build is installed) and cdist."""
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    out = ["diffusers"] if has_diffusers else []
    if device.startswith("cuda"):
        out.append("vqfast-eager")
    if has_diffusers and compile_baseline:
        out.append("diffusers-compile")
    if kind == "quantize":
        if _has_faiss(device):
            out.append("faiss")
        out.append("cdist")
    return out


def _has_faiss(device: str) -> bool:
    if importlib.util.find_spec("faiss") is None:
        return False
    if not device.startswith("cuda"):
        return True
    import faiss

    return hasattr(faiss, "GpuIndexFlatL2") and faiss.get_num_gpus() > 0


def comparisons(result: dict) -> list[tuple[str, dict, str, dict]]:
    """(ours name, ours, baseline name, baseline) for each table row of one result: vqfast
    against each baseline, and with --compile vqfast compiled against vqfast and against
    compiled diffusers."""
    rows = [("vqfast", result["vqfast"], name, b) for name, b in result["baselines"].items()]
    compiled = result.get("vqfast-compile")
    if compiled is not None:
        rows.append(("vqfast-compile", compiled, "vqfast", result["vqfast"]))
        if "diffusers-compile" in result["baselines"]:
            rows.append(("vqfast-compile", compiled, "diffusers-compile", result["baselines"]["diffusers-compile"]))
    return rows


def row_cells(ours_name: str, ours: dict, name: str, b: dict) -> list[str]:
    """The vqfast, baseline, speed-up and peak-memory cells of one table row."""
    mine = f"{ours['ms']:.1f} ms" if ours_name == "vqfast" else f"{ours_name} {ours['ms']:.1f} ms"
    # results before 2026-12-06 hold the nominal peak (clock from /proc/cpuinfo), later ones the measured
    for key, what in (("fma_peak_gflops_measured", "measured"), ("fma_peak_gflops", "nominal")):
        if ours.get(key) and "error" not in ours:
            mine += f" ({ours['gflops']:.0f} GFLOP/s, {100 * ours['gflops'] / ours[key]:.0f}% of the {what} FMA peak)"
            break
    mine += _wrong(ours)
    if "error" in b or "error" in ours:
        return [mine if "error" not in ours else f"{ours_name}: {ours['error']}", f"{name}: {b.get('error', '')}", "", ""]
    return [mine, f"{name} {b['ms']:.1f} ms{_wrong(b)}", f"{b['ms'] / ours['ms']:.2f}x",
            f"{_mib(ours_name, ours)} / {_mib(name, b)}"]


def _wrong(result: dict) -> str:
    if "wrong_codes" not in result:
        return ""
    return f"; +{result['offset']:g} offset: {result['wrong_codes']} of {result['rows_checked']} codes wrong"


def _mib(name: str, result: dict) -> str:
    # A compiled callable's first call (compilation) sets the process's high-water mark, so the
    # memory one later call adds cannot be read from it on CPU.
    if name.endswith("-compile") or result.get("peak_mib") is None:
        return "n/a"
    return f"{result['peak_mib']:.0f} MiB"


def environment(device: str, threads: int | None = None) -> dict:
    import vqfast

    versions = {"vqfast": vqfast.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "diffusers"):
        if importlib.util.find_spec(name):
            versions[name] = __import__(name).__version__
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name(threads)
    return {"device": device, "device_name": name, "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _cpu_name(threads: int | None = None) -> str:
    """The CPU's model name with the vector ISA ATen runs at (AVX2, AVX512...) and the thread count."""
    threads = threads or torch.get_num_threads()
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}), {threads} thread{'s' if threads > 1 else ''}"


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for kind in args.kinds:
        names = args.models if kind in ("encode", "decode") else args.codebooks if kind == "quantize" else ["movq"]
        for name in names:
            for batch in args.batch:
                for size in args.size:
                    for dtype in args.dtype:
                        for cl in sorted(set(args.layout)):
                            out.append(Case(kind, name, batch, size, dtype, "vqfast", args.device, cl == "channels_last"))
    return out


def table(env: dict, results: list[dict]) -> str:
    """Markdown: one row per (case, baseline)."""
    lines = ["| case | device | vqfast | baseline | speed-up | peak memory (vqfast / baseline) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for row in comparisons(r):
            lines.append("| " + " | ".join([r["label"], env["device_name"], *row_cells(*row)]) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"vqfast bench: --device {args.device} needs CUDA, which this torch does not see", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"vqfast bench: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    env = environment(args.device, args.threads)
    if "quantize" in args.kinds and not args.device.startswith("cuda"):
        env["fma_peak_gflops_measured"] = fma_peak_gflops(args.threads or torch.get_num_threads())
    results = []
    for case in cases(args):
        entry = {"case": asdict(case), "label": case.label,
                 "vqfast": measure(case, args.repeat, args.warmup, args.threads), "baselines": {}}
        if case.kind == "quantize" and env.get("fma_peak_gflops_measured"):
            entry["vqfast"]["fma_peak_gflops_measured"] = env["fma_peak_gflops_measured"]
        for name in baselines(args.device, args.compile, case.kind):
            other = Case(**{**asdict(case), "impl": name})
            try:
                entry["baselines"][name] = measure(other, args.repeat, args.warmup, args.threads)
            except Exception as err:  # a baseline that fails (say, compile) is reported, not fatal
                entry["baselines"][name] = {"error": str(err).splitlines()[0][:200]}
        if args.compile:
            try:
                compiled = Case(**{**asdict(case), "impl": "vqfast-compile"})
                entry["vqfast-compile"] = measure(compiled, args.repeat, args.warmup, args.threads)
            except Exception as err:
                entry["vqfast-compile"] = {"error": str(err).splitlines()[0][:200]}
        results.append(entry)
        print("\n".join(table(env, [entry]).splitlines()[2:]), flush=True)
    print()
    print(table(env, results))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One file per day, device and set of kinds: a rerun of the same subset replaces its file.
    slug = "-".join(["cuda" if args.device.startswith("cuda") else "cpu", *sorted(set(args.kinds))])
    path = out_dir / f"vqfast-bench-{env['date'][:10]}-{slug}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**env, "command": sys.argv[1:], "results": results}, indent=1))
    tmp.replace(path)
    print(f"\nwrote {path}")
    return 0


def register(sub, name: str) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = default_device == "cuda"
    p = sub.add_parser(name, help="time vqfast against diffusers; markdown table + JSON",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["decode", "encode", "quantize", "spatial_norm", "group_norm"],
                   choices=sorted(BUILDERS), help="what to time (default: all)")
    p.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    p.add_argument("--codebooks", nargs="+", default=sorted(CODEBOOKS), choices=sorted(CODEBOOKS),
                   help="quantize cases: N = batch x (size / 8)^2 vectors, so --batch 1 16 256 --size 256 "
                        "gives N = 1024, 16384, 262144")
    p.add_argument("--batch", nargs="+", type=int, default=[8] if cuda else [1])
    p.add_argument("--size", nargs="+", type=int, default=[512] if cuda else [256], help="image side in pixels")
    p.add_argument("--dtype", nargs="+", default=["float16"] if cuda else ["float32"],
                   choices=["float32", "float16", "bfloat16"])
    p.add_argument("--layout", nargs="+", default=["nchw"], choices=["nchw", "channels_last"])
    p.add_argument("--device", default=default_device)
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile of diffusers as a baseline, and torch.compile of vqfast")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every case (default: torch's default); on a shared machine "
                        "one thread per process is far less noisy than two")
    p.add_argument("--repeat", type=int, default=10 if cuda else 3, help="timed runs per case (median)")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--out", default="bench/results", help="folder for the JSON (default bench/results)")
    p.set_defaults(run=run)
