"""A tower's dead activations, for its later ops to write into.

On the eager CPU path a tower owns every activation it makes (no hooks, no gradient recorded,
see _Checkpointed._tower). Once one is dead (read for the last time) its memory can take a later
activation of the same or a smaller size, instead of a new tensor: a new tensor pays a page
fault for each 4 KiB page on first touch, and the towers' activations are all new. A 128-channel
256x256 fp32 convolution measured 84 ms into a new tensor, 71 ms into a dead one (zeroed, then
summed into by oneDNN, see layers.conv_into), on a 2-core Xeon.

The activations that must be new (the first ones of each size) are advised onto 2 MiB pages
when they are 32 MiB or more: glibc maps each such allocation fresh from the kernel and unmaps it
when it is freed, so the advice covers that tensor only. A 32 MiB tensor's allocation and zeroing
took 11.6 ms on 4 KiB pages and 4.3 ms on 2 MiB ones (Linux's transparent huge pages, in their
``madvise`` mode; where they are off the advice changes nothing, and where free memory is so
fragmented that the kernel must compact it to find a huge page, its ``defrag`` setting decides
whether the first touch waits for that or takes 4 KiB pages).
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

from ..ops.reference import is_channels_last

#: glibc's largest dynamic mmap threshold on 64-bit Linux: allocations this large are always
#: their own mapping, so a huge-page advice on one never outlives the tensor.
OWN_MAPPING_BYTES = 32 * 2**20
HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14


def _madvise():
    """libc's madvise (among the process's own symbols on Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to back a new, untouched CPU tensor of OWN_MAPPING_BYTES or more with
    2 MiB pages (the aligned pages inside it). Whether the advice was taken."""
    storage = t.untyped_storage()
    if _MADVISE is None or t.device.type != "cpu" or storage.nbytes() < OWN_MAPPING_BYTES:
        return False
    start = -(-storage.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (storage.data_ptr() + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE
    return end > start and _MADVISE(start, end - start, _MADV_HUGEPAGE) == 0


def _strides(shape, memory_format: torch.memory_format) -> tuple[int, ...]:
    """A dense tensor's strides: NCHW order, or NHWC for channels_last."""
    order = (0, 2, 3, 1) if memory_format == torch.channels_last else tuple(range(len(shape)))
    strides, step = [0] * len(shape), 1
    for dim in reversed(order):
        strides[dim], step = step, step * shape[dim]
    return tuple(strides)


class Workspace:
    """Dead activations of one tower call, each a whole storage that no live tensor uses.

    ``take`` carves a tensor from the smallest dead storage that holds it, else makes a new one
    (after freeing the dead ones too small to hold it); ``give`` hands back the storage of a
    dead tensor that ``take`` lent. So the workspace holds no more than the tower's own tensors
    would at their peak, and an op that cannot write into what it is given (a 16-bit
    convolution makes its own output) only frees it. A storage is lent to one taker at a time,
    and only its owner gives it back: nothing is ever written where a live tensor lies.
    """

    def __init__(self) -> None:
        self._dead: list[torch.UntypedStorage] = []  # CPU storages: see for_owner
        self._lent: set[int] = set()  # data pointers of the storages out with takers

    @staticmethod
    def for_owner(own: bool, x: torch.Tensor) -> Workspace | None:
        """A workspace for a tower (or a block) that owns its activations (``own``) on the CPU,
        where no gradient is recorded and nothing is being compiled (inductor plans its own
        buffers; CUDA's caching allocator already reuses memory)."""
        usable = own and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        return Workspace() if usable else None

    def give(self, t: torch.Tensor) -> None:
        """Keep t's storage, dead from now on, if ``take`` lent it (else leave it to be freed)."""
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._lent:
            return
        self._lent.remove(storage.data_ptr())
        self._dead.append(storage)

    def take(self, shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        """A tensor of ``shape`` with like's dtype and device, dense in ``memory_format``, whose
        values are garbage: from the smallest dead storage that holds it, else new."""
        nbytes = math.prod(shape) * like.element_size()
        fits = [d for d in self._dead if d.nbytes() >= nbytes]
        if fits:
            storage = min(fits, key=torch.UntypedStorage.nbytes)
            self._dead = [d for d in self._dead if d is not storage]
            t = torch.empty(0, dtype=like.dtype, device=like.device).set_(storage, 0, shape, _strides(shape, memory_format))
        else:
            self.clear()  # every dead storage is smaller: freed first
            t = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
            advise_huge_pages(t)
        self._lent.add(t.untyped_storage().data_ptr())
        return t

    def take_like(self, x: torch.Tensor) -> torch.Tensor | None:
        """A tensor laid out as x is (NCHW or channels_last), or None for an x dense in neither."""
        memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return self.take(x.shape, x, memory_format) if x.is_contiguous(memory_format=memory_format) else None

    def clear(self) -> None:
        """Free every dead storage (before a step whose tensors are larger, which none can hold)."""
        self._dead = []
