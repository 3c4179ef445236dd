"""``cmrf predict CHECKPOINT INPUT... --out DIR``: a mask PNG (and an overlay PNG) per image.

It keeps going: an input that cannot be read (a corrupt or unreadable image, a missing path, a
folder without images) is reported on one line of stderr and skipped; the others are written. The
summary counts the masks written and the inputs that failed, and the exit status is 1 when any
input failed (docs/cli.md). Errors on the output side (read-only folder, full disk) stop the run
with exit status 2: every later write would fail the same way.

Only its own files are replaced or removed: masks and overlays carry the PNG text entry
``Software: cmrf predict`` (``OUTPUT_MARK``). A file in ``--out`` that is named like an output of
this run but lacks the entry (a ground-truth ``a_mask.png``, or a mask of cmrf 0.1.0, which wrote
no entry) stops the run before anything is written, unless ``--overwrite`` is given; one named like
an earlier run's output that this run would remove is left where it is and counted in the summary.

Output names are unique (compared case-insensitively, as on macOS and Windows disks):
``STEM_mask.png`` and ``STEM_overlay.png``, where ``STEM`` is the input's stem; inputs whose stems
collide (``a.png``, ``a.jpg``) use their full file name instead (``a.png_mask.png``,
``a.jpg_mask.png``); inputs whose file names collide too (``x/a.png``, ``y/a.png``) get ``-2``,
``-3``... in input order after the first (``a.png-2_mask.png``). Every file is written atomically.
An earlier run's outputs that would pass for this run's are removed (and counted in the summary):
with ``--no-overlays`` the overlay of an image whose mask is written now, both files of an
input that cannot be read now, and those an input's plain stem had before another input's came to
collide with it (``a_mask.png`` once ``a.png`` is written as ``a.png_mask.png``).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from cmrf.cli.common import require_extra, user_path
from cmrf.cli.model_args import (
    add_checkpoint_model_arguments,
    add_optimize_argument,
    checkpoint_model_options,
    inference_device,
    inference_model,
    positive_int,
)
from cmrf.data.base import listing
from cmrf.train.setup import model_from_checkpoint

__all__ = ["OUTPUT_MARK", "build", "output_stems", "run_predict"]

# Written into every mask and overlay: what cmrf predict may replace or remove.
OUTPUT_MARK = {"Software": "cmrf predict"}


def _image_files(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files named by ``inputs`` (files and folders), each once; and the inputs that
    name nothing usable, as ``(path, reason)``."""
    from cmrf.data import IMAGE_SUFFIXES
    from cmrf.data.pairs import broken_link_reason

    files, problems, seen = [], [], {}
    for item in map(Path, inputs):
        if item.is_dir():
            # Hidden files are skipped, as training skips them (macOS leaves "._a.png" beside "a.png").
            named = sorted(p for p in item.iterdir() if not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_SUFFIXES)
            found = [p for p in named if p.is_file()]
            # A link whose target is gone is an image the user meant to segment: reported, as
            # training reports it, not skipped (exit 0 would say every image was segmented).
            problems += [(p, broken_link_reason(p).removeprefix("is ")) for p in named
                         if p.is_symlink() and not p.exists()]
            if not named:
                problems.append((item, f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
                                       f"{_nested_images_hint(item)}"))
        elif item.is_file() and item.name.lower().endswith((".nii", ".nii.gz")):
            found = []  # (Pillow's "cannot identify image file" would not say why)
            problems.append((item, "a NIfTI volume: cmrf predict segments 2D images; segment volumes from "
                                   "Python (docs/volumes.md)"))
        elif item.is_file():
            found = [item]
        else:
            found = []
            problems.append((item, broken_link_reason(item).removeprefix("is ") if item.is_symlink()
                             else "no such file or folder"))
        for path in found:
            target = path.resolve()
            if target not in seen:
                seen[target] = len(files)
                files.append(path)
            elif files[seen[target]].is_symlink() and not path.is_symlink():
                files[seen[target]] = path  # one file under two names: named as the file itself
    return files, problems


def _nested_images_hint(folder: Path) -> str:
    """For a folder without images: its subfolders that hold some, which are not searched."""
    from cmrf.data.folder import holds_images

    nested = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and holds_images(p))
    if not nested:
        return ""
    more = f" and {len(nested) - 3} more" if len(nested) > 3 else ""
    shown = ", ".join(f"{name}/" for name in nested[:3]) + more
    return f"; its subfolders {shown} hold images, but subfolders are not searched: give them as inputs"


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output stem per input path, unique case-insensitively (rules in the module docstring)."""
    stem_count = Counter(p.stem.casefold() for p in paths)
    stems = [p.stem if stem_count[p.stem.casefold()] == 1 else p.name for p in paths]
    taken: set[str] = set()
    unique = []
    for stem in stems:
        candidate, n = stem, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


def build(parser: argparse.ArgumentParser):
    parser.add_argument("checkpoint", type=user_path,
                        help="best.safetensors or last.safetensors written by cmrf train, or a state dict "
                             "such as the reference code's .pth (with --model)")
    parser.add_argument("inputs", nargs="+", type=user_path,
                        help="2D image files and/or folders of images (volumes: see docs/volumes.md)")
    parser.add_argument("--out", type=user_path, required=True,
                        help="folder for STEM_mask.png (0/255 for two classes, a palette PNG of class "
                             "indices for more; the input image's size) and STEM_overlay.png")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="network input side (default: the run's; 256 for a file that records none)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="write only the masks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in --out named like this run's outputs that cmrf predict did not "
                             "write (without it such files stop the run before anything is written)")
    add_optimize_argument(parser, "masks")
    add_checkpoint_model_arguments(parser)
    parser.epilog = (
        "Unreadable inputs are reported and skipped; exit status 1 if any input failed. Stems that collide "
        "(a.png, a.jpg) give a.png_mask.png and a.jpg_mask.png."
    )
    return run_predict


def _report(path: Path, err: BaseException | str) -> None:
    from cmrf.cli import describe_error

    message = err if isinstance(err, str) else describe_error(err)
    if str(path) not in message:
        message = f"{path}: {message}"
    print(f"cmrf predict: error: {_printable(message)} (skipped)", file=sys.stderr)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a file name holding a newline or a terminal escape
    sequence must not forge lines or recolour the terminal."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def _check_model_fits_images(meta: dict, model, checkpoint) -> None:
    # The model's own dimensions: a bare state dict's metadata has no data settings.
    spatial_dims = getattr(model, "spatial_dims", None) or meta.get("data", {}).get("spatial_dims") or 2
    if spatial_dims != 2:
        raise ValueError(f"{checkpoint} holds a {spatial_dims}D model; cmrf predict handles 2D image files")
    if not 2 <= meta["num_classes"] <= 256:
        raise ValueError(f"{checkpoint} holds a model with {meta['num_classes']} output channel(s); cmrf "
                         f"predict writes the argmax of 2 to 256 class logits as a PNG mask (a one-channel "
                         f"sigmoid head is not a class index)")
    if meta["in_chans"] not in (1, 3):
        raise ValueError(
            f"{checkpoint} holds a model with {meta['in_chans']} input channels; cmrf predict reads images "
            f"as grey (1) or RGB (3)"
        )


def _input_side(args: argparse.Namespace, meta: dict, model) -> int:
    """The network's input side: ``--img-size``, else the run's, else 256; checked against the
    smallest side the model takes, and noted on stderr when it is not the run's."""
    from cmrf.data.factory import MAX_IMG_SIZE

    trained = meta.get("data", {}).get("img_size")
    side = args.img_size or trained or 256
    smallest = int(getattr(model, "smallest_side", None) or getattr(model, "min_size", 1))
    if not isinstance(side, int) or side > MAX_IMG_SIZE[2]:  # a checkpoint's recorded size included
        raise ValueError(f"--img-size {side!r} (the {'flag' if args.img_size else 'checkpoint'}'s): expected "
                         f"an integer of at most {MAX_IMG_SIZE[2]}")
    if side < smallest:
        raise ValueError(f"--img-size {side} is below the smallest side {type(model).__name__} takes "
                         f"({smallest})")
    if args.img_size and trained and args.img_size != trained:
        print(f"cmrf predict: note: --img-size {args.img_size}, the run trained at {trained}",
              file=sys.stderr)
    if not args.img_size and not trained:  # a save_weights file or a bare state dict: a guess
        print(f"cmrf predict: note: {args.checkpoint} records no training image size; predicting at "
              f"{side} (give --img-size, the side the model was trained at)", file=sys.stderr)
    return side


def _check_out_is_not_an_input_folder(out: Path, inputs: Sequence[str]) -> None:
    """Masks written among the images would overwrite files there (a ground-truth ``a_mask.png``)
    and be read as images by the next run over that folder: ``--out`` may be neither a folder given
    as input nor the folder of an image given as input (``data/*.jpg --out data``)."""
    # Resolved even when it does not exist yet: "data/new/.." is "data" once "new" is made.
    for item in map(Path, inputs):
        folder = item if item.is_dir() else item.parent if item.is_file() else None
        if folder is not None and folder.resolve() == out.resolve():
            what = "an input folder" if folder is item else f"the folder of the input {item}"
            raise ValueError(f"--out {out} is also {what}: its masks would be written among the images "
                             f"(over any file named like them) and read as images by the next run; "
                             f"choose another --out")


def _check_no_output_links_to_an_input(
    files: Sequence[Path], stems: Sequence[str], out: Path, overlays: bool
) -> None:
    """Refuse, before anything is written, an output name in ``--out`` that is a symbolic link to an
    input image: files are written through links (``cmrf.files``, as ``open()`` does), so the mask
    would replace that image."""
    inputs = {path.resolve(): path for path in files}
    kinds = ("mask", "overlay") if overlays else ("mask",)
    for stem in stems:
        for kind in kinds:
            target = out / f"{stem}_{kind}.png"
            # realpath, not resolve(), which raises for a symbolic link loop (that names no input).
            source = inputs.get(Path(os.path.realpath(target)))
            if source is not None:
                raise ValueError(
                    f"{target} is a link to the input {source}: writing the {kind} would "
                    f"replace that image; remove the link or choose another --out"
                )


def _renamed_outputs(files: Sequence[Path], stems: Sequence[str], out: Path) -> list[Path]:
    """Outputs an earlier run wrote for an input under the name this run does not use: its plain
    stem (``a_mask.png`` for ``a.png``, now ``a.png_mask.png`` since ``a.jpg`` came along) or its
    full name (``a.png_mask.png``, now ``a_mask.png`` since ``a.jpg`` is gone). They would pass
    for the mask of an image of this run."""
    used = {stem.casefold() for stem in stems}
    other = dict.fromkeys(name for path in files for name in (path.stem, path.name)
                          if name.casefold() not in used)
    return [out / f"{name}_{kind}.png" for name in other for kind in ("mask", "overlay")]


def _written_by_predict(path: Path) -> bool:
    """Whether ``path`` is a PNG that carries ``OUTPUT_MARK`` (one this command wrote)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and all(image.text.get(k) == v for k, v in OUTPUT_MARK.items())
    except (OSError, ValueError, SyntaxError):  # not an image, unreadable: not ours either
        return False


def _check_no_foreign_outputs(stems: Sequence[str], out: Path, overlays: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, to replace files in ``--out`` that this command did not
    write (a user's ground truth named ``a_mask.png``), unless ``--overwrite``."""
    if overwrite:
        return
    kinds = ("mask", "overlay") if overlays else ("mask",)
    targets = (out / f"{stem}_{kind}.png" for stem in stems for kind in kinds)
    # A link whose target is missing counts too: written through, it would create that target.
    foreign = [path for path in targets
               if (path.exists() or path.is_symlink()) and not _written_by_predict(path)]
    if foreign:
        names = listing([path.name for path in foreign], 3)
        raise ValueError(
            f"--out {out} holds {len(foreign)} file(s) named like this run's outputs that cmrf predict did "
            f"not write ({names}); they would be replaced: choose another --out, or pass --overwrite "
            f"(masks of cmrf 0.1.0 carry no mark and count as not written by it)")


def _remove_outputs(paths: Sequence[Path]) -> tuple[int, int]:
    """Remove those of ``paths`` that this command wrote; ``(removed, left)``, where ``left``
    counts the files at those paths that it did not write (kept)."""
    present = [path for path in paths if path.is_file()]
    ours = [path for path in present if _written_by_predict(path)]
    for path in ours:
        path.unlink()
    return len(ours), len(present) - len(ours)


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    from cmrf.data import denormalize, image_size, load_image, save_mask_png
    from cmrf.train.plots import plot_overlays

    if args.overlays:  # else an "internal error" after the first mask is written
        require_extra(("matplotlib",), "cmrf predict (its overlays; --no-overlays writes only the masks)",
                      "train")
    model, meta = model_from_checkpoint(args.checkpoint, **checkpoint_model_options(args))
    _check_model_fits_images(meta, model, args.checkpoint)
    img_size = _input_side(args, meta, model)
    out = Path(args.out)
    _check_out_is_not_an_input_folder(out, args.inputs)
    # Flags the device or backend refuses fail here, before --out is made: no empty folder is left.
    device = inference_device(args)
    model = inference_model(model.to(device), device, args.optimize, max_graphs=1, backend=args.backend)
    files, problems = _image_files(args.inputs)
    if not files:  # nothing to write: no --out folder is made, and an earlier run's is left as it is
        for path, reason in problems:
            _report(path, reason)
        print(f"wrote no masks: none of the {len(problems)} input(s) names an image")
        return 1
    if out.exists() and not out.is_dir():  # mkdir's own word for it, "File exists", says nothing
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder: --out takes the masks' folder", str(out))
    out.mkdir(parents=True, exist_ok=True)
    stems = output_stems(files)
    _check_no_output_links_to_an_input(files, stems, out, args.overlays)
    _check_no_foreign_outputs(stems, out, args.overlays, args.overwrite)
    for path, reason in problems:
        _report(path, reason)
    failed, written = len(problems), 0
    stale = Counter()

    def remove(paths: Sequence[Path]) -> None:
        removed, left = _remove_outputs(paths)
        stale.update(removed=removed, left=left)

    remove(_renamed_outputs(files, stems, out))
    for path, stem in zip(files, stems, strict=True):
        try:  # the input side: a bad image is reported and skipped
            size = image_size(path)
            image = load_image(path, img_size, meta["in_chans"])
        except (OSError, ValueError) as err:
            _report(path, err)
            failed += 1
            # An earlier run's outputs for this image would pass for this run's.
            remove([out / f"{stem}_mask.png", out / f"{stem}_overlay.png"])
            continue
        prediction = model(image[None].to(device)).argmax(dim=1)[0].cpu()
        # The output side: an error here (full disk, read-only folder) ends the run with exit 2.
        # Both writers are atomic (cmrf.files): the masks already written and, for this one, any
        # previous file stay intact. The mask matches the input image's size; the overlay shows
        # what the network saw.
        save_mask_png(prediction, out / f"{stem}_mask.png", meta["num_classes"], size, metadata=OUTPUT_MARK)
        overlay = out / f"{stem}_overlay.png"
        if args.overlays:
            plot_overlays(denormalize(image)[None], None, prediction[None], overlay, titles=[path.name],
                          metadata=OUTPUT_MARK)
        else:  # an earlier run's overlay would show another prediction beside this mask
            remove([overlay])
        written += 1
    what = " and overlays" if args.overlays else ""
    removed = f"; removed {stale['removed']} file(s) of an earlier run" if stale["removed"] else ""
    if stale["left"]:
        removed += (f"; left {stale['left']} file(s) named like an earlier run's outputs, which cmrf predict "
                    f"did not write")
    print(f"wrote {written} mask(s){what} to {out}{removed}; {failed} input(s) failed")
    return 1 if failed else 0
