"""``cmrf.ops.upsample``: every x2 formulation equals ``F.interpolate`` forward and backward."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import cmrf.ops.upsample as up
from cmrf import TinyUNet
from cmrf.ops.upsample import METHODS, choose_method, upsample2x, upsample_to, use_method
from tests.conftest import requires_onnx_exporter

FAST = [m for m in METHODS if m != "interpolate"]
# (mode, input shape): odd sides, 1x1 and 2x2 inputs where every tap is clamped to the border.
CASES = [
    ("bicubic", (2, 3, 5, 7)),
    ("bicubic", (1, 2, 1, 1)),
    ("bicubic", (1, 2, 2, 2)),
    ("bicubic", (1, 1, 1, 6)),
    ("bilinear", (2, 2, 3, 1)),
    ("trilinear", (1, 2, 3, 1, 4)),
    ("trilinear", (1, 1, 2, 2, 2)),
    ("linear", (2, 3, 5)),
]


def _double(shape):
    return tuple(2 * s for s in shape[2:])


def _fwd_bwd(x, size, mode, method):
    x = x.detach().requires_grad_(True)
    if method == "oracle":
        out = F.interpolate(x, size=size, mode=mode, align_corners=False)
    else:
        out = upsample_to(x, size, mode, method=method)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).flip(-1)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out, grad


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_batch_upsamples_forward_and_backward(method):
    """pixel_shuffle's backward (the "conv" method, CUDA's default with a backward) refused an
    empty batch."""
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = upsample_to(x, (8, 8), "bicubic", method=method)
    out.sum().backward()
    assert out.shape == (0, 3, 8, 8) and x.grad.shape == x.shape


@pytest.mark.parametrize("method", [m for m in FAST if m in ("conv", "matmul")])  # the cached ones
def test_training_after_validation_under_inference_mode(method):
    """Validate under torch.inference_mode(), then train: the cached upsampling constants made
    during validation must not be inference tensors (autograd refuses to save those)."""
    model = _tiny(2)
    x = torch.randn(2, 3, 16, 32)
    up._CACHE.clear()
    with use_method(method):
        with torch.inference_mode():
            model.eval()(x)
        out = model.train()(x)
        out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_constants_a_cuda_graph_captured_are_never_evicted(monkeypatch):
    """A captured graph holds the addresses of the cached kernels it read: evicting one would let
    later replays read freed memory. Capture is simulated (no GPU needed)."""
    monkeypatch.setattr(up, "_CACHE", {})
    monkeypatch.setattr(up, "_CAPTURED", {})
    monkeypatch.setattr(up, "_capturing", lambda value: True)
    captured = up._cached(("kernel", "captured"), lambda: torch.ones(3))
    monkeypatch.setattr(up, "_capturing", lambda value: False)
    for i in range(2 * up._CACHE_LIMIT):  # enough new entries to clear the cache at least once
        up._cached(("kernel", i), lambda: torch.zeros(1))
    assert ("kernel", "captured") not in up._CACHE
    assert up._cached(("kernel", "captured"), lambda: torch.full((3,), 2.0)) is captured
    assert up._cached(("kernel", 0), lambda: torch.zeros(1)) is not None  # others are rebuilt


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize(("mode", "shape"), CASES)
def test_float64_is_exact(method, mode, shape):
    x = torch.randn(shape, dtype=torch.float64)
    out, grad = _fwd_bwd(x, _double(shape), mode, method)
    ref, ref_grad = _fwd_bwd(x, _double(shape), mode, "oracle")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)


@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    c=st.integers(1, 4),
    method=st.sampled_from(FAST),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
)
def test_float32_matches_interpolate_any_size_and_layout(h, w, c, method, layout):
    x = torch.randn(2, c, h, w)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(2, c, w, h).transpose(2, 3)  # non-contiguous view with the same shape
    out, grad = _fwd_bwd(x, (2 * h, 2 * w), "bicubic", method)
    ref, ref_grad = _fwd_bwd(x, (2 * h, 2 * w), "bicubic", "oracle")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_exact_result(method, dtype):
    x = torch.randn(2, 4, 6, 5).to(dtype)
    truth = F.interpolate(x.double(), size=(12, 10), mode="bicubic", align_corners=False)
    out = upsample_to(x, (12, 10), "bicubic", method=method)
    oracle = F.interpolate(x, size=(12, 10), mode="bicubic", align_corners=False)
    assert out.dtype == dtype
    # A few roundings of the low-precision dtype, as many as the oracle's own error allows.
    tol = 4 * torch.finfo(dtype).eps * (truth.abs() + 1)
    assert ((out.double() - truth).abs() <= tol + (oracle.double() - truth).abs()).all()


@pytest.mark.parametrize("method", FAST)
def test_backward_is_deterministic(method):
    x = torch.randn(2, 8, 9, 7)
    grads = [_fwd_bwd(x, (18, 14), "bicubic", method)[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_non_2x_sizes_fall_back_to_interpolate(monkeypatch):
    calls = []
    monkeypatch.setattr(up, "upsample2x", lambda *a, **k: calls.append(a) or pytest.fail("fast path"))
    x = torch.randn(1, 2, 4, 5)
    for size in [(9, 10), (8, 11), (4, 5), (16, 20)]:
        for method in METHODS:
            out = upsample_to(x, size, "bicubic", method=method)
            torch.testing.assert_close(out, F.interpolate(x, size=size, mode="bicubic", align_corners=False))
    assert calls == []


def test_exact_2x_takes_the_chosen_fast_path(monkeypatch):
    seen = []
    original = up.upsample2x
    def record(x, mode, method):
        seen.append(method)
        return original(x, mode, method)

    monkeypatch.setattr(up, "upsample2x", record)
    x = torch.randn(1, 2, 4, 5)
    with use_method("separable"):
        upsample_to(x, (8, 10), "bicubic")
    upsample_to(x, (8, 10), "bicubic", method="conv")
    assert seen == ["separable", "conv"]


def test_reference_only_takes_interpolate_over_every_override(monkeypatch):
    from cmrf.ops import reference_only

    x = torch.randn(1, 2, 4, 5)
    monkeypatch.setattr(up, "_ENV_METHOD", "matmul")
    with use_method("conv"):
        assert choose_method(x) == "conv"
        with reference_only():
            assert choose_method(x) == "interpolate"


def test_bad_arguments_name_the_value(monkeypatch):
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="'nearest'"):
        upsample_to(x, (4, 4), "nearest")
    with pytest.raises(ValueError, match="'fast'"):
        upsample_to(x, (4, 4), "bicubic", method="fast")
    with pytest.raises(ValueError, match="'fast'"), use_method("fast"):
        pass
    with pytest.raises(ValueError, match=r"'bicubic' takes \(B, C\) and 2 spatial side.*\(1, 1, 2, 2, 2\)"):
        upsample_to(torch.randn(1, 1, 2, 2, 2), (4, 4, 4), "bicubic")
    with pytest.raises(ValueError, match="'trilinear' takes"):
        upsample_to(torch.randn(1, 1, 2, 2, 2), (4, 4), "trilinear")
    monkeypatch.setenv(up.UPSAMPLE_ENV, "Matmul ")
    assert up._read_env() == "matmul"
    monkeypatch.setenv(up.UPSAMPLE_ENV, "cubic")
    monkeypatch.setattr(up, "_ENV_METHOD", up._read_env())  # read at import: no error then
    with pytest.raises(ValueError, match="CMRF_UPSAMPLE.*'cubic'"):
        up.env_method()  # raised where the value is used


def _fake(device, shape, dtype=torch.float32, requires_grad=False):
    device = torch.device(device)
    return types.SimpleNamespace(device=device, shape=shape, dtype=dtype, requires_grad=requires_grad)


def test_choice_rule(monkeypatch):
    monkeypatch.setattr(up, "_ENV_METHOD", None)
    monkeypatch.setattr(up, "_tf32_products_allowed", lambda: False)  # PyTorch's default
    assert choose_method(torch.randn(1, 2, 16, 16)) == "matmul"
    assert choose_method(torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)) == "interpolate"
    assert choose_method(_fake("cpu", (1, 2, 256, 8))) == "interpolate"
    # the measured limits (docs/upsampling.md): sides up to 128 in 2D, 16 in 3D
    assert choose_method(_fake("cpu", (1, 2, 128, 128))) == "matmul"
    assert choose_method(_fake("cpu", (1, 2, 129, 8))) == "interpolate"
    assert choose_method(_fake("cpu", (1, 2, 16, 16, 16)), "trilinear") == "matmul"
    assert choose_method(_fake("cpu", (1, 2, 17, 8, 8)), "trilinear") == "interpolate"
    # CUDA bicubic (H200, docs/upsampling.md): matmul, except a forward from 128 x 128 pixels
    assert choose_method(_fake("cuda", (16, 128, 128, 127))) == "matmul"
    assert choose_method(_fake("cuda", (16, 128, 128, 128))) == "interpolate"
    assert choose_method(_fake("cpu", (1, 2, 8, 8, 8)), "trilinear") == "matmul"
    assert choose_method(_fake("cpu", (1, 2, 32, 32, 32)), "trilinear") == "interpolate"
    assert choose_method(_fake("cuda", (16, 128, 128, 128), requires_grad=True)) == "matmul"
    assert choose_method(_fake("cuda", (16, 128, 128, 128))) == "interpolate"
    assert choose_method(_fake("cuda", (16, 512, 16, 16), torch.bfloat16)) == "matmul"
    assert choose_method(_fake("cuda", (16, 512, 16, 16)), "bilinear") == "separable"
    assert choose_method(_fake("cuda", (16, 512, 16, 16), requires_grad=True), "bilinear") == "separable"
    assert choose_method(_fake("cuda", (1, 8, 8, 8, 8), requires_grad=True), "trilinear") == "separable"
    # beyond the measured sides (128): the conv form, as before the H200 figures
    assert choose_method(_fake("cuda", (2, 8, 129, 64), requires_grad=True)) == "conv"
    assert choose_method(_fake("cuda", (2, 8, 256, 256))) == "interpolate"
    # TF32 matrix products would round fp32/fp16 values: the exact slices and sums instead
    monkeypatch.setattr(up, "_tf32_products_allowed", lambda: True)
    assert choose_method(_fake("cuda", (16, 128, 128, 128), requires_grad=True)) == "separable"
    assert choose_method(_fake("cuda", (16, 512, 16, 16), torch.float16)) == "separable"
    assert choose_method(_fake("cuda", (16, 512, 16, 16), torch.bfloat16)) == "matmul"
    assert choose_method(_fake("cuda", (16, 512, 16, 16), torch.float64)) == "matmul"
    assert choose_method(_fake("cuda", (16, 128, 128, 128))) == "interpolate"
    monkeypatch.setattr(up, "_tf32_products_allowed", lambda: False)
    with use_method("conv"):
        assert choose_method(torch.randn(1, 2, 4, 4)) == "conv"
        assert choose_method(torch.randn(1, 2, 4, 4, 4), "trilinear") == "separable"
    traced = torch.jit.trace(lambda t: torch.tensor(len(choose_method(t))), torch.randn(1, 2, 4, 4))
    assert traced(torch.randn(1, 2, 4, 4)).item() == len("interpolate")
    monkeypatch.setattr(up, "_ENV_METHOD", "separable")
    assert choose_method(torch.randn(1, 2, 4, 4)) == "separable"


def test_autocast_keeps_the_input_dtype():
    x = torch.randn(1, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for method in FAST:
            out = upsample_to(x, (8, 8), "bicubic", method=method)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode="bicubic"))


def _tiny(spatial_dims=2):
    return TinyUNet(channels=(8, 16, 16, 32), N=4, spatial_dims=spatial_dims)


def _net_fwd_bwd(model, x, method):
    model.zero_grad()
    with use_method(method):
        out = model(x)
        out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (17, 24)), (3, (16, 16, 16))])
def test_tinyunet_matches_interpolate_version(spatial_dims, size):
    model = _tiny(spatial_dims).train()
    x = torch.randn(2, 3, *size)
    ref_out, ref_grads = _net_fwd_bwd(model, x, "interpolate")
    for method in FAST:
        out, grads = _net_fwd_bwd(model, x, method)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("method", FAST)
def test_compile_fullgraph(method):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    fn = torch.compile(lambda t: upsample_to(t, (10, 12), "bicubic", method=method), backend="aot_eager",
                       fullgraph=True)
    out = fn(x)
    out.sum().backward()
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode="bicubic"), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_tinyunet_compiles_fullgraph():
    model = _tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), model(x))
    torch._dynamo.reset()


def test_static_export_uses_the_fast_path():
    class Up(torch.nn.Module):
        def forward(self, x):
            return upsample_to(x, (8, 10), "bicubic")

    ep = torch.export.export(Up(), (torch.randn(1, 2, 4, 5),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("upsample_bicubic2d" in t for t in targets)
    x = torch.randn(1, 2, 4, 5)
    torch.testing.assert_close(ep.module()(x), F.interpolate(x, scale_factor=2, mode="bicubic"))


@pytest.mark.parametrize("sides", ["multiples of 16", "any"])
def test_dynamic_export_from_the_documented_minimum(sides):
    """torch.export with dynamic H and W works from 16 (issue #10): sides that are multiples of 16
    on every torch tested (2.11, 2.14); any side from 16 on torch 2.14, while torch 2.11 adds guards
    on the sides' parity (checked) and so refuses a range that holds odd sides."""
    from torch.export import Dim

    if sides == "any" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 14):
        pytest.skip(f"dynamic export of any side is tested from torch 2.14, this is {torch.__version__}")
    model = _tiny().eval()
    if sides == "any":
        h, w = Dim("h", min=16, max=1024), Dim("w", min=16, max=1024)
        sizes = [(16, 16), (16, 64), (17, 23), (48, 32)]
    else:
        h, w = 16 * Dim("h16", min=1, max=64), 16 * Dim("w16", min=1, max=64)
        sizes = [(16, 16), (16, 64), (48, 32), (80, 16)]
    ep = torch.export.export(model, (torch.randn(1, 3, 32, 48),), dynamic_shapes=({2: h, 3: w},))
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=1e-5)


@requires_onnx_exporter
def test_onnx_export_of_the_plain_model_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from cmrf import export_onnx

    model = _tiny().eval()
    path = export_onnx(model, tmp_path / "tiny.onnx", (1, 3, 32, 32), optimize=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = session.run(None, {"input": x.numpy()})
    assert abs(got - expected).max() < 1e-4


def test_measure_reports_every_method():
    rows = up.measure([(1, 2, 3, 4)], repeat=1)
    assert [r["method"] for r in rows] == list(METHODS)
    assert all(r["max_diff"] < 1e-5 for r in rows)
    table = up.format_measurements(rows)
    assert table.count("\n") == 1 + len(METHODS) and "| (1, 2, 3, 4) | float32 | matmul |" in table
    expected = [(16, 512, 16, 16), (16, 512, 32, 32), (16, 256, 64, 64), (16, 128, 128, 128)]
    assert up.decoder_shapes(16) == expected


def test_is_exporting_is_true_under_torch_export_only(monkeypatch):
    """Export and compile get different upsampling choices, so they must be told apart. Dynamo in
    torch 2.11 folds torch.compiler.is_exporting() to True under torch.compile: is_exporting()
    reads the flag instead (simulated here by making the function lie)."""
    from cmrf.ops.upsample import is_exporting

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(is_exporting())
            return x + 1

    x = torch.randn(2, 3)
    assert not is_exporting()
    torch.compile(Probe(), backend="eager", fullgraph=True)(x)
    if hasattr(torch.compiler, "is_exporting"):
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # what 2.11's Dynamo answers
        torch._dynamo.reset()
        torch.compile(Probe(), backend="eager", fullgraph=True)(x)
        monkeypatch.undo()
    torch.export.export(Probe(), (x,))
    if hasattr(torch.compiler, "_is_exporting_flag"):
        assert seen == [False] * (len(seen) - 1) + [True]
    else:  # torch 2.4/2.6: no flag to read, torch.export is not seen
        assert not any(seen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode, shape", [("bicubic", (2, 8, 13, 17)), ("bilinear", (2, 3, 9, 6)),
                                         ("trilinear", (1, 4, 5, 6, 7))])
@pytest.mark.parametrize("method", ["separable", "matmul"])
def test_half_precision_rounds_once_as_interpolate_does(dtype, mode, shape, method):
    """Per axis, the weighted sums were rounded to fp16/bf16 at every term: up to 1.5 ulp at |x| ~ 4
    (hundreds of ulps near zero) from F.interpolate, which accumulates in fp32 and rounds once."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).to(dtype)
    expected = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False).float()
    got = upsample2x(x, mode, method)
    assert got.dtype == dtype
    ulps = (got.float() - expected).abs() / (expected.abs().clamp_min(1e-3) * torch.finfo(dtype).eps)
    assert ulps.max().item() <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_a_channels_last_input_gives_a_channels_last_output(method):
    """As F.interpolate's: separable and matmul returned plain contiguous tensors."""
    x = torch.randn(1, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    out = upsample2x(x, "bicubic", method)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False))
    volume = torch.randn(1, 3, 4, 5, 3).contiguous(memory_format=torch.channels_last_3d)
    assert upsample2x(volume, "trilinear", method).is_contiguous(memory_format=torch.channels_last_3d)


def test_tf32_setting_is_read_from_either_api(monkeypatch):
    """torch.get_float32_matmul_precision() raises once the new fp32_precision API was used (torch
    2.14): every CUDA bicubic upsampling would have failed after the recommended TF32 setting."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(type(matmul), "fp32_precision") and not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert up._tf32_products_allowed() is True
        matmul.fp32_precision = "ieee"
        assert up._tf32_products_allowed() is False
        matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("high")  # the legacy API
        assert up._tf32_products_allowed() is True
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = "none"
        assert up._tf32_products_allowed() is False
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = saved
