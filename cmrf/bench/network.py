"""Whole-network rows: TinyU-Net inference and one Adam training step, in every variant.

Each builder returns a ``Runner``: ``call()`` does the timed unit of work on a fixed input and
``check()`` does it once and returns the tensors compared with the group reference's. Every
variant starts from a copy of the same model (seeded, BatchNorm statistics randomised so that
folding and normalisation are exercised), so outputs and gradients are comparable.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cmrf.bench.settings import PRECISIONS, BenchSettings

__all__ = ["NetworkContext", "Runner", "build_network_runner", "randomise_batchnorm"]


@dataclass
class Runner:
    """``call()`` is timed; ``check()`` runs once first and returns ``name -> tensor`` to compare."""

    call: Callable[[], object]
    check: Callable[[], dict[str, torch.Tensor]]
    note: str = ""
    extra: dict = field(default_factory=dict)
    module: nn.Module | None = None  # the model the row trains, where a test needs to read it
    # Peak MiB measured by the row itself (a CUDA graph's, at capture: a replay allocates nothing
    # new, so the suite's measurement around a call would say nothing of the step's memory).
    peak_mib: float | None = None


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return model


def autocast(settings: BenchSettings, cache_enabled: bool = True):
    """The run's autocast context (a no-op in fp32)."""
    if settings.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(settings.torch_device.type, dtype=PRECISIONS[settings.precision],
                          cache_enabled=cache_enabled)


@dataclass
class NetworkContext:
    """The model every variant copies, and the fixed input and target, all on the bench device."""

    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor

    @classmethod
    def create(cls, settings: BenchSettings) -> NetworkContext:
        from cmrf.models import create_model

        device = settings.torch_device
        torch.manual_seed(0)
        model = randomise_batchnorm(create_model("tinyunet", N=settings.N)).to(device)
        gen = torch.Generator().manual_seed(1)
        shape = (settings.batch, model.in_channels, settings.size, settings.size)
        x = torch.randn(shape, generator=gen).to(device)
        target = torch.randint(0, model.num_classes, (settings.batch, settings.size, settings.size),
                               generator=gen).to(device)
        return cls(model, x, target)


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _inference_runner(forward: Callable[[torch.Tensor], torch.Tensor], x, settings, note="") -> Runner:
    def run():
        with torch.inference_mode(), autocast(settings):
            return forward(x)

    return Runner(call=run, check=lambda: {"output": run()}, note=note)


def _reference_forward(ctx: NetworkContext) -> Callable[[torch.Tensor], torch.Tensor]:
    from cmrf.reference import reference_tinyunet

    weights = {k: v.detach() for k, v in ctx.model.state_dict().items()}
    n, depth = ctx.model.encoders[0].N, len(ctx.model.channels)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return reference_tinyunet(x, weights, n, depth)

    return forward


def _optimized_graph_runner(ctx: NetworkContext, settings: BenchSettings) -> Runner:
    from cmrf.inference import optimize_for_inference

    # cmrf's own capture: the way users are told to remove launch overhead
    model = optimize_for_inference(copy.deepcopy(ctx.model).eval(), cuda_graph=True)
    # The graph's memory pool is taken at capture (the untimed first call): a replay allocates
    # only the copy of the output, so this row's peak MiB is not comparable with the others'.
    note = "optimize_for_inference(cuda_graph=True); peak MiB: replay only (the pool is taken at capture)"
    runner = _inference_runner(model, ctx.x, settings, note=note)
    check = runner.check

    def check_captured() -> dict[str, torch.Tensor]:
        outputs = check()
        if model.num_graphs == 0:  # the capture failed and the wrapper fell back to eager
            raise RuntimeError("no CUDA graph was captured (the warning in the log says why); "
                               "this row would time the eager forward")
        return outputs

    runner.check = check_captured
    return runner


def _onnxruntime_runner(ctx: NetworkContext, settings: BenchSettings) -> Runner:
    from cmrf.inference import OnnxRuntimeInference, optimize_for_inference

    # What optimize_for_inference(model, backend="onnxruntime") returns, with the bench's threads.
    # Its threads do not spin between calls (the default), so they leave the cores to PyTorch's
    # rows interleaved with it. The first call (export and session) is the untimed check.
    optimized = optimize_for_inference(copy.deepcopy(ctx.model).eval())
    model = OnnxRuntimeInference(optimized, threads=settings.threads).eval()
    return _inference_runner(model, ctx.x, settings)


def _inference(variant: str, ctx: NetworkContext, settings: BenchSettings) -> Runner:
    from cmrf.inference import optimize_for_inference

    if variant == "reference":
        return _inference_runner(_reference_forward(ctx), ctx.x, settings)
    if variant == "compile":
        return _compiled(_inference_runner(torch.compile(_reference_forward(ctx)), ctx.x, settings))
    if variant == "cmrf":
        return _inference_runner(copy.deepcopy(ctx.model).eval(), ctx.x, settings)
    if variant == "optimized":
        return _inference_runner(optimize_for_inference(copy.deepcopy(ctx.model).eval()), ctx.x, settings)
    if variant == "optimized-frozen":  # the first call (the trace) is the untimed check
        model = optimize_for_inference(copy.deepcopy(ctx.model).eval(), freeze=True)
        return _inference_runner(model, ctx.x, settings)
    if variant == "optimized-graph":
        return _optimized_graph_runner(ctx, settings)
    if variant == "onnxruntime":
        return _onnxruntime_runner(ctx, settings)
    raise ValueError(f"unknown inference variant {variant!r}")


def _compiled(runner: Runner) -> Runner:
    """Record how long the first call (the compilation) took and how many graphs Dynamo made."""
    check = runner.check

    def timed_check():
        graphs, start = _dynamo_graphs(), time.perf_counter()
        outputs = check()
        seconds = time.perf_counter() - start
        runner.extra.update(compile_s=round(seconds, 1), graphs=_dynamo_graphs() - graphs)
        runner.note = f"first call (compiling) {seconds:.0f} s, {runner.extra['graphs']} graph(s)"
        return outputs

    runner.check = timed_check
    return runner


def _training(variant: str, ctx: NetworkContext, settings: BenchSettings) -> Runner:
    """One Adam step (forward, loss, backward, step, zero_grad) of a copy of the model in train mode."""
    from cmrf.ops.cascade import reference_only

    if variant not in ("reference", "cmrf", "compile", "cmrf-compile"):
        raise ValueError(f"unknown training variant {variant!r}")
    model = copy.deepcopy(ctx.model).train()
    net = torch.compile(model) if variant in ("compile", "cmrf-compile") else model
    path = reference_only if variant in ("reference", "compile") else contextlib.nullcontext
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    # As in `cmrf train`: fp16 needs loss scaling so that small gradients do not underflow (its
    # step reads back whether any was infinite); for fp32 and bf16 the scaler does nothing.
    scaler = torch.amp.GradScaler(settings.torch_device.type, enabled=settings.precision == "fp16")

    def forward_backward() -> torch.Tensor:
        with path():
            with autocast(settings):
                out = net(ctx.x)
                loss = F.cross_entropy(out.float(), ctx.target)
            scaler.scale(loss).backward()
        return out

    def step():
        forward_backward()
        scaler.step(optimizer)
        scaler.update()
        # grads freed after the step, so a call starts with none: its peak memory is its own
        optimizer.zero_grad(set_to_none=True)

    def check() -> dict[str, torch.Tensor]:
        out = forward_backward().detach().float()
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0  # compare unscaled gradients
        grads = {f"grad.{n}": p.grad.detach().float() / scale for n, p in model.named_parameters()
                 if p.grad is not None}
        optimizer.zero_grad(set_to_none=True)
        return {"output": out, **grads}

    runner = Runner(call=step, check=check)
    return _compiled(runner) if net is not model else runner


def _graphed_training(ctx: NetworkContext, settings: BenchSettings) -> Runner:
    """The cmrf model's whole Adam step (forward, loss, backward, step) captured in one CUDA graph
    and replayed: no host work per step, so the wall time approaches the kernel time (the eager
    step spent half its time on the host on an H200). The recipe of PyTorch's whole-network
    capture: static input and target, warm-up on a side stream, gradients allocated inside the
    graph, an Adam that keeps its step count on the device (``capturable=True``), autocast without
    its cast cache. fp16 is refused: its loss scaler reads a flag back to the host at every step.
    """
    if settings.precision == "fp16":
        raise ValueError("a CUDA-graphed step cannot hold fp16's loss scaler (it reads back whether a "
                         "gradient overflowed at each step): run this row in bf16 or fp32")
    model = copy.deepcopy(ctx.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
    x, target = ctx.x.clone(), ctx.target.clone()

    def step() -> torch.Tensor:
        with autocast(settings, cache_enabled=False):
            out = model(x)
            loss = F.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()
        return out

    graph = torch.cuda.CUDAGraph()
    captured: dict[str, torch.Tensor] = {}

    def capture() -> None:
        # Warm-up with a zero learning rate: Triton compiles its kernels and Adam makes its state,
        # while the weights stay those of the other rows (their first-step outputs compare).
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        for group in optimizer.param_groups:
            group["lr"] = 1e-4
        optimizer.zero_grad(set_to_none=True)  # allocated, then rewritten at each replay, in the graph
        device = x.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.cuda.graph(graph):
            captured["output"] = step()
        runner.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20

    def check() -> dict[str, torch.Tensor]:
        capture()
        graph.replay()  # the first step from the shared weights: its logits and gradients compare
        out = captured["output"].detach().float().clone()
        grads = {f"grad.{n}": p.grad.detach().float().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        return {"output": out, **grads}

    def replay() -> None:
        if not captured:  # a call before the check (a probe in a fresh process)
            capture()
        graph.replay()

    note = "whole step in one CUDA graph (replayed); peak MiB: the graph's, measured at capture"
    runner = Runner(call=replay, check=check, note=note, module=model)
    return runner


def build_network_runner(name: str, ctx: NetworkContext, settings: BenchSettings) -> Runner:
    """The runner of row ``name`` (``inference.<variant>`` or ``training.<variant>``)."""
    group, _, variant = name.partition(".")
    if group == "inference":
        return _inference(variant, ctx, settings)
    if group == "training" and variant == "cmrf-graph":
        return _graphed_training(ctx, settings)
    if group == "training":
        return _training(variant, ctx, settings)
    raise ValueError(f"not a whole-network row: {name!r}")
