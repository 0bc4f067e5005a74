"""Kernels that check themselves: the first launch of each kernel specialisation in a process
also runs the eager reference on a canary slice of the same call and compares.

A specialisation is (op, dtype, layout, device, and what picks the compiled variant: the search's
D and whether it writes z_q, the norm's SiLU and affine). Its first call:
- search (nearest_code, quantize): the first CANARY_ROWS vectors' distances to every code in
  float64; every index the kernel gave must be within the arithmetic's error bound of that row's
  float64 minimum (so where float64 has a clear winner, the kernel's index is it; ties and near
  ties may go either way), and z_q must be exactly the chosen codes;
- norms (group_norm, spatial_norm): the first image of the batch through the eager op in the
  input dtype and in float64, by the three-way rule |kernel - f64| <= 2 |eager - f64| +
  atol(dtype) x max(1, max |f64|).
Cost, once per specialisation: that slice's eager op twice (dtype and float64) and one host sync.
A kernel that raises or disagrees: one warning (SelfCheckWarning) naming the kernel, the case
and how to report it, and that op runs eagerly for that specialisation for the rest of the
process, so results stay right. VQFAST_SELFCHECK=0 turns the check off (errors then propagate).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor

ENV_VAR = "VQFAST_SELFCHECK"
CANARY_ROWS = 64
#: The absolute term of the three-way rule, per dtype (times max(1, max |f64|)). The norm kernels
#: compute in fp32 whatever the input, so a float64 input is held to fp32's term.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-5}
REPORT = ("Please report it with this message and the output of `python -c \"import torch, triton; "
          "print(torch.__version__, triton.__version__, torch.cuda.get_device_name())\"` to vqfast's "
          "issue tracker; VQFAST_SELFCHECK=0 turns this check off.")


class SelfCheckWarning(RuntimeWarning):
    """A Triton kernel failed its first-call check; its op now runs eagerly in this process."""


#: specialisation -> True (checked and right) or False (failed: run eagerly).
_verdicts: dict[tuple, bool] = {}


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip() != "0"


def forget() -> None:
    """Clear every verdict (tests; a process that changed its triton or driver)."""
    _verdicts.clear()


def run(op: str, key: tuple, kernel: Callable[[], object], eager: Callable[[], object],
        check: Callable[[object], str | None]) -> object:
    """kernel(), checked on the first call of its specialisation ``(op, *key)`` by
    check(result) (None when right, else what is wrong); eager() once it has failed."""
    spec = (op, *key)
    verdict = _verdicts.get(spec)
    if verdict is False:
        return eager()
    if verdict or not enabled():
        return kernel()
    try:
        out = kernel()
        problem = check(out)
    except Exception as e:  # a compile or launch error: the op must still answer
        problem = f"raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if problem is None:
        _verdicts[spec] = True
        return out
    _verdicts[spec] = False
    case = ", ".join(map(str, key))
    warnings.warn(f"vqfast: the Triton {op} kernel ({case}) {problem}. This process runs {op} eagerly for "
                  f"that case from now on: results stay right, slower. {REPORT}", SelfCheckWarning, stacklevel=4)
    return eager()


def search_problem(z: Tensor, codebook: Tensor, dim: int, indices: Tensor, z_q: Tensor | None) -> str | None:
    """What is wrong with the kernel's first CANARY_ROWS indices (and codes), or None."""
    D = codebook.shape[1]
    rows = z.movedim(dim, -1).reshape(-1, D)[:CANARY_ROWS].double()
    if rows.shape[0] == 0:
        return None
    got = indices.reshape(-1)[: rows.shape[0]]
    book = codebook.double()
    dist = torch.cdist(rows, book).square()
    best = dist.min(dim=1).values
    picked = dist.gather(1, got.clamp(0, book.shape[0] - 1).unsqueeze(1)).squeeze(1)
    # the fp32 (or fp64) ranking's error: a few ulps of the squared norms it sums
    eps = torch.finfo(torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32).eps
    bound = 8 * D * eps * (rows.square().sum(1) + book.square().sum(1).max())
    finite = torch.isfinite(best)
    bad = finite & ((got < 0) | (got >= book.shape[0]) | (picked - best > bound))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        return (f"picked code {int(got[r])} for vector {r}, whose nearest is {int(dist[r].argmin())} "
                f"(squared distances {float(picked[r]):.6g} vs {float(best[r]):.6g})")
    if z_q is not None:
        codes = z_q.movedim(dim, -1).reshape(-1, D)[: rows.shape[0]]
        if not torch.equal(codes, codebook[got].to(codes.dtype)):
            return "wrote z_q rows that are not the chosen codes"
    return None


def norm_problem(out: Tensor, eager: Callable[[torch.dtype | None], Tensor]) -> str | None:
    """What is wrong with the kernel's output for the first image, or None. ``eager(dtype)``:
    the eager op on that image, its inputs cast to dtype (None: as given)."""
    if out.shape[0] == 0:
        return None
    got = out[:1].double()
    ref = eager(torch.float64)
    same = eager(None).double()
    nan_ok = torch.isnan(ref) == torch.isnan(got)
    if not bool(nan_ok.all()):
        return "gave NaN where the float64 reference has none, or the reverse"
    finite = ~torch.isnan(ref)
    err = (got - ref).abs()[finite].max().item() if bool(finite.any()) else 0.0
    eager_err = (same - ref).abs()[finite].max().item() if bool(finite.any()) else 0.0
    scale = max(1.0, ref[finite].abs().max().item()) if bool(finite.any()) else 1.0
    limit = 2 * eager_err + ATOL.get(out.dtype, 1e-5) * scale
    if not err <= limit:
        return f"is off the float64 reference by {err:.3g} on the first image (the eager op: {eager_err:.3g}; allowed {limit:.3g})"
    return None
