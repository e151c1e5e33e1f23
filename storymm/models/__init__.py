"""Models: visual and text autoencoders, fusion registry, story continuation model."""

from .fusion import FUSIONS, ConcatFusion, GateFusion, build_fusion, register_fusion
from .motion import MotionWarp
from .pointer import GeneratedText, PointerHead, TextCondition
from .sequence import StoryContinuationModel
from .text import TextAutoencoder
from .visual import VisualAutoencoder

__all__ = [
    "FUSIONS",
    "ConcatFusion",
    "GateFusion",
    "GeneratedText",
    "MotionWarp",
    "PointerHead",
    "StoryContinuationModel",
    "TextAutoencoder",
    "TextCondition",
    "VisualAutoencoder",
    "build_fusion",
    "register_fusion",
]
