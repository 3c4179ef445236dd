"""optimize_for_inference, ONNX export and the CPU benchmark: exactness against the plain model."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cmrf import CMRF, TinyUNet, export_onnx, optimize_for_inference, save_weights
from cmrf import load_checkpoint as cmrf_load_checkpoint
from cmrf.cli import main as cli_main
from cmrf.inference import InferenceCMRF, fold_conv_norm, max_pool2x, upsample_bicubic2x
from cmrf.layers import ConvNorm
from tests.conftest import (
    GOLDEN_EVAL_ATOL,
    golden_state_dict,
    load_golden,
    randomise_batchnorm,
    requires_onnx_exporter,
)

# The fp32 paths agree to ~1e-7 at outputs of order 0.1-1 (2e-6 at worst on large maps); 1e-5
# catches a tanh GELU or a BatchNorm eps of 1e-5 in the fast path, which 1e-4 let through.
TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max().detach())


# --- building blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_fold_conv_norm_equals_conv_then_batchnorm(spatial_dims):
    block = randomise_batchnorm(ConvNorm(6, 6, kernel_size=3, groups=6, spatial_dims=spatial_dims)).eval()
    weight, bias = fold_conv_norm(block)
    x = torch.randn(2, 6, *([7] * spatial_dims))
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
    folded = conv(x, weight, bias, padding=1, groups=6)
    assert _max_diff(folded, block(x)) < 1e-5


@pytest.mark.parametrize("removed", ["weight", "bias", "both"])
def test_fold_conv_norm_reads_a_missing_affine_weight_or_bias_as_batchnorm_does(removed):
    """A BatchNorm whose weight or bias was set to None scales by 1 or shifts by 0, as
    ``F.batch_norm`` does; folding it must do the same rather than fail on ``None.detach``."""
    block = randomise_batchnorm(ConvNorm(4, 6, kernel_size=1)).eval()
    for name in ("weight", "bias") if removed == "both" else (removed,):
        setattr(block.norm, name, None)
    weight, bias = fold_conv_norm(block)
    x = torch.randn(2, 4, 5, 5)
    assert _max_diff(F.conv2d(x, weight, bias), block(x)) < 1e-5


@given(
    channels=st.integers(1, 3),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    batch=st.integers(1, 2),
)
def test_bicubic2x_equals_interpolate_including_borders(channels, height, width, batch):
    x = torch.randn(batch, channels, height, width) * 10
    expected = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    assert _max_diff(upsample_bicubic2x(x), expected) < 1e-4


def test_bicubic2x_names_a_tensor_of_the_wrong_rank_or_kernel():
    """A (C, H, W) tensor gave conv2d's "expected input[1, 3, 9, 11] to have 5 channels", about
    channels; a 5-D one "Padding size 4 is not supported for 5D input"."""
    for shape in ((3, 5, 7), (1, 2, 3, 5, 7), (2, 0, 4, 4)):
        with pytest.raises(ValueError, match=rf"takes a \(B, C, H, W\) tensor with C, H, W >= 1, got shape "
                                              rf"{re.escape(str(shape))}"):
            upsample_bicubic2x(torch.randn(shape))
    wrong_kernel = r"kernel of shape \(8, 1, 5, 5\) for 3 channels, expected .*\(12, 1, 5, 5\)"
    with pytest.raises(ValueError, match=wrong_kernel):
        upsample_bicubic2x(torch.randn(1, 3, 4, 4), torch.randn(8, 1, 5, 5))
    assert upsample_bicubic2x(torch.randn(0, 3, 4, 4)).shape == (0, 3, 8, 8)  # an empty batch, as interpolate


@given(height=st.integers(2, 11), width=st.integers(2, 11))
def test_max_pool2x_equals_max_pool2d(height, width):
    x = torch.randn(2, 3, height, width)
    assert torch.equal(max_pool2x(x), F.max_pool2d(x, 2, 2))


# --- optimize_for_inference ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tinyunet_pair():
    torch.manual_seed(1)
    model = randomise_batchnorm(TinyUNet()).eval()
    return model, optimize_for_inference(model)


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 37, 53), (1, 3, 250, 190)])
def test_tinyunet_optimized_equals_original(tinyunet_pair, shape):
    model, fast = tinyunet_pair
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        assert _max_diff(fast(x), expected) < TOL
        # also in inference mode, where the channels-last cascade takes another code path
    with torch.inference_mode():
        assert _max_diff(fast(x), expected) < TOL


def test_optimized_matches_reference_golden_output():
    golden = load_golden("tinyunet_official.safetensors")
    model = TinyUNet()
    model.load_state_dict(golden_state_dict(golden))
    with torch.no_grad():
        out = optimize_for_inference(model)(golden["input"])
    assert _max_diff(out, golden["output_eval"]) < GOLDEN_EVAL_ATOL  # as tight as the model's own check


def test_original_is_left_untouched():
    model = randomise_batchnorm(TinyUNet(channels=(16, 32), N=2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    assert model.training and not fast.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in fast.parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())


def test_any_model_holding_cmrf_blocks():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        CMRF(8, 16, N=2),
        nn.Sequential(CMRF(16, 16, N=4), nn.ReLU()),  # in == out: the residual CMRF
        nn.Conv2d(16, 2, 1),
    )
    model = randomise_batchnorm(model).eval()
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, CMRF) for m in fast.modules())
    assert sum(isinstance(m, InferenceCMRF) for m in fast.modules()) == 2
    assert fast[2][0].add_residual
    for shape in [(2, 3, 17, 23), (1, 3, 40, 8)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            assert _max_diff(fast(x), model(x)) < TOL
    x = torch.randn(2, 8, 9, 12).transpose(2, 3)  # not contiguous: the convolution fallback
    with torch.inference_mode():
        assert _max_diff(fast[1](x), model[1](x)) < TOL


def test_bands_of_rows_are_exact(monkeypatch):
    """Tiny bands: every inner band edge, an odd last band and the pooled halves are exercised."""
    import cmrf.inference

    monkeypatch.setattr(cmrf.inference, "BAND_BYTES", 1)
    unet = randomise_batchnorm(TinyUNet(channels=(16, 32), N=4, spatial_dims=2)).eval()
    volume = randomise_batchnorm(TinyUNet(in_channels=1, channels=(8, 16), N=2, spatial_dims=3)).eval()
    residual = randomise_batchnorm(CMRF(8, 8, N=2)).eval()
    cases = [(unet, (2, 3, 45, 38)), (volume, (1, 1, 11, 9, 8)), (residual, (1, 8, 13, 5))]
    for model, shape in cases:
        fast = optimize_for_inference(model)
        x = torch.randn(shape)
        with torch.inference_mode():
            assert _max_diff(fast(x), model(x)) < TOL


def test_volume_tinyunet_and_single_cmrf():
    model = randomise_batchnorm(TinyUNet(in_channels=1, channels=(8, 16), N=2, spatial_dims=3)).eval()
    x = torch.randn(1, 1, 10, 13, 9)  # odd sides: trilinear to the skip's exact size
    with torch.inference_mode():
        assert _max_diff(optimize_for_inference(model)(x), model(x)) < TOL
    block = randomise_batchnorm(CMRF(6, 12, N=3, spatial_dims=1)).eval()
    x = torch.randn(2, 6, 31)
    with torch.inference_mode():
        assert _max_diff(optimize_for_inference(block)(x), block(x)) < TOL


def test_bad_input_gives_clear_errors(tinyunet_pair):
    _, fast = tinyunet_pair
    with pytest.raises(ValueError, match="expected 3 input channels"):
        fast(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"every spatial side >= 16"):
        fast(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match="no CMRF block in Sequential"):
        optimize_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="expects an nn.Module"):
        optimize_for_inference("tinyunet")
    # Optimizing a copy again said it "found no CMRF block", sending the user to look for one.
    with pytest.raises(ValueError, match=r"^InferenceTinyUNet is already optimized: it comes from "
                                         r"optimize_for_inference; call optimize_for_inference on the"):
        optimize_for_inference(fast)
    with pytest.raises(ValueError, match=r"^Sequential is already optimized: its part 0 \(InferenceTinyUNet"):
        optimize_for_inference(nn.Sequential(fast))
    # train() switched the eval-only copy to training mode without a word; a backward then failed
    # with torch's "element 0 of tensors does not require grad".
    with pytest.warns(UserWarning, match=r"InferenceTinyUNet is an eval-only copy .*train the original"):
        assert fast.train() is fast
    assert not any(module.training for module in fast.modules())
    block, fast_block = CMRF(8, 16, N=2).eval(), optimize_for_inference(CMRF(8, 16, N=2))
    for bad in (torch.randn(1, 5, 4, 4), torch.ones(1, 8, 4, 4, dtype=torch.long), "image"):
        with pytest.raises(ValueError) as original:  # the optimized block says what the original says
            block(bad)
        with pytest.raises(ValueError, match=re.escape(str(original.value))):
            fast_block(bad)


def test_batchnorm_without_running_statistics_is_refused_not_folded():
    """Such a BatchNorm normalises with each batch's statistics in eval mode too: folding it would
    compute another function."""
    block = CMRF(4, 8, N=2)
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    with pytest.raises(ValueError, match=r"cannot fold BatchNorm2d\(.*no running statistics"):
        optimize_for_inference(block.eval())


class _SoftmaxUNet(TinyUNet):
    def forward(self, x):
        return super().forward(x).softmax(1)


class _DoubledCMRF(CMRF):
    def forward(self, x):
        return super().forward(x) * 2


def _customise(model: TinyUNet, change: str) -> TinyUNet:
    if change == "forward hook":
        model.register_forward_hook(lambda module, args, out: out.sigmoid())
    elif change == "pre-hook":
        model.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    elif change == "hook inside a block":
        model.encoders[1].pw1.norm.register_forward_hook(lambda module, args, out: out * 2)
    elif change == "average pooling":
        model.pool = nn.AvgPool2d(2)
    elif change == "pooling with a stride of 1":
        model.pool = nn.MaxPool2d(2, 1)
    elif change == "sigmoid head":
        model.head = nn.Sequential(model.head, nn.Sigmoid())
    elif change == "plain first encoder":
        model.encoders[0] = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU())
    elif change == "layer added to a block":
        model.decoders[0].cascade[0].add_module("act", nn.ReLU())  # a Sequential runs it
    elif change == "dilated stage":
        model.encoders[0].cascade[0].conv.dilation = (2, 2)
        model.encoders[0].cascade[0].conv.padding = (2, 2)
    elif change == "tanh GELU":
        model.decoders[1].pw2.act = nn.GELU(approximate="tanh")
    elif change == "block with its own forward":
        doubled = _DoubledCMRF(64, 32, N=2)
        doubled.load_state_dict(model.decoders[1].state_dict())
        model.decoders[1] = doubled.eval()
    return model


@pytest.mark.parametrize("change", [
    "own forward", "forward hook", "pre-hook", "hook inside a block", "average pooling",
    "pooling with a stride of 1", "sigmoid head", "plain first encoder", "layer added to a block",
    "dilated stage", "tanh GELU", "block with its own forward",
])
def test_customised_parts_are_kept_as_they_are_not_rewritten(change):
    """The rewrite computes what TinyUNet and CMRF build; a model changed after building (its own
    forward, hooks, other layers) must keep computing its own function: the changed parts stay
    plain copies, with a warning that names them, and the other CMRF blocks are still optimized."""
    torch.manual_seed(4)
    model = (_SoftmaxUNet if change == "own forward" else TinyUNet)(channels=(16, 32), N=2)
    model = randomise_batchnorm(_customise(model, change)).eval()
    x = torch.randn(1, 3, 20, 24)
    with pytest.warns(UserWarning, match="kept these parts as they are") as caught:
        fast = optimize_for_inference(model)
    assert caught[0].filename == __file__  # the warning names the caller's line, not torch's decorators
    assert sum(isinstance(m, InferenceCMRF) for m in fast.modules()) >= 3
    with torch.no_grad():
        assert _max_diff(fast(x), model(x)) < TOL


def test_what_is_kept_and_why_is_named():
    model = _customise(_customise(TinyUNet(channels=(16, 32), N=2), "hook inside a block"), "sigmoid head")
    with pytest.warns(UserWarning) as caught:
        optimize_for_inference(model.eval())
    message = str(caught[0].message)
    assert "head is Sequential, where its class builds Conv2d" in message
    assert "encoders.1 (CMRF): encoders.1.pw1.norm has hooks registered" in message
    with pytest.raises(ValueError, match=r"no CMRF block it can rewrite in _DoubledCMRF: .*its own forward"):
        optimize_for_inference(_DoubledCMRF(8, 8, N=2).eval())


def test_hooks_on_every_block_are_named_once_with_the_way_out():
    """Each hooked block was named twice ("has hooks registered" in the TinyUNet's entry and its
    own), and the refusal did not say how to get an optimized copy."""
    model = TinyUNet(channels=(16, 32), N=2).eval()
    handles = [m.register_forward_hook(lambda *a: None) for m in model.modules() if isinstance(m, CMRF)]
    with pytest.raises(ValueError) as caught:
        optimize_for_inference(model)
    message = str(caught.value)
    assert message.count("has hooks registered") == len(handles)
    assert "its blocks encoders.0, encoders.1, decoders.0, decoders.1 are customised" in message
    assert "remove them (handle.remove())" in message
    for handle in handles:
        handle.remove()
    assert type(optimize_for_inference(model)).__name__ == "InferenceTinyUNet"


@pytest.mark.parametrize("freeze", [False, True])
def test_save_weights_refuses_an_optimized_copy_and_a_load_names_one(tmp_path, freeze):
    """The copy's state dict (BatchNorm folded) was saved without a word, and loading it back gave
    a list of missing keys with no hint; save_weights now refuses it and a torch.save'd one is named."""
    model = TinyUNet(channels=(16, 32), N=2, num_classes=3).eval()
    fast = optimize_for_inference(model, freeze=freeze)
    with pytest.raises(ValueError, match=r"optimize_for_inference copy .*save the model you optimized"):
        save_weights(fast, tmp_path / "fast.safetensors")
    assert not list(tmp_path.iterdir())
    generic = optimize_for_inference(nn.Sequential(nn.Conv2d(3, 8, 1), CMRF(8, 8, N=2)).eval())
    with pytest.raises(ValueError, match=r"Sequential: its part '1' is inference-only"):
        save_weights(generic, tmp_path / "generic.safetensors")
    torch.save(fast.state_dict(), tmp_path / "fast.pt")
    with pytest.raises(ValueError, match=r"of an optimize_for_inference copy .*save the model before"):
        cmrf_load_checkpoint(TinyUNet(channels=(16, 32), N=2, num_classes=3), tmp_path / "fast.pt")
    save_weights(model, tmp_path / "model.safetensors")  # the model it was made from saves as ever


@pytest.mark.parametrize("change", ["none", "momentum", "SyncBatchNorm", "same settings spelt otherwise"])
def test_a_model_as_built_is_rewritten_whole_without_a_warning(change):
    model = randomise_batchnorm(TinyUNet(channels=(16, 32), N=2)).eval()
    if change == "momentum":  # training settings change nothing in eval
        model.encoders[0].cascade[0].norm.momentum = 0.1
    elif change == "SyncBatchNorm":  # what DDP users convert to; in eval it is BatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    elif change == "same settings spelt otherwise":
        model.pool.kernel_size, model.pool.stride = (2, 2), [2, 2]
        model.encoders[0].cascade[0].conv.padding = [1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = optimize_for_inference(model)
    assert type(fast).__name__ == "InferenceTinyUNet"
    x = torch.randn(1, 3, 20, 24)
    with torch.no_grad():
        assert _max_diff(fast(x), model(x)) < TOL


class _ScaledNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_batchnorm_subclass_with_its_own_forward_is_kept():
    model = randomise_batchnorm(TinyUNet(channels=(16, 32), N=2)).eval()
    scaled = _ScaledNorm(model.encoders[0].pw2.norm.num_features, eps=1e-3).eval()
    scaled.load_state_dict(model.encoders[0].pw2.norm.state_dict())
    model.encoders[0].pw2.norm = scaled
    with pytest.warns(UserWarning, match=r"encoders\.0\.pw2\.norm has its own forward"):
        fast = optimize_for_inference(model)
    x = torch.randn(1, 3, 20, 24)
    with torch.no_grad():
        assert _max_diff(fast(x), model(x)) < TOL


# --- ONNX ------------------------------------------------------------------------------------

def _run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    # Here, not at import: a module-level skip would also hide the tests above (and test_cuda's).
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(2)
    return randomise_batchnorm(TinyUNet(channels=(16, 32, 64), N=4)).eval()


@requires_onnx_exporter
def test_onnx_dynamic_batch_and_size_matches_pytorch(small_unet, tmp_path):
    path = export_onnx(small_unet, tmp_path / "unet.onnx", (1, 3, 32, 32), dynamic=True)
    for shape in [(1, 3, 32, 32), (2, 3, 24, 40)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = small_unet(x)
        assert _max_diff(_run_onnx(path, x), expected) < TOL


@requires_onnx_exporter
def test_onnx_cli_static_odd_size_with_checkpoint(small_unet, tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    save_weights(small_unet, weights)
    out = tmp_path / "static.onnx"
    argv = ["export", "onnx", "tinyunet", "--channels", "16", "32", "64", "--N", "4"]
    argv += ["--checkpoint", str(weights), "--input-size", "1", "3", "37", "29", "-o", str(out)]
    assert cli_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(1, 3, 37, 29)  # not multiples of 8: upsampling falls back to Resize
    with torch.no_grad():
        expected = small_unet(x)
    assert _max_diff(_run_onnx(out, x), expected) < TOL


@requires_onnx_exporter
def test_onnx_dynamic_needs_multiples_of_min_size(small_unet, tmp_path):
    with pytest.raises(ValueError, match="multiples of 8"):
        export_onnx(small_unet, tmp_path / "x.onnx", (1, 3, 36, 32), dynamic=True)
    with pytest.raises(ValueError, match="input_size must be"):
        export_onnx(small_unet, tmp_path / "x.onnx", (3, 32))


def _hook_calls(fast: nn.Module, x: torch.Tensor, calls: int = 4) -> tuple[int, int, bool]:
    """Calls of a hook inside ``fast``'s optimized CMRF and of a zeroing hook on its plain head,
    and whether every output came out zeroed."""
    inner = getattr(fast, "module", fast)
    inside, plain = [], []
    inner[0].pw1.register_forward_hook(lambda *_: inside.append(1))
    inner[1].register_forward_hook(lambda module, args, out: (plain.append(1), out * 0)[1])
    with torch.no_grad():
        outs = [fast(x) for _ in range(calls)]
    return len(inside), len(plain), all(not out.any() for out in outs)


def test_hooks_on_the_copy_run_as_docs_inference_md_says():
    """Default path: a hook inside an optimized part never runs, one on a layer copied as it is
    runs per call. freeze=True: hooks run only while the shape's graph is traced, effect baked in."""
    net = nn.Sequential(CMRF(16, 16, N=2), nn.Conv2d(16, 2, 1)).eval()
    x = torch.randn(1, 16, 32, 32)
    assert _hook_calls(optimize_for_inference(net), x) == (0, 4, True)
    inside, plain, zeroed = _hook_calls(optimize_for_inference(net, freeze=True), x)
    assert inside < 4 and 1 <= plain < 4 and zeroed, (inside, plain, zeroed)


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "8"], "--size 8: TinyUNet takes sides of at least 16 pixels"),
    (["--onnx", "{tmp}/notes.txt"], "is an existing file not named .onnx: it would be replaced"),
])
def test_the_deployment_example_refuses_bad_arguments_in_one_line(tmp_path, monkeypatch, capsys, args,
                                                                  message):
    """``--size 8`` ended in a traceback from the model; ``--onnx notes.txt`` replaced the user's file."""
    import runpy
    import sys
    from pathlib import Path

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    script = Path(__file__).resolve().parents[1] / "examples" / "deploy_cpu.py"
    monkeypatch.setattr(sys, "argv", ["deploy_cpu.py", *(a.format(tmp=tmp_path) for a in args)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert notes.read_text() == "hello"


def test_the_deployment_example_reports_the_share_of_each_class(monkeypatch, capsys):
    """It printed the mean class index as a "foreground fraction" (3.000 for a 4-class mask)."""
    import re as regex
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "deploy_cpu.py"
    monkeypatch.setattr(sys, "argv", ["deploy_cpu.py", "--size", "32", "--num-classes", "3"])
    runpy.run_path(str(script), run_name="__main__")
    line = next(line for line in capsys.readouterr().out.splitlines() if "share of each class" in line)
    shares = [float(value) for value in regex.findall(r"\d: (\d\.\d+)", line)]
    assert len(shares) == 3 and abs(sum(shares) - 1) < 2e-3
