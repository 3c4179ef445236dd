"""``cmrf.ops.stamps``: when a cache derived from tensors is stale."""

import torch
from torch import nn

from cmrf.ops.stamps import TensorStamp, tensor_version


def test_a_stamp_sees_in_place_writes_replacements_and_moves():
    conv = nn.Conv2d(2, 3, 1)
    stamp = TensorStamp([conv.weight, conv.bias])
    assert stamp.matches([conv.weight, conv.bias])
    assert not stamp.matches([conv.weight])  # a tensor fewer
    assert not stamp.matches([conv.bias, conv.weight])  # other tensors in its places
    with torch.no_grad():
        conv.bias.add_(1.0)
    assert not stamp.matches([conv.weight, conv.bias])  # written in place

    stamp = TensorStamp([conv.weight, conv.bias])
    conv.load_state_dict(nn.Conv2d(2, 3, 1).state_dict())  # copy_ into the same tensors
    assert not stamp.matches([conv.weight, conv.bias])

    stamp = TensorStamp([conv.weight, conv.bias])
    conv.weight.data = conv.weight.data.clone()  # same tensor object, new storage
    assert not stamp.matches([conv.weight, conv.bias])

    stamp = TensorStamp([conv.weight, conv.bias])
    conv.bias = nn.Parameter(conv.bias.detach().clone())  # replaced
    assert not stamp.matches([conv.weight, conv.bias])


def test_inference_tensors_are_stamped_without_a_version():
    with torch.inference_mode():
        t = torch.ones(3)
    assert tensor_version(t) is None
    assert tensor_version(torch.ones(3)) == 0
    stamp = TensorStamp([t])
    assert stamp.matches([t]) and not stamp.matches([t.clone()])


def test_inference_tensors_written_in_place_do_not_match():
    """Without a version counter a write inside inference mode left the stamp matching: a graph
    or derived weight of a module built under inference_mode kept the old values."""
    with torch.inference_mode():
        weight = torch.ones(3)
    stamp = TensorStamp([weight, torch.zeros(2)])
    assert stamp.matches([weight, stamp._tensors[1]])
    with torch.inference_mode():
        weight.mul_(2)
    assert not stamp.matches([weight, stamp._tensors[1]])
