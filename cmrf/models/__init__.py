"""Model zoo. Importing this package registers every model with cmrf's and timm's registries."""

from cmrf.models._base import SegmentationModel
from cmrf.models._builder import UnknownArgumentError
from cmrf.models.cmunext import CMUNeXt
from cmrf.models.registry import create_model, is_model, list_models, register_model
from cmrf.models.segnet import SegNet
from cmrf.models.tinyunet import TinyUNet

__all__ = [
    "CMUNeXt",
    "SegNet",
    "SegmentationModel",
    "TinyUNet",
    "UnknownArgumentError",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
]
