"""The ``cmrf`` command line.

This package is the only place argparse lives: library functions take keyword arguments.
``COMMANDS`` maps a command name to a function ``build(parser) -> run`` in a module of this package
that adds the command's arguments and returns ``run(args) -> int``. Only the module of the command
being run is imported, so one command's heavy dependencies never slow down another.

Errors are handled here, once, for every command (docs/cli.md):

- exit 2 and one line ``cmrf COMMAND: error: PATH: CAUSE`` on stderr for what the user can fix: a
  file-system error (``OSError``: missing file, permission, read-only folder, full disk) or a bad
  argument, data or checkpoint (``ValueError``, which the library raises with the value named), and
  a failed memory allocation (sizes too large for the machine);
- exit 70 (``EX_SOFTWARE``) and one line ending in "rerun with --debug" for any other exception
  (a bug: please report it with the traceback);
- exit 130 on Ctrl-C (also while the command is still starting, once torch is imported);
- exit 141, quietly, when the reader of its output goes away (``cmrf profile ... | head``).
- exit 143 and one line on SIGTERM, unwound as Ctrl-C is (files being written are removed).

``--debug`` (``cmrf --debug COMMAND ...`` or anywhere after the command) or the environment
variable ``CMRF_DEBUG=1`` prints the full traceback before that line; the exit status stays the same.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import os
import re
import signal
import sys
import traceback

__all__ = ["COMMANDS", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_USER_ERROR", "build_parser", "main"]

# name -> ("module:builder", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("cmrf.cli.quickstart:build", "build TinyU-Net, print its costs beside the paper's"),
    "profile": ("cmrf.cli.profile:build", "params, fvcore MACs and paper-convention FLOPs of a model"),
    "export": ("cmrf.cli.export:build", "export a model, optimized for inference, to ONNX"),
    "bench": ("cmrf.cli.bench:build", "TinyU-Net speed on CPU or CUDA against the reference: one table"),
    "bench-cascade": ("cmrf.cli.bench:build_cascade", "alias of `cmrf bench --rows cascade`"),
    "demo": ("cmrf.cli.train:build_demo", "train TinyU-Net on synthetic lesions on the CPU, evaluate, plot"),
    "train": ("cmrf.cli.train:build_train", "train a model with the paper's recipe (resumable, DDP-ready)"),
    "evaluate": ("cmrf.cli.evaluate:build", "per-class IoU/Dice of a trained checkpoint on a split"),
    "predict": ("cmrf.cli.predict:build", "mask PNGs and overlays of a trained checkpoint on images"),
}

EXIT_USER_ERROR = 2  # bad argument, data, checkpoint, or a file-system error; argparse uses 2 too
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: an unexpected exception, i.e. a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`cmrf ... | head`)
EXIT_TERMINATED = 143  # 128 + SIGTERM: `kill`, a job scheduler's time limit, `docker stop`

# Commands whose closed output stops work worth saying so (with how to continue).
_LONG_RUNNING = ("train", "demo")


class _Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: it unwinds as Ctrl-C does, so a file being written is cleaned up
    and a run stops between its saves, instead of the process vanishing mid-write."""


def _on_sigterm(main_pid: int, signum, frame) -> None:
    if os.getpid() != main_pid:  # a forked worker (DataLoader): end as SIGTERM would end it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises ``_Terminated`` in this (main) process while the block runs; the previous
    handler comes back after it. Nothing is changed outside the main thread, where Python
    cannot install handlers, nor in a torchrun worker (``WORLD_SIZE`` > 1): torchrun ends its
    workers with SIGTERM when one fails, and a worker waiting inside a collective (C++ code) would
    run a Python handler only once the wait ends, i.e. never; it must die at once."""
    from cmrf.train.processes import world_size_from_env

    if world_size_from_env() > 1:
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, os.getpid()))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

_DEBUG_HELP = "show the full traceback of an error instead of one line (also: CMRF_DEBUG=1)"


def _builder(spec: str):
    module_name, func_name = spec.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that command's module is imported."""
    from cmrf import __version__

    parser = argparse.ArgumentParser(prog="cmrf", description="CMRF and TinyU-Net tools")
    parser.add_argument("--version", action="version", version=f"cmrf {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (spec, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a sub-command's default must not undo a global --debug given before it.
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        if command in (None, name):
            sub_parser.set_defaults(run=_builder(spec)(sub_parser))
    return parser


def _debug_requested(args: argparse.Namespace | None, argv: list[str] = ()) -> bool:
    """``--debug`` (parsed into ``args``, or in ``argv`` before parsing) or ``CMRF_DEBUG`` set to
    anything but an "off" spelling (empty, ``0``, ``false``, ``no``, ``off``, any case)."""
    flag = bool(getattr(args, "debug", False)) or "--debug" in argv
    return flag or os.environ.get("CMRF_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _silence_stdout() -> None:
    """Point stdout at the null device, so Python's flush at exit does not fail a second time."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    # A stdout without a file descriptor (a captured one) has nothing to redirect.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(text: str) -> str:
    """``text`` without terminal colour codes, in one line: runs of blanks become one space; the
    indented items of a listed report (``problem_report``) and what follows them are set apart by
    "; ", other lines (wrapped text) joined by a space."""
    joined, after_item = "", False
    for raw in _ANSI.sub("", text).splitlines():
        line = " ".join(raw.split())
        if not line:
            continue
        item = raw[:1].isspace()
        if joined:
            apart = (item or after_item) and not joined.endswith((":", ";"))
            joined += "; " if apart else " "
        joined, after_item = joined + line, item
    return joined


def _user_error(err: BaseException) -> BaseException | None:
    """The ``OSError`` or ``ValueError`` behind ``err`` (itself, or what it was raised from)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (OSError, ValueError)):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


# What PyTorch's CPU allocator says when an allocation fails (a RuntimeError, not MemoryError).
_CPU_ALLOCATOR_FAILURES = ("can't allocate memory", "not enough memory")


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: host (``MemoryError``, the CPU allocator's
    ``RuntimeError``) or device (``torch.OutOfMemoryError``)."""
    torch = sys.modules.get("torch")
    device_oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                   getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    return isinstance(err, (MemoryError, *device_oom)) or (
        isinstance(err, RuntimeError) and any(text in str(err) for text in _CPU_ALLOCATOR_FAILURES))


def describe_error(err: BaseException) -> str:
    """One line for ``err``: ``PATH: CAUSE`` for file-system errors, the message otherwise."""
    if isinstance(err, OSError) and err.filename is not None:
        cause = err.strerror or (str(err.args[0]) if err.args else type(err).__name__)
        where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else f"{err.filename}"
        return _one_line(f"{where}: {cause}")
    return _one_line(str(err)) or type(err).__name__


def _drop_unusable_mplbackend(command: str) -> None:
    """Ignore an ``MPLBACKEND`` that matplotlib does not know, saying so, rather than stop.

    matplotlib refuses to be imported at all under such a value, and MONAI (the losses) imports it,
    so every ``train`` and ``evaluate`` failed, ``--no-plots`` or not. cmrf draws its figures on a
    ``Figure`` of its own and needs no backend, so the command goes on as if the variable were unset.
    """
    value = os.environ.get("MPLBACKEND")
    if not value or "matplotlib" in sys.modules:
        return
    try:
        import matplotlib  # noqa: F401  (validates MPLBACKEND)
    except ValueError:
        del os.environ["MPLBACKEND"]
        for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
            del sys.modules[name]  # the failed import left half-built modules behind
        print(f"cmrf {command}: note: ignoring the environment variable MPLBACKEND={value!r}: not a "
              f"matplotlib backend (cmrf draws its figures without one)", file=sys.stderr)
    except ImportError:  # matplotlib not installed: nothing reads the variable
        return


def _escape_unprintable_output() -> None:
    """Print what the terminal's encoding cannot show (a file name's undecodable bytes, kept by
    Python as lone surrogates) as escapes, as stderr already does: stdout's strict default turned
    the last line of a finished export or prediction into an error and exit 2."""
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        if sys.stdout.errors == "strict":
            sys.stdout.reconfigure(errors="backslashreplace")


def _tell(line: str) -> None:
    """The command's last line on stderr; a stderr that is closed (``2>&1 | true``, ``2>/dev/full``)
    loses it, and the exit status stays the one the line explains (it was 1: Python's own)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``cmrf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (see module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    _escape_unprintable_output()
    try:  # building the parser imports the command's module: seconds in which Ctrl-C is common
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        if _debug_requested(None, argv):
            raise
        name = f"cmrf {command}" if command in COMMANDS else "cmrf"
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else EXIT_USER_ERROR
    try:
        from cmrf.ops import check_environment

        check_environment()  # CMRF_FUSED, CMRF_UPSAMPLE: a bad value is refused before any work
        _drop_unusable_mplbackend(args.command)
        with _sigterm_unwinds():
            return int(args.run(args) or 0)
    except KeyboardInterrupt as err:
        if _debug_requested(args):  # where it stopped, then the status scripts rely on (not 1)
            traceback.print_exc()
        # Training saves every epoch: say how to go on (a new run may start there too, as --resume allows).
        hint = ("; completed epochs are kept: run the same command with --resume to continue"
                if args.command in _LONG_RUNNING else "")
        if isinstance(err, _Terminated):
            _tell(f"cmrf {args.command}: terminated{hint}")
            return EXIT_TERMINATED
        _tell(f"cmrf {args.command}: interrupted{hint}")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if _debug_requested(args):
            traceback.print_exc()
        _silence_stdout()
        if args.command in _LONG_RUNNING:  # quiet for a listing cut short, not for hours of training
            with contextlib.suppress(OSError):  # stderr may go to the same closed pipe (2>&1 | head)
                print(f"cmrf {args.command}: stopped: its output was closed (the reader of a pipe, such as "
                      f"'| head' or a tee, ended); completed epochs are kept: run the same command with "
                      f"--resume, its output not cut short, to continue", file=sys.stderr)
        return EXIT_BROKEN_PIPE
    except Exception as err:
        if _debug_requested(args):  # the traceback, then the usual line and status (2 or 70)
            traceback.print_exc()
        if _out_of_memory(err):  # sizes the user chose: fixable, not a bug
            _tell(f"cmrf {args.command}: error: out of memory: {describe_error(err)}; use a smaller input "
                  f"size or batch, or a machine with more memory")
            return EXIT_USER_ERROR
        user_error = _user_error(err)
        if user_error is not None:
            _tell(f"cmrf {args.command}: error: {describe_error(user_error)}")
            return EXIT_USER_ERROR
        _tell(f"cmrf {args.command}: internal error: {type(err).__name__}: {describe_error(err)} "
              f"(rerun with --debug for the traceback, and please report it)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
