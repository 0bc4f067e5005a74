"""vqfast: a drop-in, faster diffusers VQModel for PyTorch.

``from vqfast import VQModel`` replaces ``from diffusers import VQModel``.

Layout, in import order: ``vqfast.cli`` (the command) -> ``vqfast.models`` (the VQModel) ->
``vqfast.ops`` (the fused ops and their dispatcher) -> ``vqfast.kernels`` (Triton).
"""

import sys

from .models.model import VQModel
from .models.outputs import DecoderOutput, VQEncoderOutput
from .models.patch import patch, unpatch
from .models.quantizer import VectorQuantizer
from .ops import derived, functional
from .ops.dispatch import backend_info, get_backend, set_backend

# vqfast.functional and vqfast.derived are documented public modules that live in vqfast.ops:
# registering them under their public names makes `import vqfast.functional` work too.
sys.modules[f"{__name__}.functional"] = functional
sys.modules[f"{__name__}.derived"] = derived

__version__ = "0.1.0"
__all__ = [
    "VQModel", "VQEncoderOutput", "DecoderOutput", "VectorQuantizer",
    "set_backend", "get_backend", "backend_info", "patch", "unpatch",
    "functional", "derived", "__version__",
]
