"""Training with the TinyU-Net paper's recipe, on one process or many (DistributedDataParallel).

The paper's recipe (MICCAI 2024, section 4.1), the defaults of ``Recipe``:

- Adam, lr 1e-4, betas (0.9, 0.999), no weight decay;
- cosine annealing of the lr from 1e-4 to 1e-6 over the run, stepped once per epoch;
- loss = cross-entropy + Dice (``cmrf.train.losses.CEDiceLoss``);
- 300 epochs, data augmentation switched off after epoch 180 (``aug_stop``, 60% of the run);
- 256x256 inputs (a data option, ``--img-size``).

The paper does not state the batch size; the default here is 8, the value of the CMUNeXt code
base that TinyU-Net's experiments build on.

Reproducibility: with the same seed, a CPU run gives the same weights every time, also when it is
interrupted and resumed (``resume=True``), because batches come from a ``DistributedSampler`` and
augmentation from ``(seed, epoch, index)``, both independent of the process history, and every
generator state is saved with the checkpoint.

Distributed: under ``torchrun --nproc_per_node K -m cmrf train ...`` each process trains on its
shard (``DistributedSampler``), gradients are averaged by DDP (gloo on CPU, NCCL on GPU), the
validation and test metrics are summed across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics
from cmrf.train.state import (
    STATE_FILE,
    atomic_write_json,
    get_rng_state,
    load_training_state,
    save_training_state,
    set_rng_state,
)

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
# Seconds between two redraws of the training curve during a run (it is always drawn at the end).
CURVE_EVERY_S = 60.0


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
        workers: DataLoader worker processes. Default 0 (load in the training process).
        seed: seed of initialisation, shuffling and augmentation. Default 0.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.
        overlays: number of test images drawn in ``overlays.png``. Default 4.
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
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    overlays: int = 4

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("workers", "seed", "overlays"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.aug_stop is not None and not 0 <= self.aug_stop <= self.epochs:
            raise ValueError(f"aug_stop must be between 0 and epochs={self.epochs}, got {self.aug_stop}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")

    @property
    def augment_epochs(self) -> int:
        """Number of leading epochs trained with augmentation."""
        return round(0.6 * self.epochs) if self.aug_stop is None else self.aug_stop

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d


# --- devices, precision, processes --------------------------------------------------------------


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` for ``name`` (see ``Recipe.device``); checks that CUDA exists."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or ``None`` for float32 (always on CPU)."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device_name: str) -> Processes:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL when training on CUDA and gloo otherwise. A plain ``python`` run is one process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: every item exactly once across ranks.

    Used for evaluation, where ``DistributedSampler`` would pad with repeated items and bias the
    accumulated metrics.
    """

    def __init__(self, dataset: Dataset, processes: Processes):
        self.indices = list(range(processes.rank, len(dataset), processes.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, processes: Processes) -> DataLoader:
    """A loader over this process's shard of ``dataset``, in order, without padding."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(dataset, processes), num_workers=workers
    )


# --- one epoch, one evaluation ------------------------------------------------------------------


def _progress(loader, description: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
    return tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=None if enabled else True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    processes: Processes,
    description: str = "train",
) -> float:
    """One pass over ``loader``; returns the mean loss per image over all processes."""
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of loss * images, images)
    bar = _progress(loader, description, processes.is_main)
    start = time.perf_counter()
    for images, masks in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), masks)
        if not torch.isfinite(loss):
            # A ValueError: the cause is a setting (lr, precision), and the CLI reports it in one line.
            raise ValueError(
                f"{description}: training loss is {loss.item()}; lower --lr or use --amp bf16/none "
                f"(fp16 may overflow); the last completed epoch is kept in last_state.pt"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total[0] += loss.detach().double() * images.shape[0]
        total[1] += images.shape[0]
        seen = total[1].item()
        bar.set_postfix(
            loss=f"{total[0].item() / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.1f}"
        )
    if processes.distributed:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    class_names: list[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    description: str = "eval",
    progress: bool = True,
) -> dict:
    """Per-class IoU and Dice of ``model`` over ``loader`` (summed across processes).

    Returns ``SegmentationMetrics.compute()``'s dict.
    """
    model.eval()
    metrics = SegmentationMetrics(num_classes, class_names, device=device)
    for images, masks in _progress(loader, description, progress):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        metrics.update(logits.argmax(dim=1), masks)
    return metrics.compute()


# --- the run ------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _share_buffers(model: nn.Module, processes: Processes) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank's last step updated its own), so
    that all shards are scored, and the checkpoint saved, with the same network."""
    if processes.distributed:
        for buffer in _unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def _gather_rng_states(processes: Processes) -> list[dict]:
    state = get_rng_state()
    if not processes.distributed:
        return [state]
    states = [None] * processes.world_size
    dist.all_gather_object(states, state)
    return states


def _plot_curve(history: list[dict], path: Path) -> None:
    from cmrf.train.plots import plot_history

    plot_history(history, path)


def _log(processes: Processes, message: str) -> None:
    if processes.is_main:
        print(message, flush=True)


@dataclass
class RunFiles:
    """The files of a run directory."""

    out: Path

    @property
    def state(self) -> Path:
        return self.out / STATE_FILE

    @property
    def last(self) -> Path:
        return self.out / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.out / "best.safetensors"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.json"

    @property
    def curve(self) -> Path:
        return self.out / "training_curve.png"

    @property
    def overlays(self) -> Path:
        return self.out / "overlays.png"


def fit(
    model: nn.Module,
    bundle,
    out_dir: str | Path,
    recipe: Recipe | None = None,
    *,
    resume: bool = False,
    metadata: dict[str, str] | None = None,
    plots: bool = True,
) -> dict:
    """Train ``model`` on ``bundle.train``, keep the best by validation mIoU, test it.

    Args:
        model: a segmentation network ``(B, C, *S) -> (B, K, *S)`` on the CPU.
        bundle: a ``cmrf.data.DataBundle`` (train/val/test datasets, classes, channels).
        out_dir: run directory; created if missing. Holds ``last``/``best`` checkpoints, the
            resumable state, ``metrics.json`` and the figures (see ``RunFiles``).
        recipe: optimisation settings; default ``Recipe()``, the paper's.
        resume: continue from ``out_dir/last_state.pt`` when it exists (exactly where it stopped).
        metadata: strings stored in every ``.safetensors`` (``cmrf.train.state.model_metadata``).
        plots: write ``training_curve.png`` and ``overlays.png``. Default True.

    Returns:
        The content of ``metrics.json``: test (or, without a test split, validation) scores
        ``mean_iou``, ``mean_dice``, ``per_class``, plus ``split``, ``best_epoch``, ``val`` and
        ``history`` (one record per epoch: ``epoch`` (1-based), ``train_loss``,
        ``val_mean_iou``, ``lr``).
    """
    from cmrf.checkpoint import load_checkpoint, save_weights

    recipe = recipe or Recipe()
    if bundle.val is None or len(bundle.val) == 0:
        raise ValueError("training needs a non-empty validation split to choose the best checkpoint")
    processes = init_processes(recipe.device)
    device = resolve_device(recipe.device, processes.local_rank)
    amp_dtype = autocast_dtype(recipe.amp, device)
    files = RunFiles(Path(out_dir))
    if processes.is_main:
        files.out.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})

    # Different ranks draw different random numbers (e.g. dropout); initial weights are
    # broadcast from rank 0 by DDP.
    seed_everything(recipe.seed + processes.rank)
    model = model.to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=recipe.epochs, eta_min=recipe.min_lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = CEDiceLoss(recipe.ce_weight, recipe.dice_weight)

    history: list[dict] = []
    start_epoch, best_score, best_epoch = 0, -math.inf, 0
    if resume and files.state.is_file():
        state = load_training_state(files.state)
        saved_epochs = state["recipe"]["epochs"]
        if saved_epochs != recipe.epochs:
            raise ValueError(
                f"{files.state} belongs to a {saved_epochs}-epoch run; resume it with --epochs "
                f"{saved_epochs} (got {recipe.epochs}) or start a new run in another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        rng_states = state["rng"]
        set_rng_state(
            rng_states[processes.rank] if len(rng_states) == processes.world_size else rng_states[0]
        )
        _log(processes, f"resuming {files.out} after epoch {start_epoch}/{recipe.epochs}")
    elif resume:
        _log(processes, f"nothing to resume in {files.out} (no {STATE_FILE}): starting a new run")

    if processes.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_sampler = DistributedSampler(
        bundle.train, num_replicas=processes.world_size, rank=processes.rank, shuffle=True, seed=recipe.seed
    )
    loader_generator = torch.Generator()
    train_loader = DataLoader(
        bundle.train,
        batch_size=recipe.batch_size,
        sampler=train_sampler,
        num_workers=recipe.workers,
        pin_memory=device.type == "cuda",
        generator=loader_generator,
    )
    val_loader = eval_loader(bundle.val, recipe.batch_size, recipe.workers, processes)
    names = list(bundle.class_names)

    last_plot = time.monotonic()
    for epoch in range(start_epoch, recipe.epochs):
        bundle.train.augment = epoch < recipe.augment_epochs
        bundle.train.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        # Worker seeds come from this generator: tie them to the epoch, not to the past.
        loader_generator.manual_seed(recipe.seed * 1_000_003 + epoch)
        lr = optimizer.param_groups[0]["lr"]
        tag = f"epoch {epoch + 1}/{recipe.epochs}"
        started = time.perf_counter()
        train_loss = train_one_epoch(
            model, train_loader, loss_fn, optimizer, scaler, device, amp_dtype, processes, tag
        )
        images_per_s = len(train_sampler) * processes.world_size / (time.perf_counter() - started)
        _share_buffers(model, processes)
        scores = evaluate_model(
            _unwrap(model), val_loader, bundle.num_classes, names, device, amp_dtype, "val", processes.is_main
        )
        scheduler.step()
        history.append(
            {"epoch": epoch + 1, "train_loss": train_loss, "val_mean_iou": scores["mean_iou"], "lr": lr}
        )
        improved = scores["mean_iou"] > best_score
        if improved:
            best_score, best_epoch = scores["mean_iou"], epoch + 1
        rng_states = _gather_rng_states(processes)
        if processes.is_main:
            raw = _unwrap(model)
            epoch_meta = {**metadata, "epoch": str(epoch + 1), "val_mean_iou": str(scores["mean_iou"])}
            # best first, then the state: a kill in between re-runs this epoch, which rewrites
            # the same best weights (runs are deterministic), so the pair never disagrees.
            if improved:
                save_weights(raw, files.best, metadata=epoch_meta)
            save_weights(raw, files.last, metadata=epoch_meta)
            save_training_state(
                files.state,
                {
                    "epoch": epoch + 1,
                    "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "history": history,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "rng": rng_states,
                    "recipe": recipe.to_dict(),
                    "world_size": processes.world_size,
                },
            )
            # A live curve for long runs, at most once a minute (a plot costs about a second).
            if plots and time.monotonic() - last_plot > CURVE_EVERY_S:
                _plot_curve(history, files.curve)
                last_plot = time.monotonic()
        seconds = time.perf_counter() - started
        _log(
            processes,
            f"{tag}  loss {train_loss:.4f}  val mIoU {scores['mean_iou']:.4f}  lr {lr:.2e}  "
            f"{seconds:.1f}s ({images_per_s:.1f} img/s){'  *best' if improved else ''}",
        )

    if processes.distributed:
        dist.barrier()  # rank 0 has written best.safetensors
    raw = _unwrap(model)
    load_checkpoint(raw, files.best)
    val_scores = evaluate_model(raw, val_loader, bundle.num_classes, names, device, amp_dtype, "val", False)
    has_test = bundle.test is not None and len(bundle.test) > 0
    if has_test:
        test_loader = eval_loader(bundle.test, recipe.batch_size, recipe.workers, processes)
        scores = evaluate_model(raw, test_loader, bundle.num_classes, names, device, amp_dtype, "test", False)
    else:
        scores = val_scores
    result = {
        **scores,
        "split": "test" if has_test else "val",
        "best_epoch": best_epoch,
        "val": val_scores,
        "history": history,
    }
    if processes.is_main:
        atomic_write_json(result, files.metrics)
        if plots:
            _plot_curve(history, files.curve)
        if plots and recipe.overlays:
            write_overlays(
                raw,
                bundle.test if has_test else bundle.val,
                files.overlays,
                recipe.overlays,
                device,
                bundle.spatial_dims,
            )
    if processes.distributed:
        dist.barrier()
    return result


@torch.no_grad()
def write_overlays(
    model: nn.Module, dataset: Dataset, path: Path, count: int, device: torch.device, spatial_dims: int = 2
) -> Path:
    """Draw the first ``count`` items of ``dataset`` with their ground truth and prediction."""
    from cmrf.data import denormalize
    from cmrf.train.plots import plot_overlays

    items = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([image for image, _ in items])
    masks = torch.stack([mask for _, mask in items])
    model.eval()
    predictions = model(images.to(device)).argmax(dim=1).cpu()
    return plot_overlays(denormalize(images), masks, predictions, path, spatial_dims)
