"""The one place that decides which implementation each fused op runs.

"auto" runs Triton for CUDA tensors when triton imports, eager PyTorch otherwise. "triton" and
"eager" force a path; "triton" on CPU tensors runs the kernels in Triton's interpreter, which
needs TRITON_INTERPRET=1 set before the kernels are first imported. A forced path that cannot
run raises; nothing falls back silently.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "eager")
ENV_VAR = "VQFAST_BACKEND"
#: The ops with a Triton kernel; every other op is eager everywhere.
FUSED_OPS = ("nearest_code", "quantize", "group_norm", "spatial_norm")

_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force "triton" or "eager" for every fused op, or "auto"; None defers to $VQFAST_BACKEND.

    Takes effect at the next call (a function already compiled with torch.compile keeps the
    path it was traced with).
    """
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {name!r}")
    _forced = name


def get_backend() -> str:
    """The backend in force: set_backend's, else $VQFAST_BACKEND's, else "auto"."""
    if _forced is not None:
        return _forced
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {list(BACKENDS)}, got {os.environ[ENV_VAR]!r}")
    return name


@functools.lru_cache(maxsize=None)
def triton_problem() -> str | None:
    """Why the Triton kernels cannot be imported here, or None when they can."""
    try:
        from ..kernels import codebook, group_norm, spatial_norm  # noqa: F401
    except Exception as e:  # ImportError, or triton failing to find a backend
        return f"{type(e).__name__}: {e}"
    return None


def _kernels_interpreted() -> bool:
    from .. import kernels

    return kernels.INTERPRETED


def use_triton(device: torch.device) -> bool:
    """Whether the fused ops run their Triton kernels for tensors on ``device``."""
    backend = get_backend()
    if backend == "eager":
        return False
    if backend == "auto" and device.type != "cuda":
        return False  # before triton_problem(): importing triton costs ~80 MiB and a second on CPU
    problem = triton_problem()
    if backend == "auto":
        return problem is None
    if problem is not None:
        raise RuntimeError(f"the 'triton' backend is forced but the kernels cannot be imported ({problem})")
    if device.type == "cuda":
        return True
    if device.type == "cpu" and _kernels_interpreted():
        return True
    raise RuntimeError(
        f"the 'triton' backend is forced for {device.type} tensors; Triton runs on CUDA tensors, "
        "or on CPU tensors when TRITON_INTERPRET=1 was set before vqfast's kernels were imported"
    )


# torch.compile evaluates the choice once, while tracing, and bakes it into the graph. This is
# what torch.compiler.assume_constant_result sets; calling that would import torch._dynamo (about
# a second) at `import vqfast`.
use_triton._dynamo_marked_constant = True


def backend_info(device: str | torch.device = "cpu") -> dict[str, str]:
    """For each fused op, "triton" or "eager": the path it takes for tensors on ``device`` now
    (on CPU the search's eager path names its compiled kernels when they are built: float32
    searches run there, float64 ones on the GEMM path).

    Raises, as the op itself would, when a forced backend cannot run there.
    """
    device = torch.device(device)
    path = "triton" if use_triton(device) else "eager"
    info = {op: path for op in FUSED_OPS}
    if path == "eager" and device.type == "cpu":
        from . import search_cpu

        if search_cpu.library() is not None:  # builds it on first use (seconds), as a search would
            for op in ("nearest_code", "quantize"):
                info[op] = "eager (compiled search for float32)"
    return info
