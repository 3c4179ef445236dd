"""Where a library warning points: the user's line, not a line inside cmrf."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

__all__ = ["caller_stacklevel"]


def caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel for the caller's first frame outside cmrf, torch (whose
    decorators add frames) and timm (``timm.create_model`` calls our entry points), so that a
    warning names the user's line."""
    inside = (str(Path(__file__).parent), str(Path(torch.__file__).parent))
    timm = sys.modules.get("timm")
    if getattr(timm, "__file__", None):
        inside += (str(Path(timm.__file__).parent),)
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
