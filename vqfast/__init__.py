"""vqfast: a drop-in, faster diffusers VQModel for PyTorch.

``from vqfast import VQModel`` replaces ``from diffusers import VQModel``.
"""

from .dispatch import backend_info, get_backend, set_backend
from .model import VQModel
from .outputs import DecoderOutput, VQEncoderOutput
from .patch import patch, unpatch
from .quantizer import VectorQuantizer

__version__ = "0.1.0"
__all__ = [
    "VQModel", "VQEncoderOutput", "DecoderOutput", "VectorQuantizer",
    "set_backend", "get_backend", "backend_info", "patch", "unpatch", "__version__",
]
