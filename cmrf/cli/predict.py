"""``cmrf predict``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cmrf.train.setup import model_from_checkpoint


def _image_files(inputs: list[str]) -> list[Path]:
    from cmrf.data import IMAGE_SUFFIXES

    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return files


def _image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def build(parser: argparse.ArgumentParser):
    parser.add_argument("checkpoint", help="best.safetensors or last.safetensors written by cmrf train")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--out", required=True, help="folder for NAME_mask.png and NAME_overlay.png")
    parser.add_argument("--img-size", type=int, default=None, help="network input side (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="write only the masks")
    return run_predict


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    from cmrf.data import denormalize, load_image, save_mask_png
    from cmrf.train.loop import resolve_device
    from cmrf.train.plots import plot_overlays

    model, meta = model_from_checkpoint(args.checkpoint)
    img_size = args.img_size or meta.get("data", {}).get("img_size") or 256
    files = _image_files(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    model.to(device)
    for path in files:
        image = load_image(path, img_size, meta["in_chans"])
        prediction = model(image[None].to(device)).argmax(dim=1)[0].cpu()
        # The mask file matches the input image's size; the overlay shows what the network saw.
        save_mask_png(prediction, out / f"{path.stem}_mask.png", meta["num_classes"], _image_size(path))
        if args.overlays:
            plot_overlays(
                denormalize(image)[None],
                None,
                prediction[None],
                out / f"{path.stem}_overlay.png",
                titles=[path.name],
            )
    print(f"wrote {len(files)} mask(s){' and overlays' if args.overlays else ''} to {out}")
    return 0
