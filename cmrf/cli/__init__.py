"""The ``cmrf`` command line.

This package is the only place argparse lives: library functions take keyword arguments.
``COMMANDS`` maps a command name to a function ``build(parser) -> run`` in a module of this package
that adds the command's arguments and returns ``run(args) -> int``. Only the module of the command
being run is imported, so one command's heavy dependencies never slow down another.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

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


def _builder(spec: str):
    module_name, func_name = spec.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that command's module is imported."""
    from cmrf import __version__

    parser = argparse.ArgumentParser(prog="cmrf", description="CMRF and TinyU-Net tools")
    parser.add_argument("--version", action="version", version=f"cmrf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (spec, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            sub_parser.set_defaults(run=_builder(spec)(sub_parser))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("CMRF_DEBUG"):
            raise
        # Bad input: one clear line, no traceback (CMRF_DEBUG=1 shows it).
        print(f"cmrf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
