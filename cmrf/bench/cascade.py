"""Per-cascade rows: CMRF's cascade at TinyU-Net's four shapes, reference against fused.

TinyU-Net (N = 8) runs its cascade on ``(B, width / N, side, side)`` for width 64, 128, 256, 512
at side 256, 128, 64, 32 (each shape twice: encoder and decoder). The reference is
``cmrf.ops.cascade.cascade_concat_reference``; the fused row forces the dispatch
``cascade_concat(..., fused=True)``, so it runs whatever fused path the library ships. Off CUDA the
kernels only run in Triton's CPU interpreter: those rows compare outputs and are not timed, at an
eighth of the widths and sides 16, 8, 4, 2.

``--sweep`` (``BenchSettings.cascade_sweep``) adds one fused row per candidate tiling of the
kernels, ``...fused.<config>`` (e.g. ``fused.single.32x64.w8``), from
``cmrf.ops.fused_cascade.eval_configs`` or ``train_configs``, each run under ``force_config``; the
plain ``fused`` row is the default tiling. On a GPU this picks tilings by measurement.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from cmrf.bench.network import Runner
from cmrf.bench.settings import CASCADE_WIDTHS, PRECISIONS, BenchSettings

__all__ = ["CascadeCase", "cascade_bytes", "cascade_case_runners", "cascade_cases_of", "cascade_sweep_sides"]


@dataclass(frozen=True)
class CascadeCase:
    """One cascade shape in one mode: input ``(batch, 2c, side, side)``, output ``(batch, N c, ...)``."""

    mode: str
    batch: int
    level: int
    dtype: str
    c: int
    side: int
    N: int

    @property
    def prefix(self) -> str:
        return f"cascade.{self.mode}.b{self.batch}.L{self.level}.{self.dtype}"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 2 * self.c, self.side, self.side)


def cascade_cases_of(settings: BenchSettings) -> list[CascadeCase]:
    """Every case of the run, in table order (eval first, then each training batch)."""
    from cmrf.bench.settings import cascade_cases

    cases = []
    for mode, batch in cascade_cases(settings):
        for dtype in settings.cascade_dtypes:
            for level, width in enumerate(CASCADE_WIDTHS):
                side = settings.size // 2**level
                if settings.tiny_cascade:
                    # an eighth of the width (still a multiple of 2N), sides 16, 8, 4, 2 whatever
                    # the image size: small enough for the interpreter, large enough for training
                    # BatchNorm at batch 1
                    width = max(2 * settings.N, width // 8 // (2 * settings.N) * (2 * settings.N))
                    side = 16 // 2**level
                c = width // (2 * settings.N)
                cases.append(CascadeCase(mode, batch, level, dtype, c, side, settings.N))
    return cases


def cascade_bytes(case: CascadeCase, itemsize: int) -> int:
    """Compulsory HBM traffic of one call: read ``y`` (2c planes), write the output (N c planes).

    Training (forward + backward) is counted as twice that: the backward reads the output's
    gradient and writes ``y``'s, each the size of the forward's output and input.
    """
    planes = 2 * case.c + case.N * case.c
    return planes * case.batch * case.side**2 * itemsize * (2 if case.mode == "train" else 1)


def _stages(case: CascadeCase, device: torch.device) -> nn.ModuleList:
    from cmrf.bench.network import randomise_batchnorm
    from cmrf.layers import CMRF

    torch.manual_seed(case.level)
    stages = randomise_batchnorm(CMRF(2 * case.c, 2 * case.c * case.N, N=case.N).cascade, seed=case.level)
    return stages.to(device=device, dtype=PRECISIONS[case.dtype]).train(case.mode == "train")


def _fused(y: torch.Tensor, stages: nn.ModuleList) -> torch.Tensor:
    """The fused dispatch, forced; a silent fallback to the reference is turned into an error."""
    from cmrf.ops.cascade import cascade_concat

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cascade_concat(y, stages, fused=True)
    fallback = [w for w in caught if "unavailable" in str(w.message)]
    if fallback:
        raise RuntimeError(str(fallback[0].message))
    return out


def _sweep_configs(case: CascadeCase) -> list:
    """The non-default tilings of this case's kernels (imports Triton)."""
    from cmrf.ops.fused_cascade import eval_configs, train_configs

    if case.mode == "eval":
        configs = eval_configs(case.side, case.side, case.N - 1)
    else:
        configs = train_configs(case.side, case.side)
    return configs[1:]  # the first is the default: the plain "fused" row


def cascade_sweep_sides(case: CascadeCase) -> list[str]:
    """Row suffixes ``fused.<config>`` that ``--sweep`` adds to this case."""
    return [f"fused.{config.name}" for config in _sweep_configs(case)]


def cascade_case_runners(case: CascadeCase, device: torch.device, sweep: bool = False) -> dict[str, Runner]:
    """``{"reference": Runner, "fused": Runner}`` for one case; each has its own copy of the stages.

    With ``sweep``, also ``"fused.<config>": Runner`` for each non-default tiling (forced).
    """
    from cmrf.ops.cascade import cascade_concat_reference

    dtype = PRECISIONS[case.dtype]
    gen = torch.Generator().manual_seed(100 + case.level)
    y0 = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)
    grad = None  # the output's gradient, drawn for training cases only (about 1 GiB at eval b128)
    if case.mode == "train":
        grad_shape = (case.batch, case.N * case.c, case.side, case.side)
        grad = torch.randn(grad_shape, generator=gen).to(device, dtype)
    base = _stages(case, device)
    sides = [("reference", cascade_concat_reference), ("fused", _fused)]
    if sweep:
        from cmrf.ops.fused_cascade import force_config

        for config in _sweep_configs(case):
            def forced(y, stages, config=config):
                with force_config(config):
                    return _fused(y, stages)

            sides.append((f"fused.{config.name}", forced))
    runners = {}
    for side, op in sides:
        stages = copy.deepcopy(base)
        y = y0.clone().requires_grad_(case.mode == "train")

        def call(op=op, stages=stages, y=y):
            if case.mode == "eval":
                with torch.no_grad():
                    return op(y, stages)
            y.grad = None
            out = op(y, stages)
            out.backward(grad)
            return out

        def check(call=call, y=y):
            out = call().detach().float()
            result = {"output": out}
            if case.mode == "train":
                result["grad.input"] = y.grad.detach().float().clone()
            return result

        runners[side] = Runner(call=call, check=check)
    return runners
