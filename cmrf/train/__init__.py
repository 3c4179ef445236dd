"""Training, evaluation and prediction with the TinyU-Net paper's recipe.

Submodules (imported on demand so ``import cmrf`` stays light):

- datasets live in ``cmrf.data`` (ISIC 2018, generic folders, NIfTI, synthetic lesions).
- ``cmrf.train.losses``: cross-entropy + Dice.
- ``cmrf.train.metrics``: per-class IoU and Dice accumulated over a dataset (torchmetrics).
- ``cmrf.train.state``: atomic checkpoints and the resumable training state.
- ``cmrf.train.loop``: ``Recipe`` and ``fit``, single process or DistributedDataParallel.
- ``cmrf.train.plots``: training curve and prediction overlays (matplotlib).
- ``cmrf.train.cli``: the ``cmrf train / evaluate / predict / demo`` commands.

Needs the ``train`` extra: ``pip install "cmrf[train]"``.
"""

from cmrf.train.loop import Recipe, fit
from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics, format_table

__all__ = ["CEDiceLoss", "Recipe", "SegmentationMetrics", "fit", "format_table"]
