"""DataLoaders of a run: the shuffled training batches, the in-order evaluation shards, and how
many worker processes load them.

Seeded runs give the same batches with any number of workers: the sampler is seeded by
``(seed, epoch)``, and every item's augmentation by ``(seed, epoch, index)`` (the datasets of
``cmrf.data``). The epoch and the augmentation switch also travel with each index
(``EpochSampler`` / ``EpochView``): persistent workers keep the copy of the dataset they started
with, and a dataset that stores its epoch as a plain attribute (unlike ``cmrf.data``'s, which keep
it in shared memory) would otherwise never see it change there.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cmrf.train.processes import Processes

# At most this many workers per process for "auto": TinyU-Net's batches are small, and more
# workers only add start-up time and memory.
MAX_AUTO_WORKERS = 8


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _workers_can_start() -> bool:
    """False where DataLoader worker processes would fail to start."""
    if multiprocessing.current_process().daemon:  # daemonic processes cannot have children
        return False
    if torch.utils.data.get_worker_info() is not None:  # already inside a worker
        return False
    context = multiprocessing.get_context()  # the default start method, or the one set
    if context.get_start_method() != "fork":
        # spawn/forkserver re-import __main__ in each worker: impossible from a REPL or notebook.
        main = sys.modules.get("__main__")
        return bool(getattr(main, "__file__", None))
    return True


def choose_workers(requested: int | str, device: torch.device, processes_per_machine: int = 1) -> int:
    """DataLoader workers for ``requested`` (an integer >= 0, or ``"auto"``).

    ``"auto"``: 0 on the CPU, where the training step already keeps every core busy (PyTorch's
    threads) and a loader process would take cores from it; on CUDA, the cores this process may
    use, shared among the processes of the machine, less one for the training loop itself, at
    most ``MAX_AUTO_WORKERS``; 0 where worker processes cannot start (daemonic processes,
    interactive sessions without ``fork``).
    """
    if requested != "auto":
        return int(requested)
    if device.type != "cuda" or not _workers_can_start():
        return 0
    per_process = _usable_cores() // max(1, processes_per_machine)
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def _loader_options(workers: int, pin_memory: bool, persistent: bool) -> dict:
    return {
        "num_workers": workers,
        "pin_memory": pin_memory,  # page-locked batches: host-to-GPU copies can be asynchronous
        "persistent_workers": persistent and workers > 0,  # no worker start-up at every epoch
    }


class EpochSampler(Sampler[tuple[int, bool, int]]):
    """Wraps an index sampler to yield ``(epoch, augment, index)`` (see ``EpochView``).

    Args:
        sampler: a sampler with ``set_epoch`` (``DistributedSampler``).
    """

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0
        self.augment = False

    def set_epoch(self, epoch: int, augment: bool) -> None:
        """Shuffle for ``epoch`` (0-based) and tell the items whether to augment."""
        self.epoch, self.augment = epoch, augment
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch, augment = self.epoch, self.augment
        return ((epoch, augment, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochView(Dataset):
    """A training dataset read with ``EpochSampler``'s ``(epoch, augment, index)`` keys.

    Before reading the item, in whichever process reads it, sets the dataset's ``augment``
    attribute when it is a ``bool`` (a dataset's own ``augment`` of another kind, such as its
    transform, is left alone) and calls its ``set_epoch(epoch)`` when it has one.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool, int]):
        epoch, augment, index = key
        if isinstance(getattr(self.dataset, "augment", None), bool):
            self.dataset.augment = augment
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def train_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    processes: Processes,
    seed: int,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochSampler]:
    """The shuffled training loader over this process's shard, and its sampler (``set_epoch``).

    Args:
        dataset: the training split (items augment from ``(seed, epoch, index)``).
        batch_size: images per step of this process.
        workers: loader processes (0: load in this process); they persist across epochs.
        processes: this process's rank and the world size.
        seed: shuffling seed (with the epoch).
        pin_memory: page-locked batches, for asynchronous copies to a GPU.
    """
    shards = DistributedSampler(
        dataset, num_replicas=processes.world_size, rank=processes.rank, shuffle=True, seed=seed
    )
    sampler = EpochSampler(shards)
    # Worker seeds are drawn from this generator, not from torch's global one, which would make
    # the run depend on how many loaders were created before. Our datasets do not use them; a
    # user's may (augmenting from `random`), so each rank's workers get other seeds, as the
    # ranks' own generators do.
    generator = torch.Generator().manual_seed(seed + processes.rank)
    loader = DataLoader(
        EpochView(dataset),
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        # A last batch of one image: BatchNorm statistics of a single image (and CMUNeXt's deepest
        # block, at small sizes, cannot train on it at all). That image is left out of the epoch;
        # shuffling leaves out another one each epoch.
        drop_last=batch_size > 1 and len(shards) > 1 and len(shards) % batch_size == 1,
        **_loader_options(workers, pin_memory, persistent=True),
    )
    return loader, sampler


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


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int | str,
    processes: Processes,
    *,
    device: torch.device | None = None,
    persistent: bool = False,
) -> DataLoader:
    """A loader over this process's shard of ``dataset``, in order, without padding.

    Args:
        dataset: the split to score.
        batch_size: images per batch.
        workers: loader processes, or ``"auto"`` (``choose_workers`` for ``device``).
        processes: this process's rank and the world size.
        device: where the batches go (default CPU); CUDA gets pinned memory.
        persistent: keep the workers between passes (for the validation split).
    """
    device = device or torch.device("cpu")
    workers = choose_workers(workers, device, processes.local_world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(dataset, processes),
        # Each new iterator draws its workers' base seed from this generator: from torch's global
        # one it would take a draw per evaluation with 0 workers and none later with persistent
        # workers, so dropout in the next epoch would depend on --workers.
        generator=torch.Generator().manual_seed(0),
        **_loader_options(workers, device.type == "cuda", persistent),
    )
