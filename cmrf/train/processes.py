"""Devices, precision and processes of a run: one process, or many under ``torchrun`` (DDP).

Under ``torchrun --nproc_per_node K -m cmrf train ...`` each process trains on its shard
(``DistributedSampler``), gradients are averaged by DDP (gloo on CPU, NCCL on GPU), validation and
test metrics are summed across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cmrf.train.state import get_rng_state


def check_device_name(name) -> str:
    """``name`` as ``Recipe.device`` spells it (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``; a
    ``torch.device`` is taken by its name), else a ``ValueError`` naming it. Whether the device
    exists is ``resolve_device``'s question."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` for ``name`` (see ``Recipe.device``); checks that CUDA exists."""
    asked = name = check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:  # else torch fails later, deep inside the first copy to it
            shown = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            asked = asked if asked == str(device) else f"{asked!r} (process {local_rank}: {device})"
            raise ValueError(
                f"device {asked} requested but this machine has {count} CUDA device"
                f"{'s' if count != 1 else ''} ({shown}; CUDA_VISIBLE_DEVICES limits which are seen)"
            )
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or ``None`` for float32 (always on CPU)."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bf16 natively (sm_80 and newer).

    Not emulated support: older GPUs (V100, T4) run bf16 several times slower than fp16.
    """
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@contextlib.contextmanager
def fast_cuda(device: torch.device) -> Iterator[None]:
    """Let cuDNN pick the fastest convolution algorithms for the run's fixed shapes (CUDA only).

    GPU training is not bit-reproducible anyway (atomic adds in backward kernels); the CPU path,
    which is, is left alone. The previous setting is restored afterwards.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in a single-process run)."""
        if self.distributed:
            dist.barrier()

    def from_main(self, value):
        """The main process's ``value`` (a picklable object), in every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def world_size_from_env() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 when unset or empty)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Whether this process prints and writes for its run: any but ranks 1.. of a multi-process
    run (``torchrun`` sets ``WORLD_SIZE`` > 1; a stray ``RANK`` alone makes no second process)."""
    return world_size_from_env() <= 1 or int(os.environ.get("RANK", "0") or 0) == 0


def init_processes(device_name: str) -> Processes:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL when training on CUDA and gloo otherwise. A plain ``python`` run is one process.
    """
    world_size = world_size_from_env()
    if world_size <= 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if not dist.is_initialized():
        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            if ":" in device_name:  # NCCL refuses two processes on one GPU ("Duplicate GPU detected")
                raise ValueError(
                    f"--device {device_name} puts all {world_size} processes on one GPU; give --device "
                    f"cuda: each process then takes the GPU of its LOCAL_RANK")
            # resolve_device names a LOCAL_RANK past the visible GPUs (CUDA's "invalid device ordinal")
            torch.cuda.set_device(resolve_device(device_name, local_rank))
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(rank, world_size, local_rank, local_world_size)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def share_buffers(model: nn.Module, processes: Processes) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank's last step updated its own), so
    that all shards are scored, and the checkpoint saved, with the same network."""
    if processes.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_rng_states(processes: Processes) -> list[dict]:
    """``get_rng_state()`` of every process, by rank (the state file keeps them all)."""
    state = get_rng_state()
    if not processes.distributed:
        return [state]
    states = [None] * processes.world_size
    dist.all_gather_object(states, state)
    return states
