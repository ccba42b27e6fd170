"""Train a tiny LLaVA-style captioner on (image, dense caption) pairs, as PixArt-α's LLaVA captioned SA-1B.

The model is ``pixart_cli.tiny.make_tiny_llava`` (a CLIP vision tower, a linear projector and a Llama language
model) with its byte-level BPE tokenizer trained on the training captions, then trained with teacher forcing through
transformers' own forward with ``labels``: the conversation (``USER: <image>\\n{prompt}\\nASSISTANT:``, the image
tokens included) is masked out, so only the caption tokens and the end-of-sequence token are supervised. The result
is saved with ``save_pretrained`` (model and processor) as a normal transformers directory, which ``pixart caption``
runs like any released VLM::

    python experiments/shapesworld/train_captioner.py data/shapes/data-engine-32/labelled.jsonl \
        -o outputs/data-engine/captioner --hidden 128 --layers 2 --patch 8 --steps 1200 --threads 2
    pixart caption data/shapes/data-engine-32/alt.jsonl -m outputs/data-engine/captioner -o captions.jsonl \
        --prompt "Describe this image and its style in a very detailed manner" --max-new-tokens 48

``--eval-data`` (a manifest of other scenes) with ``--eval-scenes`` (their scenes file, from ``data_engine.py
data``) captions ``--eval-n`` of them after training through the same code as ``pixart caption`` and prints the
per-attribute accuracy of ``caption_accuracy.py`` with the model's size, as one JSON line on stdout.
Seeded and deterministic on one machine; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from caption_accuracy import accuracy, read_pairs

from pixart_cli.tiny import make_tiny_llava

PROMPT = "Describe this image and its style in a very detailed manner"  # the paper's LLaVA prompt


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_manifest(path: Path) -> list[tuple[Path, str]]:
    """(image path, caption) for each line of a JSONL manifest; paths are relative to the manifest's folder."""
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.append((path.parent / row["path"], row["caption"]))
    return rows


def conversation(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode(processor, rows: list[tuple[Path, str]], prompt: str) -> dict[str, torch.Tensor]:
    """Pixels, token ids, attention mask and labels (-100 except on the caption and its end token), right-padded."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    text = conversation(processor, prompt)
    images = [Image.open(path).convert("RGB") for path, _ in rows]
    prefix = processor(images=images[:1], text=[text], return_tensors="pt")["input_ids"][0]
    full = [f"{text} {caption}{tokenizer.eos_token}" for _, caption in rows]
    batch = processor(images=images, text=full, return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    if not torch.equal(ids[:, : len(prefix)], prefix.expand(len(rows), -1)):
        raise SystemExit("the conversation tokenizes differently before a caption: cannot mask it out")
    labels = ids.clone()
    labels[:, : len(prefix)] = -100  # the conversation and the image tokens: not supervised
    labels[batch["attention_mask"] == 0] = -100
    return {
        "pixel_values": batch["pixel_values"],
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "labels": labels,
    }


def build(args: argparse.Namespace, rows: list[tuple[Path, str]]) -> Path:
    """The untrained model and processor in ``args.output``: tokenizer trained on the captions and the prompt."""
    sentences = [caption for _, caption in rows] + [PROMPT, args.prompt, "USER: ASSISTANT:"]
    return make_tiny_llava(
        args.output,
        sentences,
        image_size=32,
        patch_size=args.patch,
        hidden_size=args.hidden,
        num_layers=args.layers,
        vocab_size=args.vocab,
        initializer_range=0.02,  # a model to train, not make_tiny_llava's default for telling random captions apart
        seed=args.seed,
    )


def train(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rows = read_manifest(args.data)
    if args.n:
        rows = rows[: args.n]
    build(args, rows)
    processor = AutoProcessor.from_pretrained(args.output)
    model = AutoModelForImageTextToText.from_pretrained(args.output, dtype=torch.float32)
    data = encode(processor, rows, args.prompt)
    tokens = int((data["labels"] != -100).sum())
    params = sum(p.numel() for p in model.parameters())
    log(f"{len(rows)} pairs, {tokens / len(rows):.1f} caption tokens each, sequences of {data['input_ids'].shape[1]}")
    log(f"model: hidden {args.hidden}, {args.layers} layers, patch {args.patch}: {params / 1e6:.2f} M parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = min(100, args.steps // 10)

    def lr_at(step: int) -> float:  # linear warmup, then a cosine to 0 at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    started, window_loss, window_steps, loss_value = time.monotonic(), 0.0, 0, float("nan")
    for step in range(args.steps):
        if len(order) < args.batch:  # epochs in a seeded order
            order = torch.cat([order, torch.randperm(len(rows), generator=generator)])
        index, order = order[: args.batch], order[args.batch :]
        length = int(data["attention_mask"][index].sum(1).max())  # cut the batch's own padding
        batch = {k: v[index] if k == "pixel_values" else v[index, :length] for k, v in data.items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window_loss += loss.item()
        window_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            loss_value = window_loss / window_steps
            rate = (step + 1) * args.batch / (time.monotonic() - started)
            lr = scheduler.get_last_lr()[0]
            log(f"step {step + 1}/{args.steps}  loss {loss_value:.4f}  lr {lr:.2e}  {rate:.0f} pairs/s")
            window_loss, window_steps = 0.0, 0
    seconds = time.monotonic() - started
    model.eval()
    model.save_pretrained(args.output)
    processor.tokenizer.padding_side = "left"  # as pixart caption sets it; saved as the model's default
    processor.save_pretrained(args.output)
    size = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file())
    return {
        "output": str(args.output),
        "hidden": args.hidden,
        "layers": args.layers,
        "patch": args.patch,
        "vocab": len(processor.tokenizer),
        "parameters": params,
        "size_mb": round(size / 1e6, 2),
        "pairs": len(rows),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "final_loss": round(loss_value, 4),
        "train_minutes": round(seconds / 60, 2),
    }


def evaluate(args: argparse.Namespace) -> dict:
    """Caption ``--eval-n`` scenes through pixart caption's model class and read them against their scenes."""
    from pixart_cli.captioning.vlm import VisionLanguageModel

    pairs = read_pairs(args.eval_data, args.eval_scenes, "caption", args.eval_skip, args.eval_n)
    names = {Path(scene["path"]).name for _, scene in pairs}
    rows = [r for r in read_manifest(args.eval_data) if r[0].name in names]
    vlm = VisionLanguageModel(args.output, dtype=torch.float32)
    started, captions = time.monotonic(), []
    for start in range(0, len(rows), 64):
        images = [Image.open(path).convert("RGB") for path, _ in rows[start : start + 64]]
        captions += vlm.caption(images, args.prompt, args.max_new_tokens)
    by_name = dict(zip((path.name for path, _ in rows), captions, strict=True))
    result = accuracy([(by_name[Path(scene["path"]).name], scene) for _, scene in pairs])
    result["images_per_s"] = round(len(rows) / (time.monotonic() - started), 1)
    for (path, _), text in list(zip(rows, captions, strict=True))[:3]:
        log(f"{path.name}: {text}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a JSONL manifest of (image, dense caption): the labelled subset")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the captioner directory to write")
    parser.add_argument("-n", type=int, default=None, help="train on the first N pairs only")
    parser.add_argument("--hidden", type=int, default=128, help="width of the vision tower and the language model")
    parser.add_argument("--layers", type=int, default=2, help="layers of each")
    parser.add_argument("--patch", type=int, default=8, help="vision patch size (32-px images)")
    parser.add_argument("--vocab", type=int, default=512, help="BPE vocabulary bound")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-data", type=Path, default=None, help="a manifest of scenes to caption after training")
    parser.add_argument("--eval-scenes", type=Path, default=None, help="their scenes file (data_engine.py data)")
    parser.add_argument("--eval-skip", type=int, default=0, help="leave out the first N scenes (the training ones)")
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"{args.output} exists and is not empty")
    row = train(args)
    if args.eval_data is not None:
        if args.eval_scenes is None:
            parser.error("--eval-data needs --eval-scenes")
        row["accuracy"] = evaluate(args)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
