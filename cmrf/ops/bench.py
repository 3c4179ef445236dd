"""``cmrf bench-cascade``: the eager reference cascade against the fused Triton kernels.

For every CMRF layer of TinyU-Net (the cascade's input shape depends only on a layer's output
width and resolution), in each dtype, it times

* ``eval``: one inference forward (BatchNorm folded, no autograd);
* ``train``: a training-mode forward plus backward (batch statistics, running-stat updates);

for the reference and the fused path in the same run, checks that both give the same output, and
prints milliseconds, the speed-up, and on CUDA the achieved bandwidth over the op's compulsory
traffic (read the input, write the output; for ``train`` also read the output gradient and write
the input gradient) and its fraction of the device's peak. Then an end-to-end TinyU-Net training
step (bf16 autocast on CUDA) and inference, fused vs reference, with peak memory on CUDA. All
figures go to a JSON file as well.

On a CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` is set for this process):
that checks correctness only; its timings say nothing about GPU speed. Use ``--quick`` (the default
on CPU) for tiny shapes there.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# TinyU-Net at 256x256: (output width, side) of its CMRF layers. The cascade's shapes depend only
# on these, and each pair occurs twice (encoder stage i and decoder stage i): time each once.
TINYUNET_LAYERS = [(64, 256), (128, 128), (256, 64), (512, 32)]
LAYERS_PER_SHAPE = 2
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class CascadeResult:
    """One timed case. ``gbs``/``peak_fraction`` are ``None`` off CUDA."""

    layer: int
    layers_with_shape: int
    shape: tuple[int, ...]
    dtype: str
    mode: str
    reference_ms: float
    fused_ms: float
    speedup: float
    max_abs_diff: float
    gbs: float | None
    peak_fraction: float | None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"


def peak_bandwidth_gbs(device) -> float | None:
    """Theoretical DRAM bandwidth (GB/s) from the CUDA device properties (double data rate)."""
    import torch

    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def time_ms(fn: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, synchronising CUDA around each call."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cascade_bytes(batch: int, c: int, N: int, side: int, itemsize: int, mode: str) -> int:
    """Compulsory traffic: read ``y`` (2c planes), write ``out`` (N c); doubled for forward+backward."""
    planes = 2 * c + N * c
    return planes * batch * side * side * itemsize * (2 if mode == "train" else 1)


def _make_cascade(width: int, N: int, device, dtype):
    from cmrf.layers import CMRF

    stages = CMRF(width // N, width, N=N).cascade
    for stage in stages:  # non-trivial BatchNorm so the comparison means something
        stage.norm.weight.data.uniform_(0.5, 1.5)
        stage.norm.bias.data.normal_(0, 0.5)
        stage.norm.running_var.data.uniform_(0.5, 1.5)
    return stages.to(device=device, dtype=dtype)


def bench_cascade_case(width, side, batch, N, dtype_name, mode, device, warmup, iters, peak_gbs, layer):
    """Time reference and fused on one cascade shape; return a ``CascadeResult``."""
    import torch

    from cmrf.ops.cascade import cascade_concat_reference
    from cmrf.ops.triton_cascade import cascade_concat_fused

    dtype = getattr(torch, DTYPES[dtype_name])
    c = width // (2 * N)
    stages = _make_cascade(width, N, device, dtype)
    stages.train(mode == "train")
    fused_stages = copy.deepcopy(stages)
    y = torch.randn(batch, 2 * c, side, side, device=device, dtype=dtype)

    if mode == "eval":
        def run(fn, s):
            with torch.no_grad():
                return fn(y, s)
    else:
        y = y.requires_grad_()
        grad = torch.randn(batch, N * c, side, side, device=device, dtype=dtype)

        def run(fn, s):
            out = fn(y, s)
            out.backward(grad)
            return out

    out_ref = run(cascade_concat_reference, stages)
    out_fused = run(cascade_concat_fused, fused_stages)
    diff = (out_ref.float() - out_fused.float()).abs().max().item()
    ref_ms = time_ms(lambda: run(cascade_concat_reference, stages), device, warmup, iters)
    fused_ms = time_ms(lambda: run(cascade_concat_fused, fused_stages), device, warmup, iters)
    gbs = fraction = None
    if device.type == "cuda":
        gbs = cascade_bytes(batch, c, N, side, y.element_size(), mode) / (fused_ms * 1e-3) / 1e9
        fraction = gbs / peak_gbs if peak_gbs else None
    shape = (batch, 2 * c, side, side)
    return CascadeResult(layer, LAYERS_PER_SHAPE, shape, dtype_name, mode, ref_ms, fused_ms,
                         ref_ms / fused_ms, diff, gbs, fraction)


def bench_model(batch, side, N, channels, device, warmup, iters) -> dict:
    """End-to-end TinyU-Net: one training step (bf16 autocast on CUDA) and one inference, both paths."""
    import torch

    from cmrf.layers import CMRF
    from cmrf.models import create_model

    base = create_model("tinyunet", N=N, channels=channels).to(device)
    x = torch.randn(batch, 3, side, side, device=device)
    target = torch.randint(0, 2, (batch, side, side), device=device)
    autocast = device.type == "cuda"  # bf16 autocast on the GPU; plain fp32 in the CPU interpreter
    results = {}
    for name, fused in (("reference", False), ("fused", True)):
        model = copy.deepcopy(base)
        for module in model.modules():
            if isinstance(module, CMRF):
                module.fused = fused
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def train_step(model=model, optimizer=optimizer):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def infer(model=model):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return model(x)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        train_ms = time_ms(train_step, device, warmup, iters)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        model.eval()
        results[name] = {"train_step_ms": train_ms, "inference_ms": time_ms(infer, device, warmup, iters),
                         "train_peak_mib": peak}
    results["train_speedup"] = results["reference"]["train_step_ms"] / results["fused"]["train_step_ms"]
    results["inference_speedup"] = results["reference"]["inference_ms"] / results["fused"]["inference_ms"]
    return results


def _print_case(r: CascadeResult) -> None:
    bandwidth = f"{r.gbs:8.0f} GB/s {100 * r.peak_fraction:5.1f}%" if r.gbs and r.peak_fraction else (
        f"{r.gbs:8.0f} GB/s" if r.gbs else "")
    print(f"L{r.layer} x{r.layers_with_shape} {str(r.shape):20} {r.dtype:5} {r.mode:5} "
          f"ref {r.reference_ms:9.3f} ms  fused {r.fused_ms:9.3f} ms  x{r.speedup:5.2f}  "
          f"maxdiff {r.max_abs_diff:.2e} {bandwidth}")


def build_command(parser):
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 16, 2 with --quick)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 256, 16 with --quick)")
    parser.add_argument("--N", dest="N", type=int, default=8, help="receptive fields per CMRF (default 8)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 5, 0 with --quick)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 20, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (always on CPU)")
    parser.add_argument("--no-model", action="store_true", help="skip the end-to-end TinyU-Net step")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="device peak bandwidth in GB/s (default: from the CUDA device properties)")
    parser.add_argument("--json", default="bench_cascade.json", help="where to write the figures")
    return run


def run(args) -> int:
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be cuda, cuda:N or cpu, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    quick = args.quick or device.type == "cpu"
    if device.type == "cpu":
        # Must precede the first import of the kernels (Triton reads it when decorating them).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from cmrf.ops.cascade import check_fused_device

    try:
        check_fused_device(torch.empty(0, device=device))
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    batch = args.batch or (2 if quick else 16)
    side = args.size or (16 if quick else 256)
    warmup = args.warmup if args.warmup is not None else (0 if quick else 5)
    iters = args.iters if args.iters is not None else (1 if quick else 20)
    # --quick: an eighth of the widths, rounded to a multiple of 2N as CMRF requires.
    step = 2 * args.N
    widths = [(max(step, (w // 8 if quick else w) // step * step), max(s * side // 256, 1))
              for w, s in TINYUNET_LAYERS]
    peak = args.peak_gbs or peak_bandwidth_gbs(device)
    label = device_name(device)
    print(f"device: {label}" + (f", peak {peak:.0f} GB/s" if peak else ""))
    if device.type == "cpu":
        print("Triton interpreter on CPU: correctness only, the timings say nothing about GPU speed")
    results = []
    for dtype_name in args.dtypes:
        for mode in args.modes:
            for layer, (width, s) in enumerate(widths):
                result = bench_cascade_case(width, s, batch, args.N, dtype_name, mode, device, warmup, iters,
                                            peak, layer)
                _print_case(result)
                results.append(result)
    report = {"device": label, "date": time.strftime("%Y-%m-%d"), "peak_gbs": peak, "batch": batch,
              "size": side, "N": args.N, "quick": quick, "cascade": [asdict(r) for r in results]}
    if not args.no_model:
        channels = (8 * args.N // 4, 16 * args.N // 4, 32 * args.N // 4, 64 * args.N // 4) if quick else None
        model = bench_model(batch, side, args.N, channels, device, warmup, iters)
        report["tinyunet"] = model
        for key in ("reference", "fused"):
            m = model[key]
            peak_text = f", peak {m['train_peak_mib']:.0f} MiB" if m["train_peak_mib"] is not None else ""
            print(f"TinyU-Net {key:9}: train step {m['train_step_ms']:9.2f} ms{peak_text}, "
                  f"inference {m['inference_ms']:9.2f} ms")
        print(f"TinyU-Net speed-up: train x{model['train_speedup']:.2f}, "
              f"inference x{model['inference_speedup']:.2f}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
    return 0
