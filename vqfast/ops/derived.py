"""Tensors derived from weights (folded upsample kernels, the centred codebook): built once,
rebuilt when a weight changes.

A cache entry is stamped with each source tensor's storage (held weakly), data pointer,
version counter, dtype, device, shape and strides. Anything that replaces or writes a weight
through the tensor itself changes the stamp: ``load_state_dict``, ``model.to(...)``, an
optimizer step, an in-place op under ``torch.no_grad()``. A write through ``weight.data`` does
not (``.data`` has its own version counter), so after such a write call ``vqfast.derived.clear()``.

Nothing is cached while autograd records through a source (the result must carry gradients
back to the weights), for inference-mode tensors (they have no version counter), or under
torch.compile (which builds the derived tensor into its graph).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_CACHE: dict[tuple, tuple[list[StorageWeakRef], tuple[int, ...], Any]] = {}


def _cacheable(tensors: list[torch.Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not any(t.is_inference() for t in tensors)


def derived(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, computed once per state of the tensors among ``args`` (other arguments
    are part of the key)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not _cacheable(tensors):
        return fn(*args)
    key = (fn,) + tuple(
        (a.data_ptr(), a.dtype, a.device, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
        for a in args
    )
    versions = tuple(t._version for t in tensors)
    hit = _CACHE.get(key)
    # The weak storage references tell a live weight from a new one that reuses a freed address.
    if hit is not None and hit[1] == versions and not any(ref.expired() for ref in hit[0]):
        return hit[2]
    _prune()
    value = fn(*args)
    _CACHE[key] = ([StorageWeakRef(t.untyped_storage()) for t in tensors], versions, value)
    return value


def _prune() -> None:
    """Drop entries whose weights are gone, so dead models' derived tensors are freed."""
    for key in [k for k, (refs, _, _) in _CACHE.items() if any(r.expired() for r in refs)]:
        del _CACHE[key]


def clear() -> None:
    """Forget every derived tensor (needed only after writing weights through ``.data``)."""
    _CACHE.clear()
