"""Cost of 3D TinyU-Net beside MONAI's BasicUNet and UNet: params, FLOPs, peak training memory.

Each model is measured in a fresh subprocess (so peak RSS belongs to that model alone): one
forward + backward at batch 1 with one input channel and two classes, on the CPU. "Peak train
memory" is the growth of the process's peak RSS during that step (activations, gradients and
workspace; the weights and the input were allocated before).

    python examples/volumes_cost.py --sizes 96 128          # markdown table
    python examples/volumes_cost.py --sizes 64 --json       # one JSON line per row
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODELS = {
    "tinyunet3d": "cmrf.create_model('tinyunet3d', in_chans=1, num_classes=2)",
    "tinyunet3d (32-256)": (
        "cmrf.create_model('tinyunet3d', in_chans=1, num_classes=2, channels=(32, 64, 128, 256))"
    ),
    "MONAI BasicUNet": "monai.networks.nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2)",
    "MONAI UNet": (
        "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, "
        "channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)"
    ),
}

# Runs inside the subprocess: build, profile, then one training step while watching peak RSS.
_WORKER = """
import json, resource, sys, time
import torch, cmrf
{imports}
torch.manual_seed(0)
model = {build}
size = {size}
result = {{"params": sum(p.numel() for p in model.parameters())}}
x = torch.randn(1, 1, size, size, size)
target = torch.randint(0, 2, (1, size, size, size))
model.train()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
loss = torch.nn.functional.cross_entropy(model(x), target)
loss.backward()
result["step_s"] = time.perf_counter() - start
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["train_mem_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
if {count}:  # after the training step, so its no-grad forward cannot raise the peak first
    cost = cmrf.profile(model, (1, 1, size, size, size))
    result.update(macs=cost.macs, flops=cost.flops)
print(json.dumps(result))
"""


def measure(build: str, size: int, count: bool) -> dict:
    # MONAI only for its own rows: the TinyU-Net rows run without it installed.
    imports = "import monai" if "monai." in build else ""
    code = _WORKER.format(build=build, size=size, count=count, imports=imports)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-flops", action="store_true", help="skip profiling (faster)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.json:
        print("| model | volume | params | FLOPs (paper conv.) | fvcore MACs | peak train memory | step |")
        print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for name in args.models:
            row = {"model": name, "size": size, **measure(MODELS[name], size, not args.no_flops)}
            if args.json:
                print(json.dumps(row), flush=True)
            elif "error" in row:
                print(f"| {name} | {size}^3 | failed: {row['error']} | | | | |", flush=True)
            else:
                flops = f"{row['flops'] / 1e9:.1f}G" if "flops" in row else "-"
                macs = f"{row['macs'] / 1e9:.1f}G" if "macs" in row else "-"
                print(
                    f"| {name} | {size}^3 | {row['params'] / 1e6:.3f}M | {flops} | {macs} | "
                    f"{row['train_mem_mb'] / 1024:.2f} GiB | {row['step_s']:.1f} s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
