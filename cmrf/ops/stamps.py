"""Stamps of tensors, for caches of values derived from parameters.

A stamp records which tensors (holding them, so that their ids cannot be reused meanwhile), their
storage and their version counter, which every in-place write raises (``copy_`` in
``load_state_dict``, an optimizer step). A cache built from the tensors is valid while its stamp
matches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["TensorStamp", "tensor_version"]


def tensor_version(tensor: torch.Tensor) -> int | None:
    """``tensor._version``, or ``None`` for an inference tensor, which keeps no version counter
    (and cannot be written in place outside inference mode)."""
    try:  # cheaper than asking is_inference() first: this runs for every parameter at every call
        return tensor._version
    except RuntimeError:
        if tensor.is_inference():
            return None
        raise


def _marks(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int | None]]:
    return [(t.data_ptr(), tensor_version(t)) for t in tensors]


class TensorStamp:
    """Which ``tensors``, at which storage and version, when the stamp was taken.

    Inference tensors (made under ``torch.inference_mode()``) have no version counter: the stamp
    keeps a copy of their values instead and compares it at every ``matches`` (slower, and on a
    GPU a synchronisation, but a write in place inside inference mode is seen).
    """

    __slots__ = ("_marks", "_tensors", "_values")

    def __init__(self, tensors: Iterable[torch.Tensor] = ()):
        self._tensors = tuple(tensors)
        self._marks = _marks(self._tensors)
        with torch.inference_mode(False):
            self._values = {i: t.detach().clone() for i, (t, (_, version)) in
                            enumerate(zip(self._tensors, self._marks, strict=True)) if version is None}

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` are the stamped ones, none replaced, moved or written in place."""
        return (len(tensors) == len(self._tensors)
                and all(a is b for a, b in zip(self._tensors, tensors, strict=True))
                and _marks(tensors) == self._marks
                and all(torch.equal(tensors[i], value) for i, value in self._values.items()))
