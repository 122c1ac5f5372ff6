"""Model reprogramming of CLIP text-image encoders (Reprogrammer and Residual Reprogrammer)."""
from .clip import load_clip
from .model import Reprogrammer

__all__ = ["load_clip", "Reprogrammer"]
