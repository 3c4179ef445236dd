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

import copy
import subprocess
import sys
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cmrf.layers import CMRF
from cmrf.ops import cascade as cascade_module
from cmrf.ops.cascade import (
    FusedUnavailableError,
    cascade_concat,
    cascade_concat_reference,
    fused_unsupported_reason,
    reference_only,
)

pytest.importorskip("triton")
from cmrf.ops import triton_cascade  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


@pytest.mark.parametrize("N", [2, 4, 8])
def test_training_forward_backward_and_running_stats(N):
    stages = make_stages(2, N)
    y = torch.randn(2, 4, 9, 11, device=DEVICE)
    (out, y_fused), (expected, y_ref), ref_stages = run_both(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(y_fused.grad, y_ref.grad)
    assert_stages_match(stages, ref_stages)


@pytest.mark.parametrize("N", [2, 4, 8])
def test_inference_folded_matches(N):
    stages = make_stages(3, N).eval()
    y = torch.randn(2, 6, 13, 7, device=DEVICE)
    with torch.no_grad():
        out = cascade_concat(y, stages, fused=True)
        expected = cascade_concat_reference(y, stages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eval_mode_with_gradients():
    """Frozen-BatchNorm fine-tuning: running statistics normalise, nothing is updated."""
    stages = make_stages(2, 4).eval()
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
    assert counts == {"_stage_forward_kernel": 3, "_affine_kernel": 1, "_stage_backward_kernel": 4}
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_dispatch_rules(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_cascade, "cascade_concat_fused", lambda y, s: calls.append("fused") or y)
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
        cascade_concat(y, stages, fused=True)
    assert len(calls) == 2
    monkeypatch.setenv("CMRF_FUSED", "auto")
    cascade_concat(y, stages)
    assert len(calls) == (3 if DEVICE == "cuda" else 2)  # auto: Triton for CUDA tensors only
    monkeypatch.setenv("CMRF_FUSED", "maybe")
    with pytest.raises(ValueError, match="CMRF_FUSED.*'maybe'"):
        cascade_concat(y, stages)


@pytest.mark.skipif(DEVICE == "cuda", reason="a CPU tensor is what cannot run without the interpreter")
def test_forced_on_cpu_without_interpreter_names_cuda_and_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    stages = make_stages(1, 2)
    with pytest.raises(FusedUnavailableError, match="CUDA") as info:
        cascade_concat(torch.randn(1, 2, 3, 3), stages, fused=True)
    assert "Triton" in str(info.value) and "CMRF_FUSED=0" in str(info.value)


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

def compile_kernel(kernel, dtype, constexprs, ones):
    signature, constants = {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = constexprs.get(name, 1 if name in ones else None)
        if value is not None:
            signature[name], constants[(index,)] = "constexpr", value
        elif name.endswith("_ptr"):
            signature[name] = "*" + (dtype if name in IO else "fp32")
        else:
            signature[name] = "i32"
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
