"""What timm and PyTorch users expect of every zoo model: pickling, timm's cfg and classifier
methods, clear errors for unknown arguments, bad constructor arguments and non-float inputs."""

from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import timm
import torch
from timm.data import resolve_data_config

import cmrf
from cmrf import CMRF, TinyUNet, create_model, replace_blocks
from cmrf.constants import NORMALIZE_MEAN, NORMALIZE_STD
from cmrf.layers import check_input
from cmrf.models import CMUNeXt, SegNet, UnknownArgumentError
from tests.conftest import GOLDEN_EVAL_ATOL, golden_state_dict, load_golden

# Small configurations of every registered model (SegNet's widths are fixed), so tests stay fast.
SMALL = {
    "tinyunet": dict(N=2, channels=(4, 8)),
    "tinyunet3d": dict(N=2, channels=(4, 8)),
    "cmunext": dict(dims=(8, 8, 8, 8, 8)),
    "cmunext_cmrf": dict(dims=(16, 16, 16, 16, 16)),
    "cmunext_s": {},
    "cmunext_l": dict(dims=(8, 8, 16, 16, 16)),
    "segnet": {},
    "segnet_cmrf": {},
}
SIDE = {"segnet": 32, "segnet_cmrf": 32}  # spatial side of test inputs: the models' minimum, else 16


def test_small_covers_the_registry():
    assert sorted(SMALL) == cmrf.list_models()


@functools.cache
def small(name: str, in_chans: int = 3) -> torch.nn.Module:
    return create_model(name, in_chans=in_chans, **SMALL[name]).eval()


def example(name: str, model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, model.in_channels, *(SIDE.get(name, 16),) * model.spatial_dims)


# --- pickling --------------------------------------------------------------------------------


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)  # whole-model save: pickles the module
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # our own object, built just above


def _pickle_round_trip(model):
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_pickles_and_copies_whole(name):
    model = small(name)
    x = example(name, model)[:1]
    with torch.no_grad():
        expected = model(x)
        for clone in (_pickle_round_trip, _torch_save_load):  # the two calls that used to fail
            copied = clone(model)
            assert type(copied) is type(model) and copied.pretrained_cfg == model.pretrained_cfg
            torch.testing.assert_close(copied(x), expected, rtol=0, atol=0, msg=clone.__name__)
    copied = copy.deepcopy(model)
    assert copied.pretrained_cfg == model.pretrained_cfg and copied.pretrained_cfg is not model.pretrained_cfg
    for key, value in model.state_dict().items():
        assert torch.equal(copied.state_dict()[key], value), key


def test_cmrf_block_pickles():
    block = CMRF(4, 8, N=2).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(block))(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "golden_name, build",
    [
        ("tinyunet_official.safetensors", TinyUNet),
        (
            "cmunext_official.safetensors",
            lambda: CMUNeXt(dims=(8, 16, 32, 64, 128), depths=(1, 1, 1, 2, 1), kernels=(3, 3, 7, 7, 9)),
        ),
    ],
)
def test_unpickled_model_still_loads_reference_checkpoints(golden_name, build):
    golden = load_golden(golden_name)
    reference = golden_state_dict(golden)  # the reference code's key names
    restored = pickle.loads(pickle.dumps(build())).eval()
    restored.load_state_dict(reference)  # renamed by the (unpickled) pre-hook
    with torch.no_grad():  # eval mode: one item of the golden batch is enough (and half the cost)
        out = restored(golden["input"][:1])
    torch.testing.assert_close(out, golden["output_eval"][:1], rtol=0, atol=GOLDEN_EVAL_ATOL)
    # Same weights as a never-pickled model (so identical outputs), also when nested in another
    # module: the hook then maps the keys under the model's prefix.
    fresh = build()
    fresh.load_state_dict(reference)
    wrapper = pickle.loads(pickle.dumps(torch.nn.Sequential(build())))
    wrapper.load_state_dict({f"0.{k}": v for k, v in reference.items()})
    for key, value in fresh.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
        assert torch.equal(wrapper.state_dict()[f"0.{key}"], value), key


# --- timm's pretrained_cfg / default_cfg ----------------------------------------------------------


@pytest.mark.parametrize(
    "factory, in_chans", [(create_model, 3), (timm.create_model, 1)], ids=["cmrf", "timm"]
)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_pretrained_cfg_carries_our_normalisation(name, factory, in_chans):
    model = small(name) if factory is create_model else factory(name, in_chans=in_chans, **SMALL[name])
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    side = (64,) * 3 if model.spatial_dims == 3 else (256, 256)
    assert cfg["input_size"] == (in_chans, *side)
    assert cfg["mean"] == (NORMALIZE_MEAN,) * in_chans and cfg["std"] == (NORMALIZE_STD,) * in_chans
    assert cfg["num_classes"] == model.num_classes == 2
    assert cfg["architecture"] == name
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.modules.conv._ConvNd)
    assert not any(cfg.get(k) for k in ("url", "hf_hub_id", "file", "state_dict"))  # nothing downloads
    data = resolve_data_config({}, model=model)
    assert data["mean"] == cfg["mean"] and data["std"] == cfg["std"]
    assert data["input_size"] == cfg["input_size"]


def test_registry_cfgs_are_timms_and_have_no_weights():
    for name in cmrf.list_models():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name and not cfg.has_weights
        assert cfg.mean == (NORMALIZE_MEAN,) * 3
    assert timm.list_pretrained("tinyunet*") == [] and timm.list_pretrained("cmunext*") == []


def test_directly_built_models_have_a_cfg_too():
    model = TinyUNet(in_channels=1, num_classes=4, N=2, channels=(4, 8))
    assert resolve_data_config({}, model=model)["mean"] == (NORMALIZE_MEAN,)
    assert model.pretrained_cfg["num_classes"] == 4 and model.pretrained_cfg["architecture"] == "tinyunet"
    assert SegNet(spatial_dims=3).pretrained_cfg["input_size"] == (3, 64, 64, 64)
    # Volumes are resized trilinearly; timm's image transforms never read a 3D model's cfg.
    assert SegNet(spatial_dims=3).pretrained_cfg["interpolation"] == "trilinear"
    assert cmrf.create_model("tinyunet3d").pretrained_cfg["interpolation"] == "trilinear"


@pytest.mark.parametrize("name, targets", [("segnet", None), ("cmunext", ["stem", "encoders.*"])])
def test_replace_blocks_keeps_the_cfgs_first_conv_a_real_layer(name, targets):
    """timm adapts ``first_conv`` to other input channels when it loads weights: after a swap it must
    still name a convolution of the model."""
    model = create_model(name, **SMALL.get(name, {}))
    before = model.pretrained_cfg["first_conv"]
    replace_blocks(model, 4, targets=targets)
    first = model.pretrained_cfg["first_conv"]
    assert first != before and isinstance(model.get_submodule(first), torch.nn.Conv2d)
    assert model.default_cfg["first_conv"] == first


def test_timm_cfg_overlay_and_tags():
    overlay = dict(mean=(0.1, 0.2, 0.3))
    model = timm.create_model("tinyunet", pretrained_cfg_overlay=overlay, **SMALL["tinyunet"])
    assert resolve_data_config({}, model=model)["mean"] == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="no pretrained tag 'imagenet'"):
        create_model("tinyunet", pretrained_cfg="imagenet")
    with pytest.raises((ValueError, RuntimeError), match="imagenet"):  # newer timm checks tags itself
        timm.create_model("tinyunet.imagenet")


def test_timm_cfg_overlay_sets_the_models_defaults_as_timm_does():
    """timm builds ``num_classes`` and ``in_chans`` from a ``pretrained_cfg_overlay`` when they are not
    given; the cfg then still describes the model."""
    overlay = dict(num_classes=5, input_size=(1, 48, 48))
    for build in (create_model, timm.create_model):
        model = build("tinyunet", pretrained_cfg_overlay=overlay, **SMALL["tinyunet"])
        assert model.num_classes == 5 and model.in_channels == 1
        assert model.get_classifier().out_channels == 5
        assert model.pretrained_cfg["num_classes"] == 5 and model.pretrained_cfg["input_size"] == (1, 48, 48)
        assert model.pretrained_cfg["mean"] == (NORMALIZE_MEAN,)
    overlay = dict(input_size=[2, 24, 24, 24])
    volume = create_model("tinyunet3d", pretrained_cfg_overlay=overlay, **SMALL["tinyunet3d"])
    assert volume.in_channels == 2 and volume.pretrained_cfg["input_size"] == (2, 24, 24, 24)
    # the overlay lies over a given cfg, as in timm; one number stands for every channel
    model = timm.create_model("tinyunet", pretrained_cfg=dict(num_classes=3), pretrained_cfg_overlay=dict(
        num_classes=5, mean=0.25), in_chans=2, **SMALL["tinyunet"])
    assert model.num_classes == 5 and model.pretrained_cfg["mean"] == (0.25, 0.25)


@pytest.mark.parametrize("factory", [create_model, timm.create_model], ids=["cmrf", "timm"])
def test_a_pretrained_cfg_dict_keeps_the_models_own_entries(factory, tmp_path):
    """timm builds a ``pretrained_cfg`` dict into a cfg of ImageNet defaults (224 px, bicubic, a
    0.875 crop, ImageNet mean/std); laid over the model's own cfg, what it leaves out stays ours."""
    weights = tmp_path / "w.safetensors"
    cmrf.save_weights(create_model("tinyunet", **SMALL["tinyunet"]), weights)
    model = factory("tinyunet", pretrained=True, pretrained_cfg=dict(file=str(weights)), **SMALL["tinyunet"])
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 256, 256) and data["interpolation"] == "bilinear"
    assert data["crop_pct"] == 1.0
    assert data["mean"] == (NORMALIZE_MEAN,) * 3 and data["std"] == (NORMALIZE_STD,) * 3
    cfg = dict(interpolation="bicubic", crop_pct=0.9)
    given = factory("tinyunet", pretrained_cfg=cfg, **SMALL["tinyunet"])
    assert resolve_data_config({}, model=given)["interpolation"] == "bicubic"
    assert given.pretrained_cfg["crop_pct"] == 0.9


@pytest.mark.parametrize("name", ["tinyunet", "cmunext", "segnet"])
@pytest.mark.parametrize("spatial_dims, mode", [(1, "linear"), (3, "trilinear")])
def test_the_cfg_interpolation_fits_the_spatial_dims(name, spatial_dims, mode):
    model = create_model(name, spatial_dims=spatial_dims, **SMALL[name])
    assert model.pretrained_cfg["interpolation"] == mode
    assert resolve_data_config({}, model=model)["interpolation"] == mode
    overlay = dict(interpolation="nearest")
    overlaid = create_model(name, spatial_dims=spatial_dims, pretrained_cfg_overlay=overlay, **SMALL[name])
    assert overlaid.pretrained_cfg["interpolation"] == "nearest"


def test_list_models_takes_a_list_of_patterns_as_timm_does():
    assert cmrf.list_models(["tinyunet*", "segnet*"]) == ["segnet", "segnet_cmrf", "tinyunet", "tinyunet3d"]
    assert cmrf.list_models(("tinyunet3d",)) == ["tinyunet3d"]
    for bad in (None, 3, ["tinyunet*", 3]):
        with pytest.raises(ValueError, match="pattern must be a string or a list of strings"):
            cmrf.list_models(bad)


def test_pretrained_with_a_checkpoint_path_says_to_drop_pretrained(tmp_path):
    """timm's train.py passes both for --pretrained --initial-checkpoint."""
    weights = tmp_path / "w.safetensors"
    cmrf.save_weights(create_model("tinyunet", **SMALL["tinyunet"]), weights)
    expected = r"checkpoint_path='.*w\.safetensors' loads that file by itself: drop pretrained=True"
    with pytest.raises(ValueError, match=expected):
        create_model("tinyunet", pretrained=True, checkpoint_path=weights, **SMALL["tinyunet"])
    with pytest.raises(ValueError, match="with checkpoint_path given as well, drop pretrained=True"):
        timm.create_model("tinyunet", pretrained=True, checkpoint_path=str(weights), **SMALL["tinyunet"])


@pytest.mark.parametrize("kwargs, overlay, key", [
    (dict(in_chans=1), dict(input_size=(3, 16, 16, 16)), "input_size"),
    ({}, dict(input_size=(3, 16, 16, 16)), "input_size"),
    ({}, dict(mean=(0.5, 0.5)), "mean"),
    ({}, dict(first_conv="stem"), "first_conv"),
])
def test_timm_cfg_overlay_that_contradicts_the_model_is_refused(kwargs, overlay, key):
    with pytest.raises(ValueError, match=f"pretrained_cfg_overlay {key}=.*contradicts"):
        timm.create_model("tinyunet", pretrained_cfg_overlay=overlay, **kwargs, **SMALL["tinyunet"])


@pytest.mark.parametrize("factory", [create_model, timm.create_model], ids=["cmrf", "timm"])
def test_an_overlay_describing_the_file_fine_tunes_to_the_classes_and_channels_asked_for(factory, tmp_path):
    """timm's fine-tuning idiom: the overlay's num_classes and input_size describe the file; it was
    refused as contradicting the model (docs/api.md said both), while pretrained_cfg=dict(...) took it."""
    weights = tmp_path / "w.safetensors"
    cmrf.save_weights(create_model("tinyunet", **SMALL["tinyunet"]), weights)
    overlay = dict(file=str(weights), num_classes=2, input_size=(3, 64, 64))
    model = factory("tinyunet", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, in_chans=1,
                    **SMALL["tinyunet"])
    assert model.num_classes == 5 and model.in_channels == 1
    assert model.pretrained_cfg["num_classes"] == 5 and model.pretrained_cfg["input_size"] == (1, 64, 64)


# --- get_classifier / reset_classifier -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_reset_classifier_replaces_only_the_head(name):
    model = copy.deepcopy(small(name))
    head = model.get_classifier()
    assert isinstance(head, torch.nn.modules.conv._ConvNd) and head.out_channels == model.num_classes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(5)
    new = model.get_classifier()
    assert new is not head and new.out_channels == 5 and new.in_channels == head.in_channels
    assert new.kernel_size == head.kernel_size and new.padding == head.padding
    assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    head_prefix = model.pretrained_cfg["classifier"] + "."
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if not key.startswith(head_prefix):
            assert torch.equal(after[key], value), key
    x = example(name, model)[:1]
    with torch.no_grad():
        assert model(x).shape == (1, 5, *x.shape[2:])


def test_reset_classifier_keeps_device_and_dtype():
    model = create_model("tinyunet", device="meta", dtype=torch.float64, **SMALL["tinyunet"])
    model.reset_classifier(3)
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.float64
    assert model.head.bias.dtype == torch.float64


@pytest.mark.parametrize(
    "num_classes, global_pool, match", [(0, None, "num_classes"), (2, "avg", "global_pool")]
)
def test_reset_classifier_rejects_what_segmentation_cannot_do(num_classes, global_pool, match):
    with pytest.raises(ValueError, match=match):
        copy.deepcopy(small("tinyunet")).reset_classifier(num_classes, global_pool)


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [create_model, timm.create_model], ids=["cmrf", "timm"])
def test_unknown_kwargs_are_named_with_the_accepted_ones(factory):
    with pytest.raises(ValueError, match=r"tinyunet does not take drop_rate=0\.1.*accepts: .*N, ch") as err:
        factory("tinyunet", drop_rate=0.1)
    # Also a TypeError, as Python's own "unexpected keyword argument", for callers that catch that.
    assert isinstance(err.value, UnknownArgumentError) and isinstance(err.value, TypeError)
    with pytest.raises(ValueError, match=r"segnet does not take N=4; it accepts: in_chans"):
        factory("segnet", N=4)
    with pytest.raises(ValueError, match=r"cmunext_cmrf does not take channels=\(8,\).*\bN\b"):
        factory("cmunext_cmrf", channels=(8,))


@pytest.mark.parametrize("factory", [create_model, timm.create_model], ids=["cmrf", "timm"])
def test_timm_layer_flags(factory):
    """timm's scriptable=True promised a model torch.jit.script takes, and it failed there; exportable
    and no_jit are accepted (cmrf.create_model refused them as unknown arguments)."""
    for name in ("tinyunet", "segnet"):
        with pytest.raises(ValueError, match=rf"'{name}' is not TorchScript-scriptable.*torch\.jit\.trace"):
            factory(name, scriptable=True)
    model = factory("tinyunet", exportable=True, no_jit=True, scriptable=False, **SMALL["tinyunet"]).eval()
    torch.jit.trace(model, torch.randn(1, 3, 16, 16))  # the documented route works
    assert not timm.layers.is_scriptable()  # the flag does not outlive the call


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torch_jit_script_of_a_model_holding_cmrf_says_why_it_cannot():
    """Scripting failed deep in the TorchScript compiler ("Expected a value of type 'Tensor' for
    argument 'self' but instead found type 'str'"), also for a MONAI U-Net after replace_blocks."""
    from cmrf import CMRF

    holder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), CMRF(8, 8, N=2))
    for model in (create_model("tinyunet", **SMALL["tinyunet"]), holder, CMRF(4, 8, N=2, spatial_dims=3)):
        with pytest.raises(TypeError, match=r"torch\.jit\.script cannot compile CMRF.*torch\.jit\.trace"):
            torch.jit.script(model)
    torch.jit.trace(holder.eval(), torch.randn(1, 3, 8, 8))  # the route it names works


def test_zero_drop_rates_change_nothing_and_are_accepted():
    # timm's train.py always passes drop_rate (0.0 by default).
    model = timm.create_model("tinyunet", drop_rate=0.0, drop_path_rate=0.0, **SMALL["tinyunet"]).eval()
    reference = create_model("tinyunet", **SMALL["tinyunet"]).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("factory", [create_model, timm.create_model], ids=["cmrf", "timm"])
def test_in_channels_and_in_chans_are_aliases(factory):
    assert factory("tinyunet", in_channels=1, **SMALL["tinyunet"]).in_channels == 1
    assert factory("cmunext_s", in_channels=1).in_channels == 1
    assert factory("tinyunet", in_chans=1, in_channels=1, **SMALL["tinyunet"]).in_channels == 1
    assert factory("tinyunet", **SMALL["tinyunet"]).in_channels == 3
    with pytest.raises(ValueError, match="in_chans=3 and in_channels=1 disagree"):
        factory("tinyunet", in_chans=3, in_channels=1)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TinyUNet(channels=64), r"channels must be a sequence of encoder widths, e\.g\. .*got 64"),
        (lambda: TinyUNet(channels="64"), r"channels must be a sequence of encoder widths.*got '64'"),
        (lambda: TinyUNet(channels=(64.0, 128)), r"channels\[0\] must be an integer >= 1, got 64\.0"),
        (lambda: TinyUNet(channels=()), "channels must have at least one entry"),
        (lambda: TinyUNet(channels=(16, 36), N=4), r"multiple of 2N = 8 \(N = 4\), got channels\[1\]=36"),
        (lambda: TinyUNet(N="8"), r"N must be an integer >= 1, got '8'"),
        (lambda: TinyUNet(N=-2), "N must be an integer >= 1, got -2"),
        (lambda: TinyUNet(in_channels=True), "in_channels must be an integer >= 1, got True"),
        (lambda: TinyUNet(num_classes=2.0), "num_classes must be an integer >= 1, got 2.0"),
        (lambda: TinyUNet(spatial_dims=2.0), "spatial_dims must be 1, 2 or 3, got 2.0"),
        (lambda: TinyUNet(spatial_dims="2"), "spatial_dims must be 1, 2 or 3, got '2'"),
        (lambda: TinyUNet(fused="yes"), "fused must be True, False or None, got 'yes'"),
        (lambda: CMUNeXt(dims=16), r"dims must be a sequence of stage widths.*got 16"),
        (lambda: CMUNeXt(depths=(1, 1, 1, 3.5, 1)), r"depths\[3\] must be an integer >= 1, got 3\.5"),
        (lambda: CMUNeXt(kernels=7), r"kernels must be a sequence of odd kernel sides.*got 7"),
        (lambda: CMUNeXt(dims=(8, 16, 32, 64)), "dims must have 5 entries"),
        (lambda: CMUNeXt(spatial_dims=False), "spatial_dims must be 1, 2 or 3, got False"),
        (lambda: CMRF(16, 16, 4, spatial_dims=True), "spatial_dims must be 1, 2 or 3, got True"),  # True == 1
        (lambda: SegNet(in_channels="3"), "in_channels must be an integer >= 1, got '3'"),
        (lambda: SegNet(num_classes=0), "num_classes must be an integer >= 1, got 0"),
        (lambda: CMRF(8, 16, shortcut="no"), "shortcut must be True or False, got 'no'"),
        (lambda: CMRF(8, 16, fused=1), "fused must be True, False or None, got 1"),
        (lambda: create_model("segnet_cmrf", N="4"), "N must be an integer >= 1, got '4'"),
        (lambda: create_model("segnet_cmrf", N=7),
         r"segnet_cmrf with N=7: .*encoders\.0 \(64 channels, N=4 there\).*choose N from \[1, 2, 4, 8, 16"),
        (lambda: create_model("cmunext_cmrf", N=16), r"encoders\.0 \(16 channels, N=8 there\) do not allow; "
                                                    r"choose N from \[1, 2, 4, 8\]"),
        (lambda: create_model("tinyunet3d", spatial_dims=2), "tinyunet3d is TinyU-Net for volumes .*=2"),
        (lambda: create_model("tinyunet", dtype="float16"), "dtype must be a floating-point .*'float16'"),
        (lambda: create_model("tinyunet", dtype=torch.int8), "dtype must be a floating-point .*torch.int8"),
        (lambda: create_model("tinyunet", device="gpu0"), "device must be a torch.device or .*'gpu0'"),
    ],
)
def test_bad_constructor_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --- inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_inputs_are_refused_clearly(name, dtype):
    model = small(name)
    x = example(name, model).to(dtype)
    label = type(model).__name__
    hint = r"x\.float\(\) / 255" if dtype == torch.uint8 else r"x\.float\(\)"
    expected = rf"{label} expects a floating-point input \(float32.*got {dtype}.*{hint}"
    with pytest.raises(ValueError, match=expected):
        model(x)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_an_input_of_another_float_dtype_than_the_weights_is_named(name, dtype):
    """torch said "expected scalar type Double but found Float" (which is which?)."""
    model = small(name).eval()
    x = example(name, model).to(dtype)
    label = type(model).__name__
    expected = rf"{label}'s weights are torch.float32 but the input is {dtype}: .*x.to\(torch.float32\)"
    with pytest.raises(ValueError, match=expected):
        model(x)
    if dtype == torch.bfloat16:  # once per model: a bf16 forward of SegNet takes seconds on the CPU
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no refusal
            assert model(x).shape[0] == x.shape[0]
    with pytest.raises(ValueError, match=r"CMRF's weights are torch.float64 but the input is torch.float32"):
        CMRF(4, 8, N=2).double()(torch.ones(1, 4, 3, 3))


def test_cmrf_refuses_integer_input_and_non_tensors():
    with pytest.raises(ValueError, match=r"CMRF expects a floating-point input.*torch\.int32"):
        CMRF(4, 8, N=2)(torch.ones(1, 4, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="CMRF expects a torch.Tensor, got list"):
        CMRF(4, 8, N=2)([[1.0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_check_input_accepts_every_floating_dtype(dtype):
    check_input(torch.zeros(1, 2, 4, 4, dtype=dtype), 2, 2, "Model", min_size=4)


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((2, 4, 4), {}, r"Model \(spatial_dims=2\) expects a 4-D input \(B, 2, \*, \*\), got shape \(2, 4"),
        ((1, 3, 4, 4), {}, r"Model expected 2 input channels, received 3: expected shape \(B, 2, \*, \*\)"),
        ((1, 2, 4, 3), dict(min_size=4, why="2 pools"), r"side >= 4 \(2 pools\), got spatial size \(4, 3\)"),
        ((1, 2, 8, 12), dict(multiple_of=8), r"multiple of 8, got spatial size \(8, 12\)"),
    ],
)
def test_check_input_messages(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_input(torch.zeros(shape), 2, 2, "Model", **kwargs)


def test_float64_and_bfloat16_models_run():
    model = copy.deepcopy(small("tinyunet")).double()
    assert model(torch.randn(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    model = copy.deepcopy(small("tinyunet")).to(torch.bfloat16)
    assert model(torch.randn(1, 3, 16, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_create_model_takes_timm_train_py_defaults():
    """timm's train.py passes drop_path_rate=None and checkpoint_path='' when not given."""
    model = cmrf.create_model("tinyunet", channels=(16, 32), drop_rate=0.0, drop_path_rate=None,
                              drop_block_rate=None, checkpoint_path="")
    assert isinstance(model, cmrf.TinyUNet)
    with pytest.raises(ValueError, match=r"unknown model \['tinyunet'\]; available: .*tinyunet"):
        cmrf.create_model(["tinyunet"])


def test_weights_for_other_input_channels_name_in_chans(tmp_path):
    """A 1-channel file loaded without in_chans listed a shape mismatch and nothing else."""
    weights = tmp_path / "grey.safetensors"
    cmrf.save_weights(create_model("tinyunet", in_chans=1, **SMALL["tinyunet"]), weights)
    for build in (lambda: timm.create_model("tinyunet", pretrained=True, pretrained_cfg_overlay=dict(
                      file=str(weights)), **SMALL["tinyunet"]),
                  lambda: create_model("tinyunet", checkpoint_path=weights, **SMALL["tinyunet"])):
        with pytest.raises(ValueError, match=r"the file is for 1 input channel\(s\) and the model takes 3: "
                                             r"build it with in_chans=1"):
            build()
