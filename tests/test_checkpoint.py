"""Weights on disk: damaged files named in the error, atomic saves, and what a bare state dict
(a reference-code checkpoint) says about its model."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch

import cmrf
from cmrf.checkpoint import read_state_dict, safetensors_metadata, save_weights
from cmrf.models.io_channels import infer_io_channels
from cmrf.train.setup import model_from_checkpoint
from tests.conftest import GOLDEN_EVAL_ATOL, golden_state_dict, load_golden


def _small_unet(**kwargs) -> cmrf.TinyUNet:
    return cmrf.TinyUNet(channels=(16, 32), N=4, **kwargs).eval()


@pytest.fixture(scope="module")
def golden():
    return load_golden("tinyunet_official.safetensors")


@pytest.fixture()
def reference_pth(golden, tmp_path):
    """A checkpoint as the reference code saves it: ``torch.save(model.state_dict(), path)``."""
    path = tmp_path / "best_model.pth"
    torch.save(golden_state_dict(golden), path)
    return path


# --- damaged files ------------------------------------------------------------------------------


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    path = tmp_path / "w.safetensors"
    save_weights(_small_unet(), path)
    _truncate(path, keep)
    expected = rf"cannot read weights from {path}: file is truncated or not a safetensors file \("
    with pytest.raises(ValueError, match=expected):
        read_state_dict(path)
    with pytest.raises(ValueError, match=expected):
        safetensors_metadata(path)
    with pytest.raises(ValueError, match=expected):
        cmrf.load_checkpoint(_small_unet(), path)


def test_truncated_pth_names_the_file(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_small_unet().state_dict(), path)
    _truncate(path)
    expected = rf"cannot read weights from {path}: file is truncated or not a torch checkpoint file"
    with pytest.raises(ValueError, match=expected):
        read_state_dict(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"cannot read weights from {path}"):
        read_state_dict(path)


def test_a_file_that_is_no_checkpoint_is_not_called_unsafe(tmp_path):
    """An image or ONNX graph passed by mistake is "not a checkpoint"; a pickle holding objects
    other than tensors is refused as such, naming the type."""
    import numpy as np
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(image)
    with pytest.raises(ValueError, match=rf"{image}: not a torch checkpoint or safetensors file") as info:
        read_state_dict(image)
    assert "pickled objects" not in str(info.value)
    pickled = tmp_path / "numpy.pth"
    torch.save({"weight": np.zeros(3)}, pickled)
    with pytest.raises(ValueError, match=r"pickled objects other than tensors \(numpy\..* is not a tensor"):
        read_state_dict(pickled)


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_pickle_that_would_run_code_is_named_as_such_without_torch_warnings(tmp_path):
    """torch blocks os/sys outright with another wording ("unsupported GLOBAL posix.system whose
    module posix is blocked"): it was called "not a torch checkpoint". A TorchScript archive made
    torch warn "call torch.jit.load" (which runs its code) before the error."""
    payload = tmp_path / "payload.pth"
    torch.save({"weight": _RunsACommand()}, payload)
    with pytest.raises(ValueError, match=r"pickled objects other than tensors \((posix|nt)\.system is not"):
        read_state_dict(payload)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=rf"cannot read weights from {script}"):
            read_state_dict(script)


def test_missing_checkpoint_is_an_oserror_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_state_dict(tmp_path / "nope.safetensors")
    assert info.value.filename == str(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        read_state_dict(tmp_path)


def test_safetensors_content_is_recognised_whatever_the_suffix(tmp_path):
    path = tmp_path / "weights.bin"  # written under another name (save_weights refuses .bin)
    save_weights(_small_unet(), tmp_path / "weights.safetensors", metadata={"format": "x"})
    (tmp_path / "weights.safetensors").rename(path)
    assert safetensors_metadata(path) == {"format": "x"}
    assert read_state_dict(path).keys() == _small_unet().state_dict().keys()


# --- atomic saves -------------------------------------------------------------------------------


def _half_written_then_full(real_save):
    """A ``safetensors.torch.save_file`` that writes half of the file and then finds the disk full."""

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save_file


@pytest.mark.parametrize("name", ["w.pth", "w.PT", "w.ckpt", "w.bin", "w.pth.tar"])
def test_save_weights_refuses_a_pickle_suffix_torch_load_could_not_read(tmp_path, name):
    with pytest.raises(ValueError, match=r"torch.load cannot read.*name it \*\.safetensors"):
        save_weights(_small_unet(), tmp_path / name)
    assert not list(tmp_path.iterdir())
    save_weights(_small_unet(), tmp_path / "w")  # no suffix, or any other: safetensors as asked


def test_save_weights_names_metadata_that_is_not_text(tmp_path):
    with pytest.raises(ValueError, match=r"metadata must map str to str .*'epoch': 3"):
        save_weights(_small_unet(), tmp_path / "w.safetensors", metadata={"epoch": 3, "ok": "x"})
    with pytest.raises(ValueError, match="metadata must be a dict of str to str, got list"):
        save_weights(_small_unet(), tmp_path / "w.safetensors", metadata=[("a", "b")])
    assert not list(tmp_path.iterdir())


def test_save_weights_on_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "best.safetensors"
    save_weights(_small_unet(), path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _half_written_then_full(safetensors.torch.save_file))
    with pytest.raises(OSError) as info:
        save_weights(_small_unet(in_channels=1), path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["best.safetensors"]


def test_safetensors_io_error_becomes_an_oserror(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)"), not as OSError."""
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"{")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError) as info:
        save_weights(_small_unet(), tmp_path / "w.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


def test_saved_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_weights(_small_unet(), tmp_path / "w.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644


# --- bare state dicts ---------------------------------------------------------------------------


@pytest.mark.parametrize(("in_chans", "num_classes"), [(1, 2), (3, 5), (4, 1)])
def test_infer_io_channels_from_own_and_reference_names(in_chans, num_classes):
    model = cmrf.create_model("tinyunet", in_chans=in_chans, num_classes=num_classes, channels=(16, 32), N=4)
    assert infer_io_channels("tinyunet", model.state_dict(), {"channels": (16, 32), "N": 4}) == {
        "in_chans": in_chans,
        "num_classes": num_classes,
    }
    cmunext = cmrf.create_model("cmunext_s", in_chans=in_chans, num_classes=num_classes)
    expected = {"in_chans": in_chans, "num_classes": num_classes}
    assert infer_io_channels("cmunext_s", cmunext.state_dict()) == expected


def test_infer_io_channels_says_none_for_another_model():
    state = cmrf.create_model("cmunext_s").state_dict()
    assert infer_io_channels("tinyunet", state) == {"in_chans": None, "num_classes": None}


def test_reference_checkpoint_rebuilds_exactly(golden, reference_pth):
    model, meta = model_from_checkpoint(reference_pth, model="tinyunet")
    assert (meta["model"], meta["in_chans"], meta["num_classes"]) == ("tinyunet", 3, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            model(golden["input"]), golden["output_eval"], atol=GOLDEN_EVAL_ATOL, rtol=0
        )


def test_reference_checkpoint_with_other_class_count(golden, tmp_path):
    state = golden_state_dict(golden)
    state["final_conv.weight"] = torch.randn(5, 64, 1, 1)
    state["final_conv.bias"] = torch.randn(5)
    path = tmp_path / "five.pth"
    torch.save({"state_dict": state}, path)  # wrapped, as many training scripts save it
    model, meta = model_from_checkpoint(path, model="tinyunet")
    assert meta["num_classes"] == 5 and model.head.out_channels == 5
    with pytest.raises(ValueError, match=r"num_classes=5, but --num-classes 3 was given"):
        model_from_checkpoint(path, model="tinyunet", num_classes=3)


def test_reference_checkpoint_needs_the_model_name(reference_pth):
    expected = rf"{reference_pth} carries no cmrf metadata.*--model NAME.*tinyunet"
    with pytest.raises(ValueError, match=expected):
        model_from_checkpoint(reference_pth)
    with pytest.raises(ValueError, match="cannot tell num_classes .*look like a cmunext_s's"):
        model_from_checkpoint(reference_pth, model="cmunext_s")
    with pytest.raises(ValueError, match="unknown model 'tinyunett'"):
        model_from_checkpoint(reference_pth, model="tinyunett")


def test_run_checkpoint_refuses_disagreeing_values(tmp_path):
    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    kwargs = {"channels": [16, 32], "N": 4}
    save_weights(_small_unet(), path, metadata=model_metadata("tinyunet", kwargs, 3, 2, ["bg", "fg"]))
    model, meta = model_from_checkpoint(path, model="tinyunet", num_classes=2)
    assert meta["model_kwargs"] == kwargs and model.channels == (16, 32)
    with pytest.raises(ValueError, match=r"other settings: num_classes=3 \(the file has 2\)"):
        model_from_checkpoint(path, num_classes=3)
    with pytest.raises(ValueError, match=r"other settings: --N 2 \(the file has 4\)"):
        model_from_checkpoint(path, model_kwargs={"N": 2})
    with pytest.raises(ValueError, match=r"--channels 16 64 \(the file has 16 32\)"):
        model_from_checkpoint(path, model_kwargs={"channels": (16, 64)})
    # naming some of the run's arguments, as a tuple or a list, is fine
    model_from_checkpoint(path, model_kwargs={"channels": (16, 32)})


def test_run_checkpoint_takes_arguments_equal_to_the_models_defaults(tmp_path):
    """``--N 8`` names TinyU-Net's default: a run that left it out was built with it."""
    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    meta = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "fg"])
    save_weights(cmrf.TinyUNet(channels=(16, 32)), path, metadata=meta)
    model, _ = model_from_checkpoint(path, model_kwargs={"N": 8, "channels": [16, 32]})
    assert model.channels == (16, 32)
    with pytest.raises(ValueError, match=r"--N 4 \(the file has 8\)"):
        model_from_checkpoint(path, model_kwargs={"N": 4})


def test_run_checkpoint_refuses_a_default_value_the_run_did_not_use(tmp_path):
    """``--N 8`` is TinyU-Net's default, but this run was built with N = 4: refused, not ignored."""
    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    kwargs = {"channels": [16, 32], "N": 4}
    save_weights(_small_unet(), path, metadata=model_metadata("tinyunet", kwargs, 3, 2, ["bg", "fg"]))
    with pytest.raises(ValueError, match=r"--N 8 \(the file has 4\)"):
        model_from_checkpoint(path, model_kwargs={"N": 8})
    with pytest.raises(ValueError, match=r"--channels 64 128 256 512 \(the file has 16 32\)"):
        model_from_checkpoint(path, model_kwargs={"channels": (64, 128, 256, 512)})


def test_an_old_replace_blocks_run_of_a_cmrf_model_compares_n_with_the_models_own(tmp_path):
    """Such a run (refused for new runs since) swapped nothing: its blocks kept TinyU-Net's N = 8,
    whatever N its metadata recorded for replace_blocks."""
    import numpy as np

    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    meta = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "fg"], 4, {"img_size": 32})
    save_weights(cmrf.TinyUNet(channels=(16, 32)), path, metadata=meta)
    model, _ = model_from_checkpoint(path, model_kwargs={"N": 8})
    assert model.encoders[0].N == 8
    with pytest.raises(ValueError, match=r"--N 4 \(the file has 8\)"):
        model_from_checkpoint(path, model_kwargs={"N": 4})
    model_from_checkpoint(path, model_kwargs={"N": np.int64(8)})  # a numpy integer is the same number


def test_replace_blocks_run_compares_n_with_the_swapped_blocks(tmp_path):
    from cmrf.train.setup import build_model
    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    model, _ = build_model("segnet", 3, 2, replace_blocks_n=4, img_size=32)
    save_weights(model, path, metadata=model_metadata("segnet", {}, 3, 2, ["bg", "fg"], 4, {"img_size": 32}))
    model_from_checkpoint(path, model_kwargs={"N": 4})  # the run's N
    with pytest.raises(ValueError, match=r"--N 8 \(the file has 4\)"):
        model_from_checkpoint(path, model_kwargs={"N": 8})


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_weights_of_wrapped_models_load_into_the_plain_model(tmp_path, prefix):
    """torch.compile's wrapper names every key _orig_mod.*, DDP's module.*: timm strips both."""
    model = cmrf.create_model("tinyunet", channels=(16, 32))
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "wrapped.pth")
    assert read_state_dict(tmp_path / "wrapped.pth").keys() == model.state_dict().keys()
    save_weights(torch.compile(model), tmp_path / "compiled.safetensors")
    path = tmp_path / "compiled.safetensors"
    loaded = cmrf.create_model("tinyunet", channels=(16, 32), checkpoint_path=path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class _OnlyChildNamedModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.module = torch.nn.Conv2d(3, 4, 1)


@pytest.mark.parametrize("wrap", ["compiled", "DataParallel", "only child named module"])
def test_a_wrapped_model_loads_its_own_and_plain_weights(tmp_path, wrap):
    """The file's wrapper prefixes are stripped; the model's own must not make its keys "missing"."""

    def build() -> torch.nn.Module:
        if wrap == "only child named module":
            return _OnlyChildNamedModule()
        inner = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
        return torch.compile(inner) if wrap == "compiled" else torch.nn.DataParallel(inner)

    source = build()
    save_weights(source, tmp_path / "own.safetensors")
    loaded = cmrf.load_checkpoint(build(), tmp_path / "own.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    plain = {k.split(".", 1)[1]: v for k, v in source.state_dict().items()}  # as the unwrapped model saves
    torch.save(plain, tmp_path / "plain.pth")
    loaded = cmrf.load_checkpoint(build(), tmp_path / "plain.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize("wrap", ["DataParallel", "compiled"])
def test_a_reference_checkpoint_loads_into_a_wrapped_tinyunet(golden, reference_pth, wrap):
    """The reference code's key names are mapped by TinyUNet's filter, found inside the wrapper."""
    inner = cmrf.TinyUNet()
    model = torch.nn.DataParallel(inner) if wrap == "DataParallel" else torch.compile(inner)
    cmrf.load_checkpoint(model, reference_pth)
    with torch.no_grad():
        out = inner.eval()(golden["input"])
    torch.testing.assert_close(out, golden["output_eval"], atol=GOLDEN_EVAL_ATOL, rtol=0)


def test_training_script_wrappers_are_unwrapped_and_an_empty_state_is_refused(tmp_path):
    model = _small_unet()
    for key in ("state_dict", "model", "model_state_dict"):
        torch.save({key: model.state_dict(), "epoch": 3}, tmp_path / f"{key}.pth")
        assert read_state_dict(tmp_path / f"{key}.pth").keys() == model.state_dict().keys(), key
    for empty in ({}, {"state_dict": {}}):
        torch.save(empty, tmp_path / "empty.pth")
        with pytest.raises(ValueError, match="empty.pth does not hold a state dict of tensors"):
            read_state_dict(tmp_path / "empty.pth")


def test_tied_weights_save_and_load_back_tied(tmp_path):
    """Shared storage is refused by safetensors itself ("Some tensors share memory")."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1))
    model[1].weight = model[0].weight
    save_weights(model, tmp_path / "tied.safetensors")
    state = read_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(state["0.weight"], state["1.weight"]) and torch.equal(state["0.bias"], model[0].bias)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1))
    fresh[1].weight = fresh[0].weight
    cmrf.load_checkpoint(fresh, tmp_path / "tied.safetensors")
    assert fresh[1].weight is fresh[0].weight and torch.equal(fresh[0].weight, model[0].weight)


def test_a_state_without_batchnorm_step_counters_loads(tmp_path):
    """Older and converted checkpoints lack num_batches_tracked; torch and timm load them."""
    source = cmrf.create_model("tinyunet", channels=(16, 32), N=2)
    source(torch.randn(2, 3, 32, 32))  # non-trivial running statistics
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save(state, path)
    model = cmrf.create_model("tinyunet", channels=(16, 32), N=2, checkpoint_path=str(path))
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    del state[next(k for k in state if k.endswith("running_var"))]  # anything else is still missing
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing keys: .*running_var"):
        cmrf.create_model("tinyunet", channels=(16, 32), N=2, checkpoint_path=str(path))


def test_wrapper_prefixes_are_stripped_only_when_every_key_has_one(tmp_path):
    """A model whose own submodule is called "module" keeps its key names."""
    model = torch.nn.ModuleDict({"module": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
    torch.save(model.state_dict(), tmp_path / "own.pth")
    assert set(read_state_dict(tmp_path / "own.pth")) == set(model.state_dict())
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "ddp.pth")
    assert set(read_state_dict(tmp_path / "ddp.pth")) == set(model.state_dict())


def test_a_checkpoint_whose_name_is_not_utf8_is_read(tmp_path):
    """A Linux file name may hold any bytes; safetensors takes UTF-8 names only and called such a
    file "truncated or not a safetensors file"."""
    from cmrf.train.state import model_metadata, read_metadata

    model = cmrf.create_model("tinyunet", channels=(16, 32), N=2)
    path = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"weights-\xff.safetensors")))
    save_weights(model, path, metadata=model_metadata("tinyunet", {"channels": [16, 32], "N": 2}, 3, 2,
                                                      ["background", "lesion"]))
    assert read_state_dict(path).keys() == model.state_dict().keys()
    assert safetensors_metadata(path)["model"] == "tinyunet"
    assert read_metadata(path)["model_kwargs"] == {"channels": [16, 32], "N": 2}
    loaded, _ = model_from_checkpoint(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # a damaged one is named as such, its error not chained to the name's encoding (--debug shows it)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="file is truncated or not a safetensors file") as info:
        read_state_dict(path)
    chain, err = [], info.value
    while err is not None:
        chain.append(type(err).__name__)
        err = err.__cause__ or err.__context__
    assert "UnicodeEncodeError" not in chain, chain


def test_a_run_checkpoint_that_does_not_fit_names_the_call_that_builds_its_model(tmp_path):
    """A cmrf train file of a narrower model loaded into a default one: the message starts with
    the create_model call its metadata describes, not only with hundreds of key names."""
    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    meta = model_metadata("tinyunet", {"channels": [16, 32], "N": 4}, 1, 3, ["a", "b", "c"],
                          data={"spatial_dims": 2})
    cmrf.save_weights(cmrf.TinyUNet(1, 3, channels=(16, 32), N=4), path, metadata=meta)
    call = "cmrf.create_model('tinyunet', in_chans=1, num_classes=3, channels=[16, 32], N=4)"
    expected = re.escape(f"does not fit TinyUNet (cmrf train wrote it for {call}: ")
    with pytest.raises(ValueError, match=expected):
        cmrf.create_model("tinyunet", checkpoint_path=path)
    model = eval(call)  # the call in the message builds a model the file fits
    cmrf.load_checkpoint(model, path)


def _swapped(model, n):
    cmrf.replace_blocks(model, N=n)
    return model


@pytest.mark.parametrize(("name", "build", "meta_args", "call"), [
    ("cmunext_s", lambda: cmrf.create_model("cmunext_s", in_chans=1, spatial_dims=3), ({}, 1, None, 3),
     "cmrf.create_model('cmunext_s', in_chans=1, num_classes=2, spatial_dims=3)"),
    # tinyunet3d is 3D by its name: no spatial_dims argument
    ("tinyunet3d", lambda: cmrf.create_model("tinyunet3d", channels=(8, 16), N=2),
     ({"channels": [8, 16], "N": 2}, 3, None, 3),
     "cmrf.create_model('tinyunet3d', in_chans=3, num_classes=2, channels=[8, 16], N=2)"),
    ("cmunext_s", lambda: _swapped(cmrf.create_model("cmunext_s", dims=(8, 8, 8, 8, 16)), 2),
     ({"dims": [8, 8, 8, 8, 16]}, 3, 2, 2),
     "cmrf.create_model('cmunext_s', in_chans=3, num_classes=2, dims=[8, 8, 8, 8, 16]), "
     "then cmrf.replace_blocks(model, N=2)"),
], ids=["3d-run", "3d-model", "replace-blocks"])
def test_a_mismatched_run_checkpoint_names_its_3d_or_swapped_model(tmp_path, name, build, meta_args, call):
    """A volume run's model and a CMRF-swapped one are not what create_model(name) builds: the
    message must name spatial_dims and replace_blocks, or following it fails again."""
    from cmrf.train.state import model_metadata

    kwargs, in_chans, replace_n, dims = meta_args
    path = tmp_path / "best.safetensors"
    meta = model_metadata(name, kwargs, in_chans, 2, ["background", "lesion"], replace_n,
                          data={"spatial_dims": dims})
    cmrf.save_weights(build(), path, metadata=meta)
    clause = f"(cmrf train wrote it for {call}: build the model that way)"
    with pytest.raises(ValueError, match=re.escape(clause)):
        cmrf.load_checkpoint(cmrf.create_model(name), path)  # default arguments: the usual mistake
    create, _, swap = call.partition(", then ")
    model = eval(create)  # the message's construction builds a model the file fits
    if swap:
        eval(swap, {"cmrf": cmrf, "model": model})
    cmrf.load_checkpoint(model, path)


def _lightning_checkpoint(model: torch.nn.Module, path: Path, attribute: str = "model", **others) -> None:
    """What a LightningModule that holds the network as ``self.<attribute>`` saves (``others``:
    further keys of its state dict, a loss's class weights, an EMA copy)."""
    state = {f"{attribute}.{k}": v for k, v in model.state_dict().items()} | others
    torch.save({"epoch": 7, "global_step": 70, "pytorch-lightning_version": "2.5.0", "state_dict": state,
                "hyper_parameters": {"lr": 1e-3}, "optimizer_states": [], "lr_schedulers": []}, path)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())


def test_a_lightning_checkpoint_loads_by_every_route(tmp_path):
    """Lightning puts the LightningModule's attribute name ("model.", "net.") before every key; it is
    dropped when what remains fits the model, as with DDP's "module."."""
    kwargs = {"channels": (16, 32), "N": 2}
    source = cmrf.create_model("tinyunet", num_classes=3, **kwargs)
    path = tmp_path / "epoch=7-step=70.ckpt"
    _lightning_checkpoint(source, path, attribute="net")
    assert _same_weights(cmrf.load_checkpoint(cmrf.TinyUNet(num_classes=3, **kwargs), path), source)
    built = cmrf.create_model("tinyunet", num_classes=3, checkpoint_path=str(path), **kwargs)
    assert _same_weights(built, source)
    overlay = cmrf.create_model("tinyunet", num_classes=3, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert _same_weights(overlay, source)
    inferred, meta = model_from_checkpoint(path, model="tinyunet", model_kwargs=kwargs)
    assert meta["num_classes"] == 3 and _same_weights(inferred, source)
    _lightning_checkpoint(torch.compile(source), path, attribute="net.model")  # net.model._orig_mod.*
    assert _same_weights(cmrf.load_checkpoint(cmrf.TinyUNet(num_classes=3, **kwargs), path), source)


def test_a_shared_leading_name_is_dropped_only_when_the_rest_fits(tmp_path):
    """A model whose own keys all start with "model." (MONAI's UNet) keeps them; its Lightning
    checkpoint ("model.model.") loads; a file that does not fit after dropping is still refused."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    source = Holder()
    torch.save(source.state_dict(), tmp_path / "own.pth")
    assert _same_weights(cmrf.load_checkpoint(Holder(), tmp_path / "own.pth"), source)
    _lightning_checkpoint(source, tmp_path / "lightning.ckpt")
    assert _same_weights(cmrf.load_checkpoint(Holder(), tmp_path / "lightning.ckpt"), source)
    conv_only = {f"model.model.0.{k}": v for k, v in source.model[0].state_dict().items()}  # no model.1
    torch.save({"state_dict": conv_only}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"missing keys: model\.0\.bias.*unexpected keys: model\.model\.0"):
        cmrf.load_checkpoint(Holder(), tmp_path / "other.ckpt")


def test_a_lightning_checkpoint_with_more_than_the_model(tmp_path):
    """A loss's class weights beside the model are left out with a warning; two sets of weights
    that both fit (the model and an EMA copy) are refused by name; a whole network's sub-block
    is never picked out for a model that happens to fit it."""
    source = _small_unet()
    path = tmp_path / "last.ckpt"
    _lightning_checkpoint(source, path, **{"criterion.weight": torch.tensor([0.2, 0.8])})
    with pytest.warns(UserWarning, match=r"last.ckpt holds the weights of TinyUNet under model\.; loaded "
                                         r"those, left out 1 other key\(s\): criterion\.$") as caught:
        assert _same_weights(cmrf.load_checkpoint(_small_unet(), path), source)
    assert caught[0].filename == __file__  # the user's line, not one inside cmrf
    timm = pytest.importorskip("timm")
    with pytest.warns(UserWarning, match="left out 1 other key") as caught:  # through timm's factory too
        timm.create_model("tinyunet", channels=(16, 32), N=4, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert caught[0].filename == __file__
    with warnings.catch_warnings(record=True) as caught:  # shapes read, then loaded: said once
        warnings.simplefilter("always")
        model_from_checkpoint(path, model="tinyunet", model_kwargs={"channels": (16, 32), "N": 4})
    assert [str(w.message).count("criterion.") for w in caught] == [1], [str(w.message) for w in caught]
    ema = {f"ema_model.{k}": v for k, v in source.state_dict().items()}
    _lightning_checkpoint(source, path, **ema)
    with pytest.raises(ValueError, match=r"last.ckpt holds 2 sets of weights that fit TinyUNet, under "
                                         r"model\., ema_model\.: save the one"):
        cmrf.load_checkpoint(torch.compile(_small_unet()), path)  # named inside its wrapper
    with pytest.raises(ValueError, match=r"last.ckpt holds 2 sets of weights"):  # the file named here too
        model_from_checkpoint(path, model="tinyunet", model_kwargs={"channels": (16, 32), "N": 4})
    torch.save(source.state_dict(), tmp_path / "whole.pth")
    block = cmrf.CMRF(16, 32, N=4)  # fits encoders.1's keys, which sit beside others of its kind
    with pytest.raises(ValueError, match="does not fit CMRF: missing keys"):
        cmrf.load_checkpoint(block, tmp_path / "whole.pth")
    head = torch.nn.Conv2d(16, 2, 1)  # fits head.*, a top-level part of a larger network
    with pytest.raises(ValueError, match="does not fit Conv2d: missing keys"):
        cmrf.load_checkpoint(head, tmp_path / "whole.pth")


def test_save_weights_of_a_created_model_names_its_call_when_a_load_does_not_fit(tmp_path):
    """A file of save_weights said nothing of the model it came from: loading it into a default
    TinyUNet listed a hundred missing keys and no way out. The create_model call is recorded now,
    unless the model changed layout since (replace_blocks, reset_classifier), when it would lie."""
    model = cmrf.create_model("tinyunet", channels=[16, 32, 64, 128], N=4, num_classes=3)
    save_weights(model, tmp_path / "w.safetensors", metadata={"note": "mine"})
    assert safetensors_metadata(tmp_path / "w.safetensors")["note"] == "mine"
    with pytest.raises(ValueError, match=re.escape(
            "(it was saved from cmrf.create_model('tinyunet', channels=[16, 32, 64, 128], N=4, "
            "num_classes=3): build the model that way)")):
        cmrf.create_model("tinyunet", checkpoint_path=tmp_path / "w.safetensors")
    rebuilt = cmrf.create_model("tinyunet", channels=[16, 32, 64, 128], N=4, num_classes=3,
                                checkpoint_path=tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))

    # timm's reset_classifier makes what the same call with other classes builds: recorded so
    # (the attribute kept naming num_classes=3, and save_weights recorded no call at all).
    model.reset_classifier(5)
    assert json.loads(model.cmrf_create_call[0])["kwargs"]["num_classes"] == 5
    save_weights(model, tmp_path / "five.safetensors")
    with pytest.raises(ValueError, match=re.escape("N=4, num_classes=5): build the model that way)")):
        cmrf.create_model("tinyunet", num_classes=5, checkpoint_path=tmp_path / "five.safetensors")
    cmrf.create_model("tinyunet", channels=[16, 32, 64, 128], N=4, num_classes=5,
                      checkpoint_path=tmp_path / "five.safetensors")
    segnet = cmrf.create_model("segnet")
    cmrf.replace_blocks(segnet)
    segnet.reset_classifier(3)  # a layout no call builds: nothing recorded, the stale call dropped
    assert not hasattr(segnet, "cmrf_create_call")
    save_weights(segnet, tmp_path / "changed.safetensors")
    assert "cmrf_create_model" not in safetensors_metadata(tmp_path / "changed.safetensors")


@pytest.mark.parametrize("bad, why", [
    (torch.empty(2, device="meta"), "a meta tensor"),
    (torch.zeros(2).to_sparse(), "a sparse_coo tensor, not a dense one"),
    (torch.zeros(2, dtype=torch.int64), "int64 values for a floating-point weight"),
])
def test_a_tensor_that_cannot_be_loaded_is_refused_before_any_weight_is_copied(tmp_path, bad, why):
    """Keys and shapes fitted, so load_state_dict ran and failed partway ("Cannot copy out of meta
    tensor"), 433 of 434 tensors already overwritten; integer weights were cast silently."""
    state = cmrf.create_model("tinyunet").state_dict()
    state["head.bias"] = bad
    torch.save(state, tmp_path / "bad.pth")
    model = cmrf.create_model("tinyunet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"unusable tensors: head\.bias: {re.escape(why)}"):
        cmrf.load_checkpoint(model, tmp_path / "bad.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_under_other_common_keys_load_and_a_miss_names_the_keys_found(tmp_path):
    """{'net': sd}, timm's EMA-only {'state_dict_ema': sd}, or a configuration dict under 'model'
    beside 'model_state_dict' gave "does not hold a state dict of tensors" and nothing more."""
    model = cmrf.create_model("tinyunet")
    state = model.state_dict()
    for name, content in (("net", {"net": state, "epoch": 3}), ("ema", {"state_dict_ema": state}),
                          ("config", {"model": {"name": "tinyunet", "N": 8}, "model_state_dict": state})):
        torch.save(content, tmp_path / f"{name}.pth")
        loaded = cmrf.load_checkpoint(cmrf.create_model("tinyunet"), tmp_path / f"{name}.pth")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    torch.save({"optimizer": {"lr": 1}, "epoch": 3}, tmp_path / "none.pth")
    missed = (r"none\.pth does not hold a state dict of tensors: its top-level keys are 'optimizer', "
              r"'epoch'; the weights are read from the top level or from the first of state_dict_ema, "
              r"model_ema, ema, state_dict, model, ")
    with pytest.raises(ValueError, match=missed):
        cmrf.load_checkpoint(model, tmp_path / "none.pth")


def test_the_command_line_builds_the_model_a_save_weights_file_records(tmp_path, monkeypatch):
    """`cmrf evaluate`/`export` said such a file "carries no cmrf metadata" and wanted --model, and
    a CMUNeXt of other dims could not be described with the flags at all."""
    import cmrf.export
    from cmrf.cli import main

    model = cmrf.create_model("cmunext", dims=(8, 16, 32, 64, 128), depths=(1, 1, 1, 2, 1),
                              kernels=(3, 3, 7, 7, 9), num_classes=3)
    save_weights(model, tmp_path / "mine.safetensors")
    rebuilt, meta = model_from_checkpoint(tmp_path / "mine.safetensors")
    assert (meta["model"], meta["num_classes"]) == ("cmunext", 3)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    exported = []  # the model the command builds, not the (slow) export itself, is under test here

    def record(model, path, *args, **kwargs):
        exported.append(model)
        Path(path).write_bytes(b"onnx")
        return Path(path)

    monkeypatch.setattr(cmrf.export, "export_onnx", record)
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "mine.safetensors"),
                 "--input-size", "1", "3", "32", "32", "-o", str(tmp_path / "mine.onnx")]) == 0
    (built,) = exported
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))


def test_flags_beside_a_recorded_call_replace_its_arguments(tmp_path):
    """With --channels/--N given, a save_weights file's recorded call was ignored and the file said to
    "carry no cmrf metadata" although the flags named exactly the recorded arguments."""
    save_weights(cmrf.create_model("tinyunet", channels=(16, 32), N=2), tmp_path / "w.safetensors")
    path = tmp_path / "w.safetensors"
    model, meta = model_from_checkpoint(path, model_kwargs={"channels": [16, 32], "N": 2})
    assert meta["model"] == "tinyunet" and isinstance(model, cmrf.TinyUNet)
    with pytest.raises(ValueError, match=r"saved from cmrf.create_model\('tinyunet', channels=\[16, 32\]"):
        model_from_checkpoint(path, model_kwargs={"channels": [16, 64]})


def test_a_torch_file_named_safetensors_loads_and_a_torchscript_archive_is_named(tmp_path):
    """A torch.save file named *.safetensors was read as safetensors ("header too large"), by
    cmrf and by torch 2.14's own torch.load; a TorchScript archive was called truncated."""
    model = cmrf.create_model("tinyunet").eval()
    torch.save(model.state_dict(), tmp_path / "renamed.safetensors")
    loaded = cmrf.load_checkpoint(cmrf.create_model("tinyunet"), tmp_path / "renamed.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), tmp_path / "scripted.pt")
    with pytest.raises(ValueError, match=r"scripted\.pt: it is a TorchScript archive \(torch\.jit\.save\)"):
        cmrf.load_checkpoint(cmrf.create_model("tinyunet"), tmp_path / "scripted.pt")


@pytest.mark.parametrize("path, expected", [
    (5, r"must be a str or os.PathLike, got int \(5\)$"),
    ({"w": torch.zeros(1)}, r"got dict: for weights already in memory, use model.load_state_dict\(state\)"),
])
def test_load_checkpoint_names_a_path_that_is_not_one(path, expected):
    """load_checkpoint(model, 5) gave os.fspath's "expected str, bytes or os.PathLike object, not
    int", naming no argument; a state dict passed by habit got the same."""
    with pytest.raises(TypeError, match=expected):
        cmrf.load_checkpoint(cmrf.TinyUNet(channels=(16, 32), N=2), path)


def test_an_overlays_num_classes_describes_the_file_and_a_head_only_mismatch_names_fine_tuning(tmp_path):
    """pretrained_cfg_overlay=dict(file=..., num_classes=4) for a 2-class file built a 4-class model
    with a random head, silently: in timm the cfg's num_classes describes the weights. Asked for in
    create_model's own arguments, the head starts afresh, as before."""
    kwargs = {"channels": (16, 32), "N": 2}
    path = tmp_path / "two.safetensors"
    cmrf.save_weights(cmrf.create_model("tinyunet", **kwargs), path)
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(2, .* vs model \(4, "):
        overlay = dict(file=str(path), num_classes=4)
        cmrf.create_model("tinyunet", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    asked = cmrf.create_model("tinyunet", num_classes=4, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert asked.head.out_channels == 4
    with pytest.raises(ValueError, match=r"only the classifier differs: to fine-tune .*train --init PATH"):
        cmrf.create_model("tinyunet", num_classes=4, checkpoint_path=str(path), **kwargs)


def _run_file_with(tmp_path, name: str, **changes) -> Path:
    """A cmrf train checkpoint whose metadata entries ``changes`` replace (a crafted file)."""
    from cmrf.train.state import model_metadata

    meta = model_metadata("tinyunet", {"channels": [16, 32], "N": 2}, 3, 2, ["background", "lesion"],
                          data={"data": "synthetic", "img_size": 32, "spatial_dims": 2})
    path = tmp_path / name
    model = cmrf.create_model("tinyunet", channels=(16, 32), N=2)
    cmrf.save_weights(model, path, metadata={**meta, **changes})
    return path


def test_a_crafted_checkpoints_metadata_cannot_allocate_or_open_files(tmp_path):
    """Metadata chose the model built before its weights were checked: huge channels tried to
    allocate 40 GB, model arguments could name files to open (checkpoint_path), and malformed
    entries ended in a RecursionError or TypeError ("internal error")."""
    import json

    huge = _run_file_with(tmp_path, "huge.safetensors", model_kwargs=json.dumps({"channels": [100000] * 2}))
    with pytest.raises(ValueError, match=r"does not fit TinyUNet"):
        model_from_checkpoint(huge)
    opener = _run_file_with(tmp_path, "open.safetensors",
                            model_kwargs=json.dumps({"checkpoint_path": "/etc/passwd"}))
    with pytest.raises(ValueError, match=r"hold 'checkpoint_path', which are not constructor arguments"):
        model_from_checkpoint(opener)
    deep = _run_file_with(tmp_path, "deep.safetensors", model_kwargs="[" * 100000)
    with pytest.raises(ValueError, match=r"its cmrf metadata is damaged \(not JSON: RecursionError\)"):
        model_from_checkpoint(deep)
    listed = _run_file_with(tmp_path, "list.safetensors", data="[1, 2]", num_classes="true")
    with pytest.raises(ValueError, match=r"wrong type: num_classes \(bool, .*data \(list, expected a dict\)"):
        model_from_checkpoint(listed)
    assert isinstance(model_from_checkpoint(_run_file_with(tmp_path, "ok.safetensors"))[0], cmrf.TinyUNet)


def test_a_recompressed_torch_file_is_not_inflated(tmp_path):
    """torch.save stores zip entries uncompressed; a re-packed deflated archive of 20 KB expanded to a
    20 MB tensor (1000-fold: a few MB of file could exhaust memory)."""
    import zipfile

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(5_000_000)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as packed:
        for entry in source.infolist():
            packed.writestr(entry.filename, source.read(entry.filename))
    with pytest.raises(ValueError, match=r"bomb.pt: its zip entries expand to \d+ bytes from \d+"):
        read_state_dict(bomb)
    assert read_state_dict(plain)["w"].numel() == 5_000_000


def test_weights_of_another_dimensionality_are_named_as_such(tmp_path):
    """3D weights for a 2D model listed every convolution's shape and did not say why they differ."""
    volume = tmp_path / "volume.safetensors"
    cmrf.save_weights(cmrf.create_model("tinyunet3d", channels=(16, 32), N=2), volume)
    with pytest.raises(ValueError, match=r"weights of a 3D model and the model is 2D \(spatial_dims=2\)"):
        cmrf.load_checkpoint(cmrf.create_model("tinyunet", channels=(16, 32), N=2), volume)
    with pytest.raises(ValueError) as caught:  # other widths, same dimensionality: no such claim
        cmrf.load_checkpoint(cmrf.create_model("tinyunet3d", channels=(16, 64), N=2), volume)
    assert "shape mismatches" in str(caught.value) and "3D model and" not in str(caught.value)


def _small_tinyunet() -> torch.nn.Module:
    return cmrf.create_model("tinyunet", channels=(16, 32), N=2)


def test_a_file_with_averaged_and_raw_weights_loads_the_averaged_ones_as_timm_does_and_says_so(tmp_path):
    """timm's train.py writes 'state_dict' beside 'state_dict_ema': cmrf.create_model read the raw
    copy and timm.create_model (use_ema=True) the averaged one, from the same file, without a word."""
    timm = pytest.importorskip("timm")
    raw = _small_tinyunet().state_dict()
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 5, "state_dict": raw, "state_dict_ema": averaged, "optimizer": {}}, path)
    key = "stem.pw1.conv.weight" if "stem.pw1.conv.weight" in raw else next(iter(raw))
    both = (r"averaged \(EMA\) weights under 'state_dict_ema' and raw ones under 'state_dict': "
            r"read the averaged \(EMA\) ones.*use_ema=False")
    with pytest.warns(UserWarning, match=both):
        ours = cmrf.create_model("tinyunet", channels=(16, 32), N=2, checkpoint_path=path)
    theirs = timm.create_model("tinyunet", channels=(16, 32), N=2, checkpoint_path=str(path))
    assert torch.equal(ours.state_dict()[key], averaged[key])
    assert torch.equal(theirs.state_dict()[key], averaged[key])
    with pytest.warns(UserWarning, match=r"read the raw ones, 'state_dict'.*use_ema=True"):
        loaded = cmrf.load_checkpoint(_small_tinyunet(), path, use_ema=False)
    assert torch.equal(loaded.state_dict()[key], raw[key])
    torch.save({"state_dict": raw, "epoch": 5}, tmp_path / "raw_only.pth")  # one copy: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(read_state_dict(tmp_path / "raw_only.pth")[key], raw[key])


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
def test_save_weights_looks_through_compile_and_data_parallel_wrappers(tmp_path, wrap):
    """save_weights(torch.compile(model)) stored '_orig_mod.' keys and no recorded create_model call,
    so `cmrf evaluate` of the file wanted --model, unlike the same model saved unwrapped."""
    from cmrf.checkpoint import recorded_create_call

    model = _small_tinyunet()
    wrapped = torch.compile(model) if wrap == "compile" else torch.nn.DataParallel(model)
    save_weights(wrapped, tmp_path / "w.safetensors")
    assert read_state_dict(tmp_path / "w.safetensors").keys() == model.state_dict().keys()
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "w.safetensors")) == set(model.state_dict())  # as stored
    assert recorded_create_call(tmp_path / "w.safetensors") == ("tinyunet", {"channels": [16, 32], "N": 2})


def test_save_weights_of_a_model_on_the_meta_device_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        model = _small_tinyunet()
    with pytest.raises(ValueError, match=r"save_weights: '[\w.]+' is a meta tensor: a model built on the "
                                         r"meta device has no values to save"):
        save_weights(model, tmp_path / "meta.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_last_state_file_that_does_not_fit_names_the_call_that_builds_its_model(tmp_path):
    """The mismatch message named the create_model call for a run's .safetensors but not for its
    last_state.pt, which records the same metadata (and docs/training.md promised it for both)."""
    from cmrf.train.state import model_metadata

    meta = model_metadata("tinyunet", {"channels": [16, 32], "N": 2}, 3, 2, ["background", "lesion"])
    torch.save({"model": _small_tinyunet().state_dict(), "metadata": meta, "epoch": 1},
               tmp_path / "last_state.pt")
    call = r"cmrf\.create_model\('tinyunet', in_chans=3, num_classes=2, channels=\[16, 32\], N=2\)"
    with pytest.raises(ValueError, match=rf"cmrf train wrote it for {call}"):
        cmrf.create_model("tinyunet", checkpoint_path=tmp_path / "last_state.pt")
    from cmrf.checkpoint import training_create_call  # what `cmrf train --init` names

    assert training_create_call(tmp_path / "last_state.pt") == ("tinyunet", {"channels": [16, 32], "N": 2})
