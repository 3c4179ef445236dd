"""cmrf: Cascade Multi-Receptive Fields and TinyU-Net for PyTorch."""

from cmrf.checkpoint import load_checkpoint, save_weights
from cmrf.export import export_onnx
from cmrf.inference import optimize_for_inference
from cmrf.layers import CMRF
from cmrf.models import TinyUNet, create_model, list_models
from cmrf.profile import profile
from cmrf.surgery import replace_blocks

__version__ = "0.1.0"

__all__ = [
    "CMRF",
    "TinyUNet",
    "create_model",
    "export_onnx",
    "list_models",
    "load_checkpoint",
    "optimize_for_inference",
    "profile",
    "replace_blocks",
    "save_weights",
]
