"""A tower's eager CPU path as one custom op inside a torch.compile graph (fp32, x86-64).

In fp32 on an x86-64 CPU the eager path writes over its own activations, sums each residual
inside oneDNN's convolution (layers.conv_add) and lays conv weights out once per weight state
(vqfast.ops.derived). Inductor does none of that without freezing, and its fused norms do not
make up for it: the MoVQ encode compiled through inductor ran at 0.96x the eager speed (13
rounds alternating in one process, 2-core Xeon). So there a compiled graph calls each tower
through this op: opaque to inductor, with no graph break (``fullgraph=True`` still captures one
graph), and the same values as eager, bit for bit. In 16-bit dtypes inductor compiles the
tower's own ops, where it is the faster (bf16: 1.12x eager on the decode, 1.18x on the encode);
so it does wherever autograd records (this op has no gradient).

A custom op takes tensors and numbers, not modules: each tower gets a key when it is made (and
again when copied or unpickled, which skip ``__init__``), and the op finds the tower by its key
in a weak registry.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn

from ..ops.dispatch import use_triton
from .layers import _X86_ONEDNN, hooked, memory_format_of

#: Where the eager path sums residuals inside oneDNN's convolutions (read once: dynamo does not
#: trace torch.backends.mkldnn.is_available).
_FUSED_SUMS = _X86_ONEDNN and torch.backends.mkldnn.is_available()
_TOWERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register(tower: nn.Module) -> int:
    """A new key for ``tower``, under which eager_tower finds it."""
    key = next(_KEYS)
    _TOWERS[key] = tower
    return key


def runs_opaque(tower: nn.Module, x: Tensor) -> bool:
    """Whether a tower being compiled should call eager_tower for x: fp32 on an x86-64 CPU
    (where the eager path sums residuals inside oneDNN's convolutions), the eager backend, no
    gradient recorded (the op has no autograd formula), not ``exact`` (diffusers' own layouts),
    and no hooks in the tower (then the eager path writes nothing in place, so it has nothing
    to offer over inductor)."""
    return (
        torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4
        and _FUSED_SUMS and not torch.is_grad_enabled()
        and not use_triton(x.device) and not getattr(tower, "exact", False)
        and not any(hooked(m) for m in tower.modules())
    )


@torch.library.custom_op("vqfast::eager_tower", mutates_args=())
def eager_tower(x: Tensor, zq: Tensor | None, key: int) -> Tensor:
    """The tower registered under ``key``, run eagerly on x (and zq, a SpatialNorm decoder's
    quantized latents)."""
    tower = _TOWERS[key]
    return tower(x) if zq is None else tower(x, zq)


@eager_tower.register_fake
def _(x: Tensor, zq: Tensor | None, key: int) -> Tensor:
    tower = _TOWERS[key]
    shape = tower.output_shape(x)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
