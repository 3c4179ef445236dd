"""What every zoo network shares: timm's configuration and classifier idioms.

``pretrained_cfg`` (alias ``default_cfg``) is timm's description of a model's expected input. Here it
describes the model itself, not published weights (there are none): ``input_size`` and
``mean``/``std`` follow the model's ``in_channels`` and the library's normalisation
(``cmrf.constants``), ``num_classes`` is the model's, and no ``url``/``hf_hub_id`` is ever set, so
nothing downloads. ``timm.data.resolve_data_config({}, model=model)`` therefore returns the
normalisation the model was trained with.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cmrf.constants import NORMALIZE_MEAN, NORMALIZE_STD
from cmrf.layers import check_positive_int

__all__ = ["SegmentationModel", "fit_cfg", "zoo_cfg"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Default input side per spatial dimension: the library's default image size (256 px) and a
# typical volume crop (64 voxels); 1-D signals get 1024 samples.
DEFAULT_SIDE = {1: 1024, 2: 256, 3: 64}

# cfg entries that state facts about the built model: an overlay may repeat them, not change them.
_MODEL_FACTS = ("num_classes", "input_size", "min_input_size", "mean", "std", "classifier", "first_conv")


# How samples of each dimensionality are resized: torch's interpolate mode names.
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
# The modes that resize a sample of each dimensionality (a cfg naming another is a 2-D default
# left on a model built with other ``spatial_dims``).
_FITTING_MODES = {1: ("linear",), 2: ("bilinear", "bicubic"), 3: ("trilinear",)}
_ANY_DIMS_MODES = ("nearest", "nearest-exact", "area")


def zoo_cfg(
    spatial_dims: int = 2, in_chans: int = 3, num_classes: int = 2, min_side: int = 16, **overrides: Any
) -> dict:
    """A timm ``pretrained_cfg`` entry for ``default_cfgs`` of a zoo model (no weights, no URL).

    Args:
        spatial_dims: 2 for images (default), 3 for volumes, 1 for signals.
        in_chans: input channels. Default 3.
        num_classes: output classes. Default 2.
        min_side: smallest input side of the model built with its defaults (``min_input_size``;
            a built model's cfg states its own). Default 16.
        **overrides: other ``timm.models.PretrainedCfg`` fields (``classifier``, ``first_conv``...).
    """
    side = (DEFAULT_SIDE[spatial_dims],) * spatial_dims
    cfg = {
        "input_size": (in_chans, *side),
        "min_input_size": (in_chans, *(min_side,) * spatial_dims),
        "fixed_input_size": False,
        # The data pipeline resizes images bilinearly, volumes trilinearly, and never crops.
        "interpolation": _INTERPOLATION[spatial_dims],
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (NORMALIZE_MEAN,) * in_chans,
        "std": (NORMALIZE_STD,) * in_chans,
        "num_classes": num_classes,
        "classifier": "head",
        "license": "mit",
    }
    cfg.update(overrides)
    return cfg


def _first_conv(model: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if isinstance(m, _CONVS)), None)


def fit_cfg(
    cfg: dict,
    model: SegmentationModel,
    architecture: str | None = None,
    overlay: dict | None = None,
) -> dict:
    """``cfg`` with ``overlay`` (timm's ``pretrained_cfg_overlay``) on top, made true for ``model``:
    its channels, classes, classifier and first conv.

    The overlay's spatial ``input_size`` and its ``mean``/``std`` are kept; ``mean``/``std`` that
    do not have one entry per input channel become the library's constants repeated
    ``in_channels`` times.

    Raises:
        ValueError: an overlay entry that states a fact about ``model`` and contradicts it
            (``num_classes``, ``input_size`` of another channel count or dimensionality,
            ``mean``/``std`` of another length, ``classifier``, ``first_conv``, ``min_input_size``).
    """
    channels, sd = model.in_channels, model.spatial_dims
    overlay = dict(overlay or {})
    for key in ("mean", "std"):  # one number for every channel (as timm takes it), or a sequence
        if isinstance(overlay.get(key), (int, float)):
            overlay[key] = (float(overlay[key]),) * channels
        elif hasattr(overlay.get(key), "__len__") and not isinstance(overlay[key], str):
            overlay[key] = tuple(float(v) for v in overlay[key])
    cfg = {**cfg, **overlay}
    size = tuple(cfg.get("input_size") or ())
    spatial = size[1:] if len(size) == sd + 1 else (DEFAULT_SIDE[sd],) * sd
    cfg.update(
        input_size=(channels, *spatial),
        min_input_size=(channels, *(model.smallest_side,) * sd),
        num_classes=model.num_classes,
        classifier=model.classifier_name,
        first_conv=_first_conv(model),
    )
    for key, value in (("mean", NORMALIZE_MEAN), ("std", NORMALIZE_STD)):
        if len(tuple(cfg.get(key) or ())) != channels:
            cfg[key] = (value,) * channels
    fitting = (*_FITTING_MODES[sd], *_ANY_DIMS_MODES)
    if "interpolation" not in overlay and cfg.get("interpolation") not in fitting:
        cfg["interpolation"] = _INTERPOLATION[sd]
    if architecture is not None:
        cfg["architecture"] = architecture
    _check_overlay(overlay, cfg, type(model).__name__)
    return cfg


def _as_compared(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_overlay(overlay: dict, cfg: dict, model_name: str) -> None:
    """Refuse overlay entries the fitted ``cfg`` had to change: the cfg describes the model, so an
    overlay that contradicts it would be dropped silently or make the cfg false."""
    for key in _MODEL_FACTS:
        if key in overlay and _as_compared(overlay[key]) != _as_compared(cfg[key]):
            raise ValueError(
                f"pretrained_cfg_overlay {key}={overlay[key]!r} contradicts the {model_name} built, "
                f"whose {key} is {cfg[key]!r} (cmrf's pretrained_cfg describes the model itself); "
                f"give the model's arguments (num_classes, in_chans) instead, or overlay agreeing values"
            )


class SegmentationModel(nn.Module):
    """Base class of the zoo's networks (``TinyUNet``, ``CMUNeXt``, ``SegNet``).

    Subclasses set ``in_channels``, ``num_classes`` and ``spatial_dims``, build their layers, then
    call ``self._init_cfg()``. They hold their classifier at ``classifier_name`` (a dotted module
    path); ``smallest_side`` is the smallest input side they accept.
    """

    classifier_name = "head"

    @property
    def smallest_side(self) -> int:
        """Smallest spatial side the network accepts (``min_input_size`` in the cfg)."""
        return int(getattr(self, "min_size", 1))

    def _init_cfg(self, architecture: str | None = None) -> None:
        self.pretrained_cfg = fit_cfg(zoo_cfg(self.spatial_dims), self, architecture)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    def get_classifier(self) -> nn.Module:
        """The classifier: the last convolution, mapping features to ``num_classes`` logits per pixel."""
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs.

        The new convolution has the old one's input channels, kernel, padding and bias, and its
        device and dtype; every other layer is kept. ``num_classes``, ``pretrained_cfg`` and the
        recorded ``create_model`` call (``cmrf_create_call``) follow.

        Args:
            num_classes: output classes, an integer >= 1 (a segmentation head always exists; to read
                features, use a forward hook on the layer before it).
            global_pool: timm's pooling argument; must be ``None`` (segmentation does not pool).

        Raises:
            ValueError: for ``num_classes`` that is not an integer >= 1, a ``global_pool``, or a
                classifier that is no longer a convolution.
        """
        num_classes = check_positive_int("num_classes", num_classes)
        if global_pool is not None:
            raise ValueError(
                f"{type(self).__name__} has no global pooling (it predicts every pixel); "
                f"global_pool must be None, got {global_pool!r}"
            )
        from cmrf.checkpoint import model_create_call, record_create_call

        old = self.get_classifier()
        call = model_create_call(self)
        if not isinstance(old, _CONVS):
            raise ValueError(
                f"reset_classifier replaces the convolution at {self.classifier_name!r}, found a "
                f"{type(old).__name__}"
            )
        new = type(old)(
            old.in_channels,
            num_classes,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        parent_name, _, child_name = self.classifier_name.rpartition(".")
        setattr(self.get_submodule(parent_name), child_name, new)
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        # The model is now what the same call with these classes builds (save_weights records it).
        if call is not None:
            record_create_call(self, call[0], {**call[1], "num_classes": num_classes})
        elif hasattr(self, "cmrf_create_call"):
            del self.cmrf_create_call
