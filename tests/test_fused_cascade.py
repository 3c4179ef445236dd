"""The fused Triton cascade against the plain PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here,
before anything imports ``cmrf.ops.triton_cascade`` (Triton reads it when a kernel is decorated).
Other test files are unaffected: on CPU they take the reference path (``CMRF_FUSED=auto`` picks
Triton only for CUDA tensors), and nothing else launches Triton kernels without a GPU. On a CUDA
machine the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import collections
import copy
import subprocess
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from cmrf.layers import CMRF
from cmrf.ops import cascade as cascade_module
from cmrf.ops.cascade import (
    FusedUnavailableError,
    cascade_concat,
    cascade_concat_reference,
    fused_unsupported_reason,
    reference_only,
    triton_available,
    triton_missing_reason,
)
from tests.conftest import fused_interpreter_problem

if not triton_available():
    pytest.skip(f"no fused kernels here: {triton_missing_reason()}", allow_module_level=True)
from cmrf.ops import fused_cascade, triton_cascade  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tests that run no kernel in this process: they run where the interpreter cannot.
_NO_INTERPRETER_NEEDED = {"test_kernels_compile_for_a_real_gpu",
                          "test_importing_cmrf_does_not_import_the_kernels"}


@pytest.fixture(autouse=True)
def _interpreter_runs_the_kernels(request):
    problem = fused_interpreter_problem()
    if problem and request.node.originalname not in _NO_INTERPRETER_NEEDED:
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Compare in true fp32 on a GPU: TF32 off (cuDNN's 1x1 convolutions of a whole CMRF would
    otherwise round at about 1e-4, past these tests' tolerances)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _kernels_runnable():
    if DEVICE == "cpu" and not triton_cascade.INTERPRETED:
        pytest.fail("cmrf.ops.triton_cascade was imported before TRITON_INTERPRET=1 was set in this process")


def make_stages(c: int, N: int, dtype=torch.float32, seed: int = 0) -> nn.ModuleList:
    """A CMRF's cascade with non-trivial BatchNorm parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    stages = CMRF(2 * c, 2 * c * N, N=N).cascade
    for stage in stages:
        norm = stage.norm
        norm.weight.data = torch.rand(c, generator=gen) + 0.5
        norm.bias.data = torch.randn(c, generator=gen) * 0.5
        norm.running_mean.data = torch.randn(c, generator=gen) * 0.1
        norm.running_var.data = torch.rand(c, generator=gen) + 0.5
    return stages.to(DEVICE, dtype)


def run_both(y: torch.Tensor, stages: nn.ModuleList, grad: bool = True, fused_kwargs=None):
    """Run fused (on ``stages``) and reference (on a copy); return outputs, grads and the copies."""
    ref_stages = copy.deepcopy(stages)
    y_fused = y.detach().clone().requires_grad_(grad)
    y_ref = y.detach().clone().requires_grad_(grad)
    out = cascade_concat(y_fused, stages, fused=True)
    expected = cascade_concat_reference(y_ref, ref_stages)
    if grad:
        g = torch.randn_like(expected)
        out.backward(g)
        expected.backward(g)
    return (out, y_fused), (expected, y_ref), ref_stages


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, scale=None):
    """Relative to the gradient's scale: |a - e| <= rtol * (|e| + scale), scale = max|e| by default."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def assert_stages_match(stages, ref_stages, rtol: float = 1e-4):
    for stage, ref in zip(stages, ref_stages):
        for p, q in zip(stage.parameters(), ref.parameters()):
            if q.grad is not None:
                assert_grad_close(p.grad, q.grad, rtol)
        norm, ref_norm = stage.norm, ref.norm
        if ref_norm.running_mean is not None:
            torch.testing.assert_close(norm.running_mean, ref_norm.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(norm.running_var, ref_norm.running_var, rtol=1e-5, atol=1e-6)
            assert norm.num_batches_tracked.item() == ref_norm.num_batches_tracked.item()


@pytest.mark.parametrize("N", [2, 8])  # (test_random_shapes draws N = 3 and 4 too)
def test_training_forward_backward_and_running_stats(N):
    stages = make_stages(2, N)
    # Odd sides; the interpreter's time grows with the map, and N = 8 runs seven stages (21 s at 2x9x11).
    y = torch.randn(1, 4, 5, 3, device=DEVICE) if N == 8 else torch.randn(2, 4, 9, 11, device=DEVICE)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(y_fused.grad, y_ref.grad)
    assert_stages_match(stages, ref_stages)


@pytest.mark.parametrize("train", [True, False])
def test_an_empty_batch_gives_what_the_reference_gives(train):
    """PyTorch's BatchNorm refuses one value per channel in training, not zero (it refused both)."""
    stages = make_stages(2, 4).train(train)
    y = torch.randn(0, 4, 6, 5, device=DEVICE)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    assert out.shape == expected.shape == (0, 8, 6, 5)
    assert y_fused.grad.shape == y.shape
    assert_stages_match(stages, ref_stages)


def test_double_backward_is_refused_not_silently_wrong():
    """The kernels' gradients carry no graph: with create_graph=True a gradient penalty lost this
    op's second-order part without an error."""
    stages = make_stages(2, 3)
    y = torch.randn(1, 4, 5, 5, device=DEVICE, requires_grad=True)
    out = cascade_concat(y, stages, fused=True)
    with pytest.raises(RuntimeError, match="fused CMRF cascade has no double backward.*fused=False"):
        torch.autograd.grad(out.square().sum(), y, create_graph=True)
    again = cascade_concat(y, stages, fused=True)  # a plain backward still works
    (grad,) = torch.autograd.grad(again.sum(), y)
    assert grad.shape == y.shape and not grad.requires_grad


@pytest.mark.parametrize("N", [2, 4, 8])
def test_inference_folded_matches(N):
    stages = make_stages(3, N).eval()
    y = torch.randn(2, 6, 13, 7, device=DEVICE)
    with torch.no_grad():
        out = cascade_concat(y, stages, fused=True)
        expected = cascade_concat_reference(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_inference_on_a_module_made_in_inference_mode():
    """Parameters made under ``torch.inference_mode`` keep no version counter: the cache of
    folded weights must key them without one (it raised RuntimeError)."""
    with torch.inference_mode():
        stages = make_stages(3, 4).eval()
        y = torch.randn(1, 6, 9, 8, device=DEVICE)
        out = cascade_concat(y, stages, fused=True)
        expected = cascade_concat_reference(y, stages)
        again = cascade_concat(y, stages, fused=True)  # from the cache
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, out)


@pytest.mark.parametrize("frozen", [False, True])
def test_eval_mode_with_gradients(frozen):
    """Frozen-BatchNorm fine-tuning: running statistics normalise, nothing is updated. With frozen
    parameters only the input needs a gradient (a saliency map): still the autograd kernels."""
    stages = make_stages(2, 4).eval().requires_grad_(not frozen)
    y = torch.randn(2, 4, 6, 5, device=DEVICE)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(y_fused.grad, y_ref.grad)
    assert_stages_match(stages, ref_stages)


def test_many_tiles(monkeypatch):
    """Tiles smaller than the image: halos cross tile borders, statistics combine over tiles."""
    monkeypatch.setattr(triton_cascade, "MAX_BLOCK_W", 4)
    monkeypatch.setattr(triton_cascade, "MAX_BLOCK_ELEMENTS", 16)
    stages = make_stages(1, 3)
    y = torch.randn(2, 2, 7, 9, device=DEVICE)  # 4x4 tiles: 2 x 3 per plane, partial at both edges
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(y_fused.grad, y_ref.grad)
    assert_stages_match(stages, ref_stages)
    stages.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            cascade_concat(y, stages, fused=True), cascade_concat_reference(y, stages), rtol=1e-5, atol=1e-5
        )


def small_eval_blocks(monkeypatch, block_w: int, elements: int, programs: int = 3):
    """Shrink the single-launch kernel's block (and its persistent grid) so tiny images span tiles."""
    monkeypatch.setattr(triton_cascade, "EVAL_MAX_BLOCK_W", block_w)
    monkeypatch.setattr(triton_cascade, "EVAL_MAX_BLOCK_ELEMENTS", elements)
    monkeypatch.setattr(triton_cascade, "EVAL_MAX_PROGRAMS", programs)


def eval_fused_and_reference(y, stages):
    """Eval-mode fused output, the launches it made, and the reference output."""
    triton_cascade.launch_counts.clear()
    with torch.no_grad():
        out = cascade_concat(y, stages, fused=True)
        counts = dict(triton_cascade.launch_counts)
        expected = cascade_concat_reference(y, stages)
    return out, counts, expected


# (N, block cap W, block cap elements, H, W): the tile (block - 2(N-1)) is smaller than the odd
# image in both directions, so tile borders, halos crossing them and image-edge tiles all occur.
@pytest.mark.parametrize("N, cap_w, cap_elements, H, W", [
    (2, 8, 64, 13, 11),     # 8x8 blocks, 6x6 tiles: 3 x 2 tiles
    (4, 16, 256, 23, 21),   # 16x16 blocks, 10x10 tiles: 3 x 3 tiles
    (8, 32, 1024, 31, 19),  # 32x32 blocks, 18x18 tiles: 2 x 2 tiles (halo 7 > image edge margin)
])
def test_eval_single_launch_across_tiles(monkeypatch, N, cap_w, cap_elements, H, W):
    small_eval_blocks(monkeypatch, cap_w, cap_elements)
    block_h, block_w = triton_cascade.eval_tile_shape(H, W, N - 1)
    tile_h, tile_w = block_h - 2 * (N - 1), block_w - 2 * (N - 1)
    assert tile_h < H and tile_w < W  # really several tiles in each direction
    stages = make_stages(2, N, seed=N).eval()
    y = torch.randn(1, 4, H, W, device=DEVICE)
    out, counts, expected = eval_fused_and_reference(y, stages)
    assert counts == {"_eval_cascade_kernel": 1}  # one launch for all N - 1 stages, no fallback
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eval_single_launch_channels_last_and_strided(monkeypatch):
    small_eval_blocks(monkeypatch, 8, 64, programs=2)  # 8x8 blocks, 4x4 tiles (N = 3)
    stages = make_stages(2, 3, seed=1).eval()
    y = torch.randn(2, 4, 9, 7, device=DEVICE).to(memory_format=torch.channels_last)
    out, counts, expected = eval_fused_and_reference(y, stages)
    assert counts == {"_eval_cascade_kernel": 1}
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    base = torch.randn(2, 5, 11, 20, device=DEVICE)
    y = base[:, 1:, 1:10, ::2]  # storage offset, width stride 2
    out, counts, expected = eval_fused_and_reference(y, stages)
    assert counts == {"_eval_cascade_kernel": 1}
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_single_launch_low_precision(monkeypatch, dtype):
    """Intermediates stay fp32 on chip: error vs fp32 no worse than the low-precision reference's."""
    small_eval_blocks(monkeypatch, 16, 256)  # 16x16 blocks, 10x10 tiles (N = 4)
    stages = make_stages(2, 4, seed=2).eval()
    y = torch.randn(1, 4, 13, 15, device=DEVICE)
    with torch.no_grad():
        exact = cascade_concat_reference(y, stages)
        low_stages = copy.deepcopy(stages).to(dtype)
        low_ref = cascade_concat_reference(y.to(dtype), low_stages)
    out, counts, _ = eval_fused_and_reference(y.to(dtype), low_stages)
    assert counts == {"_eval_cascade_kernel": 1} and out.dtype == dtype
    fused_error = (out.float() - exact).abs().max().item()
    reference_error = (low_ref.float() - exact).abs().max().item()
    assert fused_error <= 1.5 * reference_error + 4 * torch.finfo(dtype).eps, (fused_error, reference_error)


def test_eval_tile_rule_and_fallback(monkeypatch):
    # Default caps: 32 x 64 blocks for large images while the halo leaves half of each dimension.
    assert triton_cascade.eval_tile_shape(256, 256, 8) == (32, 64)
    assert triton_cascade.eval_tile_shape(256, 256, 9) is None  # tile 14 rows < half of 32
    assert triton_cascade.eval_tile_shape(5, 6, 3) == (16, 16)  # one tile covers the image
    assert triton_cascade.eval_tile_shape(3, 3, 20) is None  # halo wider than any allowed block
    # The fallback (one launch per stage) still matches, across several of its own tiles.
    small_eval_blocks(monkeypatch, 16, 256)
    monkeypatch.setattr(triton_cascade, "MAX_BLOCK_W", 8)
    monkeypatch.setattr(triton_cascade, "MAX_BLOCK_ELEMENTS", 64)
    assert triton_cascade.eval_tile_shape(17, 18, 7) is None  # 16x16 block, 2-pixel tile
    stages = make_stages(2, 8, seed=3).eval()
    y = torch.randn(1, 4, 17, 18, device=DEVICE)
    out, counts, expected = eval_fused_and_reference(y, stages)
    assert counts == {"_stage_forward_kernel": 7}
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eval_launches_once_per_call_and_training_does_not():
    stages = make_stages(1, 4)
    y = torch.randn(1, 2, 6, 5, device=DEVICE)
    triton_cascade.launch_counts.clear()
    with torch.no_grad():
        cascade_concat(y, stages.eval(), fused=True)
        cascade_concat(y, stages, fused=True)
    assert dict(triton_cascade.launch_counts) == {"_eval_cascade_kernel": 2}
    # Gradients needed (frozen-BatchNorm fine-tuning) or training mode: the per-stage kernels.
    triton_cascade.launch_counts.clear()
    cascade_concat(y.clone().requires_grad_(), stages, fused=True)
    assert "_eval_cascade_kernel" not in triton_cascade.launch_counts
    triton_cascade.launch_counts.clear()
    with torch.no_grad():
        cascade_concat(y, stages.train(), fused=True)
    assert "_eval_cascade_kernel" not in triton_cascade.launch_counts


def test_channels_last_and_strided_inputs():
    stages = make_stages(2, 3)
    y = torch.randn(2, 4, 7, 9, device=DEVICE).to(memory_format=torch.channels_last)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert y_fused.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(y_fused.grad, y_ref.grad)
    assert_stages_match(stages, ref_stages)
    # A sliced view (non-unit width stride, storage offset) and a non-contiguous gradient.
    stages = make_stages(2, 3).eval()
    base = torch.randn(2, 5, 9, 20, device=DEVICE)
    y = base[:, 1:, 1:8, ::2]
    with torch.no_grad():
        out = cascade_concat(y, stages, fused=True)
    torch.testing.assert_close(out, cascade_concat_reference(y, stages), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_reference(dtype):
    """fp32 accumulation: the fused error against fp32 is at most the reference's own error (+ slack)."""
    stages = make_stages(2, 4)
    y = torch.randn(2, 4, 7, 9, device=DEVICE)
    exact_stages = copy.deepcopy(stages)
    exact = cascade_concat_reference(y, exact_stages)
    low_ref_stages = copy.deepcopy(stages).to(dtype)
    low_ref = cascade_concat_reference(y.to(dtype), low_ref_stages)
    fused_stages = copy.deepcopy(stages).to(dtype)
    y_low = y.to(dtype).requires_grad_()
    out = cascade_concat(y_low, fused_stages, fused=True)
    assert out.dtype == dtype
    fused_error = (out.float() - exact).abs().max().item()
    reference_error = (low_ref.float() - exact).abs().max().item()
    unit = torch.finfo(dtype).eps
    assert fused_error <= 1.5 * reference_error + 4 * unit, (fused_error, reference_error)
    out.backward(torch.ones_like(out))
    assert y_low.grad.dtype == dtype and torch.isfinite(y_low.grad.float()).all()
    y_exact = y.clone().requires_grad_()
    cascade_concat_reference(y_exact, copy.deepcopy(stages)).backward(torch.ones_like(exact))
    grad_error = (y_low.grad.float() - y_exact.grad).abs().max().item()
    assert grad_error <= 64 * unit * y_exact.grad.abs().max().item(), grad_error
    for norm, exact_norm in zip((s.norm for s in fused_stages), (s.norm for s in exact_stages)):
        torch.testing.assert_close(norm.running_mean.float(), exact_norm.running_mean, rtol=0, atol=8 * unit)


def test_residual_cmrf_module():
    """A whole CMRF with in == out (the residual case), fused vs reference, training step."""
    model = CMRF(8, 8, N=2).to(DEVICE)
    reference = copy.deepcopy(model)
    model.fused, reference.fused = True, False
    assert model.add_residual
    x = torch.randn(2, 8, 5, 7, device=DEVICE)
    x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = model(x_fused), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grad_close(x_fused.grad, x_ref.grad)
    # The cascade BatchNorms' bias gradients are zero in exact arithmetic (pw2's training-mode
    # BatchNorm removes per-channel shifts), so compare every gradient on the model's scale.
    scale = max(q.grad.abs().max().item() for q in reference.parameters())
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_grad_close(p.grad, q.grad, scale=scale)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_momentum_none_and_no_running_stats():
    stages = make_stages(1, 3)
    for stage in stages:
        stage.norm.momentum = None  # cumulative moving average
    ref_stages = copy.deepcopy(stages)
    for step in range(2):
        y = torch.randn(2, 2, 5, 6, device=DEVICE) + step
        cascade_concat(y, stages, fused=True)
        cascade_concat_reference(y, ref_stages)
    assert_stages_match(stages, ref_stages)
    # track_running_stats=False: batch statistics even in eval mode; one stage without affine.
    for index, stage in enumerate(stages):
        stage.norm = nn.BatchNorm2d(1, eps=1e-3, affine=index > 0, track_running_stats=False).to(DEVICE)
    stages.eval()
    y = torch.randn(2, 2, 5, 6, device=DEVICE)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(y_fused.grad, y_ref.grad)
    assert_stages_match(stages, ref_stages)


@settings(max_examples=8)  # each example runs the kernels in Triton's interpreter (seconds)
@given(
    batch=st.integers(1, 2),
    c=st.integers(1, 3),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    N=st.sampled_from([2, 3, 4, 8]),
    channels_last=st.booleans(),
    training=st.booleans(),
)
def test_random_shapes(batch, c, height, width, N, channels_last, training):
    if training and batch * height * width == 1:
        return  # BatchNorm cannot train on one value per channel (tested below)
    stages = make_stages(c, N).train(training)
    y = torch.randn(batch, 2 * c, height, width, device=DEVICE)
    if channels_last:
        y = y.to(memory_format=torch.channels_last)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages, grad=training)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if training:
        assert_grad_close(y_fused.grad, y_ref.grad)
        assert_stages_match(stages, ref_stages)


def test_forced_path_launches_triton_kernels(monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the forced fused path fell back to the reference")

    monkeypatch.setattr(cascade_module, "cascade_concat_reference", no_reference)
    triton_cascade.launch_counts.clear()
    stages = make_stages(1, 4)
    y = torch.randn(1, 2, 5, 5, device=DEVICE, requires_grad=True)
    cascade_concat(y, stages, fused=True).sum().backward()
    counts = dict(triton_cascade.launch_counts)
    # Per stage a conv and its on-device statistics; backward a launch per stage plus its reductions.
    assert counts == {"_stage_forward_kernel": 3, "_stats_kernel": 3, "_affine_kernel": 1,
                      "_stage_backward_kernel": 4, "_backward_reduce_kernel": 4}
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_dispatch_rules(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_cascade, "cascade_concat_fused", lambda y, s: calls.append("fused") or y)
    stages = make_stages(1, 2)
    y = torch.randn(1, 2, 3, 3, device=DEVICE)
    expected_shape = (1, 2, 3, 3)  # the fake fused returns y itself, the reference (1, 2c, ...)

    monkeypatch.setenv("CMRF_FUSED", "0")
    assert cascade_concat(y, stages).shape == expected_shape and calls == []
    assert cascade_concat(y, stages, fused=True) is y and calls == ["fused"]  # module override wins
    monkeypatch.setenv("CMRF_FUSED", "1")
    assert cascade_concat(y, stages) is y and len(calls) == 2
    cascade_concat(y, stages, fused=False)
    assert len(calls) == 2
    with reference_only():
        with reference_only():  # nested: leaving the inner block keeps the outer one in force
            pass
        cascade_concat(y, stages, fused=True)
    assert len(calls) == 2
    monkeypatch.setenv("CMRF_FUSED", "auto")
    cascade_concat(y, stages)
    assert len(calls) == (3 if DEVICE == "cuda" else 2)  # auto: Triton for CUDA tensors only
    for spelling, fused in (("false", False), (" OFF ", False), ("True", True), ("On", True)):
        monkeypatch.setenv("CMRF_FUSED", spelling)
        before = len(calls)
        cascade_concat(y, stages)
        assert len(calls) == before + fused, spelling
    monkeypatch.setenv("CMRF_FUSED", "maybe")
    with pytest.raises(ValueError, match="CMRF_FUSED.*'maybe'"):
        cascade_concat(y, stages)


def test_inputs_and_stages_the_kernels_cannot_reproduce_are_named():
    stages = make_stages(2, 3)
    y = torch.randn(1, 4, 5, 5, device=DEVICE)
    assert fused_unsupported_reason(y, stages) is None
    assert "float64 is not one of" in fused_unsupported_reason(y.double(), copy.deepcopy(stages).double())
    mixed = copy.deepcopy(stages)
    mixed[0].norm.eval()
    assert "mix training/eval" in fused_unsupported_reason(y, mixed)
    untracked = copy.deepcopy(stages).eval()  # stage 0 normalises with batch statistics in eval too
    untracked[0].norm = nn.BatchNorm2d(2, eps=1e-3, track_running_stats=False).to(DEVICE).eval()
    assert "mix training/eval" in fused_unsupported_reason(y, untracked)
    with pytest.warns(UserWarning, match="mix training/eval"):
        out = cascade_concat(y, untracked, fused=True)
    torch.testing.assert_close(out, cascade_concat_reference(y, copy.deepcopy(untracked)))
    padded = copy.deepcopy(stages)
    padded[1].conv = nn.Conv2d(2, 2, 3, padding=0, groups=2, bias=False).to(DEVICE)
    assert fused_unsupported_reason(y, padded).startswith("stage 1 is not a bias-free depthwise 3x3")
    # Forced anyway: a warning, and the reference's result.
    expected = cascade_concat_reference(y, copy.deepcopy(mixed))
    with pytest.warns(UserWarning, match="mix training/eval"):
        torch.testing.assert_close(cascade_concat(y, mixed, fused=True), expected)


def test_folded_weights_cached_in_inference_mode_serve_autograd_later():
    """Tensors made under inference_mode cannot be saved for backward: a cache filled there must
    not be reused when gradients are needed."""
    stages = make_stages(2, 3).eval()
    y = torch.randn(1, 4, 6, 5, device=DEVICE)
    with torch.inference_mode():
        cascade_concat(y, stages, fused=True)
    x, x_ref = (y.clone().requires_grad_() for _ in range(2))
    cascade_concat(x, stages, fused=True).sum().backward()
    cascade_concat_reference(x_ref, stages).sum().backward()
    assert_grad_close(x.grad, x_ref.grad)


def test_a_cmrf_built_in_inference_mode_sees_its_weights_change():
    """Inference tensors keep no version counter: the fused cache, keyed on versions, kept the old
    weights after `load_state_dict` inside inference mode (max diff 5.45 against the reference)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    new = {k: v + torch.randn_like(v) * 0.5 if v.is_floating_point() else v
           for k, v in CMRF(4, 12, N=3).state_dict().items()}
    with torch.inference_mode():
        model = CMRF(4, 12, N=3, fused=True).to(DEVICE).eval()
        model(x)
        model.load_state_dict(new)
        reference = CMRF(4, 12, N=3, fused=False).to(DEVICE).eval()
        reference.load_state_dict(new)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        model.cascade[0].conv.weight.mul_(2)
        reference.cascade[0].conv.weight.mul_(2)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook", ["backward", "backward_pre"])
def test_stages_with_backward_hooks_take_the_reference(hook):
    """The fused kernels never call the stage modules: their backward hooks were skipped silently."""
    stages = make_stages(2, 3)
    calls = []
    register = getattr(stages[1].norm, f"register_full_{hook}_hook")
    register(lambda *args: calls.append(hook))
    assert "hooks" in fused_unsupported_reason(torch.randn(1, 4, 5, 5, device=DEVICE), stages)
    y = torch.randn(1, 4, 5, 5, device=DEVICE, requires_grad=True)
    with pytest.warns(UserWarning, match="hooks"):
        out = cascade_concat(y, stages, fused=True)
    out.sum().backward()
    assert calls == [hook]


def test_torch_func_transforms_take_the_reference():
    """vmap and grad over the fused path failed inside the kernels' wrappers ("Cannot access data
    pointer of Tensor that doesn't have storage"); the reference runs under them."""
    from torch.func import functional_call, grad, vmap

    model = CMRF(4, 12, N=3, fused=True).to(DEVICE).eval()
    reference = copy.deepcopy(model)
    reference.fused = False
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(module):
        return lambda p: functional_call(module, (p, buffers), (x,)).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forced and unavailable: the reference, with a warning
        grads, expected = grad(loss(model))(params), grad(loss(reference))(params)
        batched = torch.randn(3, 2, 4, 5, 5, device=DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(vmap(model)(batched), vmap(reference)(batched))
        torch.testing.assert_close(vmap(model)(batched), vmap(reference)(batched))
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name])


def test_running_statistics_with_per_stage_momentum():
    """Stages with different momenta take the per-stage update of the running statistics."""
    stages = make_stages(2, 3)
    for stage, momentum in zip(stages, (0.1, 0.3, None)):
        stage.norm.momentum = momentum
    y = torch.randn(2, 4, 7, 6, device=DEVICE)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_stages_match(stages, ref_stages)


@pytest.mark.skipif(DEVICE == "cuda", reason="a CPU tensor is what cannot run without the interpreter")
def test_forced_on_cpu_without_interpreter_names_cuda_and_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    stages = make_stages(1, 2)
    with pytest.raises(FusedUnavailableError, match="CUDA") as info:
        cascade_concat(torch.randn(1, 2, 3, 3), stages, fused=True)
    assert "Triton" in str(info.value) and "CMRF_FUSED=0" in str(info.value)
    # What the kernels would not compute anyway takes the reference, as documented, instead of
    # advice to move to CUDA, where it would take the reference too.
    volume_stages = CMRF(2, 8, N=4, spatial_dims=3).cascade
    y = torch.randn(1, 2, 3, 4, 5)
    with pytest.warns(UserWarning, match="3-D volumes use the reference"):
        out = cascade_concat(y, volume_stages, fused=True)
    torch.testing.assert_close(out, cascade_concat_reference(y, volume_stages))


def test_unsupported_stages_fall_back_loudly_when_forced():
    volume_stages = CMRF(2, 8, N=4, spatial_dims=3).cascade.to(DEVICE)
    y = torch.randn(1, 2, 3, 4, 5, device=DEVICE)
    assert "2-D" in fused_unsupported_reason(y, volume_stages)
    with pytest.warns(UserWarning, match="3-D volumes use the reference"):
        out = cascade_concat(y, volume_stages, fused=True)
    torch.testing.assert_close(out, cascade_concat_reference(y, volume_stages))
    stages = make_stages(1, 2)
    stages[0].conv.bias = nn.Parameter(torch.zeros(1, device=DEVICE))
    assert "bias-free depthwise" in fused_unsupported_reason(torch.randn(1, 2, 3, 3, device=DEVICE), stages)
    with warnings.catch_warnings():  # auto mode: the reference, without a word
        warnings.simplefilter("error")
        cascade_concat(y, volume_stages)


class _DoublingStage(nn.Sequential):
    """The same two children as a cascade stage, another forward."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "change", ["hook", "old weight_norm", "parametrize", "deleted weight", "own forward", "norm first"])
def test_modified_stages_are_refused_not_misread(change):
    """The checks read the modules' dicts (not ``getattr``): reparametrized or hooked stages must
    still be recognised and run the reference, never raise a KeyError or skip the change."""
    stages = make_stages(1, 3).eval()
    conv = stages[1].conv
    if change == "hook":
        stages[1].norm.register_forward_hook(lambda module, args, out: out * 2)
    elif change == "old weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, still used
            nn.utils.weight_norm(conv)  # moves weight to weight_g / weight_v plus a pre-hook
    elif change == "parametrize":
        nn.utils.parametrizations.weight_norm(conv)  # conv becomes a ParametrizedConv2d
    elif change == "deleted weight":
        del conv.weight
        conv.register_buffer("weight", torch.ones(1, 1, 3, 3, device=DEVICE))
    elif change == "own forward":
        stages[1] = _DoublingStage(collections.OrderedDict(conv=conv, norm=stages[1].norm))
    else:  # an nn.Sequential runs its children in order: this one normalises before convolving
        stages[1] = nn.Sequential(collections.OrderedDict(norm=stages[1].norm, conv=conv))
    y = torch.randn(1, 2, 5, 4, device=DEVICE)
    reason = fused_unsupported_reason(y, stages)
    assert reason and "stage 1" in reason
    with torch.no_grad(), pytest.warns(UserWarning, match="stage 1"):
        out = cascade_concat(y, stages, fused=True)
        torch.testing.assert_close(out, cascade_concat_reference(y, stages))


def test_training_on_one_value_per_channel_is_a_value_error():
    stages = make_stages(1, 2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cascade_concat(torch.randn(1, 2, 1, 1, device=DEVICE), stages, fused=True)


def test_torch_compile_keeps_fused_op_in_one_graph():
    model = CMRF(4, 16, N=4, fused=True).to(DEVICE).eval()
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        triton_cascade.launch_counts.clear()
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert dict(triton_cascade.launch_counts) == {"_eval_cascade_kernel": 1}


# Compiles every kernel variant for sm_90 in a process without the interpreter: catches what only
# the real compiler rejects (e.g. integer arguments that Triton specialises to constexpr 1).
_AOT_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cmrf.ops import triton_cascade as tc

# Pointers to feature maps take the storage dtype; weights, statistics and partials are fp32.
IO = {"src_ptr", "dst_ptr", "prev_ptr", "odd_ptr", "gslot_ptr", "next_g_ptr", "next_z_ptr", "cur_ptr",
      "godd_ptr", "even_ptr", "out_ptr"}
FLOATS = {"eps", "unbiased_factor", "inv_n"}

def compile_kernel(kernel, dtype, constexprs, ones):
    signature, constants = {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = constexprs.get(name, 1 if name in ones else None)
        if value is not None:
            signature[name], constants[(index,)] = "constexpr", value
        elif name.endswith("_ptr"):
            signature[name] = "*" + (dtype if name in IO else "fp32")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))

blocks = dict(BLOCK_H=16, BLOCK_W=64)
for flags in (dict(SRC_AFFINE=False, DST_AFFINE=True, WRITE_PREV=True, ADD_ODD=True, STATS=False),
              dict(SRC_AFFINE=True, DST_AFFINE=False, WRITE_PREV=True, ADD_ODD=False, STATS=True)):
    compile_kernel(tc._stage_forward_kernel, "bf16", {**flags, **blocks}, ("C", "src_sw", "num_partials"))
compile_kernel(tc._affine_kernel, "bf16", blocks, ("C",))
for flags in (dict(HAS_NEXT=False, CUR_IS_Z=True, WRITE_G=False, WRITE_ODD=False),
              dict(HAS_NEXT=True, CUR_IS_Z=False, WRITE_G=True, WRITE_ODD=True)):
    compile_kernel(tc._stage_backward_kernel, "bf16", {**flags, **blocks}, ("C", "num_partials", "cur_sw"))
compile_kernel(tc._eval_cascade_kernel, "bf16", dict(NUM_STAGES=3, BLOCK_H=32, BLOCK_W=64), ("C", "even_sw"))
compile_kernel(tc._eval_cascade_kernel, "fp16", dict(NUM_STAGES=7, BLOCK_H=32, BLOCK_W=32), ())
for from_partials in (True, False):
    compile_kernel(tc._stats_kernel, "fp32", dict(FROM_PARTIALS=from_partials, BLOCK=tc.REDUCE_BLOCK), ())
for flags in (dict(HAS_NEXT=True, HAS_CUR=True, USE_BATCH_STATS=True),
              dict(HAS_NEXT=False, HAS_CUR=True, USE_BATCH_STATS=False),
              dict(HAS_NEXT=True, HAS_CUR=False, USE_BATCH_STATS=True)):
    compile_kernel(tc._backward_reduce_kernel, "fp32", {**flags, "BLOCK": tc.REDUCE_BLOCK}, ("C",))
print("compiled")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test compiles and runs the kernels for real")
def test_kernels_compile_for_a_real_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_COMPILE], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_importing_cmrf_does_not_import_the_kernels():
    code = "import sys, cmrf; cmrf.CMRF(4, 8, N=2); assert 'cmrf.ops.triton_cascade' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- GPU readiness, checked on the CPU: no host data, no syncs, launch budget, cache, compile ---------


class HostTraffic(TorchFunctionMode):
    """Records every host<->device copy or scalar read-back made through torch while active.

    Flags device tensors built from host data (``torch.tensor``, ``as_tensor``), scalar reads
    (``item``, ``float(t)``, ``int(t)``, ``bool(t)``, ``tolist``), ``cpu``/``numpy`` and a ``to``/
    ``cuda`` that changes device. Triton's interpreter copies tensors itself when it launches a
    kernel (a real GPU launch does not), so launches are run with the recorder paused.
    """

    FLAGGED = {"tensor", "as_tensor", "item", "__float__", "__int__", "__bool__", "__index__", "tolist",
               "cpu", "numpy", "cuda"}

    def __init__(self):
        super().__init__()
        self.calls, self.paused = [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if not self.paused:
            moves = name == "to" and args and isinstance(args[0], torch.Tensor) and any(
                isinstance(a, (str, torch.device)) and torch.device(a) != args[0].device
                for a in (*args[1:], kwargs.get("device"))
                if a is not None
            )
            if name in self.FLAGGED or moves:
                self.calls.append(name)
        return func(*args, **kwargs)


@pytest.fixture
def host_traffic(monkeypatch):
    recorder = HostTraffic()
    launch = triton_cascade._launch

    def paused_launch(*args, **kwargs):
        recorder.paused = True
        try:
            launch(*args, **kwargs)
        finally:
            recorder.paused = False

    monkeypatch.setattr(triton_cascade, "_launch", paused_launch)
    return recorder


def test_recorder_catches_host_data_and_syncs(host_traffic):
    """The recorder itself can fail: each of these is a copy or a sync on a GPU."""
    t = torch.ones(2, device=DEVICE)
    with host_traffic:
        torch.tensor([1e-5, 1e-5], device=DEVICE)
        float(t[0])
        t[1].item()
        t.tolist()
    assert host_traffic.calls == ["tensor", "__float__", "item", "tolist"]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_calls_copy_nothing_from_the_host_and_never_sync(host_traffic, momentum):
    """Eval (first call and cached), training forward + backward with running-stat updates."""
    fused_cascade.clear_cache()
    stages = make_stages(1, 3)
    stages[1].norm.eps = 1e-3  # per-stage eps stay Python floats
    for stage in stages:
        stage.norm.momentum = momentum
    y = torch.randn(2, 2, 4, 5, device=DEVICE, requires_grad=True)
    with host_traffic:
        out = cascade_concat(y, stages, fused=True)
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            cascade_concat(y, stages.eval(), fused=True)
            cascade_concat(y, stages, fused=True)
    assert host_traffic.calls == []


def _device_work(func_name: str) -> bool:
    """Ops that launch device work (not views, not allocations)."""
    views = {"view", "select", "unbind", "slice", "alias", "as_strided", "unsqueeze", "detach", "t",
             "reshape", "expand", "_unsafe_view", "split", "chunk"}
    return func_name not in views and not func_name.startswith(("empty", "new_empty"))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count_host_work(call):
    """``(torch ops that do device work, Triton launches)`` of ``call()``, kernels not executed."""
    launches = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_cascade, "_launch", lambda kernel, grid, *a, **k: launches.append(kernel))
        with OpCounter() as counter:
            call()
    return [op for op in counter.ops if _device_work(op)], len(launches)


def test_kernels_launch_on_the_inputs_gpu(monkeypatch):
    """Triton launches on the current device: every entry point makes its input's GPU current."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    made_current = []

    @contextmanager
    def device(d):
        made_current.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    guarded = triton_cascade._on_tensor_device(lambda first, second: (first, second))
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert guarded(on_gpu1, 2) == (on_gpu1, 2) and made_current == [torch.device("cuda", 1)]
    assert guarded(torch.zeros(1), 3)[1] == 3 and len(made_current) == 1  # CPU tensors: no guard
    for entry in (triton_cascade.eval_cascade, triton_cascade.train_forward, triton_cascade.train_backward):
        assert entry.__wrapped__.__code__ is not entry.__code__, entry.__name__


def test_launch_and_op_budget():
    """Host work per call (before this change: eval 12 device ops, N=4 train 44 ops + 8 launches).

    Eval with a warm cache: one launch and no other device op. Training forward + backward:
    ``2 S + 1`` launches forward, ``2 S + 2`` backward, and only the running-stat updates (foreach,
    one per buffer kind), the counter increment and the gradients' layout ops around them.
    """
    fused_cascade.clear_cache()
    stages = make_stages(2, 4).eval()
    y = torch.randn(1, 4, 5, 6, device=DEVICE)
    with torch.no_grad():
        cascade_concat(y, stages, fused=True)  # builds the cache
        ops, launches = count_host_work(lambda: cascade_concat(y, stages, fused=True))
    assert (ops, launches) == ([], 1)
    stages.train()
    y.requires_grad_()

    def step():
        out = cascade_concat(y, stages, fused=True)
        out.backward(torch.ones_like(out))

    step()
    ops, launches = count_host_work(step)
    S = 3
    assert launches == (2 * S + 1) + (2 * S + 2)
    running_stats = ("_foreach_add_", "_foreach_mul_", "add_", "mul_")
    cascade_ops = [op for op in ops if op not in running_stats and op != "ones_like"]
    # stack x3 (weights and affine change every step: rebuilt), autograd's accumulation of y.grad
    assert len(cascade_ops) <= 8, cascade_ops
    assert len(ops) <= 8 + 2 * 3 + 3 * S + 4, ops  # foreach on CUDA; CPU's foreach loops per tensor


def count_module_getattr(call) -> int:
    """How many attribute reads ``call()`` makes through ``nn.Module.__getattr__`` (kernels not executed)."""
    original = nn.Module.__getattr__
    reads = []

    def counting(module, name):
        reads.append(name)
        return original(module, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn.Module, "__getattr__", counting)
        patch.setattr(triton_cascade, "_launch", lambda *a, **k: None)
        call()
    return len(reads)


def test_dispatch_reads_no_module_attribute_through_getattr():
    """Host time per call: ``nn.Module.__getattr__`` costs about a microsecond a read, and the dispatch
    and cache key once made 134 of them per eval call (docs/fused.md: eval 235 -> 84 us of host time
    per call on the 2-core dev VM). The checks and keys read the modules' own dicts instead; this
    counts the reads, it does not time them."""
    fused_cascade.clear_cache()
    stages = make_stages(2, 8).eval()  # TinyU-Net's N = 8: seven stages
    y = torch.randn(1, 4, 5, 6, device=DEVICE)
    with torch.no_grad():
        cascade_concat(y, stages, fused=True)  # builds the cache
        assert count_module_getattr(lambda: cascade_concat(y, stages, fused=True)) == 0
    stages.train()
    y.requires_grad_()
    assert count_module_getattr(lambda: cascade_concat(y, stages, fused=True)) == 0


def test_cache_follows_parameter_updates():
    fused_cascade.clear_cache()
    stages = make_stages(2, 3).eval()
    y = torch.randn(1, 4, 6, 5, device=DEVICE)

    def check():
        with torch.no_grad():
            out = cascade_concat(y, stages, fused=True)
            torch.testing.assert_close(out, cascade_concat_reference(y, stages), rtol=1e-5, atol=1e-5)

    check()
    assert stages in fused_cascade._cache
    with torch.no_grad():
        stages[0].conv.weight.mul_(2)  # in place: _version moves
        stages[1].norm.running_var.add_(1)
    check()
    stages[1].norm.weight = nn.Parameter(torch.full_like(stages[1].norm.weight, 3.0))  # a new tensor
    check()
    stages[1].norm.bias.data = torch.randn_like(stages[1].norm.bias)  # new storage under the same Parameter
    check()
    stages[0].norm.eps = 0.5
    check()
    # An optimizer step in training mode, then eval again: running stats and weights both moved.
    stages.train()
    optimizer = torch.optim.SGD(stages.parameters(), lr=0.5)
    yt = torch.randn(2, 4, 6, 5, device=DEVICE)
    cascade_concat(yt, stages, fused=True).square().sum().backward()
    optimizer.step()
    stages.eval()
    check()
    from cmrf.ops import clear_fused_cache

    clear_fused_cache()
    assert len(fused_cascade._cache) == 0
    check()


def test_cache_sees_running_statistics_a_reference_training_forward_updated():
    """BatchNorm's own training forward (the reference path: reference_only(), fused=False, a
    hook) updates running_mean/var in place without moving their ``_version``: the folded eval
    weights stayed cached from before, off by 8e-2 (only ``num_batches_tracked`` is versioned)."""
    fused_cascade.clear_cache()
    stages = make_stages(2, 4).eval()
    y = torch.randn(2, 4, 6, 5, device=DEVICE)
    with torch.no_grad():
        cascade_concat(y, stages, fused=True)  # folds and caches
        stages.train()
        with reference_only():
            for _ in range(5):
                cascade_concat(torch.randn(2, 4, 6, 5, device=DEVICE) * 3 + 1, stages)
        stages.eval()
        torch.testing.assert_close(cascade_concat(y, stages, fused=True), cascade_concat_reference(y, stages),
                                   rtol=1e-5, atol=1e-5)


def test_global_module_hooks_take_the_reference():
    """Hooks registered for every module (``register_module_forward_hook``) reach the stages on the
    reference path; the fused path skipped them silently."""
    from torch.nn.modules.module import register_module_forward_hook

    stages = make_stages(2, 3).eval()
    y = torch.randn(1, 4, 5, 5, device=DEVICE)
    calls = []
    handle = register_module_forward_hook(lambda module, inputs, output: calls.append(type(module).__name__))
    try:
        assert "hooks" in fused_unsupported_reason(y, stages)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forced and unavailable: the reference, with a warning
            cascade_concat(y, stages, fused=True)
    finally:
        handle.remove()
    assert calls.count("BatchNorm2d") == len(stages)
    assert fused_unsupported_reason(y, stages) is None


@pytest.mark.parametrize("train", [False, True])
def test_forward_mode_ad_takes_the_reference(train):
    """Inside ``torch.autograd.forward_ad`` the kernels dropped the tangent (or, with autograd on,
    failed for want of a jvp); the reference carries it."""
    import torch.autograd.forward_ad as fwAD

    stages = make_stages(2, 3).train(train)
    ref_stages = copy.deepcopy(stages)
    y, tangent = torch.randn(2, 4, 5, 5, device=DEVICE), torch.randn(2, 4, 5, 5, device=DEVICE)
    with fwAD.dual_level():
        assert "forward-mode AD" in fused_unsupported_reason(y, stages)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fwAD.unpack_dual(cascade_concat(fwAD.make_dual(y, tangent), stages, fused=True)).tangent
        expected = fwAD.unpack_dual(cascade_concat_reference(fwAD.make_dual(y, tangent), ref_stages)).tangent
    torch.testing.assert_close(got, expected)


def test_stages_that_mix_running_statistics_tracking_take_the_reference():
    """``track_running_stats`` switched off on one stage after construction (its buffers remain):
    the fused path updated every stage's statistics as the first stage's setting said."""
    stages = make_stages(2, 3).train()
    stages[1].norm.track_running_stats = False
    y = torch.randn(2, 4, 5, 5, device=DEVICE)
    assert "mix" in fused_unsupported_reason(y, stages)
    ref_stages = copy.deepcopy(stages)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cascade_concat(y, stages, fused=True)
        cascade_concat_reference(y, ref_stages)
    for norm, ref in zip(stages, ref_stages):
        torch.testing.assert_close(norm.norm.running_mean, ref.norm.running_mean)
        assert int(norm.norm.num_batches_tracked) == int(ref.norm.num_batches_tracked)


def test_a_norm_whose_affine_weight_is_not_a_parameter_takes_the_reference():
    stages = make_stages(2, 3).eval()
    norm = stages[1].norm
    weight = norm.weight.detach() * 2
    del norm.weight
    norm.weight = weight  # a plain tensor attribute, as a reparametrization leaves it
    y = torch.randn(1, 4, 5, 5, device=DEVICE)
    assert "other than as parameters" in fused_unsupported_reason(y, stages)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(cascade_concat(y, stages, fused=True), cascade_concat_reference(y, stages))


@pytest.mark.parametrize("value", ["false", "0", 0, 1])
def test_a_fused_setting_that_is_not_a_bool_is_refused(value):
    """``module.fused = "false"`` read as on (a non-empty string is truthy)."""
    stages = make_stages(2, 3).eval()
    with pytest.raises(ValueError, match=f"fused must be True, False or None \\(auto\\), got {value!r}"):
        cascade_concat(torch.randn(1, 4, 5, 5, device=DEVICE), stages, fused=value)


def test_stages_a_cuda_graph_captured_are_never_cached_again(monkeypatch):
    """A replay rewrites the captured weights on the device without bumping their versions (the
    keys' host-side counters): an eager call after replays got what was derived before them."""
    import types

    captured, other = make_stages(2, 3).eval(), make_stages(2, 3).eval()
    on_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert fused_cascade._caching_allowed(on_cuda, captured)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not fused_cascade._caching_allowed(on_cuda, captured)  # capturing: no cache, as before
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not fused_cascade._caching_allowed(on_cuda, captured)  # ... and after it, for those stages
    assert fused_cascade._caching_allowed(on_cuda, other)
    assert fused_cascade._caching_allowed(on_cuda, list(other))  # (a list: never cached anyway)


def test_stages_given_as_a_list_run_uncached():
    stages = make_stages(2, 3).eval()
    y = torch.randn(1, 4, 5, 5, device=DEVICE)
    with torch.no_grad():
        expected = cascade_concat_reference(y, stages)
        torch.testing.assert_close(cascade_concat(y, list(stages), fused=True), expected)


def test_expanded_gradient_and_tolerance_1e3():
    """A gradient expanded over the batch (stride 0) reaches the backward kernels as it is."""
    stages = make_stages(2, 3, seed=5)
    ref_stages = copy.deepcopy(stages)
    y = torch.randn(3, 4, 7, 5, device=DEVICE)
    grad = torch.randn(1, 6, 7, 5, device=DEVICE).expand(3, 6, 7, 5)
    y_fused, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    cascade_concat(y_fused, stages, fused=True).backward(grad)
    cascade_concat_reference(y_ref, ref_stages).backward(grad)
    assert_grad_close(y_fused.grad, y_ref.grad, rtol=1e-3)
    assert_stages_match(stages, ref_stages, rtol=1e-3)


def test_torch_compile_training_step_in_one_graph():
    """fwd + bwd + running-stat updates traced with fullgraph=True, equal to eager."""
    torch._dynamo.reset()
    model = CMRF(4, 16, N=4, fused=True).to(DEVICE)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 6, device=DEVICE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    triton_cascade.launch_counts.clear()
    out = compiled(x)
    out.square().sum().backward()
    assert triton_cascade.launch_counts["_stage_forward_kernel"] == 3
    assert triton_cascade.launch_counts["_stage_backward_kernel"] == 4
    expected = reference(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    scale = max(r.grad.abs().max().item() for r in reference.parameters())
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_grad_close(p.grad, q.grad, rtol=1e-3, scale=scale)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tile_configs_for_sweeps(monkeypatch):
    """Every candidate of eval_configs / train_configs runs (forced) and matches the reference."""
    H, W, N = 11, 9, 3
    eval_candidates = fused_cascade.eval_configs(H, W, N - 1)
    train_candidates = fused_cascade.train_configs(H, W)
    assert eval_candidates[0] == fused_cascade.default_eval_config(H, W, N - 1)
    assert train_candidates[0] == fused_cascade.default_train_config(H, W)
    assert any(c.single_launch for c in eval_candidates) and any(not c.single_launch for c in eval_candidates)
    assert len({c.name for c in eval_candidates}) == len(eval_candidates)
    stages = make_stages(1, N, seed=7)
    y = torch.randn(1, 2, H, W, device=DEVICE)
    with torch.no_grad():
        expected = cascade_concat_reference(y, stages.eval())
    # The interpreter ignores num_warps: one config per block shape is enough here.
    for config in {(c.block_h, c.block_w, c.single_launch): c for c in eval_candidates}.values():
        triton_cascade.launch_counts.clear()
        with fused_cascade.force_config(config), torch.no_grad():
            out = cascade_concat(y, stages, fused=True)
        kernel = "_eval_cascade_kernel" if config.single_launch else "_stage_forward_kernel"
        assert set(triton_cascade.launch_counts) == {kernel}, config
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    stages.train()
    for config in list({(c.block_h, c.block_w): c for c in train_candidates}.values())[:3]:
        with fused_cascade.force_config(config):
            (out, y_fused), (expected_train, y_ref), ref_stages = run_both(y, copy.deepcopy(stages))
        torch.testing.assert_close(out, expected_train, rtol=1e-5, atol=1e-5)
        assert_grad_close(y_fused.grad, y_ref.grad, rtol=1e-3)
    narrow = fused_cascade.TileConfig("eval", 4, 4, single_launch=True)
    with pytest.raises(ValueError, match="halo"), fused_cascade.force_config(narrow), torch.no_grad():
        cascade_concat(y, make_stages(1, 4).eval(), fused=True)
    with pytest.raises(ValueError, match="power of two"):
        fused_cascade.TileConfig("train", 12, 64)
    with pytest.raises(TypeError, match="TileConfig"), fused_cascade.force_config((16, 64)):
        pass


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_eval_and_training():
    stages = make_stages(4, 8)
    ref_stages = copy.deepcopy(stages)
    y = torch.randn(2, 8, 32, 32, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 32, 32, 32, device=DEVICE)

    def step():
        out = cascade_concat(y, stages, fused=True)
        out.backward(grad)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (compiles kernels) outside capture, as CUDA graphs require
            y.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    # Reset the buffers so that graph replay and the reference see the same history.
    stages.load_state_dict(ref_stages.state_dict())
    graph = torch.cuda.CUDAGraph()
    y.grad = None
    for p in stages.parameters():
        p.grad = None  # allocated (then rewritten at each replay) inside the graph
    with torch.cuda.graph(graph):
        out = step()
    stages.load_state_dict(ref_stages.state_dict())
    graph.replay()
    y_ref = y.detach().clone().requires_grad_()
    expected = cascade_concat_reference(y_ref, ref_stages)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert_grad_close(y.grad, y_ref.grad, rtol=1e-3)
    assert_stages_match(stages, ref_stages, rtol=1e-3)
    stages.eval()
    with torch.no_grad():
        cascade_concat(y, stages, fused=True)
        eval_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(eval_graph):
            eval_out = cascade_concat(y, stages, fused=True)
        eval_graph.replay()
        torch.testing.assert_close(eval_out, cascade_concat_reference(y, stages), rtol=1e-4, atol=1e-4)


def test_profiling_counts_a_fused_cmrf_like_the_reference():
    """The counters hook every stage's convolution: a fused CMRF must still run them for profiling,
    as the reference, quietly (not as a forced fused call that refuses hooked stages and warns)."""
    from cmrf.profile import count_paper_flops

    x = torch.randn(1, 8, 8, 8, device=DEVICE)
    blocks = [CMRF(8, 16, N=4, fused=fused).to(DEVICE).eval() for fused in (False, True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counts = [count_paper_flops(block, x) for block in blocks]
    assert counts[0] == counts[1] > 0
