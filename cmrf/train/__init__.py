"""Training, evaluation and prediction with the TinyU-Net paper's recipe.

Submodules (imported on demand so ``import cmrf`` stays light):

- ``cmrf.train.recipe``: ``Recipe``, the optimisation settings (the paper's by default).
- ``cmrf.train.loop``: ``fit``, in steps: setup, resume, one epoch, save, finish.
- ``cmrf.train.losses``: cross-entropy + Dice.
- ``cmrf.train.metrics``: per-class IoU and Dice accumulated over a dataset (torchmetrics).
- ``cmrf.train.run_folder``: the files of a run and the rule that protects another run's files.
- ``cmrf.train.state``: the resumable training state (``capture_state``/``restore_state``) and
  the checkpoints' metadata.
- ``cmrf.train.loaders``: training and evaluation DataLoaders, ``--workers auto``.
- ``cmrf.train.processes``: devices, mixed precision, DistributedDataParallel processes.
- ``cmrf.train.plots``: training curve and prediction overlays (matplotlib).
- ``cmrf.train.setup``: building a model for training or from a checkpoint; CPU threads.

Datasets are in ``cmrf.data``; the commands (``cmrf train``, ``cmrf demo``, ...) in ``cmrf.cli``.

Needs the ``train`` extra: ``pip install "cmrf[train]"``.
"""

from cmrf.train.loop import UnfinishedRunError, fit
from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics, format_table
from cmrf.train.recipe import Recipe
from cmrf.train.run_folder import RunFolderError

__all__ = [
    "CEDiceLoss",
    "Recipe",
    "RunFolderError",
    "SegmentationMetrics",
    "UnfinishedRunError",
    "fit",
    "format_table",
]
