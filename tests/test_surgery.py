"""replace_blocks: which modules it replaces, on networks written by others, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cmrf import CMRF, replace_blocks
from cmrf.layers import batchnorm_type, conv_type, maxpool_type
from cmrf.surgery import NothingToReplaceWarning, ReplaceReport, choose_n

# --- networks written the way users write them -------------------------------------------------


def conv_bn_relu(cin: int, cout: int, spatial_dims: int = 2, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        conv_type(spatial_dims)(cin, cout, 3, stride=stride, padding=1, bias=False),
        batchnorm_type(spatial_dims)(cout),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Module):
    """(conv => BN => ReLU) * 2, as in most hand-written U-Nets."""

    def __init__(self, cin: int, cout: int, spatial_dims: int = 2, stride: int = 1):
        super().__init__()
        self.double_conv = nn.Sequential(
            conv_bn_relu(cin, cout, spatial_dims, stride), conv_bn_relu(cout, cout, spatial_dims)
        )

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x1, x2):
        return self.conv(torch.cat([x2, self.up(x1)], dim=1))


class UserUNet(nn.Module):
    """Encoder stages as nn.Sequential in a ModuleList, decoder with DoubleConv classes."""

    def __init__(self, in_channels=3, num_classes=2, widths=(8, 16, 32)):
        super().__init__()
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(a, b)) for a, b in zip(widths, widths[1:])
        )
        self.ups = nn.ModuleList(Up(b + a, a) for a, b in zip(widths[::-1][1:], widths[::-1]))
        self.outc = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


class UserSegNet(nn.Module):
    """A small SegNet with functional pooling indices and the classifier inside the last stage."""

    def __init__(self, in_channels=3, num_classes=2, widths=(8, 16, 32)):
        super().__init__()
        chans = (in_channels,) + widths
        self.enc = nn.ModuleList(
            nn.Sequential(conv_bn_relu(a, b), conv_bn_relu(b, b)) for a, b in zip(chans, chans[1:])
        )
        rev = widths[::-1]
        self.dec = nn.ModuleList(
            nn.Sequential(conv_bn_relu(a, a), conv_bn_relu(a, b)) for a, b in zip(rev, rev[1:])
        )
        self.dec.append(
            nn.Sequential(conv_bn_relu(widths[0], widths[0]), nn.Conv2d(widths[0], num_classes, 3, padding=1))
        )

    def forward(self, x):
        indices = []
        for stage in self.enc:
            x, idx = F.max_pool2d(stage(x), 2, 2, return_indices=True)
            indices.append(idx)
        for stage, idx in zip(self.dec, reversed(indices)):
            x = stage(F.max_unpool2d(x, idx, 2, 2))
        return x


def monai_basic_unet(spatial_dims=2):
    BasicUNet = pytest.importorskip("monai.networks.nets").BasicUNet
    return BasicUNet(spatial_dims=spatial_dims, in_channels=3, out_channels=2, features=(8, 8, 16, 16, 32, 8))


def monai_dynunet():
    DynUNet = pytest.importorskip("monai.networks.nets").DynUNet
    return DynUNet(2, 3, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2])


def smp_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2)


# name -> (builder, input shape, paths that must be among the replaced ones)
FOREIGN = {
    "user_segnet": (UserSegNet, (2, 3, 32, 32), {"enc.0", "enc.2", "dec.0", "dec.1"}),
    "user_unet": (UserUNet, (2, 3, 32, 32), {"inc", "downs.0.1", "downs.1.1", "ups.0.conv", "ups.1.conv"}),
    "monai_basicunet": (monai_basic_unet, (2, 3, 32, 32), {"conv_0", "down_1.convs", "upcat_1.convs"}),
    "monai_basicunet_3d": (lambda: monai_basic_unet(3), (1, 3, 32, 32, 32), {"conv_0", "down_4.convs"}),
    # Its blocks are registered twice (also under skip_layers, which runs them).
    "monai_dynunet": (monai_dynunet, (2, 3, 32, 32), {"input_block", "upsamples.0.conv_block"}),
    "smp_unet_resnet18": (smp_unet, (2, 3, 64, 64), {"encoder.layer1", "encoder.layer4.1"}),
}


def train_losses(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 4) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_networks_are_replaced_and_still_train(name):
    build, shape, must_replace = FOREIGN[name]
    model = build()
    x = torch.randn(shape)
    target = torch.randint(0, 2, (shape[0],) + shape[2:])
    with torch.no_grad():
        shape_before = model.eval()(x).shape
    params_before = sum(p.numel() for p in model.parameters())
    # 2D: the default probe (inferred from the first conv); 3D: a small volume of our own.
    probe = torch.randn(1, *shape[1:]) if len(shape) == 5 else None
    report = replace_blocks(model, example_input=probe)
    params_after = sum(p.numel() for p in model.parameters())

    assert must_replace <= set(report.paths), str(report)
    assert report.params_before == params_before and report.params_after == params_after
    assert params_after < params_before
    for path in report.paths:
        assert isinstance(model.get_submodule(path), CMRF)
        assert path in str(report)
    with torch.no_grad():
        assert model.eval()(x).shape == shape_before
    losses = train_losses(model, x, target)
    assert losses[-1] < losses[0], losses


def test_a_block_as_wide_as_the_classes_before_the_head_is_still_replaced():
    """Only the convolution that makes the output is the head: an earlier one with as many
    channels as there are classes (8 here) is a feature convolution, and its block is replaced."""
    report = replace_blocks(UserUNet(num_classes=8), dry_run=True)
    assert report.paths == ["inc", "downs.0.1", "downs.1.1", "ups.0.conv", "ups.1.conv"]


class _ShapeFollowsBlockType(nn.Module):
    """A forward that depends on the replaced module's class: runs, but with another output."""

    def __init__(self):
        super().__init__()
        self.block = DoubleConv(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.head(self.block(x))
        return y[..., :4, :] if isinstance(self.block, CMRF) else y


def test_a_swap_that_changes_the_output_shape_is_undone():
    model = _ShapeFollowsBlockType()
    with pytest.raises(RuntimeError, match=r"undid every swap .*output shapes changed"):
        replace_blocks(model, example_input=torch.randn(1, 8, 16, 16))
    assert isinstance(model.block, DoubleConv)


def test_dry_run_counts_only_the_targeted_block_not_others_sharing_its_prefix():
    """blocks.1 is replaced; blocks.10, whose path starts with the same characters, is kept."""
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 16, 1))
    model.add_module("blocks", nn.Sequential(*(DoubleConv(16, 16) for _ in range(11))))
    planned = replace_blocks(model, targets=["blocks.1"], dry_run=True)
    done = replace_blocks(model, targets=["blocks.1"])
    assert planned.paths == done.paths == ["blocks.1"]
    assert planned.params_after == done.params_after == sum(p.numel() for p in model.parameters())


def test_user_unet_mapping_and_reasons():
    model = UserUNet()
    report = replace_blocks(model)
    # Down stages (pool + DoubleConv) change resolution: their DoubleConv is replaced instead;
    # Up modules take two inputs: skipped with the reason, their DoubleConv replaced.
    assert report.paths == ["inc", "downs.0.1", "downs.1.1", "ups.0.conv", "ups.1.conv"]
    reasons = {s.path: s.reason for s in report.skipped}
    assert "2 positional inputs" in reasons["ups.0"]
    assert isinstance(model.outc, nn.Conv2d)  # the head stays


def test_smp_unet_reports_unprobeable_blocks():
    report = replace_blocks(smp_unet(), dry_run=True)
    reasons = {s.path: s.reason for s in report.skipped}
    assert "returns a list" in reasons["encoder"]
    assert "keyword arguments" in reasons["decoder.blocks.0"]


# --- property test: random stacks of conv blocks -------------------------------------------------


class Residual(nn.Module):
    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels, spatial_dims), conv_bn_relu(channels, channels, spatial_dims)
        )

    def forward(self, x):
        return x + self.body(x)


CHANNELS = st.sampled_from([4, 5, 6, 8, 12, 16, 24, 7])
SIDES = {1: 32, 2: 16, 3: 8}


@st.composite
def conv_stacks(draw):
    """A Sequential of random units, the blocks replace_blocks must replace, and their N."""
    spatial_dims = draw(st.sampled_from([1, 2, 3]))
    N = draw(st.sampled_from([1, 2, 4, 8]))
    max_downs = 2 if spatial_dims == 3 else 3
    channels = in_channels = draw(st.sampled_from([1, 3]))
    units, expected, downs = [], {}, 0

    def expect(path, out):
        # "reduce" never goes down to N' = 1 (no spatial convolution) unless N = 1 was asked for
        n = max((n for n in range(1, N + 1) if out % (2 * n) == 0 and (n > 1 or N == 1)), default=None)
        if n is not None:
            expected[path] = n
        return n is not None

    for i in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["single", "double", "strided", "pool", "group", "residual"]))
        if kind in ("strided", "pool") and downs >= max_downs:
            kind = "double"
        out = draw(CHANNELS)
        path = str(i)
        if kind == "single":
            units.append(conv_bn_relu(channels, out, spatial_dims))
        elif kind == "double":
            units.append(DoubleConv(channels, out, spatial_dims))
            expect(path, out)
        elif kind == "strided":  # halves the resolution: never replaced, nor its single convs
            units.append(DoubleConv(channels, out, spatial_dims, stride=2))
            downs += 1
        elif kind == "pool":
            units.append(maxpool_type(spatial_dims)(2))
            out = channels
            downs += 1
        elif kind == "group":  # the outermost block wins; if it cannot be replaced, look inside
            mid = draw(CHANNELS)
            units.append(
                nn.Sequential(DoubleConv(channels, mid, spatial_dims), DoubleConv(mid, out, spatial_dims))
            )
            if not expect(path, out):
                expect(f"{path}.0", mid)
        else:
            units.append(Residual(channels, spatial_dims))
            out = channels
            expect(path, out)
        channels = out
    units.append(conv_type(spatial_dims)(channels, 2, 1))  # the head
    model = nn.Sequential(*units)
    x = torch.randn((2, in_channels) + (SIDES[spatial_dims],) * spatial_dims)
    return model, x, N, expected


@given(conv_stacks())
def test_random_stacks_replace_exactly_the_shape_preserving_multi_conv_blocks(case):
    model, x, N, expected = case
    with torch.no_grad():
        shape_before = model.eval()(x).shape
    untouched = {name: m for name, m in model.named_modules() if name and name.split(".")[0] not in expected}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToReplaceWarning)
        report = replace_blocks(model, N, example_input=x)
    replaced = {name: m.N for name, m in model.named_modules() if isinstance(m, CMRF)}
    assert replaced == expected, str(report)
    assert {r.path: r.N for r in report.replaced} == expected
    for name, module in untouched.items():
        if not any(name == p or name.startswith(p + ".") for p in expected):
            assert model.get_submodule(name) is module
    with torch.no_grad():
        assert model(x).shape == shape_before


def test_choose_n():
    assert choose_n(64, 8) == 8
    assert choose_n(24, 8) == 6
    assert choose_n(10, 8) == 5
    assert choose_n(2, 8) == 1
    assert choose_n(7, 8) is None


# --- options -------------------------------------------------------------------------------------


def small_stack():
    return nn.Sequential(
        DoubleConv(3, 16), nn.MaxPool2d(2), DoubleConv(16, 24), DoubleConv(24, 16), nn.Conv2d(16, 2, 1)
    )


def test_targets_by_class_name_type_and_pattern():
    for targets in (["DoubleConv"], [DoubleConv], "0", ["0", "2"]):
        model = small_stack()
        report = replace_blocks(model, targets=targets)
        wanted = {"0", "2", "3"} if targets in (["DoubleConv"], [DoubleConv]) else set(targets)
        assert set(report.paths) == wanted


def test_targets_force_a_single_conv_and_an_inner_module():
    model = small_stack()
    report = replace_blocks(model, targets=["0.double_conv.1"])
    assert report.paths == ["0.double_conv.1"]  # one ConvBNReLU, 16 -> 16, forced
    assert isinstance(model[0].double_conv[1], CMRF) and model[0].double_conv[1].add_residual


def test_exclude_keeps_a_subtree():
    model = small_stack()
    report = replace_blocks(model, exclude=["2", nn.Upsample])
    assert report.paths == ["0", "3"]
    assert ("2", "excluded") in {(s.path, s.reason) for s in report.skipped}
    assert isinstance(model[2], DoubleConv)


def test_exclude_inside_a_block_keeps_the_block():
    """Replacing the block would remove the excluded module with it."""
    model = small_stack()
    kept = model[2].double_conv[0]
    report = replace_blocks(model, exclude=["2.double_conv.0"])
    assert report.paths == ["0", "3"] and any(m is kept for m in model.modules())
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["2"] == "holds the excluded module 2.double_conv.0"
    assert reasons["2.double_conv.0"] == "excluded"
    model = small_stack()
    with pytest.warns(NothingToReplaceWarning, match="holds the excluded module"):
        replace_blocks(model, exclude=[nn.BatchNorm2d])  # every block holds one
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6


def test_indivisible_channels_reduce_or_skip():
    model = small_stack()
    report = replace_blocks(model, N=8)
    assert {r.path: r.N for r in report.replaced} == {"0": 8, "2": 6, "3": 8}
    model = small_stack()
    report = replace_blocks(model, N=8, indivisible="skip")
    assert report.paths == ["0", "3"]
    reasons = {s.path: s.reason for s in report.skipped}
    assert "24 is not divisible by 2N = 16" in reasons["2"]


def test_odd_channels_are_skipped_with_reason():
    model = nn.Sequential(DoubleConv(3, 7), nn.Conv2d(7, 2, 1))
    with pytest.warns(NothingToReplaceWarning):
        report = replace_blocks(model)
    assert "7 is odd" in report.skipped[0].reason


def test_dry_run_changes_nothing_and_predicts_params():
    model = small_stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    report = replace_blocks(model, dry_run=True)
    assert list(model.modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert report.dry_run and not report.changed and "would replace" in str(report)
    predicted = report.params_after
    assert replace_blocks(model).params_after == predicted == sum(p.numel() for p in model.parameters())


class TiedBlocks(nn.Module):
    """Two blocks sharing one convolution, and a head sharing nothing."""

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(16, 16, 3, padding=1)
        self.inc = DoubleConv(3, 16)
        self.b1 = nn.Sequential(shared, nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.b2 = nn.Sequential(shared, nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.inc(x))))


def test_dry_run_counts_shared_parameters_once():
    predicted = replace_blocks(TiedBlocks(), dry_run=True).params_after
    model = TiedBlocks()
    assert replace_blocks(model).paths == ["inc", "b1", "b2"]
    assert predicted == sum(p.numel() for p in model.parameters())


def test_hooks_on_a_replaced_block_are_reported():
    model = small_stack()
    model[2].register_forward_hook(lambda *args: None)
    model[3].double_conv[0].register_forward_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"had hooks registered \(2, 3\.double_conv\.0\)"):
        replace_blocks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_blocks(small_stack())  # no hooks: no warning
        model = small_stack()
        model[2].double_conv[0][0] = nn.utils.spectral_norm(model[2].double_conv[0][0])
        replace_blocks(model)  # torch's own hook goes with its module: no word either


class TwoHeads(nn.Module):
    """A segmentation head, then a deep-supervision head run after it (the last convolution)."""

    def __init__(self):
        super().__init__()
        self.enc = DoubleConv(3, 16)
        self.deep = DoubleConv(16, 16)
        self.head = nn.Sequential(conv_bn_relu(16, 16), nn.Conv2d(16, 2, 1))
        self.aux = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        features = self.enc(x)
        deep = self.deep(F.max_pool2d(features, 2))
        logits = self.head(features + F.interpolate(deep, scale_factor=2.0))
        return logits, F.interpolate(self.aux(deep), scale_factor=2.0)


def test_every_classifier_head_is_kept_not_only_the_last_run():
    model = TwoHeads()
    report = replace_blocks(model)
    assert report.paths == ["enc", "deep"]
    assert {s.path: s.reason for s in report.skipped}["head"] == (
        "holds the network's final convolution head.1 (a classifier head)"
    )
    assert isinstance(model.head[1], nn.Conv2d)


class SegThenEdge(nn.Module):
    """A two-class segmentation head block, then a one-channel edge head run after it: the last
    convolution is not as wide as the main head, which is still a head."""

    def __init__(self):
        super().__init__()
        self.enc = DoubleConv(3, 16)
        self.head = nn.Sequential(conv_bn_relu(16, 16), nn.Conv2d(16, 2, 1))
        self.edge = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        features = self.enc(x)
        return self.head(features), self.edge(features)


def test_a_head_is_kept_when_a_head_of_another_width_runs_after_it():
    model = SegThenEdge()
    report = replace_blocks(model)
    assert report.paths == ["enc"]
    assert {s.path: s.reason for s in report.skipped}["head"] == (
        "holds the network's final convolution head.1 (a classifier head)"
    )


class CoarseThenRefined(nn.Module):
    """A coarse head block whose logits the model returns and a refinement stage also reads, then
    the final head, as wide as the coarse one (cascaded or refinement segmentation)."""

    def __init__(self):
        super().__init__()
        self.enc = DoubleConv(3, 16)
        self.coarse = nn.Sequential(conv_bn_relu(16, 16), nn.Conv2d(16, 2, 1))
        self.refine = DoubleConv(16 + 2, 16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        features = self.enc(x)
        coarse = self.coarse(features)
        return self.head(self.refine(torch.cat([features, coarse], 1))), coarse


def test_a_coarse_head_that_a_refinement_stage_reads_is_kept():
    """``coarse.1`` feeds another convolution, but it makes a returned output as wide as the final
    head's: a head all the same, and its block stays."""
    model = CoarseThenRefined()
    report = replace_blocks(model)
    assert report.paths == ["enc", "refine"]
    assert {s.path: s.reason for s in report.skipped}["coarse"] == (
        "holds the network's final convolution coarse.1 (a classifier head)"
    )
    assert isinstance(model.coarse[1], nn.Conv2d)


class ReturnsConcatenatedFeatures(nn.Module):
    """Logits of 4 classes and the features of two blocks concatenated; the first block is 4 wide."""

    def __init__(self):
        super().__init__()
        self.enc = DoubleConv(3, 4)
        self.mid = DoubleConv(4, 12)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        first = self.enc(x)
        features = torch.cat([first, self.mid(first)], 1)
        return self.head(features), features


def test_a_block_as_wide_as_the_classes_whose_features_are_returned_is_replaced():
    """``enc``'s last convolution reaches a returned output through no other convolution and is as
    wide as the head, but that output is 16 wide: a feature map, not logits, so ``enc`` is a block."""
    assert replace_blocks(ReturnsConcatenatedFeatures()).paths == ["enc", "mid"]


class BlocksRunThroughAnotherPath(nn.Module):
    """Blocks listed in ``blocks`` and run through ``path``, which registers them again (as MONAI's
    DynUNet does with its ``skip_layers``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.blocks = nn.ModuleList([DoubleConv(16, 16), DoubleConv(16, 16)])
        self.path = nn.Sequential(*self.blocks)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.path(self.stem(x)))


def test_blocks_registered_at_two_paths_are_replaced_at_both_not_through_their_holder():
    """Each block becomes one CMRF at both of its paths, so the forward (through ``path``) runs it;
    ``path`` itself is not replaced whole, which would leave the listed blocks behind."""
    model = BlocksRunThroughAnotherPath()
    x = torch.randn(2, 3, 16, 16)
    report = replace_blocks(model)
    assert report.paths == ["blocks.0", "blocks.1"]
    assert {s.path: s.reason for s in report.skipped}["path"] == (
        "holds path.0, which is replaced on its own (as blocks.0)"
    )
    assert isinstance(model.blocks[0], CMRF) and model.path[0] is model.blocks[0]
    assert report.params_after == sum(p.numel() for p in model.parameters())
    seen = []
    model.blocks[1].register_forward_hook(lambda *_: seen.append(1))
    model(x)
    assert seen  # the forward runs the new blocks


class ProjectThenBlock(nn.Module):
    """A 1x1 projection, then a two-convolution body."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)
        self.body = TwoConvs(channels)

    def forward(self, x):
        return self.body(self.proj(x))


def test_a_block_kept_for_a_module_registered_elsewhere_is_searched_inside():
    """The block stays for its shared projection; the body inside it is still a block."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ProjectThenBlock(16), nn.Conv2d(16, 2, 1))
    model.spare = model[1].proj
    model.forward = lambda x: model[2](model[1](model[0](x)))
    report = replace_blocks(model)
    assert report.paths == ["1.body"] and isinstance(model[1].body, CMRF)
    reason = {s.path: s.reason for s in report.skipped}["1"]
    assert reason == "holds 1.proj, which is also registered at spare outside it"


def test_selectors_may_name_a_block_by_its_second_path():
    """``path.0`` is the block registered first as ``blocks.0``: it names that block too."""
    report = replace_blocks(BlocksRunThroughAnotherPath(), exclude=["path.0"], dry_run=True)
    assert report.paths == ["blocks.1"]
    report = replace_blocks(BlocksRunThroughAnotherPath(), targets=["path.1"], dry_run=True)
    assert report.paths == ["blocks.1"]


class ReadsInternalsOfABlockRegisteredTwice(BlocksRunThroughAnotherPath):
    """Its forward reads a BatchNorm weight of ``blocks.0`` (also ``path.0``): no swap can stay."""

    def forward(self, x):
        scale = self.blocks[0].double_conv[0][1].weight.view(1, -1, 1, 1)
        return self.head(self.path(self.stem(x)) * scale)


def test_a_failed_swap_puts_a_block_registered_twice_back_at_both_paths():
    model = ReadsInternalsOfABlockRegisteredTwice()
    registered = dict(model.named_modules(remove_duplicate=False))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model.eval()(x)
    with pytest.raises(RuntimeError, match=r"undid every swap .*AttributeError"):
        replace_blocks(model, example_input=x)
    for i in range(2):
        assert model.blocks[i] is registered[f"blocks.{i}"] is registered[f"path.{i}"] is model.path[i]
    assert dict(model.named_modules(remove_duplicate=False)) == registered
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the forward runs the old blocks through ``path``


def test_dry_run_predicts_the_params_of_blocks_registered_twice():
    """Each block goes from both of its paths: the dry run must not count it as kept at the second."""
    predicted = replace_blocks(BlocksRunThroughAnotherPath(), dry_run=True)
    model = BlocksRunThroughAnotherPath()
    done = replace_blocks(model)
    assert predicted.paths == done.paths == ["blocks.0", "blocks.1"]
    assert predicted.params_after == done.params_after == sum(p.numel() for p in model.parameters())
    assert predicted.params_after < predicted.params_before


class SharesAWeightWithABlock(nn.Module):
    """A single convolution (kept: no block) tied to the second convolution of a replaced block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = DoubleConv(16, 16)
        self.refine = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.refine.weight = self.block.double_conv[1][0].weight
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.refine(self.block(self.stem(x))))


def test_dry_run_keeps_a_parameter_a_kept_module_shares_with_a_replaced_block():
    """The tied weight stays in the model with ``refine``: it is not removed with the block."""
    predicted = replace_blocks(SharesAWeightWithABlock(), dry_run=True)
    model = SharesAWeightWithABlock()
    tied = model.refine.weight
    done = replace_blocks(model)
    assert predicted.paths == done.paths == ["block"] and model.refine.weight is tied
    assert predicted.params_after == done.params_after == sum(p.numel() for p in model.parameters())


def test_a_module_registered_elsewhere_inside_a_block_keeps_the_block():
    """A convolution of a block also registered outside any replaced block would stay in the
    model with its parameters: the block is not replaced."""
    model = nn.Module()
    model.net = small_stack()
    model.spare = model.net[2].double_conv[0][0]  # another reference to a convolution of block 2
    model.forward = model.net.forward
    report = replace_blocks(model)
    reason = {s.path: s.reason for s in report.skipped}["net.2"]
    assert reason == "holds net.2.double_conv.0.0, which is also registered at spare outside it"
    assert report.paths == ["net.0", "net.3"] and not isinstance(model.net[2], CMRF)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, and still used
def test_a_torchscript_model_is_refused():
    model = small_stack().eval()
    for compiled in (torch.jit.trace(model, torch.randn(1, 3, 16, 16)), torch.jit.script(model)):
        with pytest.raises(ValueError, match=r"got a TorchScript module .* then script or trace it again"):
            replace_blocks(compiled)


def test_a_compiled_model_has_its_blocks_swapped_in_the_module_it_wraps():
    """The probe runs the plain module (not Dynamo over the probe's hooks), the report names that
    module's paths, and the compiled model runs the new blocks at its next call."""
    model = small_stack().eval()
    compiled = torch.compile(model, backend="eager")
    frames = torch._dynamo.utils.counters["frames"]["total"]
    try:
        report = replace_blocks(compiled)
        assert torch._dynamo.utils.counters["frames"]["total"] == frames  # nothing compiled
        assert report.paths and not any("_orig_mod" in path for path in report.paths)
        assert all(isinstance(model.get_submodule(path), CMRF) for path in report.paths)
        x = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-6)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("targets", [None, ["DoubleConv"], [DoubleConv]])
def test_compiled_blocks_inside_a_model_are_probed_eagerly_and_named_by_their_class(targets):
    """`model[0] = torch.compile(model[0])`: the probe compiled it (seconds per block, spending the
    recompile limit), the report called it 'OptimizedModule' and class selectors missed it."""
    model = small_stack().eval()
    model[0] = torch.compile(model[0], backend="eager")
    frames = torch._dynamo.utils.counters["frames"]["total"]
    try:
        report = replace_blocks(model, targets=targets)
        assert torch._dynamo.utils.counters["frames"]["total"] == frames  # nothing compiled
        kinds = {row.path: row.old_type for row in report.replaced}
        assert kinds["0"] == "DoubleConv (compiled)" and kinds["2"] == "DoubleConv"
        assert isinstance(model[0], CMRF)  # the wrapper would go on running the old block
    finally:
        torch._dynamo.reset()


def test_a_model_wrapped_for_distributed_training_is_refused():
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)  # no process group needed
    nn.Module.__init__(wrapped)
    wrapped.module = small_stack()
    with pytest.raises(ValueError, match=r"in DistributedDataParallel.*replace the blocks before wrapping"):
        replace_blocks(wrapped)
    # fully_shard (FSDP2) makes a class FSDP<Model> deriving from FSDPModule: refused by its bases.
    FSDPModule = type("FSDPModule", (nn.Module,), {})
    sharded = type("FSDPSequential", (FSDPModule, nn.Sequential), {})(*small_stack())
    with pytest.raises(ValueError, match=r"in FSDPSequential.*replace the blocks before wrapping"):
        replace_blocks(sharded)
    # ... also inside the user's own module, which the wrapper's forward runs.
    outer = nn.Sequential(nn.Identity())
    outer.append(wrapped)
    with pytest.raises(ValueError, match=r"in DistributedDataParallel \(at 1\).*before wrapping"):
        replace_blocks(outer)


class TwoConvs(nn.Module):
    """Two 3x3 convolutions as plain attributes (TorchScript can compile it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, and still used
def test_a_torchscript_module_inside_the_model_is_kept_and_reported():
    """Hooks cannot be put on it and its compiled forward would not run a CMRF put inside it."""
    scripted = torch.jit.script(TwoConvs(16))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), scripted, TwoConvs(16), nn.Conv2d(16, 2, 1))
    report = replace_blocks(model)
    assert report.paths == ["2"] and model[1] is scripted
    assert "TorchScript module" in {s.path: s.reason for s in report.skipped}["1"]


class Gate(nn.Module):
    """Squeeze-excitation on its own: 1x1 convolutions of the pooled map scale the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


def test_a_gate_that_convolves_only_pooled_maps_is_not_a_block():
    """A CMRF in a gate's place would make a new feature map of what only scaled one."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), DoubleConv(16, 16), Gate(16), nn.Conv2d(16, 2, 1))
    assert replace_blocks(model, dry_run=True).paths == ["1"]
    report = replace_blocks(model, targets=["1", "2"], dry_run=True)
    assert report.paths == ["1"]
    assert "convolves only pooled 1x1 maps" in {s.path: s.reason for s in report.skipped}["2"]


class SpatialChannelGate(nn.Module):
    """scSE: a channel gate from the pooled map plus a spatial gate, a 1x1 convolution on the grid."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel = Gate(channels)
        self.spatial = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        return self.channel(x) + x * torch.sigmoid(self.spatial(x))


class ChainedGates(nn.Module):
    """CBAM-like: a channel gate, then a spatial gate from a 7x7 convolution, scaling in turn."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel = Gate(channels)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        y = self.channel(x)
        pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
        return y * torch.sigmoid(self.spatial(pooled))


class GatedResidual(nn.Module):
    """An SE-ResNet block: the gate scales the convolutions' output, and the input is added back."""

    def __init__(self, channels: int):
        super().__init__()
        self.body, self.gate = DoubleConv(channels, channels), Gate(channels)

    def forward(self, x):
        return self.gate(self.body(x)) + x


@pytest.mark.parametrize("gate", [SpatialChannelGate, ChainedGates])
def test_an_attention_gate_convolving_on_the_grid_is_not_a_block(gate):
    """smp's scSE attention (its spatial gate is a 1x1 convolution on the input's grid) became a
    CMRF 4-5 times its size, turning gated features into new ones, without a word."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), DoubleConv(16, 16), gate(16), GatedResidual(16),
                          nn.Conv2d(16, 2, 1))
    report = replace_blocks(model, dry_run=True)
    assert report.paths == ["1", "3"]  # the gated residual block is still a block
    report = replace_blocks(model, targets=["2"], dry_run=True)
    assert not report.paths and "an attention gate" in {s.path: s.reason for s in report.skipped}["2"]


def test_no_scse_attention_of_an_smp_unet_becomes_a_cmrf():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_attention_type="scse")
    report = replace_blocks(model, example_input=torch.randn(2, 3, 64, 64), dry_run=True)
    assert report.paths and not any("attention" in path for path in report.paths)


def test_no_squeeze_excitation_of_a_torchvision_network_becomes_a_cmrf():
    models = pytest.importorskip("torchvision.models")
    features = models.mobilenet_v3_small().features
    report = replace_blocks(features, example_input=torch.randn(1, 3, 64, 64), dry_run=True)
    assert report.paths and "SqueezeExcitation" not in {r.old_type for r in report.replaced}


class ReturnsFeatures(nn.Module):
    """Logits and the bottleneck's features: a returned feature map is no classifier head."""

    def __init__(self):
        super().__init__()
        self.enc = DoubleConv(3, 16)
        self.mid = DoubleConv(16, 16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        features = self.mid(self.enc(x))
        return self.head(features), features


def test_blocks_whose_features_the_model_returns_are_still_replaced():
    assert replace_blocks(ReturnsFeatures()).paths == ["enc", "mid"]


def test_probe_leaves_running_stats_and_modes_alone():
    model = small_stack().train()
    model[2].eval()  # a user's per-module choice, e.g. frozen BatchNorm
    stats = model[3].double_conv[0][1].running_mean.clone()
    replace_blocks(model, exclude=["3"])
    assert torch.equal(model[3].double_conv[0][1].running_mean, stats)
    assert model.training and not model[2].training  # the CMRF at 2 took the old block's mode


def test_dtype_and_trainability_are_kept():
    model = small_stack().double()
    model[0].requires_grad_(False)
    # Frozen and fresh: a frozen pretrained block becomes random features that never learn.
    with pytest.warns(UserWarning, match=r"replaced frozen blocks \(0\) by CMRFs with fresh random weights"):
        replace_blocks(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
    model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).sum().backward()


def test_only_a_wholly_frozen_block_gives_a_frozen_cmrf_and_a_warning():
    """A block with one frozen convolution and one that trains (a partly fine-tuned layer) is no
    frozen block: its CMRF trains and no word of freezing is said; a wholly frozen one is both."""
    model = small_stack()
    model[0].double_conv[0][0].requires_grad_(False)  # the first conv of block 0; its second trains
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_blocks(model)
    assert isinstance(model[0], CMRF) and all(p.requires_grad for p in model[0].parameters())
    model = small_stack()
    model[0].double_conv[0][0].requires_grad_(False)
    model[2].requires_grad_(False)
    with pytest.warns(UserWarning, match=r"replaced frozen blocks \(2\) by CMRFs"):
        replace_blocks(model)
    assert all(p.requires_grad for p in model[0].parameters())
    assert isinstance(model[2], CMRF) and not any(p.requires_grad for p in model[2].parameters())
    assert all(p.requires_grad for p in model[3].parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_kept():
    model = small_stack().cuda()
    replace_blocks(model)
    assert all(p.is_cuda for p in model.parameters())


def test_report_table():
    report = replace_blocks(small_stack())
    assert isinstance(report, ReplaceReport)
    text = str(report)
    assert "3 block(s)" in text and "16 -> 24" in text and "DoubleConv" in text
    row = report.replaced[1]
    assert f"{row.old_params:,}" in text and f"{row.new_params:,}" in text
    assert report.to_dict()["replaced"][0]["path"] == "0"


# --- bad input -----------------------------------------------------------------------------------


def test_nothing_to_replace_warns_and_leaves_the_model():
    for model in (
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)),
    ):
        modules = list(model.modules())
        with pytest.warns(NothingToReplaceWarning, match="unchanged"):
            report = replace_blocks(model)
        assert report.replaced == [] and list(model.modules()) == modules


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn_relu(8, 8), conv_bn_relu(8, 8)

    def forward(self, x, y):
        return self.b(self.a(x) + y)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn_relu(8, 8), conv_bn_relu(8, 8)

    def forward(self, x):
        return {"out": self.b(self.a(x))}


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.two, self.dict_out, self.block = TwoInputs(), DictOut(), DoubleConv(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.two(x, x)
        x = self.dict_out(x)["out"]
        return self.head(self.block(x))


def test_unprobeable_blocks_are_skipped_with_reasons():
    model = Wrapper()
    report = replace_blocks(model)
    assert report.paths == ["block"]
    reasons = {s.path: s.reason for s in report.skipped}
    assert "2 positional inputs" in reasons["two"]
    assert "returns a dict" in reasons["dict_out"]


class ReadsInternals(nn.Module):
    """A forward that depends on the replaced module's attributes: replacement must roll back."""

    def __init__(self):
        super().__init__()
        self.first, self.second = DoubleConv(3, 8), DoubleConv(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.second(self.first(x))
        return self.head(x * self.second.double_conv[0][1].weight.view(1, -1, 1, 1))


def test_failure_after_swap_restores_every_module():
    model = ReadsInternals()
    modules = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="undid every swap"):
        replace_blocks(model)
    assert dict(model.named_modules()) == modules


def test_probe_failure_is_a_clear_error():
    model = UserSegNet()  # needs sides divisible by 8
    with pytest.raises(ValueError, match="pass example_input"):
        replace_blocks(model, example_input=torch.randn(1, 3, 12, 12))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(N=0), "N must be an integer >= 1"),
        (dict(N=2.5), "N must be an integer"),
        (dict(targets=[3]), "targets entries must be"),
        (dict(exclude=42), "exclude must be"),
        (dict(targets=["no_such_block*"]), "matches no module"),
        (dict(indivisible="round"), "indivisible must be"),
        (dict(example_input="image.png"), "example_input must be a tensor"),
        (dict(example_input=[1, 3, 32, 32]),
         r"got list of int; for a shape, pass a tensor of it: torch\.randn\(1, 3, 32, 32\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = small_stack()
    modules = list(model.modules())
    with pytest.raises(ValueError, match=match):
        replace_blocks(model, **kwargs)
    assert list(model.modules()) == modules


def test_not_a_module():
    with pytest.raises(ValueError, match="needs an nn.Module"):
        replace_blocks("segnet")


def test_a_block_used_twice_becomes_one_cmrf_used_twice():
    """Weight sharing is kept: the block at 1 and 2 is one module, and so is its replacement."""
    block = DoubleConv(8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block, block, nn.Conv2d(8, 2, 1))
    assert replace_blocks(model).paths == ["1"]
    assert isinstance(model[1], CMRF) and model[1] is model[2]


class SqueezeExcite(nn.Module):
    """Two 3x3 convs and a squeeze-excitation branch convolving a 1x1 map."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = DoubleConv(channels, channels)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid())

    def forward(self, x):
        y = self.body(x)
        return y * self.gate(y)


def test_global_context_branch_does_not_block_replacement():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SqueezeExcite(16), nn.Conv2d(16, 2, 1))
    assert replace_blocks(model).paths == ["1"]


def test_targeted_block_that_changes_resolution_is_reported():
    model = nn.Sequential(DoubleConv(3, 16, stride=2), DoubleConv(16, 16), nn.Conv2d(16, 2, 1))
    report = replace_blocks(model, targets=["0", "1"])
    assert report.paths == ["1"]
    assert "changes resolution" in {s.path: s.reason for s in report.skipped}["0"]


class HeadDeclaredFirst(nn.Module):
    """Its first registered convolution is the head, which takes 16 channels, not the input's 3."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(16, 2, 1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = DoubleConv(16, 16)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_the_default_probe_finds_the_input_channels_when_the_head_is_declared_first():
    model = HeadDeclaredFirst()
    report = replace_blocks(model)
    assert report.paths == ["body"] and report.example_shape == (2, 3, 64, 64)


class NeedsTwoInputs(HeadDeclaredFirst):
    def forward(self, x, skip):
        return super().forward(x) + skip


def test_a_model_no_default_probe_runs_is_refused_with_the_inputs_tried():
    with pytest.raises(ValueError) as caught:
        replace_blocks(NeedsTwoInputs())
    message = str(caught.value)
    assert "default probe inputs (2, 16, 64, 64), (2, 3, 64, 64)" in message
    assert "TypeError" in message and "pass example_input=" in message


def test_the_default_probe_tries_the_channels_of_a_timm_pretrained_cfg_first():
    model = NeedsTwoInputs()
    model.pretrained_cfg = {"input_size": (5, 224, 224)}
    with pytest.raises(ValueError, match=r"probe inputs \(2, 5, 64, 64\), \(2, 16, 64, 64\), \(2, 3, 64"):
        replace_blocks(model)
    model = HeadDeclaredFirst()
    model.pretrained_cfg = {"input_size": (3, 224, 224)}
    assert replace_blocks(model).paths == ["body"]


def test_default_probe_leaves_the_global_random_stream_alone():
    model = small_stack()
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    replace_blocks(model, dry_run=True)
    assert torch.equal(torch.rand(3), expected)


class Hourglass(nn.Module):
    """Convolves at half resolution inside and upsamples back: never one block to replace."""

    def __init__(self, channels: int):
        super().__init__()
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = F.interpolate(self.mid(F.relu(self.down(x))), size=x.shape[2:], mode="nearest")
        return self.out(x + y)


@pytest.mark.parametrize("side", [2, 64])
def test_a_conv_that_only_shrinks_to_1x1_at_the_probe_size_is_not_global_context(side):
    """At a 2x2 probe the strided conv gives a 1x1 map, as a squeeze-excitation branch does; the
    answer must not depend on the probe size."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Hourglass(16), nn.Conv2d(16, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToReplaceWarning)
        report = replace_blocks(model, example_input=torch.randn(1, 3, side, side), dry_run=True)
    assert report.paths == []


class PoolToOnePixel(nn.Module):
    """Pools by 4 and convolves 3x3 there: at a 4x4 probe its maps are 1x1, like a global branch."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.MaxPool2d(4), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.Upsample(scale_factor=4))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("side", [4, 8])
def test_a_wide_kernel_on_a_1x1_map_is_not_a_global_context_branch(side):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), PoolToOnePixel(16), nn.Conv2d(16, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToReplaceWarning)
        report = replace_blocks(model, example_input=torch.randn(1, 3, side, side), dry_run=True)
    assert report.paths == []


def test_unbatched_example_input_is_refused_with_the_reason():
    """(C, H, W) runs through Conv2d but would be read as (B, C, L): a 1-D CMRF of H channels."""
    def conv_relu():  # no BatchNorm: BatchNorm2d itself refuses a 3-D input
        return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())

    block = nn.Sequential(conv_relu(), conv_relu())
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), block, nn.Conv2d(16, 2, 1))
    with pytest.warns(NothingToReplaceWarning):
        report = replace_blocks(model, example_input=torch.randn(3, 32, 32))
    assert report.paths == [] and model[1] is block
    reason = {s.path: s.reason for s in report.skipped}["1"]
    assert "is 2-D" in reason and "give example_input a batch dimension" in reason


def test_path_patterns_match_one_dotted_part_per_star():
    """``"encoders.*"`` names the encoder blocks; inside one that is skipped it does not force the
    single 1x1 convolutions (CMUNeXt-S's first block is 8 channels: not divisible by 2N = 16)."""
    from cmrf import create_model

    report = replace_blocks(create_model("cmunext_s"), 8, indivisible="skip", dry_run=True)
    assert report.paths == ["encoders.1", "encoders.2", "encoders.3", "encoders.4"]
    assert "encoders.0" in {s.path for s in report.skipped}
    assert replace_blocks(small_stack(), targets=["0.*"], dry_run=True).paths == ["0.double_conv"]
    assert replace_blocks(small_stack(), targets=["0.*.1"], dry_run=True).paths == ["0.double_conv.1"]


class _Wrapped(nn.Module):
    """A user's network around a zoo model: a block of its own before it."""

    def __init__(self):
        from cmrf import create_model

        super().__init__()
        self.pre = DoubleConv(3, 16)
        self.net = create_model("cmunext", in_chans=16)

    def forward(self, x):
        return self.net(self.pre(x))


def test_a_zoo_model_inside_a_wrapper_keeps_its_paper_mapping():
    """CMUNeXt's own targets (its encoders) apply inside it; the wrapper's blocks qualify as usual."""
    from cmrf import create_model

    direct = replace_blocks(create_model("cmunext", in_chans=16), dry_run=True).paths
    report = replace_blocks(_Wrapped(), dry_run=True)
    assert report.paths == ["pre", *(f"net.{path}" for path in direct)] and report.targets_from_model
    assert not any(path.startswith("net.fusions") for path in report.paths)


def test_a_target_naming_a_list_of_blocks_names_its_entries():
    """``"encoder*"`` names an ``encoder`` ModuleList: its blocks are the targets."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([DoubleConv(3, 16), DoubleConv(16, 16)])
            self.other = DoubleConv(16, 16)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            for block in self.encoder:
                x = block(x)
            return self.head(self.other(x))

    assert replace_blocks(Net(), targets=["encoder*"], dry_run=True).paths == ["encoder.0", "encoder.1"]


class _Eca(nn.Module):
    """ECA channel attention: a Conv1d over the pooled channels of a 2-D map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        weights = self.conv(x.mean((2, 3))[:, None, :]).sigmoid()
        return x * weights[:, 0, :, None, None]


def test_a_batched_probe_of_a_block_with_a_1d_attention_is_not_called_unbatched():
    block = nn.Sequential(DoubleConv(16, 16), _Eca())
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), block, nn.Conv2d(16, 2, 1))
    report = replace_blocks(model, dry_run=True)
    # the attention convolves channels, not the map: the block is left (another resolution inside)
    # and its DoubleConv replaced, as before the rank check; no word of a batch dimension
    assert report.paths == ["1.0"] and not any("batch dimension" in s.reason for s in report.skipped)


def test_first_conv_that_is_still_there_is_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(16, 2, 1)  # registered first, runs last
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.block = DoubleConv(16, 16)
            self.pretrained_cfg = {"first_conv": "stem"}

        def forward(self, x):
            return self.head(self.block(self.stem(x)))

    model = Net()
    report = replace_blocks(model, example_input=torch.randn(1, 3, 32, 32))
    assert report.paths == ["block"] and model.pretrained_cfg["first_conv"] == "stem"


def test_a_second_call_finds_the_cmrfs_of_the_first_and_replaces_nothing():
    model = small_stack()
    assert replace_blocks(model).paths == ["0", "2", "3"]
    with pytest.warns(NothingToReplaceWarning):
        again = replace_blocks(model, targets=[CMRF])
    assert again.paths == [] and {s.reason for s in again.skipped} == {"already a CMRF"}


class OneBlock(nn.Module):
    """A stem, one block and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = DoubleConv(16, 16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class RunsTwice(OneBlock):
    """One block run at full and at half resolution: no one CMRF fits both calls' shapes."""

    def forward(self, x):
        y = self.block(self.stem(x))
        return self.head(y + F.interpolate(self.block(F.max_pool2d(y, 2)), scale_factor=2.0))


class Flattens(nn.Module):
    """Two convolutions, then a flattened output: (B, C, H, W) to (B, C * H * W)."""

    def __init__(self):
        super().__init__()
        self.body = DoubleConv(3, 4)

    def forward(self, x):
        return self.body(x).flatten(1)


class FoldsTheBatch(nn.Module):
    """Two convolutions, then pairs of samples summed: the batch halves, the resolution stays."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = self.b(self.a(x))
        return y[0::2] + y[1::2]


@pytest.mark.parametrize(("model", "path", "reason"), [
    (RunsTwice(), "block", "called 2 times with different shapes"),
    (nn.Sequential(Flattens(), nn.Linear(4 * 64 * 64, 2)), "0", "maps (2, 3, 64, 64) to (2, 16384), not"),
    (nn.Sequential(nn.Conv2d(3, 16, 1), FoldsTheBatch(), nn.Conv2d(16, 2, 1)), "1",
     "changes the batch size ((2, 16, 64, 64) -> (1, 16, 64, 64))"),
], ids=["called-twice", "flattens", "folds-batch"])
def test_a_block_whose_calls_no_cmrf_can_make_is_kept_with_the_reason(model, path, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToReplaceWarning)
        report = replace_blocks(model, targets=[path], dry_run=True)
    assert report.paths == []
    assert {s.path: s.reason for s in report.skipped}[path].startswith(reason)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, and still used
def test_a_torchscript_module_without_convolutions_is_not_reported():
    scripted = torch.jit.script(nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), scripted, TwoConvs(16), nn.Conv2d(16, 2, 1))
    report = replace_blocks(model)
    assert report.paths == ["2"] and report.skipped == []


class _SkipWrapper(nn.Module):
    """A skip connection's wrapper, ``cat([x, inner(x)])``, as MONAI's SkipConnection: one tensor
    in, one out at the same size, two or more convolutions inside."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cat([x, self.inner(x)], dim=1)


def test_a_skip_connections_wrapper_is_searched_inside_not_replaced():
    """It was replaced whole by a CMRF (64 -> 192 in MONAI's UNet(num_res_units=2)), which dropped
    the concatenated input path without a word; the block inside is replaced instead."""
    inner = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _SkipWrapper(inner), nn.Conv2d(24, 2, 1))
    report = replace_blocks(model, N=2)
    assert [row.path for row in report.replaced] == ["1.inner"]
    assert isinstance(model[1], _SkipWrapper) and isinstance(model[1].inner, CMRF)
    assert "concatenates its input to its output" in str(report)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 2, 16, 16)


def test_monai_unet_with_residual_units_keeps_its_skip_connections():
    UNet = pytest.importorskip("monai.networks.nets").UNet
    model = UNet(2, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    report = replace_blocks(model)
    assert [row.path for row in report.replaced] == ["model.1.submodule.1.submodule.1.submodule"]
    assert type(model.model[1].submodule[1].submodule[1]).__name__ == "SkipConnection"


def test_replacing_under_inference_mode_is_replacing_outside_it():
    """Under torch.inference_mode the probe recorded no autograd graph: MONAI's UNet lost its
    SkipConnection wrapper (the concatenated skip path dropped, shapes unchanged) and the new
    weights were inference tensors that cannot train."""
    UNet = pytest.importorskip("monai.networks.nets").UNet

    def build():
        torch.manual_seed(0)
        return UNet(2, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)

    expected = [row.path for row in replace_blocks(build()).replaced]
    model = build()
    with torch.inference_mode():
        report = replace_blocks(model, example_input=torch.randn(2, 1, 64, 64))
    assert [row.path for row in report.replaced] == expected
    assert not any(p.is_inference() for p in model.parameters())
    model.train()(torch.randn(2, 1, 64, 64)).sum().backward()


def test_lazy_modules_not_yet_initialised_are_named():
    model = nn.Sequential(nn.LazyConv2d(16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    with pytest.raises(ValueError, match=r"lazy modules not initialised yet \(0\.weight and 1 more\)"):
        replace_blocks(model, example_input=torch.randn(1, 3, 32, 32))


# --- blocks the forward reaches around the module tree, and second calls ----------------------


class RunsAListOfBlocks(nn.Module):
    """Blocks registered as attributes but run through a plain Python list the forward keeps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1, self.b2 = DoubleConv(16, 16), DoubleConv(16, 16)
        self.blocks = [self.b1, self.b2]
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_new_block_the_forward_never_calls_undoes_the_swap():
    """The swap rebinds registered attributes: a forward reaching the old blocks through a list
    went on running them (their weights no longer among the parameters) while the report said
    they were replaced."""
    model = RunsAListOfBlocks()
    with pytest.raises(RuntimeError, match=r"never called the new module at b1, b2"):
        replace_blocks(model)
    assert isinstance(model.b1, DoubleConv) and isinstance(model.b2, DoubleConv)  # undone


class FailsWithGrad(OneBlock):
    """A forward that works only without grad (a statistic read through NumPy)."""

    def forward(self, x):
        float(x.cpu().numpy().mean())  # raises when x requires grad
        return super().forward(x)


def test_a_probe_without_the_autograd_graph_says_so():
    """The skip, gate and head checks read the probe's autograd graph; a forward that cannot record
    one was probed without it in silence, so a skip wrapper or a gate could be replaced whole."""
    with pytest.warns(UserWarning, match=r"could not record.*RuntimeError.*targets="):
        report = replace_blocks(FailsWithGrad())
    assert report.paths == ["block"]


def test_reduce_never_goes_down_to_a_cmrf_without_a_spatial_convolution():
    """C_out = 22 = 2 x 11: the only N' <= 8 was 1, a CMRF of 1x1 convolutions alone."""
    model = nn.Sequential(nn.Conv2d(3, 22, 3, padding=1), DoubleConv(22, 22), nn.Conv2d(22, 2, 1))
    with pytest.warns(NothingToReplaceWarning):
        report = replace_blocks(model, N=8)
    assert "22" in report.skipped[0].reason and "N' = 1" in report.skipped[0].reason
    assert replace_blocks(nn.Sequential(nn.Conv2d(3, 22, 3, padding=1), DoubleConv(22, 22),
                                        nn.Conv2d(22, 2, 1)), N=1).paths == ["1"]  # asked for


def test_a_second_call_keeps_the_cmrfs_of_the_first():
    """A stage holding a CMRF of the first call counted the CMRF's convolutions and was replaced
    whole, the CMRF (and what it had learned) with it."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                          nn.Sequential(DoubleConv(16, 16), DoubleConv(16, 16)), nn.Conv2d(16, 2, 1))
    replace_blocks(model, targets="1.0")
    first = model[1][0]
    report = replace_blocks(model)
    assert model[1][0] is first and report.paths == ["1.1"]


def test_a_data_parallel_model_is_named_by_the_paths_of_the_module_it_wraps():
    model = small_stack()
    wrapped = nn.DataParallel(model)  # on the CPU it runs the module itself
    report = replace_blocks(wrapped, targets=["0", "2"])
    assert report.paths == ["0", "2"] and isinstance(model[0], CMRF)
