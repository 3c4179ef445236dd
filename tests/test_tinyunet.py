"""TinyU-Net: golden parity with the reference code, checkpoints, registry, any input size."""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import cmrf
from cmrf import TinyUNet, create_model
from cmrf.models.tinyunet import checkpoint_filter_fn
from tests.conftest import GOLDEN_EVAL_ATOL, golden_state_dict, load_golden

GOLDEN = "tinyunet_official.safetensors"


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


@pytest.fixture(params=["pth", "safetensors"])
def reference_checkpoint(request, golden, tmp_path):
    """The golden state dict saved as the reference code saves it, or as safetensors."""
    state = golden_state_dict(golden)
    path = tmp_path / f"best_model.{request.param}"
    if request.param == "pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path


def _after_train_stats(golden):
    prefix = "after_train_forward."
    return checkpoint_filter_fn({k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)})


def test_golden_parity_through_create_model(golden, reference_checkpoint):
    model = create_model("tinyunet", checkpoint_path=reference_checkpoint)
    x = golden["input"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), golden["output_eval"], atol=GOLDEN_EVAL_ATOL, rtol=0)
        torch.testing.assert_close(model.train()(x), golden["output_train"], atol=1e-4, rtol=0)
    stats = _after_train_stats(golden)
    assert len(stats) == 8 * 9 * 2  # 8 CMRFs x 9 BatchNorms (pw1, 7 stages, pw2) x mean/var
    state = model.state_dict()
    for key, expected in stats.items():
        torch.testing.assert_close(state[key], expected, atol=1e-4, rtol=0, msg=key)


def test_reference_state_dict_loads_with_plain_load_state_dict(golden):
    model = TinyUNet().eval()
    model.load_state_dict(golden_state_dict(golden))
    with torch.no_grad():
        torch.testing.assert_close(
            model(golden["input"]), golden["output_eval"], atol=GOLDEN_EVAL_ATOL, rtol=0
        )


def test_golden_metadata_matches_defaults(golden):
    from safetensors import safe_open

    from tests.conftest import golden_path

    with safe_open(str(golden_path(GOLDEN)), "pt") as f:
        meta = f.metadata()
    assert (int(meta["in_channels"]), int(meta["num_classes"]), int(meta["N"])) == (3, 2, 8)


def test_own_names_are_clean_and_round_trip(tmp_path):
    model = create_model("tinyunet", in_chans=1, num_classes=4)
    keys = list(model.state_dict())
    assert "encoders.0.pw1.conv.weight" in keys and "head.bias" in keys
    assert not any("cmrf" in k or "pwconv" in k for k in keys)
    cmrf.save_weights(model, tmp_path / "w.safetensors")
    clone = create_model("tinyunet", in_chans=1, num_classes=4, checkpoint_path=tmp_path / "w.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(clone.state_dict()[key], value)


def test_missing_and_unexpected_keys_are_listed_and_model_untouched(golden, tmp_path):
    state = golden_state_dict(golden)
    state.pop("final_conv.bias")
    state["encoder1.cmrf.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    model = TinyUNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys: head\.bias.*unexpected keys: encoders\.0\.extra"):
        cmrf.load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_is_reported(golden, tmp_path):
    path = tmp_path / "three_classes.pth"
    torch.save(golden_state_dict(golden), path)
    expected = r"head\.weight: checkpoint \(2, 64, 1, 1\) vs model \(4, 64, 1, 1\)"
    with pytest.raises(ValueError, match=expected):
        create_model("tinyunet", num_classes=4, checkpoint_path=path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        cmrf.load_checkpoint(TinyUNet(), path)


def test_pretrained_raises_and_suggests_checkpoint_path():
    with pytest.raises(ValueError, match="checkpoint_path.*pretrained_cfg_overlay=dict\\(file="):
        create_model("tinyunet", pretrained=True)
    with pytest.raises(ValueError, match="never downloads"):  # a URL is not a local file
        timm.create_model("tinyunet", pretrained=True, pretrained_cfg_overlay=dict(url="https://x/w.pth"))


@pytest.mark.parametrize("build", [create_model, timm.create_model])
def test_pretrained_loads_the_local_file_timm_names(tmp_path, build, golden, reference_checkpoint):
    """timm's idiom for local weights: pretrained=True with pretrained_cfg_overlay=dict(file=...)."""
    model = build("tinyunet", pretrained=True, pretrained_cfg_overlay=dict(file=str(reference_checkpoint)))
    with torch.no_grad():
        out = model.eval()(golden["input"])
    torch.testing.assert_close(out, golden["output_eval"], atol=GOLDEN_EVAL_ATOL, rtol=0)
    assert model.pretrained_cfg["file"] == str(reference_checkpoint)
    as_cfg = build("tinyunet", pretrained=True, pretrained_cfg=dict(file=str(reference_checkpoint)))
    assert all(torch.equal(a, b) for a, b in zip(as_cfg.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit TinyUNet"):
        build("tinyunet", pretrained=True, pretrained_cfg_overlay=dict(file=str(reference_checkpoint)), N=4)
    # Fine-tuning on other classes, as in timm: the body loads, the classifier starts afresh.
    local = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(reference_checkpoint)))
    five = build("tinyunet", num_classes=5, **local)
    assert five.head.weight.shape[0] == 5
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(five.state_dict()[k], v) for k, v in body.items())
    # Other input channels, as in timm: the first convolution's weights adapted, the rest as saved.
    grey = build("tinyunet", in_chans=1, **local).eval()
    body = {k: v for k, v in model.state_dict().items() if k != "encoders.0.pw1.conv.weight"}
    assert all(torch.equal(grey.state_dict()[k], v) for k, v in body.items())
    x = torch.rand(2, 1, 40, 48)
    with torch.no_grad():  # summed weights: a grey image is what the RGB model sees in three equal channels
        torch.testing.assert_close(grey(x), model(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    # Only what was asked for may differ: a 1-channel, 5-class file loaded without num_classes or
    # in_chans gave a default model, its head random and its first convolution adapted, silently.
    mine = tmp_path / "mine.pth"
    torch.save(cmrf.create_model("tinyunet", in_chans=1, num_classes=5).state_dict(), mine)
    mine_local = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(mine)))
    with pytest.raises(ValueError, match=r"does not fit TinyUNet: shape mismatches: encoders\.0.*head\."):
        build("tinyunet", **mine_local)
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(5, 64, 1, 1\) vs model \(2, 64"):
        build("tinyunet", in_chans=1, **mine_local)


@pytest.mark.parametrize("name, saved_chans, in_chans, size", [
    ("tinyunet", 1, 3, (32, 40)), ("tinyunet", 3, 6, (32, 32)), ("tinyunet3d", 1, 2, (16, 16, 24)),
    ("segnet", 3, 1, (32, 32)), ("cmunext_s", 1, 3, (32, 32)),
])
def test_pretrained_local_file_adapts_the_first_convolution_to_in_chans(
    tmp_path, name, saved_chans, in_chans, size
):
    """timm's rule (``adapt_input_conv``): from 3 channels to 1 the weights are summed; otherwise
    repeated and scaled by saved/wanted, so that the channels repeated give the saved model's output."""
    saved = cmrf.create_model(name, in_chans=saved_chans, num_classes=2).eval()
    for module in saved.modules():  # trained-like statistics, so that the check sees them
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(module.running_mean, -0.2, 0.2)
            torch.nn.init.uniform_(module.running_var, 0.5, 1.5)
    path = tmp_path / "saved.safetensors"
    cmrf.save_weights(saved, path)
    local = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    adapted = cmrf.create_model(name, in_chans=in_chans, num_classes=2, **local).eval()
    if in_chans == 1:  # a grey image is what the saved model sees in equal channels
        given = torch.rand(1, 1, *size)
        seen = given.expand(-1, saved_chans, *size)
    else:  # the saved model's channels, repeated
        seen = torch.rand(1, saved_chans, *size)
        given = seen.repeat(1, in_chans // saved_chans, *[1] * len(size))
    with torch.no_grad():
        torch.testing.assert_close(adapted(given), saved(seen), atol=1e-5, rtol=1e-5)


def test_pretrained_first_convolution_timm_cannot_adapt_starts_afresh(tmp_path, monkeypatch):
    import cmrf.models._builder as builder

    def cannot(*args, **kwargs):
        raise NotImplementedError("Weight format not supported by conversion.")

    saved = cmrf.create_model("tinyunet", in_chans=2)
    path = tmp_path / "two.safetensors"
    cmrf.save_weights(saved, path)
    monkeypatch.setattr(builder, "adapt_input_conv", cannot)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="saved for 2 input channels, the model takes 3.*starts afresh"):
        model = create_model("tinyunet", in_chans=3, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path)))
    torch.manual_seed(0)
    fresh = create_model("tinyunet")
    first = "encoders.0.pw1.conv.weight"
    assert torch.equal(model.state_dict()[first], fresh.state_dict()[first])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.state_dict().items() if k != first)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="tinyunet"):
        create_model("tinyunett")


def test_timm_registry():
    assert "tinyunet" in timm.list_models("tinyunet*")
    model = timm.create_model("tinyunet", num_classes=3, in_chans=1)
    assert isinstance(model, TinyUNet)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    assert cmrf.list_models("tiny*") == ["tinyunet", "tinyunet3d"]


def test_paper_parameter_count():
    assert sum(p.numel() for p in TinyUNet().parameters()) == 481_170


@pytest.mark.parametrize("size", [(250, 190), (37, 53), (16, 16), (64, 96)])
def test_any_size_returns_input_size(size):
    model = TinyUNet(in_channels=1, num_classes=3, channels=(16, 32, 48, 64)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *size)).shape == (1, 3, *size)


@given(
    h=st.integers(16, 70),
    w=st.integers(16, 70),
    depth=st.integers(1, 4),
    N=st.sampled_from([1, 2, 4]),
    in_ch=st.integers(1, 4),
    classes=st.integers(1, 5),
)
def test_random_sizes_and_widths(h, w, depth, N, in_ch, classes):
    channels = tuple(2 * N * (i + 1) for i in range(depth))
    model = TinyUNet(in_ch, classes, N=N, channels=channels).eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_ch, h, w)).shape == (1, classes, h, w)


def test_multiple_of_16_uses_exact_2x_upsampling():
    """For sides divisible by 16, upsampling to the skip size equals scale_factor=2 (the reference)."""
    x = torch.randn(1, 4, 5, 7)
    by_size = torch.nn.functional.interpolate(x, size=(10, 14), mode="bicubic", align_corners=False)
    by_scale = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    torch.testing.assert_close(by_size, by_scale)


def test_wrong_channels_names_expected_and_received():
    with pytest.raises(ValueError, match=r"expected 3 input channels, received 1"):
        TinyUNet()(torch.randn(1, 1, 32, 32))


def test_too_small_or_wrong_rank_is_explained():
    with pytest.raises(ValueError, match=r">= 16"):
        TinyUNet()(torch.randn(1, 3, 15, 32))
    with pytest.raises(ValueError, match="4-D input"):
        TinyUNet()(torch.randn(3, 32, 32))


def test_volumetric_variant():
    model = create_model("tinyunet3d", in_chans=1, num_classes=3, channels=(16, 32))
    assert model.upsample_mode == "trilinear"
    x = torch.randn(2, 1, 9, 12, 7, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 3, 9, 12, 7)
    out.mean().backward()
    assert x.grad is not None


def test_pretrained_takes_timms_in_memory_state_dict():
    """timm's pretrained_cfg_overlay=dict(state_dict=sd), its first choice of local weights, was
    refused as "no pretrained weights are published"."""
    source = cmrf.create_model("tinyunet")
    overlay = dict(state_dict=source.state_dict())
    for build in (create_model, timm.create_model):
        model = build("tinyunet", pretrained=True, pretrained_cfg_overlay=overlay)
        pairs = zip(model.state_dict().values(), source.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs)
        assert model.pretrained_cfg["state_dict"] is None  # the tensors are not kept alive by the cfg
    with pytest.raises(ValueError, match=r"the state_dict of pretrained_cfg_overlay does not fit TinyUNet"):
        create_model("tinyunet", pretrained=True, pretrained_cfg_overlay=dict(
            state_dict=cmrf.create_model("tinyunet", num_classes=3).state_dict()))


def test_tinyunet_arguments_are_read_from_the_shapes(golden):
    """cmrf train --init names the options of a file of other widths; a bare state dict records none."""
    from cmrf.models.tinyunet import tinyunet_arguments

    small = cmrf.create_model("tinyunet", channels=(16, 32, 96), N=4)
    assert tinyunet_arguments(small.state_dict()) == {"N": 4, "channels": [16, 32, 96]}
    # the paper's code names the same tensors otherwise
    assert tinyunet_arguments(golden_state_dict(golden)) == {"N": 8, "channels": [64, 128, 256, 512]}
    assert tinyunet_arguments(cmrf.create_model("segnet").state_dict()) is None
    # N = 1 has no cascade stage (it was not recognised); networks of CMRF blocks that are not
    # TinyU-Nets have encoders.*.pw2 too (they were read as TinyU-Nets of their widths)
    single = cmrf.create_model("tinyunet", channels=(16, 32), N=1).state_dict()
    assert tinyunet_arguments(single) == {"N": 1, "channels": [16, 32]}
    for other in ("segnet_cmrf", "cmunext_cmrf"):
        assert tinyunet_arguments(cmrf.create_model(other, N=2).state_dict()) is None


@pytest.mark.parametrize("value", ["true", ""])
def test_a_missing_golden_file_fails_whenever_ci_is_set(monkeypatch, value):
    """CI="" (set, but empty) skipped the golden tests."""
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "GOLDEN_DIR", conftest.GOLDEN_DIR / "absent")
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        conftest.golden_path(GOLDEN)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="is missing"):
        conftest.golden_path(GOLDEN)
