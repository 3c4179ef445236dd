"""``fit``: train a model with a ``Recipe``, keep the best by validation mIoU, test it.

A run is a few short steps, each a function below: ``_setup`` (devices, model, optimizer,
loaders), ``_resume`` (check and restore the saved state), ``_train_epoch`` (one pass over the
training split, then validation), ``_save`` (checkpoints and state after every epoch) and
``_finish`` (test the best checkpoint, write metrics and figures).

Reproducibility: with the same seed, a CPU run gives the same weights every time, with any number
of DataLoader workers, also when it is interrupted and resumed (``resume=True``): batches come
from a ``DistributedSampler`` seeded by ``(seed, epoch)`` and augmentation from
``(seed, epoch, index)``, both independent of the process history, and every generator state is
saved with the checkpoint (``cmrf.train.state.capture_state``).

Distributed: see ``cmrf.train.processes``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cmrf.constants import thread_limit
from cmrf.layers import compiled_original, eval_mode
from cmrf.train.loaders import EpochSampler, choose_workers, eval_loader, train_loader
from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics
from cmrf.train.processes import (
    Processes,
    autocast_dtype,
    fast_cuda,
    gather_rng_states,
    init_processes,
    resolve_device,
    seed_everything,
    share_buffers,
)
from cmrf.train.recipe import AMP_CHOICES, Recipe
from cmrf.train.run_folder import RunFiles, RunFolderError, check_run_folder, naming_errors, run_folder_lock
from cmrf.train.state import (
    Progress,
    TrainingParts,
    capture_state,
    check_run_metadata,
    decode_metadata,
    load_training_state,
    moved_data_root,
    restore_state,
    resume_differences,
    save_training_state,
)

__all__ = [
    "AMP_CHOICES",
    "Processes",
    "Recipe",
    "UnfinishedRunError",
    "eval_loader",
    "evaluate_model",
    "fit",
    "resolve_device",
    "seed_everything",
    "train_one_epoch",
    "write_overlays",
]

# Seconds between two redraws of the training curve during a run (it is always drawn at the end).
CURVE_EVERY_S = 60.0
# Seconds between two reads of the running loss (a read waits for the GPU to catch up).
LOSS_CHECK_EVERY_S = 1.0


class UnfinishedRunError(ValueError):
    """The epochs were trained and saved, but the final evaluation failed."""


# --- one epoch, one evaluation ------------------------------------------------------------------


def _progress(loader, description: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
    return tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=None if enabled else True)


def _check_finite(loss_sum: torch.Tensor, seen: int, description: str) -> float:
    """The mean loss so far; raises when a step's loss was not finite (the sum then is not)."""
    mean = loss_sum.item() / max(seen, 1)
    if not math.isfinite(mean):
        # A ValueError: the cause is a setting (lr, precision), and the CLI reports it in one line.
        raise ValueError(
            f"{description}: training loss is {mean}; the epochs completed before this one, if any, are "
            f"kept in last_state.pt. --amp fp16 may overflow: --resume with --amp bf16 or none continues "
            f"from them; else lower --lr and train afresh (another --out, or --overwrite): a resume keeps "
            f"the run's --lr"
        )
    return mean


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
    """One pass over ``loader``; returns the mean loss per image over all processes.

    The loss is read back from the device about once a second, not at every step, so that the
    host can queue the next steps while the GPU works; a non-finite loss is still caught.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    bar = _progress(loader, description, processes.is_main)
    start = last_check = time.perf_counter()
    for images, masks in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        if time.perf_counter() - last_check > LOSS_CHECK_EVERY_S:
            mean = _check_finite(loss_sum, seen, description)
            last_check = time.perf_counter()
            bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{seen / (last_check - start):.1f}")
    _check_finite(loss_sum, seen, description)
    total = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
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
        metrics.update(logits, masks)  # logits: their argmax needs no range check, and NaN is caught
    return metrics.compute()


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


# --- the steps of a run -------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything a run works with, built once by ``_setup``."""

    recipe: Recipe
    bundle: object  # a cmrf.data.DataBundle
    files: RunFiles
    processes: Processes
    device: torch.device
    amp_dtype: torch.dtype | None
    metadata: dict[str, str]
    parts: TrainingParts  # parts.model is the plain model: saved, restored, tested
    train_model: nn.Module  # parts.model, wrapped by DDP and/or torch.compile
    eval_model: nn.Module  # parts.model, compiled when asked
    loss_fn: nn.Module
    train_loader: DataLoader
    epochs: EpochSampler
    val_loader: DataLoader
    workers: int
    plots: bool
    progress: Progress = field(default_factory=Progress)
    last_plot: float = field(default_factory=time.monotonic)

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.class_names)

    def log(self, message: str) -> None:
        if self.processes.is_main:
            print(message, flush=True)


def _compiled(module: nn.Module, backend: str | None) -> nn.Module:
    return torch.compile(module, backend=backend) if backend else module


def _runners(model: nn.Module, recipe: Recipe, processes: Processes, device: torch.device):
    """``(train_model, eval_model)``: ``model`` compiled when asked, DDP-wrapped for training."""
    eval_model = _compiled(model, recipe.compile_backend)
    if not processes.distributed:
        return eval_model, eval_model
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return _compiled(ddp, recipe.compile_backend), eval_model


def _setup(model: nn.Module, bundle, out: Path, recipe: Recipe, metadata: dict, plots: bool) -> _Run:
    """Devices, the model on its device, optimizer, schedule, scaler, loss and loaders."""
    processes = init_processes(recipe.device)
    device = resolve_device(recipe.device, processes.local_rank)
    if device.type == "cuda":  # kernels launched without a device guard (Triton's) use the current GPU
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(recipe.amp, device)
    # Different ranks draw different random numbers (e.g. dropout); initial weights are
    # broadcast from rank 0 by DDP.
    seed_everything(recipe.seed + processes.rank)
    given = model
    # torch.compile's wrapper: its state_dict keys start "_orig_mod.", which a plain model of the
    # same network could not load nor resume from. Save the module it wraps; train through it.
    model = compiled_original(model).to(device)
    if not any(param.requires_grad for param in model.parameters()):  # the first backward would fail
        raise ValueError(f"{type(model).__name__} has no trainable parameter (every requires_grad is "
                         f"False): unfreeze what should train (requires_grad_(True)) before fit")
    optimizer = torch.optim.Adam(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.epochs, eta_min=recipe.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    parts = TrainingParts(model=model, optimizer=optimizer, scheduler=schedule, scaler=scaler)
    workers = choose_workers(recipe.workers, device, processes.local_world_size)
    pin = device.type == "cuda"
    loader, epochs = train_loader(bundle.train, recipe.batch_size, workers, processes, recipe.seed, pin)
    batch = recipe.batch_size
    val_loader = eval_loader(bundle.val, batch, workers, processes, device=device, persistent=True)
    train_model, eval_model = _runners(model, recipe, processes, device)
    if given is not model and not processes.distributed and not recipe.compile_backend:
        train_model = eval_model = given
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
    run = _Run(
        recipe=recipe, bundle=bundle, files=RunFiles(out), processes=processes, device=device,
        amp_dtype=amp_dtype, metadata=metadata, parts=parts, train_model=train_model,
        eval_model=eval_model, loss_fn=CEDiceLoss(recipe.ce_weight, recipe.dice_weight),
        train_loader=loader, epochs=epochs, val_loader=val_loader, workers=workers, plots=plots,
    )  # fmt: skip
    if recipe.amp in ("bf16", "fp16") and amp_dtype is None:  # asked for by name: not dropped silently
        run.log(f"note: mixed precision ({recipe.amp}) is for CUDA; on the {device.type} this run trains in "
                f"float32")
    if recipe.compile_backend:
        run.log(f"torch.compile ({recipe.compile_backend}): the first training and validation steps compile")
    if plots and importlib.util.find_spec("matplotlib") is None:
        run.plots = False
        run.log("warning: matplotlib is not installed, so this run draws no plots (pip install 'cmrf[train]' "
                "draws them; --no-plots, or plots=False, says so without this warning)")
    return run


def _clear(run: _Run) -> None:
    """``overwrite``: delete the previous run's files (only those) before anything is written."""
    if run.processes.is_main:
        removed = run.files.remove()
        if removed:
            run.log(f"deleted {len(removed)} file(s) of the previous run in {run.files.out}")
    run.processes.barrier()


@contextlib.contextmanager
def _run_folder_held(out_dir: str | Path, processes: Processes) -> Iterator[None]:
    """``run_folder_lock`` taken by the main process, whose outcome every process learns: when the
    folder is in use (or cannot be locked), all stop with the main process's error instead of
    waiting for it at the next collective."""
    with contextlib.ExitStack() as held:
        failure = None
        if processes.is_main:
            try:
                held.enter_context(run_folder_lock(out_dir))
            except Exception as err:
                failure = err
        message = processes.from_main(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise RunFolderError(message)
        yield


def _other_data_than_run(bundle, saved: dict) -> list[str]:
    """How ``bundle`` differs from the data a run recorded in its metadata (``saved``, decoded):
    classes, their names, input channels, spatial dims and, for file data, the splits' files."""
    from cmrf.data import split_fingerprint

    data = saved.get("data") or {}
    checks = [("classes", saved.get("num_classes"), bundle.num_classes),
              ("class names", saved.get("class_names"), list(bundle.class_names)),
              ("input channels", saved.get("in_chans"), bundle.in_channels),
              ("spatial dims", data.get("spatial_dims"), bundle.spatial_dims)]
    found = [f"{what} {was} (given {now})" for what, was, now in checks if was is not None and was != now]
    files, recorded = split_fingerprint(bundle), data.get("split_files")
    source = data.get("data", "synthetic")
    # (a run of file data saved before the files were recorded, or one whose metadata recorded no
    # data options at all: nothing to compare)
    synthetic_run = bool(data) and source == "synthetic"
    if (recorded is not None and recorded != files) or (recorded is None and synthetic_run and files):
        found.append(f"the splits' files differ from the run's ({source} data"
                     f"{', ' + str(data['root']) if data.get('root') else ''})")
    return found


def _resume(run: _Run) -> None:
    """Continue from ``last_state.pt``, after checking that it is this run's."""
    if not run.files.state.is_file():
        run.log(f"nothing to resume in {run.files.out} (no {run.files.state.name}): starting a new run")
        return
    state = load_training_state(run.files.state)
    differences = resume_differences(state, recipe=run.recipe, metadata=run.metadata,
                                     world_size=run.processes.world_size)
    if differences:
        raise RunFolderError(
            f"cannot resume {run.files.out}, its run has other settings: {'; '.join(differences)}; "
            f"resume with the saved settings, or train into another --out"
        )
    saved_meta = state.get("metadata")
    if not run.metadata and isinstance(saved_meta, dict) and saved_meta:
        # Resumed without metadata (from Python): keep the run's, which every later file must
        # carry for evaluate and the next resume, after comparing what the data itself says.
        other = _other_data_than_run(run.bundle, decode_metadata(saved_meta))
        if other:
            raise RunFolderError(
                f"cannot resume {run.files.out}: its run was trained on other data ({'; '.join(other)}); "
                f"pass the run's data (and its metadata=), or train into another out_dir")
        run.metadata = dict(saved_meta)
        run.log("note: resumed without metadata: the run's own is kept; the data's classes, channels and "
                "split files were compared with it")
    rank, world_size = run.processes.rank, run.processes.world_size
    run.progress = restore_state(state, run.parts, rank=rank, world_size=world_size, source=run.files.state)
    run.log(f"resuming {run.files.out} after epoch {run.progress.epoch}/{run.recipe.epochs}")
    _catch_up_weights(run)
    moved = moved_data_root(state, run.metadata)
    if moved is not None:
        saved_root, root = moved
        run.log(f"note: the data moved to {root} (the run read {saved_root}); its splits hold the same files")
    saved_threads, threads = state.get("cpu_threads"), torch.get_num_threads()
    if run.device.type == "cpu" and saved_threads is not None and saved_threads != threads:
        same = (f"--threads {saved_threads} keeps the resume bit for bit" if saved_threads <= thread_limit()
                else f"only a machine that allows --threads {saved_threads} would keep it bit for bit")
        run.log(f"note: the run trained with {saved_threads} CPU thread(s), this process has {threads}: "
                f"it continues correctly, but its float rounding differs from an uninterrupted run's; {same}")


def _train_epoch(run: _Run, epoch: int) -> tuple[dict, bool, str]:
    """Train epoch ``epoch`` (0-based), validate, step the schedule, update the progress.

    Returns:
        The epoch's history record, whether it is the best so far, and its progress line (logged
        by the caller once the epoch is saved: a line on screen says the epoch is kept).
    """
    recipe, progress = run.recipe, run.progress
    run.epochs.set_epoch(epoch, augment=epoch < recipe.augment_epochs)
    lr = run.parts.optimizer.param_groups[0]["lr"]
    tag = f"epoch {epoch + 1}/{recipe.epochs}"
    started = time.perf_counter()
    p = run.parts
    train_loss = train_one_epoch(
        run.train_model, run.train_loader, run.loss_fn, p.optimizer, p.scaler, run.device, run.amp_dtype,
        run.processes, tag,
    )  # fmt: skip
    trained = len(run.epochs)  # this process's shard, less a last image of its own (drop_last)
    if run.train_loader.drop_last:
        trained -= trained % recipe.batch_size
    images_per_s = trained * run.processes.world_size / (time.perf_counter() - started)
    share_buffers(p.model, run.processes)
    scores = evaluate_model(
        run.eval_model, run.val_loader, run.bundle.num_classes, run.class_names, run.device, run.amp_dtype,
        "val", run.processes.is_main,
    )  # fmt: skip
    p.scheduler.step()
    record = {"epoch": epoch + 1, "train_loss": train_loss, "val_mean_iou": scores["mean_iou"], "lr": lr}
    improved = scores["mean_iou"] > progress.best_score
    if improved:
        progress.best_score, progress.best_epoch = scores["mean_iou"], epoch + 1
    progress.epoch = epoch + 1
    progress.history.append(record)
    line = (
        f"{tag}  loss {train_loss:.4f}  val mIoU {scores['mean_iou']:.4f}  lr {lr:.2e}  "
        f"{time.perf_counter() - started:.1f}s ({images_per_s:.1f} img/s){'  *best' if improved else ''}"
    )
    return record, improved, line


def _save(run: _Run, record: dict, improved: bool) -> None:
    """Write the training state and the checkpoints of the epoch just completed (rank 0)."""
    rngs = gather_rng_states(run.processes)  # every rank takes part
    if not run.processes.is_main:
        return
    files = run.files
    # The state first, then the weights: a kill in between leaves weights files one epoch behind
    # a state that holds this epoch's weights, and --resume writes them from it (_catch_up_weights).
    # The other order could leave a killed epoch's weights as best.safetensors, which a re-run of
    # that epoch that no longer improves (a GPU is not bit-deterministic) would never replace.
    state = capture_state(run.parts, run.progress, recipe=run.recipe, metadata=run.metadata, rng_states=rngs)
    save_training_state(files.state, state)
    for path in [files.best] * improved + [files.last]:
        _save_weights(run, path, record)
    # A live curve for long runs, at most once a minute (a plot costs about a second).
    if run.plots and time.monotonic() - run.last_plot > CURVE_EVERY_S:
        _plot_curve(run)
        run.last_plot = time.monotonic()


def _save_weights(run: _Run, path: Path, record: dict) -> None:
    """``path`` (best or last) from the model as it is, labelled with ``record``'s epoch and score."""
    from cmrf.checkpoint import save_weights

    meta = {**run.metadata, "epoch": str(record["epoch"]), "val_mean_iou": str(record["val_mean_iou"])}
    with naming_errors(path):
        save_weights(run.parts.model, path, metadata=meta)


def _catch_up_weights(run: _Run) -> None:
    """After the state is restored (rank 0): write last.safetensors, and best.safetensors when the
    state's epoch was the best, if a kill between the state and them left them an epoch behind."""
    from cmrf.checkpoint import safetensors_metadata

    def saved_epoch(path: Path) -> str | None:
        try:
            return safetensors_metadata(path).get("epoch") if path.is_file() else None
        except (OSError, ValueError):  # unreadable: written again, where the state can
            return None

    progress, best = run.progress, run.files.best
    if not run.processes.is_main or not progress.history:
        return
    record = progress.history[-1]
    behind = []
    for path in [run.files.last] + [best] * (progress.best_epoch == progress.epoch):
        if saved_epoch(path) != str(progress.epoch):
            _save_weights(run, path, record)
            behind.append(path.name)
    if behind:
        run.log(f"note: wrote {' and '.join(behind)} of epoch {progress.epoch} from {run.files.state.name} "
                f"(the run was stopped before it wrote them)")
    found = saved_epoch(best)
    if found is not None and found != str(progress.best_epoch):  # left by 0.1.0's order: not in the state
        run.log(f"warning: {best.name} holds the weights of epoch {found}, but the run's best is epoch "
                f"{progress.best_epoch} (a stop between writing it and the state, by cmrf 0.1.0); the next "
                f"epoch that beats epoch {progress.best_epoch} replaces it")


def _plot_curve(run: _Run) -> None:
    from cmrf.train.plots import plot_history

    _draw(run, run.files.curve, lambda: plot_history(run.progress.history, run.files.curve))


def _draw(run: _Run, path: Path, draw) -> None:
    """Draw one figure of the run. A figure is not worth the run: a failure (a broken matplotlib,
    a font it cannot read) is a warning, and the weights, scores and state are written as ever."""
    try:
        draw()
    except Exception as err:  # matplotlib's errors come in many types
        run.log(f"warning: could not draw {path} ({type(err).__name__}: {_one_line(err)}); the run goes on")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    # A DataLoader worker's error carries the worker's traceback; its last line is the message.
    return lines[-1] if "Original Traceback" in str(err) else lines[0]


def _final_scores(run: _Run) -> dict:
    """Scores of the best checkpoint on validation and test (validation when there is no test)."""
    from cmrf.checkpoint import load_checkpoint

    try:
        load_checkpoint(run.parts.model, run.files.best)
    except (ValueError, OSError) as err:
        progress = run.progress
        if progress.best_epoch == progress.epoch:  # --resume rewrites it from the state
            raise
        # The state holds the last epoch's weights only: --resume could never finish this run.
        raise UnfinishedRunError(
            f"final evaluation failed: the best checkpoint {run.files.best} (epoch {progress.best_epoch}) "
            f"cannot be read ({_one_line(err)}), and its weights are nowhere else: {run.files.state} holds "
            f"epoch {progress.epoch}'s. Score the last weights with cmrf evaluate {run.files.last}, or train "
            f"again with --overwrite"
        ) from err
    bundle, recipe = run.bundle, run.recipe

    def score(loader: DataLoader, split: str) -> dict:
        # In float32 whatever --amp trained in, as cmrf evaluate scores: the numbers a paper quotes
        # from metrics.json must be what a later cmrf evaluate of best.safetensors gives.
        classes = (bundle.num_classes, run.class_names)
        return evaluate_model(run.eval_model, loader, *classes, run.device, None, split, False)

    val_scores = score(run.val_loader, "val")
    has_test = bundle.test is not None and len(bundle.test) > 0
    if has_test:
        test = eval_loader(bundle.test, recipe.batch_size, run.workers, run.processes, device=run.device)
        scores = score(test, "test")
    else:
        scores = val_scores
    return {
        **scores,
        "split": "test" if has_test else "val",
        "precision": "float32",
        "best_epoch": run.progress.best_epoch,
        "val": val_scores,
        "history": run.progress.history,
    }


def _finish(run: _Run) -> dict:
    """Test the best checkpoint; draw the curve and the overlays, then write ``metrics.json`` (rank 0)."""
    from cmrf.files import atomic_write_json

    run.processes.barrier()  # rank 0 has written best.safetensors
    try:
        result = _final_scores(run)
    except UnfinishedRunError:
        raise
    except (ValueError, OSError, RuntimeError) as err:
        raise UnfinishedRunError(
            f"final evaluation failed: {_one_line(err)}; the {run.progress.epoch} trained epoch(s) are safe "
            f"in {run.files.state}: fix the cause and run the same command with --resume to finish the run"
        ) from err
    if run.processes.is_main:
        # The figures first: metrics.json is the mark of a finished run (cmrf demo replaces a
        # finished demo), so a run stopped while drawing is unfinished, and --resume completes it.
        if run.plots:
            _plot_curve(run)
        if run.plots and run.recipe.overlays:
            shown = run.bundle.test if result["split"] == "test" else run.bundle.val
            args = (shown, run.files.overlays, run.recipe.overlays, run.device, run.bundle.spatial_dims)
            _draw(run, run.files.overlays, lambda: write_overlays(run.parts.model, *args))
        try:
            with naming_errors(run.files.metrics):
                atomic_write_json(result, run.files.metrics)
        except OSError as err:  # a full disk after all the training: say what is safe
            raise UnfinishedRunError(
                f"could not write {run.files.metrics} ({err.strerror or err}); the {run.progress.epoch} "
                f"trained epoch(s) are safe in {run.files.state}: fix the cause and run the same command "
                f"with --resume to finish the run"
            ) from err
    run.processes.barrier()
    return result


def _read_evaluation_splits(bundle) -> None:
    """Decode every validation and test sample now, into the data cache where there is one.

    The data check reads image headers only, so a damaged image file (a JPEG cut short) would
    otherwise be found at the first validation or, in the test split, after all the training
    time. Training samples are read in the first epoch anyway. Raises ``DataError`` listing every
    sample that cannot be read. Datasets without ``fill`` (not from ``cmrf.data``) are left alone.
    """
    for split in (bundle.val, bundle.test):
        if split is not None and len(split) and hasattr(split, "fill"):
            split.fill()


def _check_bundle(bundle) -> None:
    """Datasets of ``(image, mask)`` pairs in every split, training and validation not empty."""
    for name in ("train", "val"):
        split = getattr(bundle, name, None)
        if isinstance(split, DataLoader):
            raise ValueError(f"bundle.{name} is a DataLoader: fit takes datasets and makes its own loaders "
                             f"(batch size from Recipe.batch_size); pass its .dataset")
        if split is None or len(split) == 0:
            raise ValueError("training needs a non-empty validation split to choose the best checkpoint"
                             if name == "val" else "training needs a non-empty training split, got "
                             f"{'none' if split is None else 'an empty one'}")
    classes, names = bundle.num_classes, list(bundle.class_names)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2 or len(names) != classes:
        raise ValueError(f"bundle.num_classes must be an int >= 2 (background included) with as many "
                         f"class_names, got num_classes={classes!r} and class_names={names}")
    sample = bundle.val[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2
            and all(isinstance(t, torch.Tensor) for t in sample)):
        kind = (f"a dict with keys {sorted(sample)}" if isinstance(sample, dict)
                else f"a {type(sample).__name__}")
        raise ValueError(f"the datasets must yield (image, mask) tensor pairs, got {kind} from bundle.val[0]")


def _check_model_output(model: nn.Module, bundle, device: torch.device) -> None:
    """Run the model once on the first validation image, before any training: an output of other
    classes or size than the masks (a one-channel sigmoid model, a half-resolution head, a
    tuple) otherwise trains for an epoch, or, with one channel, trains and scores nonsense."""
    image, mask = bundle.val[0]
    with eval_mode(model), torch.no_grad():
        output = model(image[None].to(device))
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the model returns a {type(output).__name__}; fit needs one tensor of logits "
                         f"(B, K, *S)")
    expected = (bundle.num_classes, *mask.shape)
    if tuple(output.shape[1:]) != expected:
        raise ValueError(f"the model maps an image {tuple(image.shape)} to {tuple(output.shape[1:])} per "
                         f"sample, but the data needs (K, *S) = {expected}: {bundle.num_classes} classes at "
                         f"the mask's size (a one-channel, sigmoid-style model needs num_classes="
                         f"{bundle.num_classes})")


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    """Give the caller's random generators back: fit seeds them from the recipe (and a resume
    loads the run's), which would otherwise make every model built after it start alike."""
    import random

    import numpy as np

    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _checked_recipe(recipe) -> Recipe:
    """``fit``'s ``recipe``: ``None`` is the paper's, a dict gives ``Recipe``'s fields (an empty
    one was read as no recipe, a full one failed with "'dict' object has no attribute 'device'")."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, dict):
        return Recipe(**recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a cmrf.train.Recipe (or a dict of its fields), "
                        f"got {type(recipe).__name__}")
    return replace(recipe)  # checked again: a field assigned after construction skipped the checks


def _check_fit_arguments(model, out_dir) -> None:
    if not isinstance(model, nn.Module):
        hint = f": build it with cmrf.create_model({model!r})" if isinstance(model, str) else ""
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise TypeError(f"out_dir must be a folder name (str or os.PathLike), got {out_dir!r}")


def fit(
    model: nn.Module,
    bundle,
    out_dir: str | Path,
    recipe: Recipe | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    plots: bool = True,
) -> dict:
    """Train ``model`` on ``bundle.train``, keep the best by validation mIoU, test it.

    Args:
        model: a segmentation network ``(B, C, *S) -> (B, K, *S)`` on the CPU.
        bundle: a ``cmrf.data.DataBundle`` (train/val/test datasets, classes, channels).
        out_dir: run folder; created if missing. Holds ``last``/``best`` checkpoints, the
            resumable state, ``metrics.json`` and the figures (``cmrf.train.run_folder.RunFiles``).
            A folder that holds another run's files is refused unless ``resume`` or ``overwrite``.
        recipe: optimisation settings; default ``Recipe()``, the paper's.
        resume: continue from ``out_dir/last_state.pt`` when it exists (exactly where it stopped);
            refused when the saved run's recipe or ``metadata`` (model, data) differ.
        overwrite: delete the run files already in ``out_dir`` (and only those) first.
        metadata: strings stored in every ``.safetensors`` and in the state
            (``cmrf.train.state.model_metadata``).
        plots: write ``training_curve.png`` and ``overlays.png``. Default True.

    Returns:
        The content of ``metrics.json``: test (or, without a test split, validation) scores
        ``mean_iou``, ``mean_dice``, ``per_class``, plus ``split``, ``best_epoch``, ``val`` and
        ``history`` (one record per epoch: ``epoch`` (1-based), ``train_loss``,
        ``val_mean_iou``, ``lr``). ``model`` then holds the best epoch's weights (those of
        ``best.safetensors``; ``last.safetensors`` has the last epoch's), in eval mode.

    The random generators (Python's, NumPy's, torch's) are seeded from ``recipe.seed`` for the
    run and given back as they were when ``fit`` returns or raises.

    Raises:
        RunFolderError: ``out_dir`` holds another run (without ``resume``/``overwrite``), or the
            run to resume has other settings.
        ValueError: an empty training or validation split, datasets that do not yield
            ``(image, mask)`` tensor pairs (or DataLoaders), or a model whose output for the first
            validation image is not ``(1, num_classes, *mask.shape)`` (checked before training).
        DataError: a validation or test sample cannot be read (checked before training starts).
        UnfinishedRunError: training finished but the final evaluation failed (resume to finish).
        OSError: a file could not be written; the previous version of that file is intact.
    """
    recipe = _checked_recipe(recipe)
    _check_fit_arguments(model, out_dir)
    metadata = check_run_metadata(metadata)
    _check_bundle(bundle)
    # The folder's check under its lock: a second training into it at the same time is refused,
    # and one that waited behind a finished run finds that run's files.
    processes = init_processes(recipe.device)
    with _run_folder_held(out_dir, processes), _generators_kept():
        check_run_folder(out_dir, resume=resume, overwrite=overwrite)
        resolve_device(recipe.device, processes.local_rank)  # no CUDA: said before the data is decoded
        _read_evaluation_splits(bundle)
        run = _setup(model, bundle, Path(out_dir), recipe, metadata, plots)
        try:
            _check_model_output(run.parts.model, bundle, run.device)
            if overwrite:
                _clear(run)
            elif run.processes.is_main:  # what a kill during a write left: never read, only taking space
                run.files.remove_temporaries()
            if resume:
                _resume(run)
            with fast_cuda(run.device):
                for epoch in range(run.progress.epoch, recipe.epochs):
                    record, improved, line = _train_epoch(run, epoch)
                    _save(run, record, improved)
                    run.log(line)  # after the save: an interrupt now keeps the epoch this line reports
                return _finish(run)
        finally:
            _stop_workers(run.train_loader, run.val_loader)


def _stop_workers(*loaders: DataLoader) -> None:
    """End the persistent loaders' worker processes now: a traceback the caller keeps (a notebook's
    last error, a sweep's list of failures) holds the loaders, and would keep them running."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()
            loader._iterator = None
