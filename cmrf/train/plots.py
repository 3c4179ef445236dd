"""Figures of a run: the training curve and prediction overlays (matplotlib, no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly, not ``pyplot``, so nothing depends
on (or changes) the global backend and no window ever opens; files are written atomically.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cmrf.files import atomic_path
from cmrf.train.run_folder import naming_errors

# Colours of classes 1..K-1 in overlays (class 0, the background, is left transparent): six bright
# ones, then twelve of matplotlib's tab20 that differ from them, so that up to 18 foreground classes
# (AMOS has 15 organs) get colours of their own; beyond, they repeat.
CLASS_COLOURS = np.array(
    [[1.0, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.5, 1.0], [1.0, 0.85, 0.1], [0.9, 0.3, 0.9], [0.1, 0.9, 0.9],
     [1.0, 0.498, 0.055], [0.549, 0.337, 0.294], [0.580, 0.404, 0.741], [0.498, 0.498, 0.498],
     [0.737, 0.741, 0.133], [0.969, 0.714, 0.824], [0.682, 0.780, 0.910], [0.596, 0.875, 0.541],
     [1.0, 0.596, 0.588], [0.773, 0.690, 0.835], [0.769, 0.612, 0.580], [0.859, 0.859, 0.553]]
)


def _save(figure, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``figure`` atomically: a failed write (full disk) leaves the previous file as it was.
    ``metadata``: text entries for the file (PNG tEXt chunks), as matplotlib's ``savefig`` takes them."""
    path = Path(path)
    with naming_errors(path), atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight",
                       metadata=metadata)
    return path


def plot_history(history: Sequence[dict], path: str | Path) -> Path:
    """Training loss, validation mIoU and learning rate against the epoch, as one PNG.

    Args:
        history: records with ``epoch``, ``train_loss``, ``val_mean_iou`` and ``lr``.
        path: output file (``.png``).
    """
    return _save(_history_figure(history), path)


def _history_figure(history: Sequence[dict]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(11, 3.4))
    axes = figure.subplots(1, 3)
    # "training loss": its CE and Dice weights are the recipe's (either may be 0).
    series = (("train_loss", "training loss"), ("val_mean_iou", "validation mIoU"), ("lr", "lr"))
    for ax, (key, title) in zip(axes, series, strict=True):
        values = [r[key] for r in history]
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None)
        skipped = sum(not math.isfinite(v) for v in values)
        if skipped:  # matplotlib leaves them out without a mark
            ax.text(0.5, 0.5, f"{skipped} of {len(values)} values not finite (not drawn)",
                    transform=ax.transAxes, ha="center", va="center", color="tab:red")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.grid(alpha=0.3)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    figure.tight_layout()
    return figure


def _display_slice(tensor: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """The 2D picture of an image ``(C, *S)`` or mask ``(*S)``: the middle slice of a volume."""
    if spatial_dims == 3:
        depth_axis = tensor.dim() - 3
        tensor = tensor.select(depth_axis, tensor.shape[depth_axis] // 2)
    return tensor


def _rgb(image: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` in ``[0, 1]`` -> ``(H, W, 3)`` numpy (grey images repeated)."""
    image = image.detach().float().cpu()
    if image.shape[0] != 3:
        image = image[:1].expand(3, *image.shape[1:])
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours of ``mask (H, W)`` over ``image (C, H, W)`` in ``[0, 1]`` -> ``(H, W, 3)``."""
    rgb = _rgb(image)
    labels = mask.detach().cpu().numpy()
    out = rgb.copy()
    for k in range(1, int(labels.max(initial=0)) + 1):
        colour = CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]
        where = labels == k
        out[where] = (1 - alpha) * rgb[where] + alpha * colour
    return out


def plot_overlays(
    images: torch.Tensor,
    targets: torch.Tensor | None,
    predictions: torch.Tensor,
    path: str | Path,
    spatial_dims: int = 2,
    titles: Sequence[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """One row per image: the image, the ground truth over it (if given), the prediction over it.

    Args:
        images: ``(B, C, *S)`` in ``[0, 1]`` (denormalise network inputs first).
        targets: ``(B, *S)`` class indices, or ``None`` when there is no ground truth.
        predictions: ``(B, *S)`` class indices.
        path: output PNG.
        spatial_dims: 3 shows the middle slice of each volume.
        titles: optional row labels (e.g. file names).
        metadata: text entries for the PNG (``{"Software": ...}``). Default: matplotlib's.
    """
    from matplotlib.figure import Figure

    columns = ["image", "ground truth", "prediction"] if targets is not None else ["image", "prediction"]
    rows = images.shape[0]
    figure = Figure(figsize=(3 * len(columns), 3 * rows))
    axes = np.atleast_2d(figure.subplots(rows, len(columns), squeeze=False))
    for i in range(rows):
        image = _display_slice(images[i], spatial_dims)
        panels = [_rgb(image)]
        if targets is not None:
            panels.append(overlay(image, _display_slice(targets[i], spatial_dims)))
        panels.append(overlay(image, _display_slice(predictions[i], spatial_dims)))
        for j, (ax, panel) in enumerate(zip(axes[i], panels, strict=False)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j])
        if titles is not None:
            # File names are text, not mathtext: "scan_$x^$.png" must neither fail nor be typeset.
            axes[i][0].set_ylabel(_drawable(titles[i]), fontsize=8, parse_math=False)
    with warnings.catch_warnings():
        # A name in a script the font lacks (CJK) is drawn as boxes; the warning per glyph is noise.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        figure.tight_layout()
        return _save(figure, path, metadata)


def _drawable(text: str) -> str:
    """``text`` without the lone surrogates that stand for a file name's undecodable bytes (a
    Latin-1 name on a UTF-8 system), which the renderer refuses: each becomes U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
