"""Captioning throughput: `pixart caption` against the obvious one-image-at-a-time loop, end to end.

Both read the same JPEG files from disk and run the same LLaVA-style model (random weights, built here: no
downloads) with the same greedy settings, and must write the same captions. The naive loop is what a first script
does: for each file, open it, run the processor, ``model.generate`` on a batch of one, decode, write a line. Ours is
``caption_dataset`` (what ``pixart caption`` runs): ``--batch-size`` images per call with left padding, resumable
output (on a GPU it also decodes the next batch in a thread while the device generates; not on a CPU). Both times
include loading the model. Prints images/s of each, the ratio, and where the time goes (decoding and pre-processing vs
generation, measured separately on the same files).

    python benchmarks/caption.py                       # LLaVA's proportions (256 image tokens), 128 JPEGs of 512 px
    python benchmarks/caption.py --image-size 32 --patch-size 8 --side 32 --images 256 --max-new-tokens 48
                                                       # the ShapesWorld captioner's shape (16 image tokens)
    python benchmarks/caption.py --hidden 256 --layers 4 --images 256
    python benchmarks/caption.py --model llava-hf/llava-1.5-7b-hf --device cuda --dtype bf16 --batch-size 32 \
        --max-new-tokens 300 --images 256                  # a real VLM on a GPU (recipes/caption/sam-llava.yaml)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixart_cli.captioning.run import caption_dataset
from pixart_cli.captioning.settings import PAPER_PROMPT, CaptionSettings
from pixart_cli.captioning.vlm import DTYPES, VisionLanguageModel
from pixart_cli.precision import describe_device
from pixart_cli.tiny import make_tiny_llava

WORDS = "a red blue green grey black circle square triangle on background left of right above below small large"


def naive(model_dir: str, files: list[Path], max_new_tokens: int, out: Path, device: str, dtype: str) -> list[str]:
    model = VisionLanguageModel(model_dir, dtype=DTYPES[dtype], device=device)
    processor, vlm = model.processor, model.model
    text = model.conversation(PAPER_PROMPT)
    captions = []
    with open(out, "w", encoding="utf-8") as f:
        for path in files:
            inputs = processor(images=[Image.open(path).convert("RGB")], text=[text], return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
            with torch.no_grad():
                ids = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            caption = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
            captions.append(caption.strip())
            f.write(json.dumps({"path": path.name, "caption_vlm": captions[-1]}) + "\n")
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--side", type=int, default=512, help="the JPEG files' side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="width of the vision tower and the language model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--model", help="a real VLM (directory or hub id) instead of the tiny random one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    print(describe_device())
    root = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    model_dir = args.model or str(root / "vlm")
    if args.model is None:
        make_tiny_llava(
            root / "vlm",
            [WORDS] * 20,
            hidden_size=args.hidden,
            num_layers=args.layers,
            image_size=args.image_size,
            patch_size=args.patch_size,
            initializer_range=0.02,
        )
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):  # smooth noise, so that JPEG decoding costs what it costs on photographs
        small = (rng.random((args.side // 16, args.side // 16, 3)) * 255).astype("uint8")
        Image.fromarray(small).resize((args.side, args.side), Image.BICUBIC).save(images / f"{i:05d}.jpg", quality=90)
    files = sorted(images.glob("*.jpg"))
    tiny = f"LLaVA-style, width {args.hidden}, {args.layers} layers, {args.image_size}-px images " + (
        f"({(args.image_size // args.patch_size) ** 2} image tokens)"
    )
    print(
        f"model: {args.model or tiny}, {args.dtype} on {args.device}; {args.images} JPEGs of {args.side} px, "
        f"{args.max_new_tokens} new tokens at most, greedy"
    )
    naive(model_dir, files[:2], args.max_new_tokens, root / "warm-up.jsonl", args.device, args.dtype)

    start = time.perf_counter()
    reference = naive(model_dir, files, args.max_new_tokens, root / "naive.jsonl", args.device, args.dtype)
    t_naive = time.perf_counter() - start

    settings = CaptionSettings(
        model=model_dir, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dtype=args.dtype
    )
    start = time.perf_counter()
    caption_dataset(images, root / "ours.jsonl", settings, device=args.device)
    t_ours = time.perf_counter() - start
    lines = [json.loads(line) for line in (root / "ours.jsonl").read_text().splitlines()]
    ours = [line[settings.field] for line in lines]

    # Where the time goes: the same work without the overlap, stage by stage.
    model = VisionLanguageModel(model_dir, dtype=DTYPES[args.dtype], device=args.device)
    t_pre = t_gen = 0.0
    for i in range(0, len(files), args.batch_size):
        p0 = time.perf_counter()
        inputs = model.inputs([Image.open(f).convert("RGB") for f in files[i : i + args.batch_size]], PAPER_PROMPT)
        p1 = time.perf_counter()
        model.generate(inputs, args.max_new_tokens)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t_pre, t_gen = t_pre + p1 - p0, t_gen + time.perf_counter() - p1
    same = sum(a == b for a, b in zip(ours, reference, strict=True))
    print(f"naive loop (1 image per generate): {args.images / t_naive:8.2f} img/s")
    print(f"pixart caption (batch {args.batch_size:>3}):        {args.images / t_ours:8.2f} img/s")
    print(f"ratio ours / naive: {t_naive / t_ours:.2f}x   (same captions: {same}/{len(files)})")
    total = t_pre + t_gen
    print(
        f"where the time goes, one stage after the other: decoding + pre-processing {t_pre / total:.0%}, "
        f"generation {t_gen / total:.0%} ({total:.2f} s; pixart caption with reading and writing: {t_ours:.2f} s)"
    )


if __name__ == "__main__":
    main()
