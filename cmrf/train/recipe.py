"""``Recipe``: the optimisation settings of a run; its defaults are the TinyU-Net paper's.

The paper's recipe (MICCAI 2024, section 4.1):

- Adam, lr 1e-4, betas (0.9, 0.999), no weight decay;
- cosine annealing of the lr from 1e-4 to 1e-6 over the run, stepped once per epoch;
- loss = cross-entropy + Dice (``cmrf.train.losses.CEDiceLoss``);
- 300 epochs, data augmentation switched off after epoch 180 (``aug_stop``, 60% of the run);
- 256x256 inputs (a data option, ``--img-size``).

The paper does not state the batch size; the default here is 8, the value of the CMUNeXt code
base that TinyU-Net's experiments build on.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from cmrf.constants import MAX_SEED, worker_limit_problem
from cmrf.train.processes import check_device_name

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def _count(name: str, value, minimum: int) -> int:
    """``value`` as a plain ``int`` (NumPy's integers too), if it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # a plain int: the recipe is saved as JSON and in weights-only torch files


@dataclass
class Recipe:
    """Optimisation settings; the defaults are the paper's (see the module docstring).

    Attributes:
        epochs: training epochs. Default 300.
        batch_size: images per step and process. Default 8 (not stated in the paper).
        lr: initial learning rate of Adam. Default 1e-4.
        min_lr: learning rate reached at the end of the cosine schedule. Default 1e-6.
        betas: Adam's betas. Default (0.9, 0.999).
        weight_decay: Adam's L2 penalty. Default 0.
        aug_stop: augmentation is on for epochs ``1..aug_stop`` (1-based) and off afterwards;
            ``None`` (default) means 60% of ``epochs`` (180 of 300, as in the paper).
        ce_weight, dice_weight: weights of the two loss terms. Default 1 and 1.
        amp: mixed precision on GPU: ``"auto"`` (bf16 where supported, else fp16), ``"bf16"``,
            ``"fp16"`` or ``"none"``. The CPU always trains in float32.
        workers: DataLoader worker processes, or ``"auto"`` (default): 0 on the CPU, on CUDA the
            cores this process may use (shared among the machine's processes) less one, at most 8
            (``cmrf.train.loaders.choose_workers``). Results do not depend on it.
        seed: seed of initialisation, shuffling and augmentation. Default 0.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:1"`` (a
            ``torch.device`` is taken by its name).
        overlays: number of test images drawn in ``overlays.png``. Default 4.
        compile: ``torch.compile`` the model: ``False`` (default, eager), ``True`` (inductor) or
            the name of a backend (``"inductor"``, ``"aot_eager"``, ...). Compiling costs time
            before the first steps (see docs/training.md) and pays off on long GPU runs.
    """

    epochs: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    aug_stop: int | None = None
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    amp: str = "auto"
    workers: int | str = "auto"
    seed: int = 0
    device: str = "auto"
    overlays: int = 4
    compile: bool | str = False

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            setattr(self, name, _count(name, getattr(self, name), 1))
        for name in ("seed", "overlays"):
            setattr(self, name, _count(name, getattr(self, name), 0))
        if self.seed > MAX_SEED:  # torch's generators take it only up to there (with the ranks added)
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1 ({MAX_SEED}), got {self.seed}")
        if self.workers != "auto":
            self.workers = _count("workers", self.workers, 0)
            problem = worker_limit_problem(self.workers)
            if problem:
                raise ValueError(f"workers: {problem}")
        if self.aug_stop is not None:
            self.aug_stop = _count("aug_stop", self.aug_stop, 0)
        for name in ("lr", "min_lr", "weight_decay", "ce_weight", "dice_weight"):
            value = getattr(self, name)
            # NaN passes every comparison below unnoticed, and inf trains to NaN at the first step.
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            # A plain float: the recipe is saved as JSON and in weights-only torch files.
            setattr(self, name, float(value))
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            hint = ("; min_lr defaults to 1e-6, so a smaller lr (a fine-tune's) needs a smaller --min-lr too"
                    if 0 < self.lr < self.min_lr else "")
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr (--lr, --min-lr), got lr={self.lr}, "
                             f"min_lr={self.min_lr}{hint}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        in_range = [isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1
                    for b in (self.betas if isinstance(self.betas, (tuple, list)) else ())]
        if len(in_range) != 2 or not all(in_range):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.aug_stop is not None and not 0 <= self.aug_stop <= self.epochs:
            raise ValueError(f"aug_stop must be between 0 and epochs={self.epochs}, got {self.aug_stop}")
        # Its spelling now, not after the data is decoded (whether CUDA exists is fit's question).
        self.device = check_device_name(self.device)
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(f"compile must be True, False or a torch.compile backend, got {self.compile!r}")
        if isinstance(self.compile, str):  # now, not at the first step after the data is built
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile not in known:
                raise ValueError(f"compile backend {self.compile!r} is not one torch.compile knows; "
                                 f"expected one of {', '.join(known)}")

    @property
    def augment_epochs(self) -> int:
        """Number of leading epochs trained with augmentation."""
        return round(0.6 * self.epochs) if self.aug_stop is None else self.aug_stop

    @property
    def compile_backend(self) -> str | None:
        """The ``torch.compile`` backend, or ``None`` for eager execution."""
        if self.compile is True:
            return "inductor"
        return self.compile or None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d
