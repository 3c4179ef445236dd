"""Constants shared by the models' timm configuration, the data pipeline and the thread options (a leaf
module)."""

import os

# Images are scaled to [0, 1] then mapped to roughly zero mean, unit spread with these constants,
# the same for every channel and every dataset, so a model trained on one source accepts another.
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25

# More CPU threads than this per core never make PyTorch faster, and far more make OpenMP fail to
# start them (libgomp aborts the process, or it segfaults): thread options refuse them.
THREADS_PER_CORE_LIMIT = 4


def thread_limit() -> int:
    """The most CPU threads the thread options accept on this machine (4 per core it reports)."""
    return THREADS_PER_CORE_LIMIT * (os.cpu_count() or 1)


def worker_limit_problem(workers: int) -> str | None:
    """Why ``workers`` DataLoader processes are too many for this machine, or ``None``: more than
    4 per core it reports (the thread options' limit) only fill its memory; a typo such as 1000
    ends in the kernel's out-of-memory killer, leaving orphaned workers behind."""
    if workers <= thread_limit():
        return None
    return (f"expected at most {thread_limit()} worker processes ({THREADS_PER_CORE_LIMIT} per core of the "
            f"{os.cpu_count()} this machine has), got {workers}")


# torch.manual_seed takes seeds below 2**64, and training seeds each process with seed + rank.
MAX_SEED = 2**63 - 1
