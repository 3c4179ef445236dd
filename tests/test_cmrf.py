"""CMRF: the paper's arithmetic, the reference's algorithm, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cmrf import CMRF
from cmrf.layers import cmrf_blocks, cmrf_num_params
from tests.conftest import randomise_batchnorm


def functional_cmrf(block: CMRF, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode CMRF written out step by step from the spec, with the block's weights."""

    def conv_bn(t, cn, groups=1, padding=0):
        t = F.conv2d(t, cn.conv.weight, padding=padding, groups=groups)
        n = cn.norm
        return F.batch_norm(t, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)

    y = F.gelu(conv_bn(x, block.pw1))
    odd = y[:, 0::2]  # channels 1, 3, 5, ... in the paper's 1-based numbering
    even = y[:, 1::2]
    parts = [odd + even]
    stage = even
    for cn in block.cascade:
        stage = conv_bn(stage, cn, groups=stage.shape[1], padding=1)
        parts.append(stage)
    out = F.gelu(conv_bn(torch.cat(parts, 1), block.pw2))
    return x + out if block.in_channels == block.out_channels else out


@given(
    cin=st.integers(1, 24),
    N=st.integers(1, 6),
    k=st.integers(1, 3),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
)
def test_shape_and_closed_form_params(cin, N, k, size):
    cout = 2 * N * k
    block = CMRF(cin, cout, N)
    out = block(torch.randn(2, cin, *size))
    assert out.shape == (2, cout, *size)
    assert sum(p.numel() for p in block.parameters()) == cmrf_num_params(cin, cout, N)


@given(cin=st.integers(1, 40), cout=st.integers(1, 40), N=st.integers(1, 8))
def test_valid_iff_out_divisible_by_2n(cin, cout, N):
    if cout % (2 * N) == 0:
        assert CMRF(cin, cout, N).out_channels == cout
    else:
        with pytest.raises(ValueError, match=rf"{cout} is not divisible by 2N = {2 * N}"):
            CMRF(cin, cout, N)


def test_issue_example_message_names_the_numbers():
    with pytest.raises(ValueError, match=r"60 is not divisible by 2N = 16"):
        CMRF(64, 60, N=8)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"in_channels": 0, "out_channels": 16}, "in_channels"),
        ({"in_channels": 8, "out_channels": -16}, "out_channels"),
        ({"in_channels": 8, "out_channels": 16, "N": 0}, "N"),
        ({"in_channels": 8.0, "out_channels": 16}, "in_channels"),
        ({"in_channels": 8, "out_channels": 16, "N": 2.5}, "N"),
        ({"in_channels": 8, "out_channels": 16, "N": True}, "N"),
        ({"in_channels": 8, "out_channels": "16"}, "out_channels"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CMRF(**kwargs)


@pytest.mark.parametrize("cin, cout, N", [(3, 64, 8), (32, 32, 4), (16, 16, 8), (12, 8, 2), (5, 6, 1)])
def test_matches_functional_restatement(cin, cout, N):
    block = CMRF(cin, cout, N).eval()
    randomise_batchnorm(block)
    x = torch.randn(2, cin, 11, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), functional_cmrf(block, x), atol=1e-5, rtol=1e-5)


def test_parity_split_and_concat_order_matter():
    """Swapping the halves or reordering the concat changes the output, so the test above can fail."""
    block = CMRF(8, 32, N=4).eval()
    randomise_batchnorm(block)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        expected = functional_cmrf(block, x)
        # Feed the cascade from the odd half instead: a different (wrong) network.
        perm = torch.arange(block.pw1.conv.out_channels).view(-1, 2).flip(1).reshape(-1)
        block.pw1.conv.weight.copy_(block.pw1.conv.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.pw1.norm, name).copy_(getattr(block.pw1.norm, name)[perm])
        assert not torch.allclose(block(x), expected, atol=1e-3)


def test_stage_outputs_land_in_concat_order():
    """The k-th c-channel slot of the concat holds the k-th cascade stage (slot 0: odd + even)."""
    block = CMRF(4, 24, N=3).eval()
    randomise_batchnorm(block)
    captured = {}
    block.pw2.register_forward_pre_hook(lambda m, args: captured.setdefault("concat", args[0]))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        block(x)
        y = block.pw1(x)
        stage1 = block.cascade[0](y[:, 1::2])
        stage2 = block.cascade[1](stage1)
    c = 4
    concat = captured["concat"]
    torch.testing.assert_close(concat[:, :c], y[:, 0::2] + y[:, 1::2])
    torch.testing.assert_close(concat[:, c : 2 * c], stage1)
    torch.testing.assert_close(concat[:, 2 * c :], stage2)


def test_residual_only_when_channels_match_and_enabled():
    assert CMRF(16, 16).add_residual
    assert not CMRF(16, 16, shortcut=False).add_residual
    assert not CMRF(8, 16).add_residual
    block = CMRF(16, 16, N=2).eval()
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        plain = CMRF(16, 16, N=2, shortcut=False).eval()
        plain.load_state_dict(block.state_dict())
        torch.testing.assert_close(block(x), plain(x) + x)


def test_batchnorm_settings_are_the_references():
    norms = [m for m in CMRF(8, 16, N=2).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3
    assert all(m.eps == 1e-3 and m.momentum == 0.03 for m in norms)


def test_gelu_is_exact_not_tanh():
    acts = [m for m in CMRF(8, 16, N=2).modules() if isinstance(m, torch.nn.GELU)]
    assert len(acts) == 2 and all(a.approximate == "none" for a in acts)


def test_wrong_input_channels_names_both_numbers():
    with pytest.raises(ValueError, match=r"\(B, 8, \*, \*\).*\(1, 5, 4, 4\)"):
        CMRF(8, 16, N=2)(torch.randn(1, 5, 4, 4))


@given(cin=st.integers(1, 8), N=st.integers(1, 4), size=st.tuples(*[st.integers(1, 5)] * 3))
def test_volumes(cin, N, size):
    block = CMRF(cin, 2 * N, N, spatial_dims=3)
    x = torch.randn(2, cin, *size, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 2 * N, *size)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert sum(p.numel() for p in block.parameters()) == cmrf_num_params(cin, 2 * N, N, spatial_dims=3)
    assert all(stage.conv.weight.shape[2:] == (3, 3, 3) for stage in block.cascade)


def test_spatial_dims_checked():
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        CMRF(8, 16, spatial_dims=4)


def test_cmrf_blocks_finds_every_block_in_order():
    from cmrf import TinyUNet, optimize_for_inference

    block = CMRF(8, 8, N=2)
    assert cmrf_blocks(block) == [block]
    net = TinyUNet(channels=(8, 16), N=2)
    assert cmrf_blocks(net) == [*net.encoders, *net.decoders]
    assert cmrf_blocks(optimize_for_inference(net)) == []  # the optimized copy holds none
    assert cmrf_blocks(torch.nn.Conv2d(1, 1, 1)) == []


def test_fx_symbolic_trace_is_refused_naming_the_routes_that_work():
    """torch.fx.symbolic_trace got "CMRF expects a torch.Tensor, got Proxy" (a ValueError about the
    input, not about the tracer)."""
    with pytest.raises(TypeError, match=r"CMRF cannot be traced by torch.fx.symbolic_trace: .*torch.export"):
        torch.fx.symbolic_trace(CMRF(16, 16, N=2))


def test_repr_names_constructor_arguments():
    """The repr said ``residual=`` (no such argument) and left out ``fused``."""
    text = repr(CMRF(8, 16, N=2, fused=False))
    assert "in_channels=8, out_channels=16, N=2, shortcut=False, spatial_dims=2, fused=False" in text
    assert "shortcut=True, spatial_dims=2\n" in repr(CMRF(16, 16, N=2))


def test_numpy_arguments_become_python_values_that_compile_in_one_graph():
    """NumPy ints reached the modules' attributes (add_residual a numpy.bool): torch.compile with
    fullgraph=True refused `x + y if self.add_residual` as data-dependent branching; np.True_ was
    refused as a shortcut while np.int64 widths were taken."""
    np = pytest.importorskip("numpy")
    block = CMRF(np.int64(4), np.int64(4), np.int64(2), shortcut=np.bool_(True), fused=np.False_).eval()
    assert type(block.add_residual) is bool and block.add_residual and block.fused is False
    assert all(type(v) is int for v in (block.in_channels, block.N, block.pw1.conv.out_channels,
                                         block.cascade[0].conv.groups, block.pw2.conv.in_channels))
    x = torch.randn(1, 4, 5, 5)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), block(x))


def test_dtype_mismatch_messages_hold_under_autocast_and_suggest_it_only_where_it_helps():
    """Under CPU autocast a float64 input (or model) went through to "expected scalar type Double
    but found BFloat16"; outside it, float64 was told to "run under torch.autocast", which fails."""
    block = CMRF(4, 8, 2).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="input is torch.float64, and autocast does not cast float64"):
            block(torch.randn(1, 4, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="weights are torch.float64 .* autocast does not cast float64"):
            CMRF(4, 8, 2).double().eval()(torch.randn(1, 4, 5, 5))
        assert block(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)  # what autocast is for
    convert = r"convert the input \(x.to\(torch.float32\)\) or the model"
    with pytest.raises(ValueError, match=convert) as refused:
        block(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert "autocast" not in str(refused.value)
    with pytest.raises(ValueError, match="or run under torch.autocast"):
        block(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16))


def test_conv_norm_refuses_an_even_kernel_and_the_cascade_an_odd_width():
    """ConvNorm(3, 4, kernel_size=4) grew 8x8 into 9x9 against its "padding keeps S"; the cascade
    of an odd width failed with "The size of tensor a (3) must match ... (2)"."""
    from cmrf.layers import ConvNorm
    from cmrf.ops import cascade_concat
    from cmrf.ops.cascade import cascade_concat_reference

    with pytest.raises(ValueError, match="odd kernel_size, got 4"):
        ConvNorm(3, 4, kernel_size=4)
    with pytest.raises(ValueError, match="in_channels must be an integer >= 1, got 0"):
        ConvNorm(0, 4)
    stages = CMRF(4, 8, 2).cascade
    for run in (cascade_concat, cascade_concat_reference):
        with pytest.raises(ValueError, match=r"an even number of channels, got shape \(1, 5, 4, 4\)"):
            run(torch.randn(1, 5, 4, 4), stages)
