"""Cached-feature loader throughput vs what a PixArt-XL/2 512-px training step consumes.

Writes a synthetic feature cache in the real layout (``pixart_cli.data.cache``) with XL/2 512-px shapes — latent
posterior mean + std 4×64×64 fp16 and a full-length caption 120×4096 fp16 (no trimming: the worst case, ~1 MB per
item) — then times ``make_loader`` over it (``CachedDataset`` → ``BucketBatchSampler`` → ``collate``) with several
worker counts, and prints items/s against the images/s one GPU trains at (docs/reference.md §5–6):

* training FLOPs per 512-px image = 3 × 1,236 GFLOPs forward = 3.7 TFLOPs (no activation recompute);
* A100 at the DiT-XL/2 anchor's ~25% MFU of 312 TFLOP/s bf16 → ~21 img/s;
* H100 at 25% of 989 TFLOP/s → ~67 img/s, and an optimistic 50% → ~133 img/s (no public DiT run reports > 25%).

The cache is read from the page cache (just written, it fits in RAM): this measures the loader's CPU cost, not
the disk. From cold storage a GPU needs items/s × ~1 MB/s of read bandwidth (less with trimmed captions).

    python benchmarks/data_loader.py                 # ~1 minute on 2 CPU cores
    python benchmarks/data_loader.py --items 1024 --workers 0 2 4 8 --batch-size 38
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pixart_cli.data.buckets import Buckets
from pixart_cli.data.cache import FORMAT, INDEX, SHARDS, VERSION
from pixart_cli.data.loader import CachedDataset, make_loader

LATENT = (4, 64, 64)
CAPTION = (120, 4096)
TRAIN_TFLOPS_PER_IMAGE = 3 * 1.236  # docs/reference.md §5: forward 1,236 GFLOPs at 512 px; training ≈ 3× forward
ANCHORS = {  # name → sustained TFLOP/s of one GPU
    "A100 @ 25% MFU (DiT-XL/2 anchor)": 0.25 * 312,
    "H100 @ 25% MFU": 0.25 * 989,
    "H100 @ 50% MFU (optimistic)": 0.50 * 989,
}


def write_synthetic_cache(root: Path, items: int, shard_size: int, seed: int = 0) -> Path:
    """A cache of ``items`` random 512-px items in the layout ``CachedDataset`` reads."""
    rng = np.random.default_rng(seed)
    buckets = Buckets.single(512)
    shards = []
    for s, start in enumerate(range(0, items, shard_size)):
        n = min(shard_size, items - start)
        directory = root / SHARDS / f"{s:05d}"
        directory.mkdir(parents=True)
        np.save(directory / "index.npy", np.arange(start, start + n, dtype=np.int64))
        np.save(directory / "latent_mean.npy", rng.standard_normal((n, *LATENT), dtype=np.float32).astype(np.float16))
        np.save(directory / "latent_std.npy", np.full((n, *LATENT), 0.01, dtype=np.float16))
        caption = np.lib.format.open_memmap(directory / "caption.npy", "w+", np.float16, (n, *CAPTION))
        for i in range(n):  # item by item: keeps the writer's memory small
            caption[i] = rng.standard_normal(CAPTION, dtype=np.float32).astype(np.float16)
        caption.flush()
        del caption
        np.save(directory / "caption_mask.npy", np.ones((n, CAPTION[0]), dtype=np.uint8))
        (directory / "meta.json").write_text(json.dumps({"bucket": 0, "count": n, "bad": []}))
        shards.append({"name": directory.name, "bucket": 0, "count": n})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "conditioning": "caption",
        "class_names": None,
        "buckets": buckets.to_json(),
        "max_length": CAPTION[0],
        "shards": shards,
    }
    (root / INDEX).write_text(json.dumps(index))
    return root


def measure(cache: Path, batch_size: int, workers: int, seconds: float, seed: int = 0) -> tuple[float, int]:
    """(items/s, items) over whole epochs until ``seconds`` have passed (after one warm-up batch)."""
    dataset = CachedDataset(cache)
    loader = make_loader(dataset, batch_size, seed=seed, num_workers=workers, pin_memory=False)
    epoch, items, start = 0, 0, None
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            if start is None:  # the first batch pays for worker start-up
                start = time.perf_counter()
                continue
            items += len(batch["index"])
            if time.perf_counter() - start > seconds:
                return items / (time.perf_counter() - start), items
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=256, help="cache size (~1 MB per item)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=38, help="per-GPU batch (38: official 512-px recipe)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per worker count")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the cache (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        cache = write_synthetic_cache(Path(tmp) / "cache", args.items, args.shard_size)
        size = sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20
        print(f"synthetic cache: {args.items} items, {size:.0f} MiB, written in {time.perf_counter() - start:.1f} s")
        per_item_mb = size / args.items * 2**20 / 1e6
        needs = {name: tflops / TRAIN_TFLOPS_PER_IMAGE for name, tflops in ANCHORS.items()}
        print("one GPU trains XL/2 512 px at: " + "; ".join(f"{k}: {v:.0f} img/s" for k, v in needs.items()))
        print(f"{'workers':>7} {'items/s':>9} {'MB/s':>7}  " + "  ".join(f"×{k.split(' (')[0]}" for k in needs))
        for workers in args.workers:
            rate, _ = measure(cache, args.batch_size, workers, args.seconds)
            ratios = "  ".join(f"{rate / v:>{len(k.split(' (')[0]) + 1}.1f}" for k, v in needs.items())
            print(f"{workers:>7} {rate:>9.0f} {rate * per_item_mb:>7.0f}  {ratios}")


if __name__ == "__main__":
    main()
