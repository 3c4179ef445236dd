"""Deploy TinyU-Net on a CPU: load weights, optimize for inference, export to ONNX, segment.

    python examples/deploy_cpu.py                               # random weights, a synthetic image
    python examples/deploy_cpu.py --checkpoint best_model.pth --image scan.png --onnx tinyunet.onnx
    python examples/deploy_cpu.py --checkpoint grey4.pth --in-chans 1 --num-classes 4 --image scan.png

The optimized model computes the same logits as the original (checked below) several times faster
on the CPU; the ONNX file runs in ONNX Runtime without PyTorch. Threads follow ``--threads`` (or
``OMP_NUM_THREADS``). ``examples/bench_inference_cpu.py`` times it against the reference algorithm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import cmrf
from cmrf.cli.common import positive_int


def load_image(path: str | None, size: int, in_chans: int = 3) -> torch.Tensor:
    """``(1, in_chans, size, size)``, normalised as ``cmrf train`` and ``cmrf predict`` normalise:
    the image at ``path`` read (RGB, or grey for one channel) and resized as in training, or a
    synthetic blob."""
    from cmrf.data import load_image as load_training_image
    from cmrf.data import normalize

    if path is not None:
        return load_training_image(path, size, in_chans)[None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = (xx**2 + yy**2 < 0.3).float()
    rgb = torch.stack([blob * 0.8, blob * 0.4, 0.2 + 0 * blob])
    return normalize(rgb if in_chans == 3 else rgb.mean(0, keepdim=True).expand(in_chans, -1, -1))[None]


def median_ms(fn, x, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=None, help=".safetensors or weights-only .pth (default: random weights)"
    )
    parser.add_argument("--image", default=None, help="an image file (default: a synthetic one)")
    parser.add_argument("--in-chans", type=int, default=3, help="the model's input channels (default 3)")
    parser.add_argument("--num-classes", type=int, default=2, help="the model's classes (default 2)")
    parser.add_argument("--size", type=int, default=256, help="network input side (default 256)")
    parser.add_argument("--onnx", default=None, help="also export to this .onnx file and run it")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.image is not None and args.in_chans not in (1, 3):  # before the model is built
        parser.error(f"--in-chans {args.in_chans} with --image: an image file is read as 1 (grey) or 3 (RGB) "
                     f"channels")
    for flag, path in (("--checkpoint", args.checkpoint), ("--image", args.image)):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.onnx and Path(args.onnx).suffix.lower() != ".onnx" and Path(args.onnx).exists():
        parser.error(f"--onnx {args.onnx} is an existing file not named .onnx: it would be replaced; "
                     f"give a file name that ends in .onnx")
    if args.onnx:
        try:
            import onnxruntime  # noqa: F401  (checked first: the torch work below takes a while)
        except ImportError:
            parser.error('--onnx needs ONNX Runtime: pip install "cmrf[onnx]"')
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # The three lines a deployment needs:
    try:
        model = cmrf.create_model("tinyunet", in_chans=args.in_chans, num_classes=args.num_classes,
                                  checkpoint_path=args.checkpoint).eval()
    except (ValueError, RuntimeError) as err:  # weights of another model: the loader names the shapes
        parser.error(str(err).splitlines()[0])
    if args.size < model.min_size:
        parser.error(f"--size {args.size}: TinyUNet takes sides of at least {model.min_size} pixels")
    fast = cmrf.optimize_for_inference(model)
    x = load_image(args.image, args.size, args.in_chans)
    with torch.inference_mode():
        mask = fast(x).argmax(1)

        difference = (fast(x) - model(x)).abs().max().item()
        print(f"optimized ({fast.inference_path} path) vs original: max |difference| {difference:.1e}")
        print(f"original {median_ms(model, x):.1f} ms, optimized {median_ms(fast, x):.1f} ms per image "
              f"({torch.get_num_threads()} threads)")
    shares = torch.bincount(mask.flatten(), minlength=model.num_classes).float() / mask.numel()
    print(f"mask {tuple(mask.shape)}, share of each class: "
          + ", ".join(f"{k}: {share:.3f}" for k, share in enumerate(shares.tolist())))

    if args.onnx:
        import onnxruntime as ort

        # A graph for any size takes sides that are multiples of 16; others get one for --size only.
        dynamic = args.size % 16 == 0
        path = cmrf.export_onnx(model, Path(args.onnx), (1, args.in_chans, args.size, args.size),
                                dynamic=dynamic)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": x.numpy()})[0]
        run = lambda t: session.run(None, {"input": t.numpy()})  # noqa: E731
        print(f"ONNX Runtime: {path}, {median_ms(run, x):.1f} ms per image, max |difference| "
              f"{np.abs(logits - fast(x).detach().numpy()).max():.1e}")


if __name__ == "__main__":
    main()
