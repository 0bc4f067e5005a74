"""Exact nearest-code search on the CPU: vqfast against FAISS's exact flat index (IndexFlatL2,
k=1) and torch.cdist + argmin, on the same threads, each call in a process of its own.

    pip install faiss-cpu          # or: pip install -e .[bench]
    python bench/search_vs_faiss.py [--rounds 3] [--threads N] [--busy N]

Cases: the real codebooks' (N x K x D) of LDM-f4 (D=3), MoVQ (D=4), LlamaGen (D=8), aMUSEd (D=64)
and VQGAN f16 (D=256), random normal data. Each round runs the three once, starting from a
different one, each in its own process (FAISS and torch each bring an OpenMP runtime, and in one
process the waiting threads of one slowed the other up to 8x), timing the median of 3 calls after
a warm-up one. Reports per case the median over the rounds of each, the ratio to FAISS, and the rows whose
index differs from the float64 argmin where float64 has a clear winner (its top-2 gap above
1e-4 of the distance), over the first 2048 rows. ``--busy N`` starts N processes that spin on a
core each for the whole run (a data loader, another job). Writes
bench/results/search-vs-faiss-<date>[-busyN].json with the CPU (and its vector ISA) and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vqfast.cli.bench import float64_nearest

CASES = [(65536, 8192, 3, "ldm_f4"), (65536, 16384, 4, "movq"), (65536, 16384, 8, "llamagen"),
         (65536, 8192, 64, "amused"), (16384, 16384, 256, "vqgan_f16")]


def wrong_codes(z: torch.Tensor, book: torch.Tensor, got: torch.Tensor, rows: int = 2048) -> int:
    want, clear = float64_nearest(z[:rows], book)
    return int(((got[:rows] != want) & clear).sum())


def inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    N, K, D, _ = next(c for c in CASES if c[3] == case)
    g = torch.Generator().manual_seed(0)
    book = torch.randn(K, D, generator=g)
    return book, torch.randn(N, D, generator=g)


def search_fn(impl: str, book: torch.Tensor, z: torch.Tensor):
    if impl == "vqfast":
        import vqfast
        from vqfast import functional as vf

        vqfast.set_backend("eager")
        return lambda: vf.nearest_code(z, book)
    if impl == "faiss":
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(book.shape[1])
        index.add(book.numpy())
        return lambda: torch.from_numpy(index.search(z.numpy(), 1)[1][:, 0])
    return lambda: torch.cdist(z, book).argmin(1)


#: Timed calls per process, after one warm-up call (the second call of a process still ran up to
#: 1.4x slower than later ones: one timed call made ratios swing by 0.3 between runs).
CALLS = 3


def worker(impl: str, case: str, out: Path) -> None:
    """One measurement in this process: a warm-up call (the compiled search's build, FAISS's
    index), then CALLS timed calls, their median; the indices saved for the exactness count."""
    book, z = inputs(case)
    fn = search_fn(impl, book, z)
    fn()
    times = []
    for _ in range(CALLS):
        t = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - t)
    torch.save({"seconds": statistics.median(times), "indices": got[:2048].clone()}, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cases", nargs="+", default=[c[3] for c in CASES])
    p.add_argument("--busy", type=int, default=0, metavar="N", help="competing busy processes (default 0)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "CASE", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.worker[0], args.worker[1], Path(args.worker[2]))
    from vqfast.cli.bench import busy_processes

    with busy_processes(args.busy):
        run(args)


def run(args: argparse.Namespace) -> None:
    import subprocess
    import sys
    import tempfile

    import faiss

    from vqfast.cli.bench import environment

    threads = torch.get_num_threads()
    results = []
    for N, K, D, name in CASES:
        if name not in args.cases:
            continue
        impls = ["vqfast", "faiss"] + (["cdist+argmin"] if N * K <= 2**31 else [])  # cdist: an N x K matrix
        times: dict[str, list[float]] = {k: [] for k in impls}
        outs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
                    file = Path(tmp) / f"{impl}.pt"
                    subprocess.run([sys.executable, __file__, "--threads", str(threads), "--worker", impl, name,
                                    str(file)], check=True)
                    got = torch.load(file)
                    times[impl].append(got["seconds"])
                    outs[impl] = got["indices"]
        book, z = inputs(name)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"case": name, "N": N, "K": K, "D": D, "median_s": med, "runs_s": times,
               "vqfast_speedup_vs_faiss": med["faiss"] / med["vqfast"],
               "wrong_codes_of_2048": {k: wrong_codes(z, book, o) for k, o in outs.items()}}
        results.append(row)
        print(f"{name} N={N} K={K} D={D}: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in med.items())
              + f"; vqfast {row['vqfast_speedup_vs_faiss']:.2f}x FAISS; wrong codes {row['wrong_codes_of_2048']}",
              flush=True)
    env = environment("cpu", threads)
    env["faiss"] = faiss.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"search-vs-faiss-{env['date'][:10]}{f'-busy{args.busy}' if args.busy else ''}.json"
    path.write_text(json.dumps({**env, "rounds": args.rounds, "busy_processes": args.busy, "how": "each measurement in its own process "
                                "(FAISS and torch bring two OpenMP runtimes, whose waiting threads slow each other "
                                "up to 8x in one process), one warm-up call then the median of 3 timed calls",
                                "calls": CALLS,
                                "results": results}, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
