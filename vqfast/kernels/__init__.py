"""Triton kernels and their launchers, installed as ``vqfast.kernels``.

Only ``vqfast.ops`` (its custom ops, chosen by its dispatcher) imports from here, and only when the
dispatcher picks Triton.
"""

import os

#: triton.jit reads TRITON_INTERPRET when a kernel is defined, so this is what our kernels are:
#: run by Triton's interpreter (on CPU tensors) or compiled for a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
