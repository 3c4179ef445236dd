"""Whole-network checks on a CUDA GPU: the optimized model, CUDA graphs, a fused training step and
``cmrf train``; ``examples/gpu_check.sh`` runs them.

Without a GPU, the tests that need no GPU feature (capture, autocast on CUDA, a second GPU) run on
the CPU instead, so the test code itself is checked everywhere (a comparison that could never pass
would otherwise wait for a GPU to show it); ``CMRF_TEST_CUDA_ON_CPU=1`` does the same on a GPU
machine.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from cmrf import create_model, optimize_for_inference
from cmrf.cli import main
from cmrf.ops.cascade import reference_only
from tests.conftest import randomise_batchnorm

ON_CPU = os.environ.get("CMRF_TEST_CUDA_ON_CPU") == "1" or not torch.cuda.is_available()

DEVICE = torch.device("cpu" if ON_CPU else "cuda")
needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Compare in true fp32: TF32 off (the issue's rule for GPU comparisons)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("tinyunet", channels=(16, 32, 64))
    return randomise_batchnorm(model).eval().to(DEVICE)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=gen).to(DEVICE) for shape in ((2, 3, 64, 64), (1, 3, 48, 80))]


def test_optimized_model_equals_the_model_in_fp32():
    model = _model()
    fast = optimize_for_inference(copy.deepcopy(model))
    with torch.inference_mode():
        for x in _inputs():
            torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimized_model_under_autocast_stays_close(dtype):
    model = _model()
    fast = optimize_for_inference(copy.deepcopy(model))
    with torch.inference_mode():
        for x in _inputs():
            expected = model(x)
            with torch.autocast("cuda", dtype=dtype):
                out = fast(x)
            assert torch.isfinite(out).all()
            assert _rel_l2(out, expected) < 0.05, dtype  # bf16 eager on the CPU: 0.012


@needs_gpu
def test_cuda_graphs_replay_new_inputs_and_keep_earlier_outputs():
    model = _model()
    graphs = optimize_for_inference(copy.deepcopy(model), cuda_graph=True)
    first, second = (torch.randn(2, 3, 64, 64, device=DEVICE) for _ in range(2))
    with torch.inference_mode():
        out_first = graphs(first)  # captured here
        kept = out_first.clone()
        out_second = graphs(second)  # replayed with the new input
        assert graphs.num_graphs == 1
        torch.testing.assert_close(out_first, kept, rtol=0, atol=0)  # a copy, not the graph's buffer
        torch.testing.assert_close(out_first, model(first), rtol=0, atol=1e-4)
        torch.testing.assert_close(out_second, model(second), rtol=0, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = graphs(first)  # another key: another graph
        assert graphs.num_graphs == 2 and _rel_l2(out_bf16, kept) < 0.05


def test_training_step_equals_the_reference():
    """One forward + backward of the default training path (the fused cascade and the exact
    upsampling on a GPU) against the reference: logits, gradients and BatchNorm statistics."""
    fast = _model().train()
    reference = copy.deepcopy(fast)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    target = torch.randint(0, 2, (2, 64, 64), device=DEVICE)
    out = fast(x)
    torch.nn.functional.cross_entropy(out, target).backward()
    with reference_only():
        expected = reference(x)
        torch.nn.functional.cross_entropy(expected, target).backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    # Each gradient relative to its own size, but no smaller than 1e-4 of the largest gradient of
    # the model: the bias of a cascade BatchNorm that feeds another batch-statistics BatchNorm has a
    # gradient of exactly zero in exact arithmetic, i.e. rounding noise of ~1e-9 (as the bench's
    # _GRAD_SCALE_FLOOR). Every failure is collected, so one run shows all of them.
    floor = 1e-4 * max(float(q.grad.abs().max()) for q in reference.parameters())
    failed = []
    for (name, p), q in zip(fast.named_parameters(), reference.parameters(), strict=True):
        error = float((p.grad - q.grad).abs().max()) / max(float(q.grad.abs().max()), floor)
        if not error < 1e-3:
            failed.append(f"{name}: {error:.2e}")
    for (name, b), c in zip(fast.named_buffers(), reference.buffers(), strict=True):
        if not torch.allclose(b.float(), c.float(), rtol=1e-4, atol=1e-6):
            failed.append(f"buffer {name}: {float((b.float() - c.float()).abs().max()):.2e}")
    assert not failed, failed


@needs_gpu
def test_the_bench_step_in_a_cuda_graph_trains_as_eager_steps():
    """``cmrf bench``'s ``training.cmrf-graph`` replays a captured Adam step: its first step's logits
    and three replays' weights equal three eager steps of the same model."""
    from cmrf.bench.network import NetworkContext, build_network_runner
    from cmrf.bench.settings import BenchSettings

    settings = BenchSettings(device="cuda", batch=2, size=64, precision="fp32", N=4)
    ctx = NetworkContext.create(settings)
    eager = copy.deepcopy(ctx.model).train()
    runner = build_network_runner("training.cmrf-graph", ctx, settings)
    first = runner.check()["output"]
    runner.call()
    runner.call()
    optimizer = torch.optim.Adam(eager.parameters(), lr=1e-4)
    for step in range(3):
        out = eager(ctx.x)
        torch.nn.functional.cross_entropy(out.float(), ctx.target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            torch.testing.assert_close(first, out.detach().float(), rtol=0, atol=1e-4)
    failed = [name for (name, p), q in zip(runner.module.named_parameters(), eager.parameters(), strict=True)
              if not torch.allclose(p, q, rtol=0, atol=1e-3)]
    assert not failed, failed


def test_cmrf_train_on_the_device(tmp_path):
    pytest.importorskip("monai", reason="cmrf train's loss needs monai (carry its wheel: docs/benchmarks.md)")
    args = ["train", "--img-size", "32", "--synthetic-samples", "16", "--channels", "16", "32",
            "--device", DEVICE.type, "--epochs", "2", "--out", str(tmp_path), "--no-plots"]
    assert main(args) == 0
    assert (tmp_path / "best.safetensors").exists() and (tmp_path / "metrics.json").exists()


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_runs_there():
    """Triton launches on the current GPU: the fused path must make the input's GPU current."""
    model = _model().to("cuda:1")
    fast = optimize_for_inference(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64, device="cuda:1")
    assert torch.cuda.current_device() == 0
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-4)
