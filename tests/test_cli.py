"""The command line as a user runs it: console script entry, ``python -m cmrf``, quickstart, and the
error boundary (one line and exit 2 for what the user can fix, ``--debug`` for the traceback)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import cmrf
from cmrf.cli import COMMANDS, EXIT_INTERNAL, EXIT_USER_ERROR, main


def test_python_m_cmrf_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "cmrf", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_every_command_builds_its_parser():
    for name in COMMANDS:
        try:
            main([name, "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, name


def test_quickstart_prints_paper_and_ours(capsys):
    assert main(["quickstart", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "paper, 256²" in out and "cmrf, 64²" in out and "0.481M" in out and "(1, 2, 64, 64)" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


# --- the error boundary: one line and exit 2 for what the user can fix, --debug for tracebacks ------


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "best.safetensors"
    status = main(["predict", str(missing), str(tmp_path), "--out", str(tmp_path / "out")])
    assert status == EXIT_USER_ERROR == 2
    assert _one_line(capsys.readouterr().err) == f"cmrf predict: error: {missing}: no such checkpoint file"


def _traceback_then_line(err: str, line: str) -> bool:
    return err.startswith("Traceback (most recent call last):") and err.rstrip().splitlines()[-1] == line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_traceback_and_keeps_the_status(tmp_path, where, capsys):
    """A script run with CMRF_DEBUG=1 in its environment must read the same status (2, not 1)."""
    missing = tmp_path / "missing.safetensors"
    command = ["evaluate", str(missing)]
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert _traceback_then_line(err, f"cmrf evaluate: error: {missing}: no such checkpoint file")
    assert "FileNotFoundError" in err


def test_debug_environment_variable(tmp_path, monkeypatch, capsys):
    argv = ["evaluate", str(tmp_path / "missing.safetensors")]
    monkeypatch.setenv("CMRF_DEBUG", "1")
    assert main(argv) == 2 and "Traceback" in capsys.readouterr().err
    for off in ("0", "", "false", "No", "OFF"):  # CMRF_DEBUG=false turned debugging on
        monkeypatch.setenv("CMRF_DEBUG", off)
        assert main(argv) == 2, off
        assert "Traceback" not in capsys.readouterr().err, off
    for on in ("true", "yes"):
        monkeypatch.setenv("CMRF_DEBUG", on)
        assert main(argv) == 2 and "Traceback" in capsys.readouterr().err, on


def test_a_listed_data_report_keeps_its_items_apart_on_one_line():
    """problem_report's indented items were joined by bare spaces: "...expected (X, Y, Z) image file ..."."""
    from cmrf.cli import describe_error
    from cmrf.data import DataError
    from cmrf.data.masks import problem_report

    report = problem_report("2 of 2 pairs cannot be used:", ["a.nii.gz has shape (2, 1)", "b.nii.gz too"],
                            "Give --num-classes 3.\nOr --mask-values 0 1 2.")
    expected = ("2 of 2 pairs cannot be used: a.nii.gz has shape (2, 1); b.nii.gz too; Give --num-classes 3. "
                "Or --mask-values 0 1 2.")
    assert describe_error(DataError(report)) == expected


def test_unexpected_error_is_one_line_with_exit_70(monkeypatch, capsys):
    import cmrf.quickstart

    def broken(size):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(cmrf.quickstart, "quickstart_report", broken)
    assert main(["quickstart"]) == EXIT_INTERNAL == 70
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("cmrf quickstart: internal error: RuntimeError: something unexpected")
    assert line.endswith("(rerun with --debug for the traceback, and please report it)")
    assert main(["--debug", "quickstart"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and 'raise RuntimeError("something\\nunexpected")' in err


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 120000000000 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
])
def test_out_of_memory_is_a_user_error_naming_the_sizes(monkeypatch, capsys, error):
    """A failed allocation comes from sizes the user chose (``--img-size 100000``), not from a bug."""
    import cmrf.quickstart

    def too_big(size):
        raise error

    monkeypatch.setattr(cmrf.quickstart, "quickstart_report", too_big)
    assert main(["quickstart"]) == EXIT_USER_ERROR
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("cmrf quickstart: error: out of memory: ") and "internal error" not in line
    assert line.endswith("use a smaller input size or batch, or a machine with more memory")


def test_error_wrapped_by_a_library_is_still_a_user_error(monkeypatch, capsys):
    import errno

    import cmrf.quickstart

    def wrapped(size):
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/data/x.png")
        except OSError as err:
            raise RuntimeError("the library failed") from err

    monkeypatch.setattr(cmrf.quickstart, "quickstart_report", wrapped)
    assert main(["quickstart"]) == 2
    assert _one_line(capsys.readouterr().err) == "cmrf quickstart: error: /data/x.png: Permission denied"


def test_ctrl_c_exits_130(monkeypatch, capsys):
    import cmrf.quickstart

    def interrupted(size):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmrf.quickstart, "quickstart_report", interrupted)
    assert main(["quickstart"]) == 130
    assert _one_line(capsys.readouterr().err) == "cmrf quickstart: interrupted"


def test_bad_flag_value_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quickstart", "--size", "0"])
    assert exit_.value.code == 2
    assert "expected an image side >= 16, got 0" in capsys.readouterr().err


def test_argparse_lives_only_in_the_cli_package():
    package = Path(cmrf.__file__).parent
    outside = [p for p in package.rglob("*.py") if "cli" not in p.relative_to(package).parts]
    assert [p for p in outside if "argparse" in p.read_text()] == []
    # The command builders that used to live in library modules (bench's move with the bench package).
    for name in ("profile.py", "export.py", "quickstart.py", "checkpoint.py"):
        source = (package / name).read_text()
        assert "def build_command" not in source and "def add_model_arguments" not in source, name


# --- evaluate: reference checkpoints and an atomic --json ----------------------------------------

SYNTHETIC = ["--data", "synthetic", "--img-size", "32", "--synthetic-samples", "8"]


@pytest.fixture()
def run_checkpoint(tmp_path):
    from cmrf.train.state import model_metadata

    path = tmp_path / "best.safetensors"
    data = {"data": "synthetic", "img_size": 32, "synthetic_samples": 8, "seed": 0, "spatial_dims": 2}
    kwargs = {"channels": [16, 32], "N": 4}
    meta = model_metadata("tinyunet", kwargs, 3, 2, ["background", "lesion"], data=data)
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), path, metadata=meta)
    return path


def test_evaluate_json_on_a_full_disk_keeps_the_previous_file(run_checkpoint, tmp_path, monkeypatch, capsys):
    import errno

    scores = tmp_path / "scores.json"
    assert main(["evaluate", str(run_checkpoint), "--json", str(scores)]) == 0
    before = scores.read_bytes()
    assert json.loads(before)["split"] == "test"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the data hit the disk only at fsync (delayed allocation)
    capsys.readouterr()
    assert main(["evaluate", str(run_checkpoint), "--json", str(scores), "--split", "val"]) == 2
    assert _one_line(capsys.readouterr().err) == f"cmrf evaluate: error: {scores}: No space left on device"
    assert scores.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "scores.json"]


def test_evaluate_json_naming_a_checkpoint_by_a_slip_is_refused_before_scoring(run_checkpoint, tmp_path,
                                                                            capsys):
    """``--json runs/x/last.safetensors`` replaced another checkpoint of the run with the scores."""
    other = tmp_path / "last.safetensors"
    other.write_bytes(run_checkpoint.read_bytes())
    assert main(["evaluate", str(run_checkpoint), "--json", str(other)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"cmrf evaluate: error: --json {other} is an existing file that is not JSON (a checkpoint, "
        f"weights?): it would be replaced; write to a file whose name ends in .json")
    assert other.read_bytes() == run_checkpoint.read_bytes()
    scores = tmp_path / "scores.txt"  # JSON under another name: replaced again without a word
    scores.write_text("{}")
    assert main(["evaluate", str(run_checkpoint), "--json", str(scores), "--no-optimize"]) == 0
    assert json.loads(scores.read_text())["split"] == "test" and "note" not in capsys.readouterr().err


def test_evaluate_json_onto_a_pipe_or_into_new_folders_of_a_failed_run(run_checkpoint, tmp_path, capsys):
    """``--json`` naming a FIFO hung for ever (the check read it before scoring); new --json folders
    stayed behind, empty, when the evaluation then failed (cmrf export removes its own)."""
    fifo = tmp_path / "scores.json"
    os.mkfifo(fifo)
    assert main(["evaluate", str(run_checkpoint), "--json", str(fifo)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"cmrf evaluate: error: --json {fifo} is not a regular file (a pipe, a device or a socket): the "
        f"command writes its file by replacing it; give a file name")
    # /dev/stdout redirected to a file is that regular file: replacing it put the JSON where the
    # table was, and the table on a deleted inode
    assert main(["evaluate", str(run_checkpoint), "--json", "/dev/stdout"]) == 2
    assert "--json /dev/stdout is a stream or device" in _one_line(capsys.readouterr().err)
    nested = tmp_path / "res" / "a" / "scores.json"
    assert main(["evaluate", str(run_checkpoint), "--json", str(nested), "--img-size", "2"]) == 2
    assert "needs every spatial side" in capsys.readouterr().err and not (tmp_path / "res").exists()


def test_evaluate_json_onto_the_runs_metrics_is_refused_before_scoring(run_checkpoint, tmp_path, capsys):
    """``--json RUN/metrics.json`` replaced the run's per-epoch history and best epoch, which only
    training again gives back, with the evaluation's scores."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mean_iou": 0.5, "best_epoch": 3, "history": [{"epoch": 1}]}))
    before = metrics.read_bytes()
    assert main(["evaluate", str(run_checkpoint), "--json", str(metrics)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"cmrf evaluate: error: --json {metrics} holds the training run's metrics (its history and best "
        f"epoch), which this evaluation would replace; write it to another file, e.g. "
        f"{tmp_path / 'evaluation.json'}")
    assert metrics.read_bytes() == before
    scores = tmp_path / "scores.json"  # an evaluation's own file is replaced as before
    scores.write_text(json.dumps({"mean_iou": 0.5, "split": "val"}))
    assert main(["evaluate", str(run_checkpoint), "--json", str(scores), "--no-optimize"]) == 0
    assert json.loads(scores.read_text())["split"] == "test"


def test_evaluate_scores_the_train_split_without_augmentation(run_checkpoint, monkeypatch):
    import cmrf.train.loop as loop

    seen = []
    original = loop.eval_loader

    def recording_loader(dataset, *args, **kwargs):
        seen.append(dataset.augment)
        return original(dataset, *args, **kwargs)

    monkeypatch.setattr(loop, "eval_loader", recording_loader)
    assert main(["evaluate", str(run_checkpoint), "--split", "train", "--no-optimize"]) == 0
    assert seen == [False]


def test_evaluate_refuses_file_flags_for_a_synthetic_run(run_checkpoint, tmp_path, capsys):
    """The checkpoint's run trained on synthetic data: --root alone (no --data) would have been
    dropped, scoring synthetic images as if they were the folder's."""
    assert main(["evaluate", str(run_checkpoint), "--root", str(tmp_path)]) == 2
    assert "--root: only for data read from files" in _one_line(capsys.readouterr().err)


def test_evaluate_a_synthetic_run_that_recorded_options_it_ignored(tmp_path, capsys):
    """Before such options were refused, a synthetic run could record --val-fraction or --root
    (ignored then): its checkpoint still evaluates, and its resume still compares clean."""
    from cmrf.train.state import _metadata_settings, model_metadata

    path = tmp_path / "old.safetensors"
    data = {"data": "synthetic", "img_size": 32, "synthetic_samples": 8, "seed": 0, "spatial_dims": 2,
            "val_fraction": 0.3, "root": "/data/ncp"}
    kwargs = {"channels": [16, 32], "N": 4}
    meta = model_metadata("tinyunet", kwargs, 3, 2, ["background", "lesion"], data=data)
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), path, metadata=meta)
    assert main(["evaluate", str(path), "--device", "cpu", "--no-optimize"]) == 0
    assert "--val-fraction" not in _metadata_settings({"data": data})


def test_cpu_evaluate_runs_frozen_graphs_and_gives_the_same_scores(run_checkpoint, tmp_path, monkeypatch):
    """By default evaluate runs optimize_for_inference(freeze=True) on the CPU (a graph per batch
    shape); --no-optimize runs the loaded model. The scores agree."""
    from cmrf.inference import FrozenCPUInference

    builds = []
    original_build = FrozenCPUInference._build

    def counting_build(self, x):
        builds.append(tuple(x.shape))
        return original_build(self, x)

    monkeypatch.setattr(FrozenCPUInference, "_build", counting_build)
    scores = {}
    for flags in ([], ["--no-optimize"]):
        out = tmp_path / f"scores{len(flags)}.json"
        args = ["evaluate", str(run_checkpoint), "--device", "cpu", "--batch-size", "3", "--json", str(out)]
        assert main([*args, *flags]) == 0
        scores[len(flags)] = json.loads(out.read_text())
        assert builds and all(shape[1:] == (3, 32, 32) for shape in builds)
        assert len(builds) <= 2  # full batches and a last, smaller one; nothing built by --no-optimize
    assert scores[0].keys() == scores[1].keys()
    assert (scores[0].pop("run")["optimize"], scores[1].pop("run")["optimize"]) == (True, False)
    for key, value in scores[0].items():
        assert value == (pytest.approx(scores[1][key]) if isinstance(value, float) else scores[1][key]), key


def test_evaluate_notes_another_image_size_and_its_json_names_the_data(run_checkpoint, tmp_path, capsys):
    out = tmp_path / "scores.json"
    argv = ["evaluate", str(run_checkpoint), "--device", "cpu", "--no-optimize", "--json", str(out)]
    assert main(argv) == 0
    assert "note:" not in capsys.readouterr().err
    assert json.loads(out.read_text())["data"] == {**json.loads(out.read_text())["data"], "img_size": 32,
                                                    "data": "synthetic", "seed": 0}
    assert main([*argv, "--img-size", "48"]) == 0
    assert "note: --img-size 48, the run trained at 32" in capsys.readouterr().err
    assert json.loads(out.read_text())["data"]["img_size"] == 48


def test_evaluate_with_other_spatial_dims_than_the_model_names_the_model(run_checkpoint, capsys):
    """A data error ("no images ... add --spatial-dims 3") blamed the data for the flag's mismatch."""
    assert main(["evaluate", str(run_checkpoint), "--spatial-dims", "3", "--device", "cpu"]) == 2
    line = _one_line(capsys.readouterr().err)
    expected = "holds a 2D model, and --spatial-dims 3 reads 3D data: leave --spatial-dims out"
    assert f"{run_checkpoint} {expected}" in line


def test_evaluate_of_a_bare_volume_state_dict_reads_volumes(tmp_path, capsys):
    """A bare 3D state dict (no run metadata) was refused with "--spatial-dims 2 reads 2D data:
    leave --spatial-dims out", which was not given: its model says it reads volumes."""
    bare = tmp_path / "bare3d.pth"
    torch.save(cmrf.TinyUNet(in_channels=1, channels=(8, 16), N=2, spatial_dims=3).state_dict(), bare)
    argv = ["evaluate", str(bare), "--model", "tinyunet3d", "--channels", "8", "16", "--N", "2",
            "--data", "synthetic", "--img-size", "16", "--synthetic-samples", "8", "--no-optimize"]
    assert main(argv) == 0
    assert "mean" in capsys.readouterr().out
    assert main([*argv, "--spatial-dims", "2"]) == 2  # given: the mismatch is named
    assert "holds a 3D model, and --spatial-dims 2 reads 2D data" in _one_line(capsys.readouterr().err)


def test_evaluate_of_a_file_that_records_no_data_wants_the_data_named(tmp_path, capsys):
    """A checkpoint of fit() without metadata= (or any save_weights file) was scored on the default
    synthetic data (100 images, 256²) without a word, as if that were the run's data."""
    path = tmp_path / "mine.safetensors"
    cmrf.save_weights(cmrf.create_model("tinyunet", channels=(16, 32), N=2), path)
    assert main(["evaluate", str(path), "--device", "cpu"]) == 2
    assert "records no data options" in _one_line(capsys.readouterr().err)
    assert main(["evaluate", str(path), "--device", "cpu", "--no-optimize", *SYNTHETIC]) == 0


def test_evaluate_takes_a_reference_checkpoint(tmp_path, capsys):
    from tests.conftest import golden_state_dict, load_golden

    reference = tmp_path / "best_model.pth"
    torch.save(golden_state_dict(load_golden("tinyunet_official.safetensors")), reference)
    assert main(["evaluate", str(reference), *SYNTHETIC]) == 2
    assert "--model NAME" in _one_line(capsys.readouterr().err)
    assert main(["evaluate", str(reference), "--model", "tinyunet", *SYNTHETIC]) == 0
    captured = capsys.readouterr()
    assert "mean" in captured.out.lower()
    assert "warning" not in captured.err  # it records no class names: none can differ from the data's
    assert main(["evaluate", str(reference), "--model", "tinyunet", *SYNTHETIC, "--num-classes", "4"]) == 2
    assert "num_classes=2, but --num-classes 4 was given" in _one_line(capsys.readouterr().err)


def test_evaluate_on_another_site_does_not_take_the_runs_file_options(tmp_path, capsys):
    """A run trained on site A with its own split lists and a mask threshold: scoring site B (other
    file names, 0/1 masks) must not read A's split lists or A's threshold."""
    from cmrf.train.state import model_metadata
    from tests.test_data import write_pair

    site_a, site_b, splits = tmp_path / "a", tmp_path / "b", tmp_path / "splits_a"
    for i in range(4):
        write_pair(site_a, f"a{i}", seed=i)
        write_pair(site_b, f"b{i}", mask_values=(0, 1), seed=10 + i)
    splits.mkdir()
    for name, stems in (("train", "a0\na1\n"), ("val", "a2\n"), ("test", "a3\n")):
        (splits / f"{name}.txt").write_text(stems)
    data = {"data": "folder", "root": str(site_a), "split_dir": str(splits), "mask_threshold": 128,
            "img_size": 32, "seed": 0, "spatial_dims": 2}
    kwargs = {"channels": [16, 32], "N": 4}
    meta = model_metadata("tinyunet", kwargs, 3, 2, ["background", "lesion"], data=data)
    checkpoint = tmp_path / "best.safetensors"
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), checkpoint, metadata=meta)
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize", "--split", "train"]
    assert main([*argv, "--data", "folder", "--root", str(site_b)]) == 0, capsys.readouterr().err
    assert main(argv) == 0  # the run's own site: its split lists and threshold, as trained


def test_evaluate_names_classes_as_the_run_did_and_warns_of_other_names(tmp_path, capsys):
    """Data with a classes.txt of other names was scored under them without a word; data without one
    got "foreground" for the run's "tumour"; a class count the user never gave was blamed on a flag."""
    from cmrf.train.state import model_metadata
    from tests.test_data import write_pair

    site = tmp_path / "site"
    for i in range(5):
        write_pair(site, f"s{i}", seed=i)
    kwargs = {"channels": [16, 32], "N": 4}
    data = {"data": "folder", "root": str(site), "img_size": 32, "seed": 0, "spatial_dims": 2}
    checkpoint = tmp_path / "best.safetensors"
    meta = model_metadata("tinyunet", kwargs, 3, 2, ["background", "tumour"], data=data)
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), checkpoint, metadata=meta)
    out = tmp_path / "scores.json"
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "tumour" in captured.out and "warning" not in captured.err
    scores = json.loads(out.read_text())
    assert list(scores["per_class"]) == ["background", "tumour"]
    assert scores["checkpoint_path"] == str(checkpoint.resolve()) and scores["model"] == "tinyunet"
    assert scores["precision"] == "float32"
    # How the scores were computed, to compare them with another machine's (another path, device).
    assert scores["run"] == {"device": "cpu", "batch_size": 8, "optimize": False, "backend": "torch"}
    (site / "classes.txt").write_text("background\nlesion\n")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "the data names its classes ['background', 'lesion'], but" in err
    assert "trained on classes named ['background', 'tumour']" in err
    assert list(json.loads(out.read_text())["per_class"]) == ["background", "lesion"]
    (site / "classes.txt").unlink()
    three = tmp_path / "three.safetensors"
    meta = model_metadata("tinyunet", kwargs, 3, 3, ["background", "a", "b"], data={**data, "num_classes": 3})
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4, num_classes=3), three, metadata=meta)
    assert main(["evaluate", str(three), "--device", "cpu"]) == 2
    assert "--num-classes 3 was not given: it is the checkpoint's" in capsys.readouterr().err


def test_evaluate_never_takes_a_checkpoints_cache_location(tmp_path, capsys, monkeypatch):
    """The run's cache and cache_dir were read back from the checkpoint: a crafted file made evaluate
    create and fill any folder its metadata named."""
    from cmrf.train.state import model_metadata

    monkeypatch.setenv("CMRF_CACHE_DIR", str(tmp_path / "mine"))
    elsewhere = tmp_path / "elsewhere" / "cache"
    data = {"data": "synthetic", "img_size": 32, "synthetic_samples": 16, "cache": "disk",
            "cache_dir": str(elsewhere), "seed": 0, "spatial_dims": 2}
    names = ["background", "lesion"]
    meta = model_metadata("tinyunet", {"channels": [16, 32], "N": 4}, 3, 2, names, data=data)
    checkpoint = tmp_path / "best.safetensors"
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), checkpoint, metadata=meta)
    assert main(["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize"]) == 0
    assert not (tmp_path / "elsewhere").exists()


def test_evaluate_holds_only_the_runs_own_files_to_its_splits(tmp_path, capsys):
    """The run's split fingerprint keeps its training images out of its own test split; another
    --root is other data, scored as it is."""
    from cmrf.data import build_datasets, split_fingerprint
    from cmrf.train.state import model_metadata
    from tests.test_data import write_pair

    site_a, site_b = tmp_path / "a", tmp_path / "b"
    for i in range(6):
        write_pair(site_a, f"a{i}", seed=i)
        write_pair(site_b, f"b{i}", seed=10 + i)
    fingerprint = split_fingerprint(build_datasets(seed=0, data="folder", root=site_a, img_size=32))
    data = {"data": "folder", "root": str(site_a), "img_size": 32, "seed": 0, "spatial_dims": 2,
            "split_files": fingerprint}
    kwargs = {"channels": [16, 32], "N": 4}
    meta = model_metadata("tinyunet", kwargs, 3, 2, ["background", "lesion"], data=data)
    checkpoint = tmp_path / "best.safetensors"
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), checkpoint, metadata=meta)
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize"]
    assert main([*argv, "--root", str(site_b)]) == 0, capsys.readouterr().err
    assert main(argv) == 0
    for folder in ("images", "masks"):  # the run's own site, one file fewer: its splits moved
        (site_a / folder / "a5.png").unlink()
    capsys.readouterr()
    assert main(argv) == 2
    assert "files added or removed" in capsys.readouterr().err


def _grey_folder(root: Path, count: int = 6) -> Path:
    """A folder of ``count`` 16-bit grey images (CT slices) with 0/255 masks."""
    from tests.test_data import write_grey_pair

    for i in range(count):
        write_grey_pair(root, f"ct{i}", seed=i)
    return root


def test_a_grey_run_trains_evaluates_and_resumes_with_one_channel(tmp_path, capsys):
    from cmrf.train.state import read_metadata

    root, out = _grey_folder(tmp_path / "ct"), tmp_path / "run"
    train = ["train", "--data", "folder", "--root", str(root), "--img-size", "32", "--channels", "16", "32",
             "--epochs", "1", "--device", "cpu", "--no-plots", "--out", str(out)]
    assert main([*train, "--in-chans", "2"]) == 2
    assert "--in-chans 2: expected 1 (grey) or 3 (RGB)" in _one_line(capsys.readouterr().err)
    assert main([*train, "--in-chans", "1"]) == 0, capsys.readouterr().err
    meta = read_metadata(out / "best.safetensors")
    assert (meta["in_chans"], meta["data"]["in_chans"]) == (1, 1)
    evaluate = ["evaluate", str(out / "best.safetensors"), "--device", "cpu", "--no-optimize"]
    assert main(evaluate) == 0, capsys.readouterr().err  # the images read grey, as in training
    capsys.readouterr()
    assert main([*evaluate, "--in-chans", "3"]) == 2
    assert "in_chans=3 (the file has 1)" in _one_line(capsys.readouterr().err)
    assert main([*train, "--resume"]) == 2  # the flag left out: RGB images, which the model cannot take
    assert "--in-chans 1 (given 3)" in _one_line(capsys.readouterr().err)
    assert main([*train, "--in-chans", "1", "--resume"]) == 0, capsys.readouterr().err


def test_evaluate_reads_folder_images_with_a_bare_checkpoints_channels(tmp_path, capsys):
    """A reference .pth of a 1-channel model was refused: the folder's images were always RGB."""
    root, checkpoint = _grey_folder(tmp_path / "ct"), tmp_path / "gray1.pth"
    model = cmrf.create_model("tinyunet", channels=[16, 32], in_chans=1, num_classes=2)
    torch.save(model.state_dict(), checkpoint)
    argv = ["evaluate", str(checkpoint), "--model", "tinyunet", "--channels", "16", "32", "--data", "folder",
            "--root", str(root), "--img-size", "32", "--device", "cpu", "--no-optimize"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "test split" in capsys.readouterr().out
    assert main([*argv, "--in-chans", "3"]) == 2
    assert "in_chans=1, but --in-chans 3 was given" in _one_line(capsys.readouterr().err)


def _split_list_run(tmp_path, site, splits):
    """A checkpoint of a run on ``site`` with the split lists in ``splits`` (its fingerprint kept)."""
    from cmrf.data import build_datasets, split_file_sizes, split_fingerprint
    from cmrf.train.state import model_metadata

    options = {"data": "folder", "root": site, "split_dir": splits, "img_size": 32}
    bundle = build_datasets(seed=0, **options)
    data = {**{key: str(value) for key, value in options.items()}, "img_size": 32, "seed": 0,
            "spatial_dims": 2, "split_files": split_fingerprint(bundle),
            "split_sizes": split_file_sizes(bundle)}
    meta = model_metadata("tinyunet", {"channels": [16, 32], "N": 4}, 3, 2, ["background", "lesion"],
                          data=data)
    checkpoint = tmp_path / "best.safetensors"
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), checkpoint, metadata=meta)
    return checkpoint


def _moved_run_with_split_lists(tmp_path):
    """A run's checkpoint on six pairs split by lists inside the data (train s0 s1, val s2, test
    s3 s4 s5), the data since moved to ``tmp_path / "moved"``, lists and all."""
    import shutil

    from tests.test_data import write_pair

    site = tmp_path / "site"
    for i in range(6):
        write_pair(site, f"s{i}", seed=i)
    (site / "splits").mkdir()
    for name, stems in (("train", "s0\ns1\n"), ("val", "s2\n"), ("test", "s3\ns4\ns5\n")):
        (site / "splits" / f"{name}.txt").write_text(stems)
    checkpoint = _split_list_run(tmp_path, site, site / "splits")
    shutil.move(site, tmp_path / "moved")
    return checkpoint


def test_evaluate_a_moved_copy_of_the_runs_data_keeps_its_split_lists(tmp_path, capsys):
    """The run's dataset copied elsewhere (split lists inside it, moved along) is the run's data:
    a fresh fraction split of it would put training images into the scored split."""
    checkpoint = _moved_run_with_split_lists(tmp_path)
    out = tmp_path / "scores.json"
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize", "--json", str(out)]
    assert main([*argv, "--root", str(tmp_path / "moved")]) == 0, capsys.readouterr().err
    scores = json.loads(out.read_text())
    assert scores["images"] == 3  # the run's test list, not a fraction of six
    assert "the run's split lists" in _one_line(capsys.readouterr().err)
    assert scores["data"]["split_dir"] == str(tmp_path / "moved" / "splits")  # what was read, to trace it


@pytest.mark.parametrize(("listing", "text", "why"), [
    ("val", "s2\ns2\n", "'s2' is already in val.txt"),  # a slip in the moved copy's list
    ("test", "s3\ns4\n", "the run's splits were"),  # an edit: s5 left out of the test list
], ids=["slip", "edited"])
def test_evaluate_says_why_a_moved_copys_split_lists_are_not_the_runs(tmp_path, capsys, listing, text, why):
    """The run's data moved with its split lists, one of them since broken or edited: it was split
    afresh by fractions without a word, and that test split held the run's training images."""
    checkpoint = _moved_run_with_split_lists(tmp_path)
    moved = tmp_path / "moved"
    (moved / "splits" / f"{listing}.txt").write_text(text)
    out = tmp_path / "scores.json"
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize", "--json", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # s5 in no list
        assert main([*argv, "--root", str(moved)]) == 0
    err = _one_line(capsys.readouterr().err)
    assert f"{moved} has split lists, {moved / 'splits'}, where the run kept its own" in err, err
    assert why in err and "may hold training images" in err
    assert json.loads(out.read_text())["data"]["split_dir"] is None  # split afresh, as recorded


@pytest.mark.parametrize(("stems", "lists", "size"), [
    ("o", ("o0\no1\n", "o2\n", "o3\no4\no5\n"), (20, 16)),  # other files, split as the run's were
    ("s", ("s2\ns3\ns4\n", "s5\n", "s0\ns1\n"), (20, 16)),  # the run's names, split another way
    ("s", ("s0\ns1\n", "s2\n", "s3\ns4\ns5\n"), (24, 16)),  # the run's names and lists, other files
], ids=["other-files", "other-split", "same-names"])
def test_evaluate_on_another_root_laid_out_like_the_runs_is_not_taken_for_its_data(
    tmp_path, capsys, stems, lists, size
):
    """Another --root with split lists where the run kept its own: the run's site options read it,
    but into other splits than the run recorded, or its files are not the run's (other sizes: another
    site naming its files as the run's), so it is other data, split afresh."""
    from tests.test_data import write_pair

    site, other = tmp_path / "site", tmp_path / "other"
    for i in range(6):
        write_pair(site, f"s{i}", seed=i)
        write_pair(other, f"{stems}{i}", size=size, seed=20 + i)
    for root, texts in ((site, ("s0\ns1\n", "s2\n", "s3\ns4\ns5\n")), (other, lists)):
        (root / "splits").mkdir()
        for name, text in zip(("train", "val", "test"), texts):
            (root / "splits" / f"{name}.txt").write_text(text)
    checkpoint = _split_list_run(tmp_path, site, site / "splits")
    out = tmp_path / "scores.json"
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize", "--json", str(out)]
    assert main([*argv, "--root", str(other)]) == 0, capsys.readouterr().err
    assert "holds the files of the run's splits" not in capsys.readouterr().err
    assert json.loads(out.read_text())["images"] == 1  # a fresh 0.2 fraction of six, not its test list


def test_evaluate_says_when_the_runs_split_lists_are_gone(tmp_path, capsys):
    """Split lists kept outside the data and since deleted: another --root may be the run's data
    moved, and a fresh split of it may hold training images; the user is told, not left to guess."""
    import shutil

    from tests.test_data import write_pair

    site, splits = tmp_path / "site", tmp_path / "splits"
    for i in range(6):
        write_pair(site, f"s{i}", seed=i)
    splits.mkdir()
    for name, stems in (("train", "s0\ns1\ns2\ns3\n"), ("val", "s4\n"), ("test", "s5\n")):
        (splits / f"{name}.txt").write_text(stems)
    checkpoint = _split_list_run(tmp_path, site, splits)
    shutil.move(site, tmp_path / "moved")
    shutil.rmtree(splits)
    moved = tmp_path / "moved"
    argv = ["evaluate", str(checkpoint), "--device", "cpu", "--no-optimize", "--root", str(moved)]
    assert main(argv) == 0, capsys.readouterr().err
    err = _one_line(capsys.readouterr().err)
    assert f"{splits}, are gone" in err and "--split-dir" in err


def test_demo_help_states_the_demos_own_settings(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(f"[cmrf demo: {value}]" in text for value in (64, 160, "cpu", -1))


def test_evaluate_help_says_data_flags_default_to_the_runs(capsys):
    """Each data flag's help names the data module's default; evaluate takes the run's instead."""
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    group = out[out.index("\ndata:\n"):]
    description = " ".join(group[: group.index("  --data")].split())  # argparse wraps lines
    assert "takes the value the checkpoint's run was trained with" in description


def test_a_bad_environment_variable_is_one_line_and_exit_2(tmp_path):
    """CMRF_UPSAMPLE was checked while cmrf was imported (a traceback, exit 1); CMRF_FUSED only by
    the commands that reached a cascade."""
    cases = {"CMRF_UPSAMPLE": "bilinear", "CMRF_FUSED": "bogus"}
    runs = {  # side by side: each is mostly the seconds of importing torch
        variable: subprocess.Popen([sys.executable, "-m", "cmrf", "profile", "tinyunet"], cwd=tmp_path,
                                   env={**os.environ, variable: value}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        for variable, value in cases.items()
    }
    for variable, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cmrf profile: error: {variable} must be 'auto'")
        assert repr(cases[variable]) in lines[0]


def test_an_unknown_mplbackend_is_ignored_with_a_note(run_checkpoint, tmp_path):
    """matplotlib refuses to import under an unknown MPLBACKEND and MONAI imports it: every evaluate
    and train stopped ("Key backend: 'nonsense' is not a valid value"), even with --no-plots."""
    env = {**os.environ, "MPLBACKEND": "nonsense"}
    done = subprocess.run([sys.executable, "-m", "cmrf", "evaluate", str(run_checkpoint), "--json",
                           str(tmp_path / "scores.json")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ignoring the environment variable MPLBACKEND='nonsense'" in done.stderr
    assert (tmp_path / "scores.json").is_file()


def test_a_forced_fused_path_that_cannot_run_is_the_users_error():
    from cmrf.ops.cascade import FusedUnavailableError

    assert issubclass(FusedUnavailableError, ValueError) and issubclass(FusedUnavailableError, RuntimeError)


def test_outputs_may_not_overwrite_the_checkpoint_they_read(run_checkpoint, tmp_path, capsys):
    """`-o best.safetensors` or `--json best.safetensors` replaced the trained weights."""
    before = run_checkpoint.read_bytes()
    assert main(["evaluate", str(run_checkpoint), "--json", str(run_checkpoint)]) == 2
    assert f"--json {run_checkpoint} is the checkpoint this command reads" in capsys.readouterr().err
    assert main(["export", "onnx", "--checkpoint", str(run_checkpoint), "-o", str(run_checkpoint)]) == 2
    assert f"-o {run_checkpoint} is the --checkpoint this command reads" in capsys.readouterr().err
    assert run_checkpoint.read_bytes() == before
    assert main(["evaluate", str(run_checkpoint), "--json", str(tmp_path)]) == 2  # a folder: refused up front
    err = capsys.readouterr()
    assert "is a folder, --json needs a file name" in err.err and "IoU" not in err.out


@pytest.mark.parametrize("flags", [["--threads", "-5"], ["--batch-size", "0"]])
def test_evaluate_refuses_out_of_range_counts_up_front(run_checkpoint, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(run_checkpoint), *flags])
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}: expected an integer >= " in capsys.readouterr().err


def test_tilde_after_an_equals_sign_is_the_home_folder(run_checkpoint, tmp_path, monkeypatch):
    """The shell leaves ``~`` alone in ``--json=~/x``: the file went to a folder literally named ~."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    checkpoint = home / "ck.safetensors"
    checkpoint.write_bytes(run_checkpoint.read_bytes())
    assert main(["evaluate", "~/ck.safetensors", "--json=~/scores.json"]) == 0
    assert (home / "scores.json").is_file() and not (tmp_path / "~").exists()
    from cmrf.cli import build_parser

    for argv, dest in [(["predict", "~/ck", "~/a.png", "--out=~/masks"], ("checkpoint", "inputs", "out")),
                       (["export", "onnx", "--checkpoint=~/ck", "-o=~/m.onnx"], ("checkpoint", "output")),
                       (["train", "--out=~/run"], ("out",)), (["bench", "--json=~/b.json"], ("json_path",))]:
        args = build_parser(argv[0]).parse_args(argv)
        values = [v for name in dest for v in ([getattr(args, name)] if name != "inputs" else args.inputs)]
        assert all(v.startswith(str(home) + os.sep) for v in values), (argv, values)


@pytest.mark.parametrize("command", ["train", "demo", "evaluate"])
def test_thread_counts_beyond_the_machine_are_refused_up_front(monkeypatch, capsys, command):
    """--threads 100000 segfaulted the process (libgomp cannot start that many threads)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    extra = ["some.safetensors"] if command == "evaluate" else []
    with pytest.raises(SystemExit) as exit_info:  # a bad batch size after it: nothing runs if it passed
        main([command, *extra, "--threads", "9", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--threads: expected at most 8 threads (4 per core of the 2 this machine has), got 9" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("command", ["train", "demo", "evaluate"])
def test_worker_counts_beyond_the_machine_are_refused_up_front(monkeypatch, capsys, command):
    """--workers 1000 (a typo) started 1000 processes: the out-of-memory killer ended the run and
    a worker was left orphaned, holding the shell's pipe open."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    extra = ["some.safetensors"] if command == "evaluate" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, *extra, "--workers", "1000", "--batch-size", "0"])
    assert exit_info.value.code == 2
    from cmrf.cli import build_parser

    err = " ".join(capsys.readouterr().err.split())
    assert "--workers: expected at most 8 worker processes (4 per core of the 2 this machine has), got " \
           "1000" in err
    assert build_parser("train").parse_args(["train", "--workers", "8"]).workers == 8


def test_bench_refuses_thread_counts_beyond_the_machine(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(SystemExit) as stop:  # argparse's refusal, before any other check
        main(["bench", "--device", "cpu", "--threads", "9", "--size", "17"])
    assert stop.value.code == 2
    expected = "argument --threads: expected at most 8 threads (4 per core of the 2 this machine has), got 9"
    assert expected in capsys.readouterr().err


def test_sigterm_unwinds_except_in_torchrun_workers(monkeypatch):
    """A torchrun worker blocked in a collective cannot run a Python handler: torchrun's SIGTERM
    must kill it (it waited 30 s, then SIGKILL)."""
    import signal

    import cmrf.cli

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with cmrf.cli._sigterm_unwinds():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setenv("WORLD_SIZE", "2")
    with cmrf.cli._sigterm_unwinds():
        assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    """Building the parser imports the command's module (seconds): Ctrl-C then gave a traceback."""
    import cmrf.cli

    def interrupted(command):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmrf.cli, "build_parser", interrupted)
    assert main(["profile", "tinyunet"]) == 130
    assert capsys.readouterr().err == "cmrf profile: interrupted\n"


@pytest.mark.parametrize(("command", "hint"), [("train", True), ("demo", True), ("profile", False)])
def test_ctrl_c_during_training_says_how_to_go_on(monkeypatch, capsys, command, hint):
    """An interrupted training keeps its epochs; the line said only "interrupted"."""
    import cmrf.cli

    def interrupting(args):
        raise KeyboardInterrupt

    # every command's runner interrupted at once (its options are not built: none are given)
    monkeypatch.setattr(cmrf.cli, "_builder", lambda spec: lambda sub_parser: interrupting)
    assert main([command]) == 130
    expected = f"cmrf {command}: interrupted"
    if hint:
        expected += "; completed epochs are kept: run the same command with --resume to continue"
    assert capsys.readouterr().err == expected + "\n"


def test_a_closed_output_pipe_ends_quietly(monkeypatch, capsys):
    """`cmrf profile ... | head`: the reader going away is no user error."""
    import cmrf.cli.profile

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cmrf.cli.profile, "run_profile", reader_gone)
    assert main(["profile", "tinyunet"]) == 141
    assert capsys.readouterr().err == ""


def test_training_stopped_by_a_closed_output_says_so(monkeypatch, capsys):
    """`cmrf train ... | head` kills hours of training when head exits: unlike a listing cut short,
    that stop is told on stderr, with how to continue."""
    import cmrf.cli.train

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cmrf.cli.train, "run_train", reader_gone)
    assert main(["train", "--data", "synthetic", "--out", "never"]) == 141
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("cmrf train: stopped: its output was closed") and "--resume" in err


def test_a_demo_stopped_by_a_closed_output_says_so_and_a_report_cut_short_does_not(
    monkeypatch, capsys, tmp_path
):
    """The demo trains for minutes, as train does: its stop is told; quickstart's report is not."""
    import cmrf.cli.train
    import cmrf.quickstart

    def reader_gone(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cmrf.cli.train, "run_train", reader_gone)  # what the demo wraps
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 141
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("cmrf demo: stopped: its output was closed") and "--resume" in err
    monkeypatch.setattr(cmrf.quickstart, "quickstart_report", reader_gone)
    assert main(["quickstart", "--size", "64"]) == 141
    assert capsys.readouterr().err == ""


def test_evaluate_names_a_one_channel_sigmoid_checkpoint(tmp_path, capsys):
    """It said the checkpoint "was trained for 3 channels and 1 classes, the data has ... 2 classes",
    and --num-classes 1 then failed on the data: the model's head is what cannot be scored."""
    torch.save(cmrf.create_model("tinyunet", channels=[16, 32], N=4, num_classes=1).state_dict(),
               tmp_path / "bin1.pth")
    argv = ["evaluate", str(tmp_path / "bin1.pth"), "--model", "tinyunet", "--channels", "16", "32",
            "--N", "4", "--data", "synthetic", "--img-size", "32", "--synthetic-samples", "8"]
    assert main(argv) == 2
    assert "holds a model with 1 output channel; cmrf evaluate scores the argmax" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "package"),
    [
        (["demo", "--out", "{tmp}/demo"], "monai"),
        (["train", "--data", "synthetic", "--out", "{tmp}/run"], "torchmetrics"),
        (["evaluate", "{tmp}/missing.pt"], "torchmetrics"),
    ],
)
def test_a_command_without_the_train_extra_is_a_user_error(tmp_path, capsys, monkeypatch, argv, package):
    """Without MONAI or torchmetrics (the ``train`` extra) the command says what to install (exit
    status 2) before it reads anything, not an internal error deep in the first epoch (70)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    def find_spec(name, *rest):
        return None if name == package else real_find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"needs {package}, which is not installed: pip install 'cmrf[train]'" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("build", "package"), [("loss", "monai"), ("metrics", "torchmetrics")])
def test_the_training_parts_name_the_extra_they_need(monkeypatch, build, package):
    from cmrf.train.losses import CEDiceLoss
    from cmrf.train.metrics import SegmentationMetrics

    # Imports of it (and of its submodules, which earlier tests may have loaded) fail as if not installed.
    for name in [package, *(n for n in list(sys.modules) if n.startswith(package + "."))]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs .*not installed: pip install 'cmrf\[train\]'"):
        CEDiceLoss() if build == "loss" else SegmentationMetrics(2)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["quickstart.py", "fused_host_time.py", "bench_cascade.py"])
def test_examples_answer_help_instead_of_running(script, monkeypatch, capsys):
    """quickstart.py and fused_host_time.py ran on --help; bench_cascade.py printed cmrf bench's help."""
    import runpy

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # the script sets it
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    first_line = (EXAMPLES / script).read_text().splitlines()[0].strip('"')
    assert exit_.value.code == 0 and first_line in out, out
    assert "481,170" not in out and "host time per fused call" not in out and "--compile" not in out


def test_bench_cascade_example_keeps_its_rows(capsys):
    """A --rows given to examples/bench_cascade.py replaced the cascade rows it exists for."""
    import runpy

    bench_arguments = runpy.run_path(str(EXAMPLES / "bench_cascade.py"))["bench_arguments"]
    assert bench_arguments(["--json", "c.json"]) == ["bench", "--rows", "cascade", "--json", "c.json"]
    with pytest.raises(SystemExit) as exit_:
        bench_arguments(["--rows", "inference"])
    assert exit_.value.code == 2 and "--rows inference: this script times the cascade rows only" \
        in capsys.readouterr().err


def test_volumes_cost_example_imports_monai_only_for_its_rows(monkeypatch):
    """Every worker imported MONAI, so without it the TinyU-Net rows failed too."""
    import runpy

    script = runpy.run_path(str(EXAMPLES / "volumes_cost.py"))
    codes = []

    def run(argv, **kwargs):
        codes.append(argv[-1])
        return subprocess.CompletedProcess(argv, 1, "", "stub")

    monkeypatch.setattr(subprocess, "run", run)
    for name in ("tinyunet3d", "MONAI UNet"):
        script["measure"](script["MODELS"][name], 16, False)
    assert "import monai" not in codes[0] and "import monai" in codes[1]


def test_an_error_line_to_a_closed_stderr_keeps_the_exit_status(tmp_path, monkeypatch):
    """`cmrf evaluate BAD 2>&1 | true` exited 1 (Python's own status for the failed print), which no
    row of the documented exit statuses has; the status is the error's, 2."""
    class Closed(io.TextIOBase):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(b"xx")
    monkeypatch.setattr(sys, "stderr", Closed())
    assert main(["evaluate", str(truncated)]) == 2


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("deploy_cpu.py", ["--threads", "-3"], "argument --threads: expected an integer >= 1, got -3"),
    ("deploy_cpu.py", ["--image", __file__, "--in-chans", "4"], "--in-chans 4 with --image"),
    ("bench_inference_cpu.py", ["--path", "bogus"], "argument --path: invalid choice: 'bogus'"),
    ("bench_inference_cpu.py", ["--threads", "9999"], "argument --threads: expected at most"),
])
def test_example_flags_are_checked_by_argparse(script, argv, message, monkeypatch, capsys):
    """These ended in tracebacks from torch or the library, after the model was built; --threads 99
    timed a 2-core machine's oversubscription and printed it as a benchmark."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_quickstart_takes_any_side_of_16_or_more(capsys):
    """--size 8 passed argparse and failed in the model; 17 works, though the docstring said "a
    multiple of 16"."""
    with pytest.raises(SystemExit):
        main(["quickstart", "--size", "8"])
    assert "argument --size: expected an image side >= 16, got 8" in capsys.readouterr().err
    assert main(["quickstart", "--size", "17"]) == 0 and "(1, 2, 17, 17)" in capsys.readouterr().out
