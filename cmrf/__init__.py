"""cmrf: Cascade Multi-Receptive Fields and TinyU-Net for PyTorch."""

from cmrf.checkpoint import load_checkpoint, save_weights
from cmrf.layers import CMRF
from cmrf.models import TinyUNet, create_model, list_models
from cmrf.profile import profile

__version__ = "0.1.0"

__all__ = [
    "CMRF",
    "TinyUNet",
    "create_model",
    "list_models",
    "load_checkpoint",
    "profile",
    "save_weights",
]
