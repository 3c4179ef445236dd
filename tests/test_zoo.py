"""SegNet and CMUNeXt in the zoo: sizes, TinyU-Net's Table 3 cost rows, reference parity."""

from __future__ import annotations

import functools

import pytest
import timm
import torch

from cmrf import CMRF, create_model, save_weights
from cmrf import list_models as cmrf_list_models
from cmrf.models.cmunext import CMUNeXt, checkpoint_filter_fn
from cmrf.models.segnet import SegNet
from cmrf.profile import profile
from tests.conftest import GOLDEN_EVAL_ATOL, golden_state_dict, load_golden

# Golden CMUNeXt configuration (see ../shared/golden/README.md).
GOLDEN_CMUNEXT = dict(dims=(8, 16, 32, 64, 128), depths=(1, 1, 1, 2, 1), kernels=(3, 3, 7, 7, 9))


@functools.cache
def zoo(name: str) -> torch.nn.Module:
    """Default-built zoo models, shared by the tests that only read them (building costs a probe)."""
    return create_model(name)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("segnet", 29_444_162),  # spec / paper 29.44M
        ("cmunext", 3_149_202),  # spec / paper 3.15M
        ("cmunext_cmrf", 1_967_799),  # spec: exactly 1.968M; paper 1.97M
        ("segnet_cmrf", 643_186),  # our mapping (docs/replace_blocks.md); paper 0.64M
        ("cmunext_s", 417_514),  # reference S configuration (same blocks as the golden model)
        ("cmunext_l", 8_286_754),
    ],
)
def test_param_counts(name, expected):
    assert n_params(zoo(name)) == expected


# Paper-convention FLOPs and fvcore MACs at 1x3x256x256, measured once with
# profile(create_model(name), (1, 3, 256, 256)). Every counted cost of these networks is
# proportional to output sizes, so a 32x32 profile is exactly 1/64 of it; the test uses that to
# stay fast, and the equality below checks the proportionality as well.
TABLE3 = {
    "segnet": (80_337_698_816, 40_110_129_152),  # paper 80.34G
    "cmunext": (14_837_563_392, 7_317_561_344),  # paper 14.84G
    "cmunext_cmrf": (12_225_302_528, 6_031_325_184),  # paper 12.23G
    "segnet_cmrf": (6_866_665_472, 3_393_814_528),  # paper 7.02G (mapping not stated there)
}


@pytest.mark.parametrize("name", list(TABLE3))
def test_table3_cost_rows(name):
    flops, macs = TABLE3[name]
    result = profile(zoo(name), (1, 3, 32, 32))
    assert result.flops * 64 == flops
    assert result.macs * 64 == macs


def test_table3_rounded_figures_match_the_paper():
    assert round(TABLE3["segnet"][0] / 1e9, 2) == 80.34
    assert round(TABLE3["cmunext"][0] / 1e9, 2) == 14.84
    assert round(TABLE3["cmunext_cmrf"][0] / 1e9, 2) == 12.23
    assert n_params(zoo("segnet_cmrf")) < 1_000_000


def test_cmunext_cmrf_replaces_exactly_the_encoder_blocks():
    model = zoo("cmunext_cmrf")
    replaced = {name for name, m in model.named_modules() if isinstance(m, CMRF)}
    assert replaced == {f"encoders.{i}" for i in range(5)}
    assert [(m.in_channels, m.out_channels) for m in model.encoders] == [
        (16, 16),
        (16, 32),
        (32, 128),
        (128, 160),
        (160, 256),
    ]
    assert model.encoders[0].add_residual  # 16 -> 16 keeps CMRF's shortcut


def test_segnet_cmrf_mapping():
    model = zoo("segnet_cmrf")
    replaced = sorted(name for name, m in model.named_modules() if isinstance(m, CMRF))
    assert replaced == [f"decoders.{i}" for i in range(4)] + [f"encoders.{i}" for i in range(5)]
    # The last decoder stage (64 -> 64 ConvBNReLU and the 3x3 classifier) is kept as it was.
    assert not isinstance(model.decoders[4], CMRF)
    assert model.decoders[4][1].out_channels == 2


# --- reference parity --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
    return load_golden("cmunext_official.safetensors")


@pytest.fixture
def reference_checkpoint(golden, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cmunext_reference.safetensors"
    save_file(golden_state_dict(golden), str(path))
    return path


def test_cmunext_golden_parity(golden, reference_checkpoint):
    model = create_model("cmunext", checkpoint_path=reference_checkpoint, **GOLDEN_CMUNEXT)
    x = golden["input"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), golden["output_eval"], rtol=0, atol=GOLDEN_EVAL_ATOL)
        out_train = model.train()(x)
    # Training-mode BatchNorm divides by batch statistics; some channels of this small model have
    # gains up to ~43x, which amplify fp32 rounding: the golden output itself is 1.6e-4 away from
    # a float64 run of the same weights, and ours 1.7e-4 (measured). 1e-4 is below that noise, so
    # bound the worst element at 5e-4 and the mean, which a real error would move, at 3e-5.
    diff = (out_train - golden["output_train"]).abs()
    assert diff.max() < 5e-4, diff.max()
    assert diff.mean() < 3e-5, diff.mean()
    state = model.state_dict()
    prefix = "after_train_forward."
    stats = {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
    assert len(stats) == 2 * 40  # every BatchNorm of the golden model
    for ref_name, expected in checkpoint_filter_fn(stats).items():
        torch.testing.assert_close(state[ref_name], expected, rtol=0, atol=1e-4, msg=ref_name)


def test_cmunext_reference_state_dict_loads_with_load_state_dict(golden):
    model = CMUNeXt(**GOLDEN_CMUNEXT)
    model.load_state_dict(golden_state_dict(golden))  # the reference's names, mapped by the hook
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(golden["input"]), golden["output_eval"], rtol=0, atol=GOLDEN_EVAL_ATOL
        )


def test_checkpoint_filter_fn_keeps_own_names():
    state = CMUNeXt(**GOLDEN_CMUNEXT).state_dict()
    assert checkpoint_filter_fn(state).keys() == state.keys()


def test_reference_key_mapping_covers_every_key(golden):
    mapped = checkpoint_filter_fn(golden_state_dict(golden))
    assert mapped.keys() == CMUNeXt(**GOLDEN_CMUNEXT).state_dict().keys()


def test_cmunext_cmrf_weights_round_trip(tmp_path):
    model = create_model("cmunext_cmrf", dims=(16, 32, 32, 64, 64))
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    loaded = create_model("cmunext_cmrf", dims=(16, 32, 32, 64, 64), checkpoint_path=path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


# --- other entry points and bad input ----------------------------------------------------------


def test_timm_creates_the_zoo_models():
    assert isinstance(timm.create_model("cmunext", num_classes=4), CMUNeXt)
    assert isinstance(timm.create_model("segnet_cmrf", in_chans=1), SegNet)


@pytest.mark.parametrize("shape", [(1, 3, 40, 48), (1, 1, 32, 32), (3, 32, 32)])
def test_cmunext_rejects_bad_input(shape):
    model = CMUNeXt(**GOLDEN_CMUNEXT)
    with pytest.raises(ValueError, match="CMUNeXt"):
        model(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dims=(8, 16, 32, 64)), "dims must have 5 entries"),
        (dict(kernels=(3, 3, 7, 7, 8)), "kernels must be odd"),
        (dict(depths=(1, 1, 0, 1, 1)), r"depths\[2\]"),
    ],
)
def test_cmunext_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CMUNeXt(**kwargs)


def test_segnet_rejects_small_input_and_handles_odd_sizes():
    model = SegNet(in_channels=1, num_classes=3, spatial_dims=1).eval()
    with pytest.raises(ValueError, match=">= 32"):
        model(torch.zeros(1, 1, 16))
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 45)).shape == (2, 3, 45)


def test_cmunext_3d_forward():
    model = CMUNeXt(in_channels=1, num_classes=3, dims=(8, 8, 16, 16, 16), spatial_dims=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_without_defaults_drops_exactly_the_arguments_each_entry_point_defaults_to():
    """A run's recorded arguments compare equal to a command's when they build the same model."""
    from cmrf.models.registry import without_defaults

    assert without_defaults("tinyunet", {"N": 8, "channels": [64, 128, 256, 512]}) == {}
    assert without_defaults("tinyunet", {"N": 4, "channels": (16, 32)}) == {"N": 4, "channels": (16, 32)}
    assert without_defaults("tinyunet3d", {"spatial_dims": 3}) == {}
    assert without_defaults("cmunext_cmrf", {"N": 8}) == {}
    # a variant's own widths are its default, not the class's
    assert without_defaults("cmunext_l", {"dims": [32, 64, 128, 256, 512]}) == {}
    class_default = {"dims": (16, 32, 128, 160, 256)}
    assert without_defaults("cmunext_l", class_default) == class_default
    assert create_model("cmunext_l", dims=(16, 32, 128, 160, 256)).dims != create_model("cmunext_l").dims
    assert without_defaults("not-a-model", {"N": 8}) == {"N": 8}


@pytest.mark.parametrize("spatial_dims", [1, 2, 4])
def test_tinyunet3d_with_other_spatial_dims_suggests_only_a_call_that_works(spatial_dims):
    with pytest.raises(ValueError, match=r"tinyunet3d is TinyU-Net for volumes") as info:
        create_model("tinyunet3d", spatial_dims=spatial_dims)
    suggestion = f"create_model('tinyunet', spatial_dims={spatial_dims})"
    assert (suggestion in str(info.value)) == (spatial_dims in (1, 2))


@pytest.mark.parametrize("name", cmrf_list_models())
def test_registered_cfg_states_the_default_models_minimum_size(name):
    """What timm's registry says without building a model agrees with the model built."""
    registered = timm.models.get_pretrained_cfg(name).min_input_size
    assert tuple(registered) == tuple(create_model(name).pretrained_cfg["min_input_size"])


def test_a_traced_segnet_takes_other_sizes():
    """torch.jit.trace stored the unpooling's output sizes as constants: the traced model gave a
    64-row map for a 65-row input without a word, and failed for other sizes."""
    model = create_model("segnet_cmrf", N=2).eval()
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, torch.randn(1, 3, 32, 32), check_trace=False)
    for shape in ((1, 3, 33, 32), (1, 3, 32, 35), (2, 3, 64, 48)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(traced(x), model(x)), shape


def test_cmunext_training_on_one_deepest_pixel_is_named():
    """A batch of 1 at the 16-pixel minimum failed in torch's BatchNorm ("Expected more than 1 value
    per channel when training"), its deepest block being 1x1."""
    model = create_model("cmunext_s").train()
    with pytest.raises(ValueError, match=r"batch of 1 at spatial size \(16, 16\) .* batch of 2 or more"):
        model(torch.randn(1, 3, 16, 16))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2, 16, 16)
    assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 2, 16, 16)  # eval: running statistics


def test_model_defaults_do_not_depend_on_timms_global_layer_config():
    """Read first under timm's set_layer_config(scriptable=True) (which the zoo refuses), the defaults
    kept only the entry point's for the rest of the process."""
    from timm.layers import set_layer_config

    from cmrf.models import registry

    expected = registry.model_defaults("segnet")
    registry._built_class.cache_clear()
    with set_layer_config(scriptable=True):
        assert registry.model_defaults("segnet") == expected
    assert registry.model_defaults("segnet") == expected and "in_channels" in expected
