"""optimize_for_inference's paths ("onednn", "fused", "plain"), CUDA graphs and banding.

Every path is compared with the original model in eval mode (the oracle) on random inputs: odd
sizes, channels-last and non-contiguous inputs, an empty batch, fp32 within 1e-4, and bf16/fp16
on the CPU within a tolerance stated at each test (rounding of 16-bit arithmetic, not a
different function). The fused path runs its Triton kernel in Triton's CPU interpreter here
(``TRITON_INTERPRET=1`` is set before ``cmrf.ops.triton_cascade`` is imported), on small shapes.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import warnings

import torch

# Without a GPU the fused path runs in Triton's interpreter; on a GPU machine the variable must not
# be set for the whole pytest process (the GPU tests compile the kernels), so the fused tests here,
# which run CPU tensors, skip there (tests/test_cuda.py covers the fused path on the GPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import cmrf.inference as inference  # noqa: E402
from cmrf import CMRF, TinyUNet, export_onnx, optimize_for_inference  # noqa: E402
from cmrf.inference import (  # noqa: E402
    CUDAGraphInference,
    FrozenCPUInference,
    GraphPerShape,
    InferenceCMRF,
    choose_path,
    run_in_bands,
)
from tests.conftest import (  # noqa: E402
    GOLDEN_EVAL_ATOL,
    fused_interpreter_problem,
    golden_state_dict,
    load_golden,
    randomise_batchnorm,
    requires_onnx_exporter,
)
from tests.test_inference import _max_diff  # noqa: E402

# The fp32 paths agree to ~1e-7 at outputs of order 0.1-1 (2e-6 at worst on large maps); 1e-5
# catches a tanh GELU or a BatchNorm eps of 1e-5 in the fast path, which 1e-4 let through.
TOL = 1e-5
# 16-bit storage: each layer rounds to 8 (bf16) or 11 (fp16) significant bits; 16 layers deep
# the logits (of order 0.4) drift by about 2e-3 (bf16) and 2e-4 (fp16) against the fp32 oracle,
# as much as the original model run in that dtype; the bounds leave a factor of 10.
TOL_16BIT = {torch.bfloat16: 0.02, torch.float16: 0.005}


def _fused_runs_here() -> bool:
    if not inference.triton_available() or fused_interpreter_problem():
        return False
    from cmrf.ops import triton_cascade

    return triton_cascade.INTERPRETED


needs_fused = pytest.mark.skipif(
    not _fused_runs_here(),
    reason="no Triton that runs the kernels here (missing, too old, or imported without TRITON_INTERPRET=1)",
)
PATH_PARAMS = ["onednn", "plain", pytest.param("fused", marks=needs_fused)]


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(3)
    return randomise_batchnorm(TinyUNet(channels=(6, 12), N=3)).eval()


def _variants(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x`` contiguous, channels-last and as a non-contiguous (transposed) view with equal values."""
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "non_contiguous": x.transpose(2, 3).contiguous().transpose(2, 3),
    }


# --- every path against the original --------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (2, 3, 19, 23)])
def test_every_path_equals_original(small_unet, path, shape):
    fast = optimize_for_inference(small_unet, path=path)
    assert fast.inference_path == path
    with torch.no_grad():
        expected = small_unet(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for name, variant in _variants(x).items():
            assert _max_diff(fast(variant), expected) < TOL, name


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_cmrf_blocks_in_any_model_every_path(path):
    model = nn.Sequential(CMRF(4, 12, N=3), CMRF(12, 12, N=2))  # the second is residual
    model = randomise_batchnorm(model).eval()
    fast = optimize_for_inference(model, path=path)
    assert all(isinstance(m, InferenceCMRF) for m in fast)
    x = torch.randn(2, 4, 13, 10)
    with torch.no_grad():
        assert _max_diff(fast(x), model(x)) < TOL


class _KeepsOutputs(nn.Module):
    """As MONAI's DynUNet(deep_supervision=True): the last forward's intermediate outputs kept in a
    list attribute, still in the autograd graph after a training step."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(CMRF(4, 8, N=2), CMRF(8, 8, N=2))
        self.heads = [torch.zeros(1)]

    def forward(self, x):
        hidden = self.blocks[0](x)
        self.heads[0] = hidden
        return self.blocks[1](hidden)


def _trained_keeping_model() -> _KeepsOutputs:
    model = _KeepsOutputs()
    model(torch.randn(2, 4, 16, 16)).sum().backward()  # the kept tensor now has a grad_fn
    assert model.heads[0].grad_fn is not None
    return model.eval()


def test_a_model_keeping_graph_tensors_in_attributes_is_optimized():
    """deepcopy refused the kept tensors ("Only Tensors created explicitly by the user (graph leaves)
    support the deepcopy protocol"): optimize_for_inference failed after a training step on a
    replace_blocks'd MONAI DynUNet with deep supervision."""
    model = _trained_keeping_model()
    kept = model.heads[0]
    fast = optimize_for_inference(model, path="plain")
    assert model.heads[0] is kept and kept.grad_fn is not None  # the original is left as it was
    assert fast.heads[0].grad_fn is None and torch.equal(fast.heads[0], kept.detach())
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert _max_diff(fast(x), model(x)) < TOL


@requires_onnx_exporter
@pytest.mark.filterwarnings("ignore:The tensor attribute self.heads")  # torch's word on the test model
def test_a_model_keeping_graph_tensors_in_attributes_is_exported(tmp_path):
    export_onnx(_trained_keeping_model(), tmp_path / "kept.onnx", input_size=(1, 4, 16, 16))
    assert (tmp_path / "kept.onnx").is_file()


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_empty_batch_gives_empty_output(small_unet, path):
    fast = optimize_for_inference(small_unet, path=path)
    with torch.no_grad():
        assert fast(torch.randn(0, 3, 32, 16)).shape == (0, 2, 32, 16)
        block = optimize_for_inference(randomise_batchnorm(CMRF(4, 8, N=2)).eval(), path=path)
        assert block(torch.randn(0, 4, 5, 7)).shape == (0, 8, 5, 7)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype the original would give
            for module, original, x in ((fast, small_unet, torch.randn(0, 3, 32, 16)),
                                        (block, CMRF(4, 8, N=2).eval(), torch.randn(0, 4, 5, 7))):
                assert module(x).dtype == original(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected 3 input channels"):
        fast(torch.randn(0, 4, 32, 32))  # still checked


@pytest.mark.parametrize("path", ["onednn", "plain"])
def test_volume_tinyunet_every_path(path):
    model = randomise_batchnorm(TinyUNet(in_channels=1, channels=(4, 8), N=2, spatial_dims=3)).eval()
    x = torch.randn(1, 1, 9, 12, 8)
    with torch.no_grad():
        assert _max_diff(optimize_for_inference(model, path=path)(x), model(x)) < TOL


def test_plain_path_matches_reference_golden_output():
    golden = load_golden("tinyunet_official.safetensors")
    model = TinyUNet()
    model.load_state_dict(golden_state_dict(golden))
    with torch.no_grad():
        out = optimize_for_inference(model, path="plain")(golden["input"])
    assert _max_diff(out, golden["output_eval"]) < GOLDEN_EVAL_ATOL  # as tight as the model's own check


# --- dtypes -----------------------------------------------------------------------------------


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        F.conv2d(torch.ones(1, 2, 4, 4, dtype=dtype), torch.ones(2, 1, 3, 3, dtype=dtype), groups=2)
        F.interpolate(torch.ones(1, 1, 4, 4, dtype=dtype), scale_factor=2, mode="bicubic")
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_take_the_plain_path(small_unet, dtype):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} convolution")
    half = TinyUNet(channels=(6, 12), N=3)
    half.load_state_dict(small_unet.state_dict())
    half = half.eval().to(dtype)
    fast = optimize_for_inference(half)
    assert fast.inference_path == "plain"
    assert all(p.dtype == dtype for p in fast.parameters())
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        expected = small_unet(x)
        got = fast(x.to(dtype))
    assert got.dtype == dtype
    assert _max_diff(got.float(), expected) < TOL_16BIT[dtype]


def test_cpu_autocast_bf16_falls_back_to_plain(small_unet, monkeypatch):
    fast = optimize_for_inference(small_unet)
    assert fast.inference_path == "onednn"
    calls = []
    monkeypatch.setattr(inference, "run_in_bands", lambda *a, **k: calls.append(1) or run_in_bands(*a, **k))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = small_unet(x)
        got = fast(x)
    assert not calls  # the CPU fp32 graph did not run under autocast
    assert _max_diff(got.float(), expected.float()) < TOL_16BIT[torch.bfloat16]
    with torch.no_grad():
        fast(x)
    assert calls  # and does run without it


def test_onednn_model_cast_after_building_runs_plain(small_unet):
    """A model built for the CPU fp32 graph and then cast runs the plain operators, correctly."""
    fast = optimize_for_inference(small_unet).double()
    x = torch.randn(1, 3, 24, 40, dtype=torch.float64)
    with torch.no_grad():
        assert _max_diff(fast(x), copy.deepcopy(small_unet).double()(x)) < 1e-6  # fp32-rounded folded weights


@needs_fused
def test_fused_model_in_float64_keeps_float64_precision(small_unet):
    """The kernels compute in fp32 at most: a float64 call takes the plain operators."""
    model = copy.deepcopy(small_unet).double()
    fast = optimize_for_inference(model, path="fused")
    x = torch.randn(1, 3, 16, 20, dtype=torch.float64)
    with torch.no_grad():
        assert _max_diff(fast(x), model(x)) < 1e-12  # fp32 kernels would give about 1e-8


@needs_fused
def test_fused_model_gives_input_gradients(small_unet):
    """A saliency map needs the input's gradient; the eval kernel has no backward, so such a call
    takes the plain operators, and the gradient is the original model's."""
    fast = optimize_for_inference(small_unet, path="fused")
    x = torch.randn(1, 3, 16, 20)
    grads = []
    for model in (fast, small_unet):
        leaf = x.clone().requires_grad_()
        model(leaf)[:, 1].sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


# --- choosing the path ------------------------------------------------------------------------


def test_choose_path_rules(monkeypatch):
    assert choose_path("cpu") == "onednn"
    assert choose_path(torch.device("cpu"), torch.float32) == "onednn"
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert choose_path("cpu", dtype) == "plain"
    monkeypatch.setattr(inference, "triton_available", lambda: True)
    assert choose_path("cuda", torch.bfloat16) == "fused"
    assert choose_path("cuda:1", torch.float32) == "fused"
    assert choose_path("cuda", torch.float64) == "plain"
    assert choose_path("meta") == "plain"
    monkeypatch.setattr(inference, "triton_available", lambda: False)
    assert choose_path("cuda") == "plain"


def test_path_arguments_are_checked(small_unet, monkeypatch):
    with pytest.raises(ValueError, match=r"path must be 'auto' or one of \['onednn', 'fused', 'plain'\]"):
        optimize_for_inference(small_unet, path="gpu")
    meta = TinyUNet(channels=(6, 12), N=3).to("meta")
    with pytest.raises(ValueError, match="path='onednn' is the CPU-specialised graph; the model is on meta"):
        optimize_for_inference(meta, path="onednn")
    assert optimize_for_inference(meta).inference_path == "plain"  # constants built on the model's device
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(inference, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="path='fused' runs Triton kernels on CUDA"):
        optimize_for_inference(small_unet, path="fused")
    monkeypatch.setattr(inference, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="path='fused' needs Triton"):
        optimize_for_inference(small_unet, path="fused")


@pytest.mark.parametrize("requires_grad", [False, True])
def test_cuda_decoder_upsampling_takes_the_measured_formulation(small_unet, monkeypatch, requires_grad):
    """On CUDA the decoders upsample through ``upsample_to`` (``choose_method``'s per-shape rule,
    measured on an H200), not the phase convolutions the CPU paths use; checked on a fake CUDA
    tensor, so it runs without a GPU (``tests/test_cuda.py`` compares the outputs on one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cmrf.ops.upsample import choose_method

    calls = []

    def recording_upsample_to(x, size, mode, method=None):
        calls.append((x.device.type, tuple(size), mode, choose_method(x, mode)))
        return x.new_empty((*x.shape[:2], *size))

    monkeypatch.setattr(inference, "upsample_to", recording_upsample_to)
    decoder = optimize_for_inference(small_unet, path="plain").decoders[0]
    with FakeTensorMode():
        low = torch.empty(2, 4, 8, 8, device="cuda", requires_grad=requires_grad)
        out = decoder.upsample(low, (16, 16))
    assert tuple(out.shape) == (2, 4, 16, 16)
    assert calls == [("cuda", (16, 16), "bicubic", "matmul")]


def test_a_state_dict_of_another_paths_copy_is_refused(small_unet, tmp_path):
    """The ``"onednn"`` copy reorders ``pw1``'s channels, the others do not; same keys and shapes,
    so its state dict loaded into a ``"plain"`` copy gave wrong outputs without an error."""
    onednn = optimize_for_inference(small_unet, path="onednn")
    plain = optimize_for_inference(small_unet, path="plain")
    torch.save(onednn.state_dict(), tmp_path / "fast.pt")
    saved = torch.load(tmp_path / "fast.pt", weights_only=True)
    with pytest.raises(ValueError, match="pw1 channels are in 'halves_first' order, this InferenceCMRF's "
                                         "in 'interleaved'"):
        plain.load_state_dict(saved)
    with pytest.raises(ValueError, match="in 'interleaved' order, this InferenceCMRF's in 'halves_first'"):
        onednn.load_state_dict(plain.state_dict())
    again = optimize_for_inference(small_unet, path="onednn")
    again.load_state_dict(saved)  # the same path's copy loads
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert _max_diff(again(x), small_unet(x)) < TOL


def test_tracing_uses_plain_operators(small_unet):
    fast = optimize_for_inference(small_unet)
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(compiled(x), small_unet(x)) < TOL


@requires_onnx_exporter
def test_onnx_export_of_optimized_model(small_unet, tmp_path):
    """The CPU graph (parity reordered, bands) exports as plain operators (the plain path's own)."""
    ort = pytest.importorskip("onnxruntime")
    fast = optimize_for_inference(small_unet, path="onednn")
    onnx_path = export_onnx(fast, tmp_path / "fast.onnx", (1, 3, 32, 24))
    x = torch.randn(1, 3, 32, 24)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert _max_diff(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), small_unet(x)) < TOL


# --- CUDA graphs (argument checks and CPU behaviour; capture needs a GPU) ---------------------


def test_cuda_graph_arguments(small_unet):
    with pytest.raises(TypeError, match="cuda_graph must be a bool, got str"):
        optimize_for_inference(small_unet, cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device, got one on cpu"):
        optimize_for_inference(small_unet, cuda_graph=True)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
            optimize_for_inference(small_unet, max_graphs=bad)
        with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
            CUDAGraphInference(nn.Identity(), max_graphs=bad)
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        CUDAGraphInference(lambda x: x)
    with pytest.raises(TypeError, match="clone_output must be a bool"):
        CUDAGraphInference(nn.Identity(), clone_output=1)


def test_cuda_graph_wrapper_runs_cpu_inputs_eagerly(small_unet):
    fast = optimize_for_inference(small_unet)
    wrapped = CUDAGraphInference(fast, max_graphs=2)
    x = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(x), fast(x))
    assert wrapped.num_graphs == 0
    assert set(wrapped.state_dict()) == {f"module.{k}" for k in fast.state_dict()}


def test_cuda_graph_replay_copies_every_output_tensor():
    """A model with auxiliary heads returns several tensors: each is copied out of the graph's
    static memory, which the next replay overwrites (replay simulated: no GPU needed)."""
    wrapped = CUDAGraphInference(nn.Identity())
    static = (torch.zeros(2), {"aux": torch.ones(3)})
    replay = type("Graph", (), {"replay": lambda self: None})()
    out = wrapped._run((replay, torch.zeros(1), static), torch.ones(1))
    assert torch.equal(out[0], static[0]) and out[0] is not static[0]
    assert torch.equal(out[1]["aux"], static[1]["aux"]) and out[1]["aux"] is not static[1]["aux"]
    assert CUDAGraphInference(nn.Identity(), clone_output=False)._run((replay, torch.zeros(1), static),
                                                                      torch.ones(1)) is static


def test_a_shape_that_cannot_be_captured_runs_eagerly_with_one_warning(monkeypatch, small_unet):
    fast = optimize_for_inference(small_unet)
    wrapped = CUDAGraphInference(fast)
    builds = []

    def uncapturable(x):
        builds.append(x.shape)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(wrapped, "_eager", lambda x: False)  # as if x were on a GPU
    monkeypatch.setattr(wrapped, "_build", uncapturable)
    x = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"no graph for input shape \(1, 3, 16, 32\).*runs eagerly"):
            first = wrapped(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not on every call
            second = wrapped(x)
        expected = fast(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(builds) == 1 and wrapped.num_graphs == 0


def test_cuda_graphs_are_captured_again_after_a_weight_change(monkeypatch, small_unet):
    """A change to the weights (here in place, read through ``pw2``'s derived matrix) makes the
    next call capture again, once: the capture's own warm-up remakes the derived tensors, and
    that must not count as another change (capture simulated: no GPU needed)."""
    fast = optimize_for_inference(small_unet)
    wrapped = CUDAGraphInference(fast)
    captures = []

    def capture(x):  # a graph that replays what the module computed when it was captured
        fast(x)  # the warm-up
        captures.append(x.shape)
        return fast(x)

    monkeypatch.setattr(wrapped, "_eager", lambda x: False)  # as if x were on a GPU
    monkeypatch.setattr(wrapped, "_build", capture)
    monkeypatch.setattr(wrapped, "_run", lambda output, x: output)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = wrapped(x)
        assert torch.equal(wrapped(x), before) and len(captures) == 1
        fast.encoders[0].pw2.bias.add_(0.5)
        after = wrapped(x)
        assert torch.equal(after, fast(x)) and _max_diff(after, before) > 1e-3
        wrapped(x)
    assert len(captures) == 2


def test_other_graph_wrappers_report_a_failed_build(monkeypatch, small_unet):
    wrapped = FrozenCPUInference(optimize_for_inference(small_unet))

    def trace_fails(x):
        raise RuntimeError("trace failed")

    monkeypatch.setattr(wrapped, "_build", trace_fails)
    with torch.no_grad(), pytest.raises(RuntimeError, match="trace failed"):
        wrapped(torch.randn(1, 3, 16, 32))


# --- run_in_bands -----------------------------------------------------------------------------


def test_run_in_bands_equals_whole_tensor():
    torch.manual_seed(0)
    weight = torch.randn(3, 1, 3, 3)

    def twice_conv(x, residual, rows=slice(None)):  # each output row reads input rows within 2 of it
        y = F.conv2d(F.conv2d(x, weight, padding=1, groups=3), weight, padding=1, groups=3)
        return (y + residual)[:, :, rows]

    x, residual = torch.randn(2, 3, 23, 9), torch.randn(2, 3, 23, 9)
    consumers = [None, partial_pool, lambda y: y[:, :1] * 2]
    expected = [f(twice_conv(x, residual)) if f else twice_conv(x, residual) for f in consumers]
    for band_rows in (2, 4, 6, 22, 40):
        got = run_in_bands(twice_conv, (x, residual), band_rows, halo=2, consumers=consumers)
        for g, e in zip(got, expected, strict=True):
            assert _max_diff(g, e) < 1e-5, band_rows
    # without the halo the band edges are wrong: the check can fail
    got = run_in_bands(twice_conv, (x, residual), 4, halo=0)[0]
    assert _max_diff(got, expected[0]) > 1e-3


def partial_pool(y: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(y, 2, 2)


def _neg(x, rows=slice(None)):
    return -x[:, :, rows]


def test_run_in_bands_checks_arguments():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="band_rows must be an int >= 1, got 0"):
        run_in_bands(_neg, x, 0)
    with pytest.raises(ValueError, match="halo must be an int >= 0, got -1"):
        run_in_bands(_neg, x, 2, halo=-1)
    with pytest.raises(ValueError, match="at least one input tensor"):
        run_in_bands(_neg, (), 2)
    pool = lambda y: F.max_pool2d(y, 2)  # noqa: E731
    with pytest.raises(ValueError, match="band_rows must be even when a consumer halves the rows.*got 3"):
        run_in_bands(_neg, torch.randn(1, 1, 8, 4), 3, consumers=[pool])
    assert torch.equal(run_in_bands(_neg, x, 1, consumers=[None])[0], -x)  # odd is fine without pooling


# --- the CPU graph's pieces -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 4, 2, 7), (2, 5, 9, 4), (1, 2, 13, 17)])
def test_shifted_depthwise_into_a_buffer_slice(shape):
    x = torch.randn(shape)
    weight, bias = torch.randn(shape[1], 1, 3, 3), torch.randn(shape[1])
    buffer = torch.full((shape[0], shape[1] + 2, *shape[2:]), float("nan"))
    inference._depthwise3x3_into(x, weight, bias, buffer[:, 1:-1])
    expected = F.conv2d(x, weight, bias, padding=1, groups=shape[1])
    assert _max_diff(buffer[:, 1:-1], expected) < 1e-5
    assert buffer[:, 0].isnan().all() and buffer[:, -1].isnan().all()  # neighbours untouched


@pytest.mark.parametrize("shifted_min", [1, 1 << 40])
def test_cpu_graph_with_and_without_shifted_stages(small_unet, monkeypatch, shifted_min):
    """Both ways of computing a cascade stage, and tiny bands (every band edge exercised)."""
    monkeypatch.setattr(inference, "SHIFTED_MIN_ELEMENTS", shifted_min)
    monkeypatch.setattr(inference, "BAND_BYTES", 1)
    unet = optimize_for_inference(small_unet)
    block = randomise_batchnorm(CMRF(6, 6, N=3)).eval()  # the residual CMRF
    for model, fast, shape in [
        (small_unet, unet, (1, 3, 21, 18)),
        (small_unet, unet, (2, 3, 16, 33)),
        (block, optimize_for_inference(block), (2, 6, 11, 7)),
    ]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert _max_diff(fast(x), model(x)) < TOL


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (1, 3, 1, 6), (2, 4, 5, 3), (1, 8, 16, 16)])
def test_bicubic2x_as_one_transposed_convolution(shape):
    x = torch.randn(shape) * 10
    kernel = inference._bicubic2x_transposed_kernel(torch.float32, "cpu").repeat(shape[1], 1, 1, 1)
    got = inference._upsample_bicubic2x_channels_last(x, kernel)
    expected = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    assert _max_diff(got, expected) < 1e-4


# --- freeze=True: frozen TorchScript graphs per shape ----------------------------------------


def test_frozen_graphs_equal_original(small_unet):
    """One graph per (shape, strides), each equal to the original: odd sizes, channels-last,
    non-contiguous inputs, batch 2; under inference_mode and no_grad."""
    fast = optimize_for_inference(small_unet, freeze=True)
    assert isinstance(fast, FrozenCPUInference) and fast.inference_path == "onednn"
    base = torch.randn(2, 3, 19, 46)
    inputs = [
        torch.randn(1, 3, 16, 16),
        base[:, :, :, ::2],  # non-contiguous, odd width
        torch.randn(2, 3, 20, 12).contiguous(memory_format=torch.channels_last),
    ]
    with torch.inference_mode():
        for k, x in enumerate(inputs):
            assert _max_diff(fast(x), small_unet(x)) < TOL
            assert fast.num_graphs == k + 1
    with torch.no_grad():
        assert _max_diff(fast(inputs[0]), small_unet(inputs[0])) < TOL  # the same graph, reused
    assert fast.num_graphs == len(inputs)


def test_frozen_graph_limits_and_fallbacks(small_unet):
    fast = FrozenCPUInference(optimize_for_inference(small_unet), max_graphs=1)
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 10)
    with torch.no_grad():
        fast(a)
        assert _max_diff(fast(b), small_unet(b)) < TOL  # beyond max_graphs: eager
        assert fast.num_graphs == 1
        empty = fast(torch.randn(0, 3, 8, 8))
        assert empty.shape == (0, 2, 8, 8)
        assert fast.num_graphs == 1
    x = torch.randn(1, 3, 8, 8, requires_grad=True)  # a gradient is wanted: eager, differentiable
    out = fast(x)
    out.sum().backward()
    assert x.grad is not None and fast.num_graphs == 1
    fast.to(torch.float32)
    assert fast.num_graphs == 0
    fast(a.double().float())
    fast.reset()
    assert fast.num_graphs == 0


@pytest.mark.parametrize("freeze", [False, True])
def test_a_copy_whose_weights_were_set_to_require_grad_runs_differentiably(small_unet, freeze):
    """copy.requires_grad_() made every call with grad enabled fail inside the CPU graph's out=
    writes ("add(): functions with out=... arguments don't support automatic differentiation")."""
    fast = optimize_for_inference(small_unet, freeze=freeze).requires_grad_()
    x = torch.randn(1, 3, 16, 16)
    out = fast(x)
    assert out.requires_grad and _max_diff(out.detach(), small_unet(x).detach()) < TOL
    out.sum().backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)
    with torch.no_grad():  # no graph wanted: the fast path again
        assert _max_diff(fast(x), out.detach()) < TOL


def test_freeze_arguments(small_unet):
    with pytest.raises(TypeError, match="freeze must be a bool, got int"):
        optimize_for_inference(small_unet, freeze=1)
    with pytest.raises(ValueError, match="freeze=True builds frozen TorchScript graphs for fp32 CPU models"):
        optimize_for_inference(copy.deepcopy(small_unet).double(), freeze=True)
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        FrozenCPUInference(optimize_for_inference(small_unet), max_graphs=0)
    with pytest.raises(TypeError, match="FrozenCPUInference wraps an nn.Module"):
        FrozenCPUInference(small_unet.forward)


def test_graph_wrappers_copy_and_pickle_without_their_graphs(small_unet):
    """Graphs are caches bound to one object (some cannot be copied): copies start without them
    and build their own, with equal outputs."""
    fast = optimize_for_inference(small_unet, freeze=True)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = fast(x)
        for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert isinstance(twin, GraphPerShape) and twin.num_graphs == 0
            assert _max_diff(twin(x), expected) == 0 and twin.num_graphs == 1
    assert fast.num_graphs == 1


def test_optimizing_under_inference_mode_builds_normal_tensors(small_unet):
    """Called inside torch.inference_mode(), the copy's constants are still normal tensors, so the
    eager fallback for an input that needs a gradient works (inference tensors cannot be saved
    for backward)."""
    with torch.inference_mode():
        fast = optimize_for_inference(small_unet, freeze=True)
    assert not any(t.is_inference() for t in [*fast.parameters(), *fast.buffers()])
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and fast.num_graphs == 0


# --- backend="onnxruntime": one ONNX Runtime session per shape --------------------------------


@pytest.fixture(scope="module")
def onnxruntime_available():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        pytest.skip(f"ONNX export needs torch >= 2.5, this is {torch.__version__}")


def test_onnxruntime_backend_equals_original(small_unet, onnxruntime_available):
    """One session per shape, each equal to the original: odd sizes, a non-contiguous input, a
    channels-last batch of 2 (its key is the shape, so the same shape with other strides reuses
    it); under inference_mode and no_grad."""
    from cmrf.inference import OnnxRuntimeInference

    fast = optimize_for_inference(small_unet, backend="onnxruntime")
    assert isinstance(fast, OnnxRuntimeInference) and fast.inference_path == "onednn"
    base = torch.randn(2, 3, 19, 46)
    inputs = [
        torch.randn(1, 3, 16, 16),
        base[:1, :, :, ::2],  # non-contiguous, odd sides
        torch.randn(2, 3, 20, 12).contiguous(memory_format=torch.channels_last),
    ]
    with torch.inference_mode():
        for k, x in enumerate(inputs):
            got = fast(x)
            assert got.dtype == torch.float32 and got.is_contiguous()
            assert _max_diff(got, small_unet(x)) < TOL
            assert fast.num_graphs == k + 1
    same_shape = torch.randn(2, 3, 20, 12)  # contiguous this time: the session takes a copy
    with torch.no_grad():
        assert _max_diff(fast(same_shape), small_unet(same_shape)) < TOL
    assert fast.num_graphs == len(inputs)


def test_an_optimized_copy_that_kept_a_block_runs_in_onnxruntime_and_exports(onnxruntime_available, tmp_path):
    """A block kept as it is (a hook on it) is still a CMRF in the optimized copy: the session and
    ``export_onnx`` of that copy optimized it again, which found nothing to rewrite and raised
    ("found no CMRF block it can rewrite")."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = randomise_batchnorm(TinyUNet(channels=(6, 12), N=3)).eval()
    model.encoders[0].register_forward_hook(lambda module, inputs, output: None)
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the documented warning about the kept block
        fast = optimize_for_inference(model, backend="onnxruntime")
        optimized = optimize_for_inference(model)
    with torch.no_grad():
        expected = model(x)
        assert _max_diff(fast(x), expected) < TOL
        path = export_onnx(optimized, tmp_path / "kept.onnx", tuple(x.shape))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _max_diff(torch.from_numpy(got), expected) < TOL


def test_onnxruntime_backend_limits_and_fallbacks(small_unet, onnxruntime_available):
    from cmrf.inference import OnnxRuntimeInference

    fast = OnnxRuntimeInference(optimize_for_inference(small_unet), max_graphs=1, threads=1)
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        fast(a)
        assert _max_diff(fast(b), small_unet(b)) < TOL  # beyond max_graphs: PyTorch
        assert fast(torch.randn(0, 3, 8, 8)).shape == (0, 2, 8, 8)
        assert fast.num_graphs == 1
    x = torch.randn(1, 3, 16, 16, requires_grad=True)  # a gradient is wanted: PyTorch, differentiable
    fast(x).sum().backward()
    assert x.grad is not None and fast.num_graphs == 1
    twin = pickle.loads(pickle.dumps(fast))  # sessions cannot be pickled: left behind
    assert twin.num_graphs == 0
    with torch.no_grad():
        assert _max_diff(twin(a), fast(a)) < TOL and twin.num_graphs == 1
    fast.reset()
    assert fast.num_graphs == 0


def test_onnxruntime_wrapper_of_a_plain_model_equals_it(small_unet, onnxruntime_available):
    """Wrapped directly (not through optimize_for_inference), a model holding CMRF blocks is
    optimized before each export; the original is left as it was."""
    from cmrf.inference import OnnxRuntimeInference

    model = copy.deepcopy(small_unet)
    fast = OnnxRuntimeInference(model, threads=1)
    x = torch.randn(1, 3, 24, 16)
    with torch.no_grad():
        assert _max_diff(fast(x), small_unet(x)) < TOL
    assert fast.num_graphs == 1 and isinstance(fast.module, type(small_unet))


class _TwoHeads(torch.nn.Module):
    """A network with an auxiliary output, as deep-supervision models have."""

    def __init__(self, net: torch.nn.Module, as_dict: bool):
        super().__init__()
        self.net, self.as_dict = net, as_dict

    def forward(self, x):
        logits = self.net(x)
        aux = logits.mean(dim=1, keepdim=True)
        return {"logits": logits, "aux": aux} if self.as_dict else (logits, aux)


@pytest.mark.parametrize("kind", ["freeze", "onnxruntime"])
@pytest.mark.parametrize("as_dict", [False, True])
def test_graph_wrappers_return_every_output_in_the_modules_structure(small_unet, as_dict, kind):
    model = _TwoHeads(optimize_for_inference(small_unet), as_dict).eval()
    fast = _graph_wrapper(kind, model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected, got = model(x), fast(x)
    assert fast.num_graphs == 1 and type(got) is type(expected)
    pairs = [(got[k], expected[k]) for k in expected] if as_dict else list(zip(got, expected, strict=True))
    assert len(pairs) == 2 and all(_max_diff(a, b) < TOL for a, b in pairs)


def _graph_wrapper(kind: str, module: torch.nn.Module):
    from cmrf.inference import OnnxRuntimeInference

    if kind == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
            pytest.skip(f"ONNX export needs torch >= 2.5, this is {torch.__version__}")
        return OnnxRuntimeInference(module, threads=1)
    return FrozenCPUInference(module)


@pytest.mark.parametrize("kind", ["freeze", "onnxruntime"])
def test_graph_wrappers_refuse_bad_input_as_the_model_does(small_unet, kind):
    """The model's one-line ValueError, sizes as numbers: not the exporter's report (a
    RuntimeError) nor a trace's tensor sizes; a numpy array is named, not an AttributeError."""
    import numpy as np

    fast = _graph_wrapper(kind, optimize_for_inference(small_unet))
    for bad in (torch.randn(1, 4, 32, 32), torch.randn(1, 3, 2, 32), np.zeros((1, 3, 32, 32), np.float32)):
        with pytest.raises(ValueError) as original:
            small_unet(bad)
        with pytest.raises(ValueError) as wrapped:
            fast(bad)
        assert str(wrapped.value) == str(original.value) and "tensor(" not in str(wrapped.value)
    assert fast.num_graphs == 0


@pytest.mark.parametrize("kind", ["freeze", "onnxruntime"])
def test_graphs_follow_changed_weights(small_unet, kind, monkeypatch):
    """The graphs hold copies of the weights: after load_state_dict, an in-place write or a
    replaced parameter the next call answers with the new weights (made again), while calls with
    unchanged weights reuse the graph they have."""
    fast = _graph_wrapper(kind, optimize_for_inference(small_unet))
    builds = []
    original_build = type(fast)._build
    monkeypatch.setattr(type(fast), "_build", lambda self, x: builds.append(1) or original_build(self, x))
    torch.manual_seed(11)
    other = optimize_for_inference(randomise_batchnorm(TinyUNet(channels=(6, 12), N=3)).eval())
    x = torch.randn(1, 3, 16, 16)

    def eager(x):  # the wrapped module itself, as it now is
        return fast.module(x)

    with torch.no_grad():
        assert _max_diff(fast(x), small_unet(x)) < TOL
        fast(x)
        assert len(builds) == 1  # unchanged weights: the same graph

        fast.module.load_state_dict(other.state_dict())
        assert _max_diff(fast(x), other(x)) < TOL and _max_diff(other(x), small_unet(x)) > 1e-3
        assert len(builds) == 2 and fast.num_graphs == 1
        if kind == "onnxruntime":
            return  # the change detection below is GraphPerShape's, shared (each ORT rebuild is an export)

        head = fast.module.head
        before = eager(x)
        head.bias.add_(1.0)  # written in place
        assert _max_diff(fast(x), before + 1.0) < TOL
        head.weight = torch.nn.Parameter(head.weight * 2)  # replaced
        assert _max_diff(fast(x), eager(x)) < TOL
        fast.module.encoders[0].cascade[0].weight.mul_(-1)  # deep inside a CMRF block
        assert _max_diff(fast(x), eager(x)) < TOL
        assert len(builds) == 5
        fast(x)
        assert len(builds) == 5


@pytest.mark.parametrize("kind", ["freeze", "onnxruntime"])
def test_graph_wrapper_in_training_mode_runs_the_module_as_it_is(small_unet, kind):
    """The graphs are of the eval-mode forward: a wrapped module put in training mode (batch
    statistics) runs eagerly, and the wrapper never switches it to eval behind the caller's back."""
    module = copy.deepcopy(small_unet).train()
    fast = _graph_wrapper(kind, module)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        in_training = fast(x)
        assert module.training and fast.num_graphs == 0
        # batch statistics: another answer than the eval-mode graph would give
        assert _max_diff(in_training, copy.deepcopy(module).eval()(x)) > 1e-3
        fast.eval()
        assert _max_diff(fast(x), module(x)) < TOL and fast.num_graphs == 1 and not module.training


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_optimized_module_follows_loaded_and_changed_weights(small_unet, path):
    """``pw2``'s augmented matrix and the fused kernel's parameters are derived from parameters:
    after ``load_state_dict`` or an in-place write the module computes with the new weights."""
    fast = optimize_for_inference(small_unet, path=path)
    torch.manual_seed(11)
    other_model = randomise_batchnorm(TinyUNet(channels=(6, 12), N=3)).eval()
    other = optimize_for_inference(other_model, path=path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert _max_diff(fast(x), small_unet(x)) < TOL
        fast.load_state_dict(other.state_dict())
        assert _max_diff(fast(x), other_model(x)) < TOL
        block = fast.encoders[0]
        block.pw2.bias.add_(0.25)  # in place, read through the derived matrix on the onednn path
        block.cascade[1].weight.mul_(-1)  # ... and through the fused kernel's parameters
        other.encoders[0].pw2.bias.add_(0.25)
        other.encoders[0].cascade[1].weight.mul_(-1)
        with warnings.catch_warnings():  # a trace runs the plain operators on the parameters
            warnings.simplefilter("ignore")
            expected = torch.jit.trace(fast, x, check_trace=False)(x)
        assert _max_diff(fast(x), expected) < TOL
        assert _max_diff(fast(x), other_model(x)) > 1e-3


def test_backend_arguments(small_unet, monkeypatch, onnxruntime_available):
    import importlib.util

    from cmrf.inference import OnnxRuntimeInference

    with pytest.raises(ValueError, match=r"backend must be one of \['torch', 'onnxruntime'\], got 'ort'"):
        optimize_for_inference(small_unet, backend="ort")
    with pytest.raises(ValueError, match="runs fp32 models on the CPU, got a torch.float64 model on cpu"):
        optimize_for_inference(copy.deepcopy(small_unet).double(), backend="onnxruntime")
    with pytest.raises(ValueError, match="with freeze=True: use backend='torch' or drop the other option"):
        optimize_for_inference(small_unet, backend="onnxruntime", freeze=True)
    with pytest.raises(ValueError, match="threads must be None or an int >= 1, got 0"):
        OnnxRuntimeInference(small_unet, threads=0)
    with pytest.raises(TypeError, match="spinning must be a bool, got str"):
        OnnxRuntimeInference(small_unet, spinning="yes")
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "onnxruntime" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    missing = r"needs onnxruntime, which is not installed: pip install 'cmrf\[onnx\]'"
    with pytest.raises(ImportError, match=missing):
        optimize_for_inference(small_unet, backend="onnxruntime")


@pytest.mark.parametrize("options", [{}, {"freeze": True}, {"backend": "onnxruntime"}])
def test_torch_func_transforms_run_the_optimized_model_eagerly(small_unet, options):
    """vmap over the optimized model failed in the CPU graph's out= writes ("Batching rule not
    implemented for aten::add.out"), and under freeze=True in TorchScript ("Unsupported value kind")."""
    from torch.func import vmap

    if options.get("backend") == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    fast = optimize_for_inference(small_unet, **options)
    x = torch.randn(3, 1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vmap(fast)(x), vmap(small_unet)(x), rtol=1e-5, atol=1e-5)


# --- the full-width network against the functional reference ---------------------------------


def _statistics_of(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of ``x`` itself (a cumulative average over one batch)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def test_every_fast_path_matches_the_reference_at_full_width_with_live_statistics():
    """With the golden weights and statistics the eval output is almost the head's bias (0.03 to
    0.09): an error in a 512-channel block (5 % off its weights, a folding 2 % off) moved it by
    less than the golden tests' 1e-6. With the statistics of the input itself every block reaches
    the output, so each path is held to the functional reference (cmrf.reference) at full width."""
    from cmrf.reference import reference_tinyunet

    golden = load_golden("tinyunet_official.safetensors")
    x = golden["input"]
    model = TinyUNet()
    model.load_state_dict(golden_state_dict(golden))
    weights = _statistics_of(model, x).state_dict()
    tolerance = 1e-4  # the paths differ from the reference by about 1e-5 here; outputs reach +-1.5
    with torch.no_grad():
        want = reference_tinyunet(x, weights)
        for key in ("encoders.3.pw2.conv.weight", "decoders.3.pw2.conv.weight"):  # the check can fail
            bumped = {**weights, key: weights[key] * 1.01}
            assert _max_diff(reference_tinyunet(x, bumped), want) > 50 * tolerance, key
        paths = {"eager": model, "optimized": optimize_for_inference(model),
                 "frozen": optimize_for_inference(model, freeze=True),
                 "plain": optimize_for_inference(model, path="plain")}
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
            paths["onnxruntime"] = optimize_for_inference(model, backend="onnxruntime")
        for name, fast in paths.items():
            assert _max_diff(fast(x), want) < tolerance, name
