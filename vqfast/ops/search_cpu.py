"""The CPU codebook search in compiled code (search_cpu.cpp), built at first use: for D <= 8 the
running minimum of 8 or 16 rows in registers, above it a register-blocked GEMM whose epilogue is
the running minimum (the codebook packed for it once per codebook state, vqfast.ops.derived).

The kernel is compiled once per machine with the system C++ compiler (``$CXX`` or ``c++``,
``-O3 -march=native``) into ~/.cache/vqfast (``$VQFAST_CACHE``), under a name that hashes the
source, the compiler's version and the CPU's flags: a cache shared by machines of two CPU kinds
holds one build per kind. Built in a temporary file and renamed, so concurrent first uses are
safe. Where no compiler is found or the build fails, the search keeps its GEMM path, and one
warning says so. ``VQFAST_CPU_SEARCH=0`` keeps the GEMM path without trying.

Rows are split into ranges, several per intra-op thread (torch.get_num_threads()), which the
threads take in turn, each range searched by a ctypes call, which releases the GIL: per-row
results, so the split changes nothing, and a thread that shares its core with a busy process
takes fewer ranges.
The threads are kept between calls (a new pool after a fork: threads do not survive one).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .derived import derived

#: The largest D of the small-D kernel; above it, the GEMM-shaped one.
MAX_D = 8
ENV_VAR = "VQFAST_CPU_SEARCH"
SOURCE = Path(__file__).with_name("search_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("VQFAST_CACHE") or Path.home() / ".cache" / "vqfast")


def build(defines: tuple[str, ...] = ()) -> Path:
    """The shared library, built now unless the cache has it; raises on failure. ``defines``
    (``"NAME=VALUE"``) are passed as -D flags: the tests build the other vector width with them."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    flags = FLAGS + [f"-D{d}" for d in defines]
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_flags().encode(), " ".join(flags).encode()]))
    target = _cache_dir() / f"search_cpu-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".search_cpu-", suffix=".so.tmp")
    os.close(fd)
    try:
        run = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if run.returncode:
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (warned once) where it cannot be built."""
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except Exception as e:  # no compiler, a failed build, a library that does not load
        warnings.warn(f"vqfast: the compiled CPU codebook search is unavailable ({str(e).splitlines()[0][:300]}); "
                      f"float32 searches on CPU run on the slower GEMM path. {ENV_VAR}=0 silences this.",
                      RuntimeWarning, stacklevel=3)
        return None
    return declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its functions' argument and result types set."""
    lib.vqfast_codes_per_tile.restype = ctypes.c_int
    for fn in (lib.vqfast_nearest_small_d, lib.vqfast_nearest_any_d):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_Rows), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p]
    return lib


class _Rows(ctypes.Structure):
    """search_cpu.cpp's Rows: the rows where they lie, as a (B, P, D) strided view, and mu."""

    _fields_ = [("x", ctypes.c_void_p), ("mu", ctypes.c_void_p), ("D", ctypes.c_int64), ("P", ctypes.c_int64),
                ("batch_stride", ctypes.c_int64), ("pixel_stride", ctypes.c_int64), ("dim_stride", ctypes.c_int64)]


def _batches(rows: torch.Tensor) -> torch.Tensor:
    """rows (..., D) as a (B, P, D) view where the strides allow it (NCHW latents moved to
    channels-last: B images of P pixels, pixels at stride 1), else as a contiguous copy (1, N, D)."""
    D = rows.shape[-1]
    if rows.dim() <= 2:
        return rows.reshape(-1, D)[None]  # a view for any strides
    try:
        return rows.view(rows.shape[0], -1, D)
    except RuntimeError:  # dimensions that do not merge (a sliced image)
        return rows.reshape(1, -1, D).contiguous()


def applies(device: torch.device, acc: torch.dtype, D: int) -> bool:
    """Whether a search on ``device`` ranking in ``acc`` with this D runs here (and the kernel is there)."""
    return device.type == "cpu" and acc == torch.float32 and D >= 1 and library() is not None


def pack(codes: torch.Tensor, nr: int | None = None) -> torch.Tensor:
    """The codebook (K, D) as the any-D kernel reads it: each group of ``nr`` codes (the loaded
    kernel's codes per micro-tile by default) interleaved as (D, nr), the last K mod nr as they are."""
    nr = nr or library().vqfast_codes_per_tile()
    K, D = codes.shape
    whole = K - K % nr
    groups = codes[:whole].reshape(-1, nr, D).transpose(1, 2).reshape(-1)
    return torch.cat([groups, codes[whole:].reshape(-1)])


#: Rows per thread below which one call does all (a thread hand-off costs more than it saves).
MIN_ROWS_PER_THREAD = 256
#: Ranges of rows per thread: the work is shared out in this many turns (see nearest).
CHUNKS_PER_THREAD = 8


def nearest(rows: torch.Tensor, mu: torch.Tensor, codes: torch.Tensor, norms: torch.Tensor,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Indices (N,) int64 of the lowest norms[k] - 2 (row - mu) . codes[k] for the N rows of
    ``rows`` (..., D) float32, read where they lie (any strides); codes (K, D) float32 centred on
    mu (D,), norms (K,) their squared norms. ``lib``: another build (the tests' other width)."""
    lib = lib or library()
    n, D = rows.numel() // max(rows.shape[-1], 1), rows.shape[-1]
    out = torch.empty(n, dtype=torch.long)
    if n == 0:
        return out
    x, mu, norms = _batches(rows), mu.contiguous(), norms.contiguous()
    described = _Rows(x.data_ptr(), mu.data_ptr(), D, x.shape[1], *x.stride())
    if D <= MAX_D:
        fn, codes = lib.vqfast_nearest_small_d, codes.contiguous()
    else:
        nr = lib.vqfast_codes_per_tile()
        fn, codes = lib.vqfast_nearest_any_d, derived(pack, codes.contiguous(), nr)
    args = (ctypes.byref(described), codes.data_ptr(), norms.data_ptr(), norms.shape[0], out.data_ptr())

    def run(start: int, stop: int) -> None:
        status = fn(args[0], start, stop, *args[1:])  # ctypes releases the GIL for the call
        if status:
            raise RuntimeError(f"the CPU codebook search refused its arguments (status {status})")

    threads = max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))
    if threads == 1:
        run(0, n)
        return out
    # CHUNKS_PER_THREAD ranges per thread, taken in turn by whichever thread is free: a thread
    # whose core another process is using takes fewer (one range each made the call wait for it)
    step = max(MIN_ROWS_PER_THREAD, -(-n // (threads * CHUNKS_PER_THREAD) // 32) * 32)  # whole micro-tiles
    todo = iter(range(0, n, step))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                start = next(todo, None)
            if start is None:
                return
            run(start, min(start + step, n))

    others = [_pool(threads - 1).submit(work) for _ in range(threads - 1)]
    work()
    for f in others:
        f.result()
    return out


_POOLS: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the parent's threads


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vqfast-search")
    return _POOLS[workers]
