"""Exact resume after a real SIGKILL, and a 2-process torchrun (DDP, gloo) run on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cmrf.cli import main
from cmrf.train.state import STATE_FILE
from tests.conftest import temporary_files

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and torchrun gloo are POSIX here")

TINY = ["--img-size", "32", "--channels", "16", "32", "--device", "cpu", "--no-plots"]
# The same thread count in every process, so float sums add up in the same order in all runs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CMRF_FUSED": "0"}


def _cmrf(*args: str) -> list[str]:
    return [sys.executable, "-m", "cmrf", *args]


def _completed_epochs(state_file) -> int:
    try:
        return torch.load(state_file, weights_only=True)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def test_resume_after_sigkill_is_exact(tmp_path):
    # 4 steps per epoch; killed after epoch 2 completes, wherever the run then is. An epoch takes a
    # fraction of a second: 5 epochs left a window a loaded machine's polling could miss (killed at 5/5);
    # 9 leave six epochs of margin at 50 polls a second.
    epochs = 9
    train = ["train", *TINY, "--synthetic-samples", "16", "--batch-size", "4", "--lr", "3e-3"]
    train += ["--epochs", str(epochs)]
    reference = subprocess.Popen(
        _cmrf(*train, "--out", str(tmp_path / "ref")),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    victim = subprocess.Popen(
        _cmrf(*train, "--out", str(tmp_path / "run")),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state_file = tmp_path / "run" / STATE_FILE
    deadline = time.monotonic() + 240
    while _completed_epochs(state_file) < 2:
        assert victim.poll() is None, (
            f"the run ended before it could be killed: {victim.stderr.read()[-2000:]}"
        )
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_after = _completed_epochs(state_file)
    assert 2 <= killed_after < epochs

    resumed = subprocess.run(
        _cmrf(*train, "--resume", "--out", str(tmp_path / "run")),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'run'} after epoch {killed_after}/{epochs}" in resumed.stdout
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    got, want = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("run", "ref"))
    assert [r["epoch"] for r in got["history"]] == list(range(1, epochs + 1))  # each epoch exactly once
    assert got == want  # same losses, lrs, validation and test scores as the run never interrupted
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "ref" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sigterm_stops_a_run_with_one_line_and_leaves_it_resumable(tmp_path):
    """kill, a scheduler's time limit, docker stop: the process vanished with exit 143 and no word,
    leaving a half-written temporary file when it was saving."""
    out = tmp_path / "run"
    train = ["train", *TINY, "--synthetic-samples", "16", "--batch-size", "4", "--epochs", "200",
             "--workers", "1", "--out", str(out)]
    victim = subprocess.Popen(_cmrf(*train), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 240
    while _completed_epochs(out / STATE_FILE) < 1:
        assert victim.poll() is None, f"the run ended early: {victim.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=60) == 143
    assert victim.stderr.read().strip().splitlines() == [
        "cmrf train: terminated; completed epochs are kept: run the same command with --resume to continue"]
    assert temporary_files(out) == []
    assert _completed_epochs(out / STATE_FILE) >= 1  # --resume continues from there


def test_torchrun_into_a_folder_in_use_fails_at_once_on_every_rank(tmp_path):
    """Only rank 0 took the lock: rank 1 waited at the next collective and, unable to act on the
    launcher's SIGTERM there, was killed 30 s later."""
    from cmrf.train.run_folder import run_folder_lock

    out = tmp_path / "held"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "cmrf", "train", *TINY, "--synthetic-samples", "8", "--epochs", "1", "--out", str(out)]
    with run_folder_lock(out):
        run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    # Each rank says it itself (rank 1 no longer waits to be killed, which took torchrun 30 s).
    refusal = f"cmrf train: error: {out} is in use by another training"
    assert run.stderr.count(refusal) == 2 and "forcefully exiting" not in run.stderr, run.stderr[-3000:]


def test_torchrun_two_processes_on_cpu(tmp_path, capsys):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "cmrf", "train", *TINY, "--synthetic-samples", "16", "--epochs", "1", "--out", str(out)]
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("epoch 1/1") == 1, run.stdout  # only rank 0 reports (and writes)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1]
    assert sorted(p.name for p in out.iterdir()) == [
        "best.safetensors",
        "last.safetensors",
        "last_state.pt",
        "metrics.json",
    ]
    assert torch.load(out / STATE_FILE, weights_only=True)["world_size"] == 2
    # Another number of processes is another batch per step: refused, as another --batch-size is.
    again = ["train", *TINY, "--synthetic-samples", "16", "--epochs", "1", "--out", str(out), "--resume"]
    assert main(again) == 2
    assert "processes 2 (given 1; torchrun --nproc_per_node sets them" in capsys.readouterr().err

    # Each rank scored half of the test images; the reported scores are those of the whole split,
    # as a single process finds them.
    scores = tmp_path / "scores.json"
    assert main(["evaluate", str(out / "best.safetensors"), "--device", "cpu", "--json", str(scores)]) == 0
    single = json.loads(scores.read_text())
    for name, values in single["per_class"].items():
        assert metrics["per_class"][name] == pytest.approx(values, abs=1e-4)
