"""Can the relation in a two-object caption be read from its text features? A probe on the frozen encoder.

The denoiser reads captions only through cross-attention to the text encoder's features. This trains a small
cross-attention probe — a query built from one object's colour attends over the caption's token features — to
name where that object is relative to the other (left of / right of / above / below), and reports accuracy on
fresh training-split captions and on the held-out arrangements ShapesBench asks for. If a probe trained for this
alone cannot read the relation, the denoiser cannot either, however long it trains.

Feature sources compared: the encoder's output (what the denoiser sees), its token embeddings alone (no word
order: a floor), and the embeddings plus absolute position codes (word order given for free: a ceiling).

    python experiments/shapesworld/text_relation_probe.py                     # builtin:shapes-t5
    python experiments/shapesworld/text_relation_probe.py --encoder DIR --train 20000 --epochs 8
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from pixart_cli.components.text import TextEncoder
from pixart_cli.shapesworld.demo import SHAPES_T5
from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import COLOUR_NAMES, HELDOUT_ARRANGEMENTS, RELATIONS, arrangement, sample_scene

SOURCES = ("embeddings", "embeddings+position", "encoder")


def relation_items(n: int, seed: int, *, heldout: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Dense two-object captions, the query colour (index) and the query object's relation to the other."""
    texts, colours, labels = [], [], []
    i = 0
    while len(texts) < n:
        scene = sample_scene(seed * 1_000_003 + i, num_objects=2, split="all" if heldout else "train")
        i += 1
        a, b = scene.objects
        if heldout and arrangement(a.colour, scene.relation(0, 1), b.colour) not in HELDOUT_ARRANGEMENTS:
            continue
        q = i % 2  # ask about either object
        texts.append(caption(scene, "dense", seed=seed * 1_000_003 + i))
        colours.append(COLOUR_NAMES.index(scene.objects[q].colour))
        labels.append(RELATIONS.index(scene.relation(q, 1 - q)))
    return texts, torch.tensor(colours), torch.tensor(labels)


class Probe(nn.Module):
    """Two rounds of multi-head cross-attention from a colour query over the token features, then a classifier."""

    def __init__(self, width: int, hidden: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.query = nn.Embedding(len(COLOUR_NAMES), hidden)
        self.proj = nn.Linear(width, hidden)
        self.attn = nn.ModuleList(nn.MultiheadAttention(hidden, heads, batch_first=True) for _ in range(2))
        self.norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, len(RELATIONS)))

    def forward(self, features: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        kv = self.proj(features)
        q = self.query(colour)[:, None]
        for attn, norm in zip(self.attn, self.norm, strict=True):
            q = q + attn(norm(q), kv, kv, key_padding_mask=~mask.bool())[0]
        return self.head(q[:, 0])


def _positions(length: int, width: int) -> torch.Tensor:
    pos = torch.arange(length)[:, None]
    freq = torch.exp(torch.arange(0, width, 2) * (-math.log(10_000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


def features(encoder: TextEncoder, texts: list[str], source: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encoder.tokenize(texts)
    with torch.no_grad():
        if source == "encoder":
            out = encoder.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            out = encoder.encoder.get_input_embeddings()(ids)
            if source == "embeddings+position":
                out = out + out.std() * _positions(ids.shape[1], out.shape[-1])
    return out.float(), mask


def train_probe(train, tests, *, epochs: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    (x, m, c, y) = train
    probe = Probe(x.shape[-1])
    optimiser = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(128):
            loss = nn.functional.cross_entropy(probe(x[idx], m[idx], c[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return [(probe(tx, tm, tc).argmax(-1) == ty).float().mean().item() for tx, tm, tc, ty in tests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default=SHAPES_T5, help="T5 directory or builtin name")
    parser.add_argument("--train", type=int, default=12_000, help="training captions")
    parser.add_argument("--test", type=int, default=2_000, help="captions in each test set")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default=",".join(SOURCES), help=f"comma-separated, of: {', '.join(SOURCES)}")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    encoder = TextEncoder(args.encoder, max_length=64).load()
    sets = {
        "train": relation_items(args.train, 1, heldout=False),
        "fresh": relation_items(args.test, 2, heldout=False),
        "held-out arrangements": relation_items(args.test, 3, heldout=True),
    }
    print(f"{'features':<22} {'fresh captions':>15} {'held-out arrangements':>22}   (chance 0.25)")
    for source in args.features.split(","):
        built = {k: (*features(encoder, texts, source), c, y) for k, (texts, c, y) in sets.items()}
        fresh, held = train_probe(
            built["train"], [built["fresh"], built["held-out arrangements"]], epochs=args.epochs, seed=args.seed
        )
        print(f"{source:<22} {fresh:>15.3f} {held:>22.3f}", flush=True)


if __name__ == "__main__":
    main()
