"""How many training images per second ``cmrf train``'s loader delivers, without a model.

    python examples/loader_throughput.py [WORKERS ...]      # default: 0 1 2

Synthetic data at 256x256 (``cmrf train --data synthetic``'s default size), batch 8, augmentation
on, the training loader ``cmrf train`` builds (pinned memory off: no GPU needed). For each worker
count it prints epoch 1 (the samples are made and cached) and epoch 2 (read from the cache and
augmented: what every later epoch costs). A GPU run needs at least its target rate here, from the
workers ``--workers auto`` gives it; the figures are in docs/training.md ("GPU training").
"""

import argparse
import time

import torch

from cmrf.data import build_datasets
from cmrf.train.loaders import train_loader
from cmrf.train.processes import Processes


def images_per_second(loader, sampler, epoch: int) -> float:
    sampler.set_epoch(epoch, True)
    start, images = time.perf_counter(), 0
    for x, _ in loader:
        images += x.shape[0]
    return images / (time.perf_counter() - start)


def main(worker_counts: list[int]) -> None:
    torch.set_num_threads(1)  # as in a loader worker
    for workers in worker_counts:
        # A fresh dataset per count, so that each epoch 1 makes and caches its samples again.
        bundle = build_datasets(seed=0, data="synthetic", img_size=256, synthetic_samples=400)
        loader, sampler = train_loader(bundle.train, 8, workers, Processes(), seed=0)
        rates = [images_per_second(loader, sampler, epoch) for epoch in (0, 1)]
        print(f"workers {workers}: epoch 1 {rates[0]:.0f} img/s, epoch 2 {rates[1]:.0f} img/s")
        del loader


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workers", type=int, nargs="*", default=[0, 1, 2],
                        help="DataLoader worker counts to measure (default 0 1 2)")
    args = parser.parse_args()
    if any(count < 0 for count in args.workers):
        parser.error(f"worker counts must be 0 or more, got {args.workers}")
    main(args.workers)
