"""Copy trained ShapesWorld weights into the package's assets: EMA weights only, in fp16 (half the bytes).

A checkpoint without EMA weights is taken to be an export of them (`pixart convert RUN -o DIR --ema`).

    python scripts/ship_shapes_assets.py dit outputs/shapes-stage1 --note "1000 steps on 2 CPU cores"
    python scripts/ship_shapes_assets.py demo outputs/shapes-experiments/dit-dense-seed0 --note "..."
    python scripts/ship_shapes_assets.py demo RUN --text-encoder builtin:shapes-t5-roles --note "..."

``dit`` writes ``pixart_cli/shapesworld/assets/shapes-dit`` (the stage-1 class-conditional DiT, DiT's own key
layout in safetensors), ``demo`` writes ``pixart_cli/shapesworld/assets/shapes-demo`` (the default model of
``pixart sample``). A run directory stands for its latest checkpoint. The assets of the repository must stay within
30 MB in all.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from pixart_cli.checkpoints.format import Checkpoint, latest_in_run, load_checkpoint, save_checkpoint
from pixart_cli.components.resolve import ASSETS
from pixart_cli.models import DiTConfig, PixArtConfig

BUDGET_MB = 30.0


def ship(kind: str, run: str, note: str, text_encoder: str | None = None) -> Path:
    source = latest_in_run(run)
    checkpoint = load_checkpoint(source)
    expected = DiTConfig if kind == "dit" else PixArtConfig
    if not isinstance(checkpoint.config, expected):
        raise SystemExit(f"{source}: a {type(checkpoint.config).__name__} checkpoint, expected {expected.__name__}")
    # A training checkpoint holds EMA weights; an exported one (`pixart convert --ema`) already is them.
    ema = checkpoint.ema_state_dict is not None
    weights = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in checkpoint.weights(ema).items()}
    meta = dataclasses.replace(checkpoint.meta, source=f"{checkpoint.meta.source}; EMA weights in fp16; {note}")
    if text_encoder is not None:  # e.g. a run that read a local copy of a builtin T5
        meta = dataclasses.replace(meta, text_encoder=text_encoder)
    if kind == "demo":  # trained on ShapesWorld captions, whatever the run recorded (older runs record nothing)
        meta = dataclasses.replace(meta, prompt_completion="shapesworld")
    target = save_checkpoint(
        Checkpoint(checkpoint.config, weights, None, meta), ASSETS / f"shapes-{kind}", overwrite=True
    )
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file()) / 2**20
    print(f"{source} → {target}; assets now {total:.1f} MB (budget {BUDGET_MB:.0f} MB)")
    if total > BUDGET_MB:
        raise SystemExit(f"the assets are over budget: {total:.1f} MB")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["dit", "demo"])
    parser.add_argument("run", help="a training run directory or checkpoint directory")
    parser.add_argument("--note", default="", help="how it was trained (kept in config.yaml)")
    parser.add_argument("--text-encoder", help="record this text encoder instead, e.g. builtin:shapes-t5-roles")
    args = parser.parse_args()
    ship(args.kind, args.run, args.note, args.text_encoder)


if __name__ == "__main__":
    main()
