"""`cmrf.train.fit` and its parts used from a script of one's own, not through the command line."""

from __future__ import annotations

import dataclasses
import os
import random
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

import cmrf
from cmrf.data import build_datasets
from cmrf.train.loaders import EpochView
from cmrf.train.loop import fit
from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics
from cmrf.train.recipe import Recipe
from cmrf.train.run_folder import RunFolderError
from cmrf.train.state import model_metadata


def tiny_bundle():
    return build_datasets(seed=0, data="synthetic", img_size=32, synthetic_samples=12)


def tiny_model(**kwargs):
    return cmrf.create_model("tinyunet", N=2, channels=[8, 16], **kwargs)


def recipe(**changes) -> Recipe:
    return Recipe(**{"epochs": 1, "batch_size": 4, "device": "cpu", "workers": 0, **changes})


def run_files(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_a_one_channel_model_is_refused_before_training(tmp_path):
    """A sigmoid-style model on two-class data trained, its loss fell, and every score was that of
    an all-background prediction (argmax over one channel)."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"to \(1, 32, 32\) per sample, but the data needs .*\(2, 32, 32\).*"
                                         r"num_classes=2"):
        fit(tiny_model(num_classes=1), tiny_bundle(), out, recipe(), plots=False)
    assert not any(name.endswith(".safetensors") for name in run_files(out))


@pytest.mark.parametrize("output", ["tuple", "half"])
def test_a_model_whose_output_does_not_fit_the_masks_is_refused_before_training(tmp_path, output):
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            logits = self.inner(x)
            return (logits,) if output == "tuple" else logits[..., ::2, ::2]

    with pytest.raises(ValueError, match="returns a tuple" if output == "tuple" else r"\(2, 16, 16\)"):
        fit(Wrapped(), tiny_bundle(), tmp_path / "run", recipe(), plots=False)


def test_fit_gives_the_callers_random_generators_back(tmp_path):
    """fit seeded the global generators from the recipe and left them so: every model built after
    a fit in one process started from the same weights."""
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    for seed in (5, 6):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        expected = draws()
        model, bundle = tiny_model(), tiny_bundle()
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        fit(model, bundle, tmp_path / f"run{seed}", recipe(), plots=False)
        assert draws() == expected


def test_an_evaluation_pass_takes_nothing_from_the_global_generator():
    """Each pass over an evaluation loader drew its workers' base seed from torch's global
    generator (with 0 workers every pass, with persistent workers only the first), so a model with
    dropout trained differently with --workers 0 and 2 from the second epoch on."""
    from cmrf.train.loaders import eval_loader
    from cmrf.train.processes import Processes

    loader = eval_loader(tiny_bundle().val, 2, 0, Processes())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(2):
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), before)


def test_an_epoch_is_reported_only_once_it_is_saved(tmp_path, capsys, monkeypatch):
    """The epoch's line was printed before its state was written: a Ctrl-C in between lost an
    epoch that the screen showed as done (``--resume`` trained it again)."""
    from cmrf.train import loop

    real_save, calls = loop.save_training_state, []

    def interrupted_at_the_second(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(loop, "save_training_state", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), tiny_bundle(), tmp_path / "run", recipe(epochs=3), plots=False)
    out = capsys.readouterr().out
    assert "epoch 1/3" in out and "epoch 2/3" not in out


class StopAfter(Dataset):
    """A training split that raises KeyboardInterrupt at its ``limit``-th read (a Ctrl-C)."""

    def __init__(self, dataset, limit: int):
        self.dataset, self.limit, self.reads = dataset, limit, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt
        return self.dataset[index]


def test_a_resume_without_metadata_keeps_the_runs_metadata(tmp_path):
    """Resumed from Python without metadata=, every later file lost the run's metadata: cmrf
    evaluate then refused last.safetensors and no later resume was ever checked."""
    bundle = tiny_bundle()
    meta = model_metadata("tinyunet", {"N": 2, "channels": [8, 16]}, 3, 2, bundle.class_names)
    out = tmp_path / "run"
    interrupted = dataclasses.replace(bundle, train=StopAfter(bundle.train, len(bundle.train) + 2))
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), interrupted, out, recipe(epochs=2), metadata=meta, plots=False)
    fit(tiny_model(), bundle, out, recipe(epochs=2), resume=True, plots=False)
    with safe_open(out / "last.safetensors", "pt") as file:
        saved = file.metadata()
    assert saved["model"] == "tinyunet" and saved["epoch"] == "2"


def test_a_resume_without_metadata_on_other_data_is_refused(tmp_path):
    """fit(resume=True) without metadata= continued a synthetic run on folder data (or other
    classes), its files still describing the run's data."""
    from tests.test_data import write_pair

    bundle = tiny_bundle()
    meta = model_metadata("tinyunet", {"N": 2, "channels": [8, 16]}, 3, 2, bundle.class_names,
                          data={"data": "synthetic", "img_size": 32, "spatial_dims": 2})
    out = tmp_path / "run"
    fit(tiny_model(), bundle, out, recipe(), metadata=meta, plots=False)
    root = tmp_path / "site"
    for i in range(6):
        write_pair(root, f"s{i}", seed=i)
    (root / "classes.txt").write_text("background\nlesion\n")
    files = build_datasets(seed=0, data="folder", root=root, img_size=32)
    with pytest.raises(RunFolderError, match=r"its run was trained on other data \(the splits' files differ"):
        fit(tiny_model(), files, out, recipe(), resume=True, plots=False)
    four = build_datasets(seed=0, data="synthetic", img_size=32, synthetic_samples=12, num_classes=4)
    with pytest.raises(RunFolderError, match=r"classes 2 \(given 4\)"):
        fit(tiny_model(num_classes=4), four, out, recipe(), resume=True, plots=False)
    fit(tiny_model(), bundle, out, recipe(), resume=True, plots=False)  # its own data: resumes


def test_a_resume_must_freeze_what_the_run_froze(tmp_path):
    """A fine-tune with a frozen encoder, resumed without freezing it again, trained the encoder
    on without a word; a model with nothing to train failed in backward."""
    bundle = tiny_bundle()
    out = tmp_path / "run"
    frozen = tiny_model()
    frozen.encoders.requires_grad_(False)
    fit(frozen, bundle, out, recipe(), plots=False)
    with pytest.raises(ValueError, match=r"frozen in the run require grad now \(encoders\.0\.pw1"):
        fit(tiny_model(), bundle, out, recipe(), resume=True, plots=False)
    again = tiny_model()
    again.encoders.requires_grad_(False)
    fit(again, bundle, out, recipe(), resume=True, plots=False)
    with pytest.raises(ValueError, match=r"TinyUNet has no trainable parameter"):
        fit(tiny_model().requires_grad_(False), bundle, tmp_path / "none", recipe(), plots=False)
    with pytest.raises(ValueError, match=r"--min-lr\), got lr=1e-07, .*needs a smaller --min-lr too"):
        recipe(lr=1e-7)


def test_a_compiled_model_saves_the_weights_of_the_module_it_wraps(tmp_path):
    """Its files had keys "_orig_mod.*", which the same model uncompiled could neither load nor
    resume from ("its weights belong to another network")."""
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")
    try:
        fit(compiled, tiny_bundle(), tmp_path / "run", recipe(), plots=False)
    finally:
        torch._dynamo.reset()
    plain = tiny_model()
    cmrf.load_checkpoint(plain, tmp_path / "run" / "best.safetensors")
    with safe_open(tmp_path / "run" / "best.safetensors", "pt") as file:
        names = list(file.keys())
    assert names and not any(name.startswith("_orig_mod.") for name in names)


def test_bundles_fit_cannot_train_are_refused_plainly(tmp_path):
    bundle = tiny_bundle()
    empty = dataclasses.replace(bundle, train=torch.utils.data.Subset(bundle.train, []))
    with pytest.raises(ValueError, match="non-empty training split, got an empty one"):
        fit(tiny_model(), empty, tmp_path / "a", recipe(), plots=False)
    for classes, names in ((1, ["lesion"]), (2, ["background"])):
        with pytest.raises(ValueError, match=re.escape(f"num_classes={classes} and class_names={names}")):
            fit(tiny_model(), dataclasses.replace(bundle, num_classes=classes, class_names=names),
                tmp_path / "n", recipe(), plots=False)
    loaders = dataclasses.replace(bundle, train=DataLoader(bundle.train, batch_size=4))
    with pytest.raises(ValueError, match=r"bundle\.train is a DataLoader: .*pass its \.dataset"):
        fit(tiny_model(), loaders, tmp_path / "b", recipe(), plots=False)

    class Dicts(Dataset):
        def __len__(self):
            return len(bundle.val)

        def __getitem__(self, index):
            image, mask = bundle.val[index]
            return {"image": image, "label": mask}

    dicts = r"\(image, mask\) tensor pairs, got a dict with keys \['image', 'label'\]"
    with pytest.raises(ValueError, match=dicts):
        fit(tiny_model(), dataclasses.replace(bundle, val=Dicts()), tmp_path / "c", recipe(), plots=False)


def test_an_out_dir_that_is_a_file_is_named_as_such(tmp_path):
    """fit raised a bare FileExistsError / NotADirectoryError from its folder lock."""
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(RunFolderError, match=r"afile is a file, not a folder"):
            fit(tiny_model(), tiny_bundle(), out, recipe(), plots=False)


def test_recipe_refuses_more_workers_than_the_machine_can_hold(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(ValueError, match=r"workers: expected at most 8 worker processes .* got 1000"):
        Recipe(workers=1000)
    assert Recipe(workers=8).workers == 8


def test_recipe_counts_take_numpy_integers_and_aug_stop_is_a_count():
    made = Recipe(epochs=np.int64(3), batch_size=np.int32(2), aug_stop=np.int64(2))
    assert (made.epochs, made.batch_size, made.aug_stop) == (3, 2, 2)
    assert all(type(v) is int for v in (made.epochs, made.batch_size, made.aug_stop))
    for bad in (1.5, True):
        with pytest.raises(ValueError, match="aug_stop must be an integer >= 0"):
            Recipe(epochs=3, aug_stop=bad)


def test_epoch_view_sets_only_a_boolean_augment_flag():
    """A dataset's own callable `augment` was overwritten with a bool ('bool' object is not
    callable); one with a bool flag but no set_epoch was never switched off at aug_stop."""
    class Flagged(Dataset):
        augment = True

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return self.augment

    class OwnTransform(Flagged):
        def __init__(self):
            self.augment = lambda value: value
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __getitem__(self, index):
            return self.augment(index)

    assert EpochView(Flagged())[(3, False, 0)] is False
    own = OwnTransform()
    assert EpochView(own)[(3, False, 0)] == 0 and own.epochs == [3] and callable(own.augment)


def test_metrics_refuse_what_they_would_score_wrongly():
    metrics = SegmentationMetrics(2)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"1 channels .* num_classes is 2 .*sigmoid-style"):
        metrics.update(torch.randn(2, 1, 4, 4), target)
    with pytest.raises(ValueError, match=r"must hold class indices .*got torch.float32"):
        metrics.update(torch.rand(2, 4, 4), target)
    with pytest.raises(ValueError, match=r"target holds class 255, outside 0\.\.1 .*map it to a class"):
        metrics.update(torch.randn(2, 2, 4, 4), target.clone().fill_(255))
    with pytest.raises(ValueError, match="target holds non-integer values"):
        metrics.update(torch.randn(2, 2, 4, 4), torch.full((2, 4, 4), 0.7))
    metrics.update(torch.randn(2, 2, 4, 4), torch.ones(2, 4, 4))  # float, but class indices
    assert metrics.compute()["per_class"]["foreground"]["iou"] >= 0


def test_the_loss_names_labels_it_cannot_use():
    loss = CEDiceLoss()
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"K >= 2 classes .*got 1 channel"):
        loss(torch.randn(2, 1, 4, 4), target)
    with pytest.raises(ValueError, match=r"target holds class 255, outside 0\.\.1 of the model's 2 outputs"):
        loss(torch.randn(2, 2, 4, 4), target.clone().fill_(255))
    with pytest.raises(ValueError, match=r"target holds class -1"):
        loss(torch.randn(2, 2, 4, 4), target.clone().fill_(-1))
    with pytest.raises(ValueError, match="non-integer values"):
        loss(torch.randn(2, 2, 4, 4), torch.full((2, 4, 4), 0.7))
    assert torch.isfinite(loss(torch.randn(2, 2, 4, 4), torch.ones(2, 4, 4)))


def test_mixed_precision_asked_for_by_name_on_the_cpu_is_noted(tmp_path, capsys):
    """--amp fp16 on the CPU trained in float32 without a word."""
    fit(tiny_model(), tiny_bundle(), tmp_path / "fp16", recipe(amp="fp16"), plots=False)
    assert "note: mixed precision (fp16) is for CUDA; on the cpu this run trains in float32" in (
        capsys.readouterr().out)
    fit(tiny_model(), tiny_bundle(), tmp_path / "auto", recipe(amp="auto"), plots=False)
    assert "mixed precision" not in capsys.readouterr().out  # the default says nothing


def test_the_training_example_reads_files_and_volumes(tmp_path, monkeypatch):
    """examples/train_synthetic.py refused every --data but synthetic ("--synthetic-samples: only for
    --data synthetic", never given: its smaller default was taken for a given option), and its 2-D
    model failed on --spatial-dims 3 after the data was built."""
    import runpy
    import sys
    from pathlib import Path

    from tests.test_data import write_pair

    script = Path(__file__).resolve().parents[1] / "examples" / "train_synthetic.py"
    for i in range(6):
        write_pair(tmp_path / "data", f"case{i}", seed=i)
    runs = {
        "files": ["--data", "folder", "--root", str(tmp_path / "data"), "--img-size", "16"],
        "volumes": ["--spatial-dims", "3", "--img-size", "16", "--synthetic-samples", "6"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        monkeypatch.setattr(sys, "argv", ["train_synthetic.py", *args, "--epochs", "1", "--out", str(out)])
        runpy.run_path(str(script), run_name="__main__")
        assert (out / "best.safetensors").is_file(), name


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    (["--img-size", "8"], "needs every spatial side >= 16"),
])
def test_the_training_example_says_a_bad_value_in_one_line(tmp_path, monkeypatch, args, message):
    """A bad --epochs, --lr or --img-size ended the example in a traceback from inside the library."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_synthetic.py"
    argv = ["train_synthetic.py", "--synthetic-samples", "6", "--out", str(tmp_path / "run"), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    text = str(stopped.value.code)
    assert text.startswith("train_synthetic.py: error: ") and message in text and "\n" not in text


def test_fit_names_arguments_of_the_wrong_kind_before_anything_is_written(tmp_path):
    """fit("tinyunet", ...) said "'str' object has no attribute 'to'", a recipe dict failed with
    "'dict' object has no attribute 'device'" (an empty one trained the paper's 300 epochs), and
    metadata that is not text, or not JSON, failed after an epoch or at the resume."""
    from cmrf.train.loop import _checked_recipe

    out = tmp_path / "run"
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str: build it with "
                                        r"cmrf.create_model\('tinyunet'\)"):
        fit("tinyunet", tiny_bundle(), out, recipe(), plots=False)
    with pytest.raises(TypeError, match="out_dir must be a folder name .*got None"):
        fit(tiny_model(), tiny_bundle(), None, recipe(), plots=False)
    with pytest.raises(TypeError, match="recipe must be a cmrf.train.Recipe .*got str"):
        fit(tiny_model(), tiny_bundle(), out, "paper", plots=False)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):  # a dict is read
        fit(tiny_model(), tiny_bundle(), out, {"epochs": 0}, plots=False)
    assert _checked_recipe({}) == Recipe() and _checked_recipe({"epochs": 2}).epochs == 2
    changed = recipe()
    changed.epochs = 0  # assigned after construction: checked again
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        fit(tiny_model(), tiny_bundle(), out, changed, plots=False)
    with pytest.raises(ValueError, match=r"metadata must map str to str .*'epochs': 3"):
        fit(tiny_model(), tiny_bundle(), out, recipe(), metadata={"epochs": 3}, plots=False)
    with pytest.raises(ValueError, match=r"metadata\['note'\] = 'baseline run' is not JSON"):
        fit(tiny_model(), tiny_bundle(), out, recipe(), metadata={"note": "baseline run"}, plots=False)
    assert run_files(out) == []


def test_recipe_refuses_a_seed_torch_cannot_take_and_betas_that_are_not_a_pair():
    """Recipe(seed=2**64) failed inside fit ("Overflow when unpacking long long"), Recipe(betas=0.9)
    with "object of type 'float' has no len()"."""
    assert Recipe(seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*63 - 1 .*got 1844674407"):
        Recipe(seed=2**64)
    for betas in (0.9, (0.9,), (True, 0.9)):
        with pytest.raises(ValueError, match="betas must be two numbers in"):
            Recipe(betas=betas)


def test_a_failed_fit_leaves_its_folder_free_while_its_error_is_kept(tmp_path):
    """The folder's lock went to the DataLoader workers forked under it, which the traceback kept
    alive (a notebook keeps the last one, a sweep its failures): a retry was refused as "in use by
    another training" until the error was deleted."""
    import multiprocessing

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="training loss is nan") as failure:
        fit(tiny_model(), tiny_bundle(), out, recipe(epochs=2, lr=1e30, min_lr=0, workers=1), plots=False)
    assert failure.value is not None  # still held here
    assert multiprocessing.active_children() == []
    fit(tiny_model(), tiny_bundle(), out, recipe(), plots=False, overwrite=True)  # not refused


def test_a_run_stopped_while_drawing_its_figures_is_unfinished_and_resume_completes_it(tmp_path, monkeypatch):
    """metrics.json, the mark of a finished run, was written before the figures: a demo stopped
    while drawing them was taken as finished and replaced by a plain re-run, its epochs lost."""
    pytest.importorskip("matplotlib")
    import cmrf.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "write_overlays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), tiny_bundle(), out, recipe(overlays=1))
    assert "metrics.json" not in run_files(out) and "last_state.pt" in run_files(out)
    monkeypatch.undo()
    result = fit(tiny_model(), tiny_bundle(), out, recipe(overlays=1), resume=True)
    assert {"metrics.json", "overlays.png", "training_curve.png"} <= set(run_files(out))
    assert [r["epoch"] for r in result["history"]] == [1]  # finished, not trained again
