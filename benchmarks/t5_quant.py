"""Quantised T5 (`--t5-quant int8|nf4`): encoder memory, encoding time, and the features' cosine distance to bf16.

Two encoders: the trained ShapesWorld T5 (builtin:shapes-t5: real weights, so the distance means something) and a
T5-XXL-shaped encoder with random weights and only the first ``--xxl-layers`` of its 24 blocks (memory and time
are set by the shapes; its memory is extrapolated to 24 blocks). Captions are ShapesWorld dense captions at the
model's token length (120 for T5-XXL, as PixArt pads). CPU or GPU (whichever torch sees); ratios against bf16 in
the same run.

    python benchmarks/t5_quant.py [--xxl-layers 2] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pixart_cli.components.resolve import resolve_builtin
from pixart_cli.components.text import TextEncoder
from pixart_cli.precision import describe_cpu
from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import sample_scene

GIB = 1024**3
CHOICES = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.bfloat16, "int8"),
           "nf4": (torch.bfloat16, "nf4")}  # the unquantised parts of int8 / nf4 in bf16  # fmt: skip


def xxl_shaped(directory: Path, layers: int) -> Path:
    """T5-XXL's encoder config (google/t5-v1_1-xxl) with ``layers`` blocks, random weights, and the ShapesWorld
    tokenizer (its vocabulary is smaller; the embedding is sized as XXL's)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_builtin("builtin:shapes-t5")).save_pretrained(directory)
    return directory


def measure(source: str, max_length: int, prompts: list[str], repeats: int, device: torch.device) -> dict:
    out = {}
    for name, (dtype, quantize) in CHOICES.items():
        text = TextEncoder(source, max_length=max_length, dtype=dtype, device=device, quantize=quantize).load()
        footprint = text.encoder.get_memory_footprint()
        text.encode(prompts[:2])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            features = text.encode(prompts)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        mask = features.mask.bool()
        out[name] = {"bytes": footprint, "seconds": min(times), "features": features.embeddings.float()[mask].cpu()}
        del text
    return out


def report(title: str, results: dict, scale_bytes=None, unit: int = GIB) -> None:
    ref = results["bf16"]
    print(f"\n{title}")
    header = f"{'T5':<6} {'memory ' + ('GiB' if unit == GIB else 'MiB'):>10} {'× bf16':>7} {'s/batch':>8} {'× bf16':>7}"
    print(f"{header} {'1 − cos (mean / max) vs bf16':>30}")
    for name, r in results.items():
        cos = torch.nn.functional.cosine_similarity(r["features"], ref["features"], dim=-1)
        size = scale_bytes(r["bytes"]) if scale_bytes else r["bytes"]
        ref_size = scale_bytes(ref["bytes"]) if scale_bytes else ref["bytes"]
        print(
            f"{name:<6} {size / unit:>10.3f} {size / ref_size:>7.2f} {r['seconds']:>8.3f} "
            f"{r['seconds'] / ref['seconds']:>7.2f} {1 - cos.mean().item():>14.2e} / {1 - cos.min().item():.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xxl-layers", type=int, default=2, help="blocks of the XXL-shaped encoder (0: skip it)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({describe_cpu()})"
    print(f"{where}, torch {torch.__version__}, batch {args.batch}")
    prompts = [caption(sample_scene(i), "dense", seed=i) for i in range(args.batch)]
    shapes = measure(resolve_builtin("builtin:shapes-t5"), 64, prompts, args.repeats, device)
    report("builtin:shapes-t5 (trained, d_model 64, 64 tokens)", shapes, unit=1024**2)
    if args.xxl_layers:
        with tempfile.TemporaryDirectory() as tmp:
            xxl = measure(str(xxl_shaped(Path(tmp), args.xxl_layers)), 120, prompts, args.repeats, device)
        embedding = {"fp32": 4, "bf16": 2, "int8": 2, "nf4": 2}  # bytes per embedding weight (never quantised)
        for name, r in xxl.items():  # the blocks, scaled from the measured ones to all 24
            emb = 32128 * 4096 * embedding[name]
            r["bytes"] = emb + (r["bytes"] - emb) * 24 / args.xxl_layers
        report(f"T5-XXL shape, random weights: memory for 24 blocks (scaled from {args.xxl_layers}), "
               f"time of {args.xxl_layers} blocks at 120 tokens", xxl)  # fmt: skip


if __name__ == "__main__":
    main()
