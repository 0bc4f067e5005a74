"""vqfast: a drop-in, faster diffusers VQModel for PyTorch.

``from vqfast import VQModel`` replaces ``from diffusers import VQModel``.
"""

from .model import VQModel
from .outputs import DecoderOutput, VQEncoderOutput
from .quantizer import VectorQuantizer

__version__ = "0.1.0"
__all__ = ["VQModel", "VQEncoderOutput", "DecoderOutput", "VectorQuantizer", "__version__"]
