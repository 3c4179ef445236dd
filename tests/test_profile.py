"""Cost profiling: the paper's figures, the paper's counting rule, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cmrf
from cmrf.cli import main
from cmrf.layers import cmrf_num_params
from cmrf.profile import count_fvcore_macs, count_paper_flops


@pytest.fixture(scope="module")
def tinyunet_profile():
    return cmrf.profile(cmrf.create_model("tinyunet"), (1, 3, 256, 256))


def test_paper_figures(tinyunet_profile):
    assert tinyunet_profile.params == 481_170
    assert abs(tinyunet_profile.flops - 3.3267e9) <= 0.005e9
    # fvcore: 1.565G conv MACs plus 0.049G for batch norm (spec).
    assert abs(tinyunet_profile.macs - 1.614e9) <= 0.002e9


def test_cli_json(capsys):
    assert main(["profile", "tinyunet", "--input-size", "1", "3", "256", "256", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["params"] == 481_170
    assert abs(figures["flops"] - 3.3267e9) <= 0.005e9
    assert figures["macs"] > 0


def test_cli_json_names_the_model_measured_and_flags_that_disagree_are_refused(capsys):
    """The JSON held the figures only (tinyunet measured as tinyunet3d, --N and --channels were
    lost); --in-chans against --input-size's C failed in the model's own input check."""
    argv = ["profile", "tinyunet", "--input-size", "1", "1", "32", "32", "32", "--N", "4",
            "--channels", "8", "16", "--json"]
    assert main(argv) == 0
    figures = json.loads(capsys.readouterr().out)
    assert {k: figures[k] for k in ("model", "spatial_dims", "in_chans", "num_classes", "model_kwargs")} == {
        "model": "tinyunet3d", "spatial_dims": 3, "in_chans": 1, "num_classes": 2,
        "model_kwargs": {"N": 4, "channels": [8, 16]}}
    assert main(["profile", "tinyunet", "--input-size", "1", "3", "64", "64", "--in-chans", "1"]) == 2
    assert "--in-chans 1 does not match C = 3 of --input-size 1 3 64 64" in capsys.readouterr().err


def test_cli_model_kwargs(capsys):
    args = ["profile", "tinyunet", "--input-size", "1", "1", "64", "64", "--num-classes", "4", "--N", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    expected = cmrf.profile(cmrf.create_model("tinyunet", in_chans=1, num_classes=4, N=4), (1, 1, 64, 64))
    assert f"params {expected.params:,}" in out


def test_cli_names_the_model_it_measured(capsys):
    """A volume's input builds tinyunet3d (cmunext with spatial_dims=3), which was labelled as asked."""
    assert main(["profile", "tinyunet", "--input-size", "1", "1", "16", "16", "16", "--channels", "16"]) == 0
    assert capsys.readouterr().out.startswith("tinyunet3d: input 1x1x16x16x16:")
    assert main(["profile", "cmunext_s", "--input-size", "1", "1", "16", "16", "16"]) == 0
    assert capsys.readouterr().out.startswith("cmunext_s (spatial_dims=3): input")


def test_cli_bad_input_is_one_line(capsys):
    assert main(["profile", "nosuchnet"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuchnet'" in err and "Traceback" not in err


@pytest.mark.parametrize("N", [1, 2, 4, 16])
def test_params_follow_closed_form_for_every_n(N):
    widths = (64, 128, 256, 512)
    model = cmrf.create_model("tinyunet", N=N)
    encoder = sum(cmrf_num_params(a, b, N) for a, b in zip((3,) + widths[:-1], widths))
    decoder = sum(cmrf_num_params(b + c, c, N) for b, c in zip(widths[1:] + widths[-1:], widths))
    head = 64 * 2 + 2
    assert sum(p.numel() for p in model.parameters()) == encoder + decoder + head


def test_paper_rule_on_a_hand_counted_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),  # 8*4*4 outputs x 3*9 taps
        nn.BatchNorm2d(8),  # 4 x 128
        nn.ReLU(),  # free
        nn.Upsample(scale_factor=2, mode="bilinear"),  # 11 x 512
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # 512 x 9
        nn.Upsample(scale_factor=2, mode="bicubic"),  # 259 x 2048
    )
    expected = 2 * (128 * 27 + 4 * 128 + 11 * 512 + 512 * 9 + 259 * 2048)
    assert count_paper_flops(model.eval(), torch.zeros(1, 3, 4, 4)) == expected


def test_paper_rule_counts_the_other_layers_thop_counts():
    """MONAI's UNet normalises with InstanceNorm and activates with PReLU: they counted as zero."""
    layers = {
        nn.InstanceNorm2d(3, affine=True): 4 * 48,
        nn.InstanceNorm2d(3): 2 * 48,
        nn.LayerNorm(4): 4 * 48,
        nn.GroupNorm(1, 3): 0,  # thop has no rule for it
        nn.PReLU(): 48,
        nn.AvgPool2d(2): 12,
        nn.AdaptiveAvgPool2d(2): (4 + 1) * 12,
        nn.Softmax(dim=1): 16 * (3 * 3 - 1),
    }
    for layer, expected in layers.items():
        assert count_paper_flops(layer, torch.zeros(1, 3, 4, 4)) == 2 * expected, layer


@pytest.mark.parametrize("count", [count_paper_flops, count_fvcore_macs])
def test_counting_leaves_a_training_model_as_it_was(count):
    """The counters ran the forward in training mode: BatchNorm's running statistics changed."""
    model = cmrf.TinyUNet(channels=(16, 32), N=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_optimized_model_is_refused_not_undercounted():
    """optimize_for_inference calls its convolutions directly: module hooks saw 1/27 of them."""
    optimized = cmrf.optimize_for_inference(cmrf.TinyUNet(channels=(16, 32)).eval())
    expected = "comes from optimize_for_inference.*profile the model it was made from"
    with pytest.raises(ValueError, match=expected):
        cmrf.profile(optimized, (1, 3, 32, 32))
    with pytest.raises(ValueError, match=expected):
        count_paper_flops(optimized, torch.zeros(1, 3, 32, 32))


def test_a_meta_model_is_refused_with_the_way_to_profile_it():
    """create_model(device="meta") builds one; torch's meta kernels fail inside fvcore's trace."""
    model = cmrf.create_model("tinyunet", channels=(16, 32), device="meta")
    with pytest.raises(ValueError, match=r"cannot profile TinyUNet on the meta device.*to_empty"):
        cmrf.profile(model, (1, 3, 32, 32))
    expected = cmrf.profile(cmrf.TinyUNet(channels=(16, 32)), (1, 3, 32, 32))
    assert cmrf.profile(model.to_empty(device="cpu"), (1, 3, 32, 32)) == expected


def test_functional_interpolate_is_free():
    class Up(nn.Module):
        def forward(self, x):
            return nn.functional.interpolate(x, scale_factor=2, mode="bicubic")

    assert count_paper_flops(Up(), torch.zeros(1, 1, 4, 4)) == 0


def test_profile_of_a_function_is_a_type_error_naming_it():
    """A function failed deep inside ("'function' object has no attribute 'named_modules'")."""
    with pytest.raises(TypeError, match=r"^profile needs an nn.Module, got function$"):
        cmrf.profile(lambda t: t, (1, 3, 32, 32))


def test_profile_restores_training_mode():
    """Every submodule's own flag: a BatchNorm frozen with .eval() inside a training model stays
    frozen (restoring only the top-level flag would switch it back to training)."""
    model = cmrf.TinyUNet(channels=(16, 32)).train()
    frozen = model.encoders[0].pw1.norm.eval()
    cmrf.profile(model, (1, 3, 32, 32))
    assert model.training and not frozen.training
    modes = {name: m.training for name, m in model.named_modules()}
    assert sum(modes.values()) == len(modes) - 1


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        cmrf.profile(cmrf.TinyUNet(), (3, 256))
    with pytest.raises(ValueError, match=r"input_size\[2\] must be an integer >= 1, got 32.7"):
        cmrf.profile(cmrf.TinyUNet(), (1, 3, 32.7, 32))  # refused, not truncated to 32
    with pytest.raises(ValueError, match=r"input_size\[0\] must be an integer >= 1, got True"):
        cmrf.profile(cmrf.TinyUNet(), (True, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got a tensor; pass its \.shape, \(1, 3, 32, 32\)$"):
        cmrf.profile(cmrf.TinyUNet(), torch.randn(1, 3, 32, 32))  # its repr filled the message


@pytest.mark.parametrize(
    ("argv", "input_size"),
    [(["tinyunet3d", "--channels", "16", "32"], [1, 3, 64, 64, 64]),
     (["tinyunet", "--in-chans", "1", "--channels", "16", "32"], [1, 1, 256, 256]),
     # deeper than the default side allows: 2 ** levels, not an error about a size nobody gave
     (["tinyunet", "--N", "2", "--channels", *["4"] * 9], [1, 3, 512, 512]),
     (["tinyunet3d", "--N", "2", "--channels", *["4"] * 7], [1, 3, 128, 128, 128])],
)
def test_profile_default_input_follows_the_model(capsys, argv, input_size):
    """The default input was 1x3x256x256 whatever the model: a 3D or 1-channel model failed."""
    assert main(["profile", *argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"] == input_size


class _Untraceable(nn.Module):
    """Counts fine with hooks, but the tracer refuses its output (a Python int made from a tensor)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.head(self.conv(x))
        return {"out": y, "n": len(y)}


def test_a_model_fvcore_cannot_trace_keeps_no_hooks():
    """fvcore registers a hook on every module for the trace and leaves them when it fails: they
    would then run on every call of the user's model."""
    model = _Untraceable()
    with pytest.raises(RuntimeError):
        cmrf.profile(model, (1, 3, 16, 16))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("name", "built"), [("cmunext", ("cmunext", {"spatial_dims": 3})),
                                              ("tinyunet", ("tinyunet3d", {}))])
def test_profile_cli_builds_the_model_for_a_volume_input(capsys, name, built):
    """`cmrf profile cmunext --input-size 1 3 32 32 32` failed: "CMUNeXt (spatial_dims=2) expects a
    4-D input"; cmrf train builds it for volumes from the same name."""
    small = ["--channels", "8", "16", "--N", "4"] if name == "tinyunet" else []  # CMUNeXt's widths are dims=
    argv = ["profile", name, "--input-size", "1", "1", "32", "32", "32", *small, "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    figures = json.loads(capsys.readouterr().out)
    kwargs = {"channels": (8, 16), "N": 4} if small else {}
    expected = cmrf.profile(cmrf.create_model(built[0], in_chans=1, **kwargs, **built[1]), (1, 1, 32, 32, 32))
    assert figures["params"] == expected.params and figures["flops"] == expected.flops


def test_a_compiled_model_is_profiled_as_the_model_it_wraps():
    """fvcore's trace refused Dynamo's wrapper with a raw torch error; replace_blocks takes it."""
    model = cmrf.create_model("tinyunet", channels=(16, 32), N=4)
    compiled = torch.compile(model)
    assert cmrf.profile(compiled, (1, 3, 32, 32)) == cmrf.profile(model, (1, 3, 32, 32))
    holder = nn.Sequential(torch.compile(nn.Conv2d(3, 8, 3)), nn.ReLU())
    with pytest.raises(ValueError, match=r"holds torch.compile'd submodules \(0\).*before compiling"):
        cmrf.profile(holder, (1, 3, 16, 16))


def test_profile_inside_an_autocast_region_counts_the_model_as_it_is():
    """Under an enclosing ``torch.autocast`` fvcore's trace failed ("Cannot insert a Tensor that
    requires grad as a constant", with the weight's values in the message)."""
    model = cmrf.create_model("tinyunet", channels=(8, 16), N=2)
    expected = cmrf.profile(model, (1, 3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counted = cmrf.profile(model, (1, 3, 32, 32))
    assert (counted.params, counted.macs, counted.flops) == (expected.params, expected.macs, expected.flops)
