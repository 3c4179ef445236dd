"""The command line as a user runs it: console script entry, ``python -m cmrf``, quickstart."""

from __future__ import annotations

import subprocess
import sys

from cmrf.cli import COMMANDS, main


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
    assert "paper" in out and "0.481M" in out and "(1, 2, 64, 64)" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
