"""A quick offline check of an installation: tiny random models through the toolkit's core identities.

Each check compares against an independent computation (diffusers' PixArtTransformer2DModel, the DiT forward),
so a broken install, a wrong torch build or a regression shows up in seconds without any download.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pixart_cli.checkpoints.convert import convert
from pixart_cli.checkpoints.format import Checkpoint, instantiate, load_checkpoint, save_checkpoint
from pixart_cli.checkpoints.init_from_dit import init_from_dit
from pixart_cli.models import DiT, DiTConfig, PixArtConfig, build_pixart


@dataclass(frozen=True)
class CheckResult:
    name: str
    value: float  # max abs difference
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.value <= self.tolerance


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _init_from_dit(workdir: Path) -> float:
    config = DiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)
    dit = _randomize(DiT(config), 0)
    torch.save(dit.state_dict(), workdir / "dit.pt")
    save_checkpoint(init_from_dit(workdir / "dit.pt", caption_channels=16, max_length=6, num_heads=4), workdir / "px")
    pixart = instantiate(load_checkpoint(workdir / "px"))
    g = torch.Generator().manual_seed(1)
    x, caption = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        return (pixart(x, t, caption) - dit(x, t, torch.full((2,), 10))).abs().max().item()


def _diffusers_parity(workdir: Path) -> float:
    from diffusers import PixArtTransformer2DModel  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)

    config = PixArtConfig(
        depth=2,
        hidden_size=48,
        num_heads=4,
        input_size=8,
        caption_channels=16,
        max_length=6,
        multi_scale=True,
        interpolation_scale=2.0,
    )
    ours = _randomize(build_pixart(config), 2)
    save_checkpoint(Checkpoint(config, ours.state_dict()), workdir / "ms")
    convert(workdir / "ms", workdir / "hf", "diffusers")
    theirs = PixArtTransformer2DModel.from_pretrained(workdir / "hf").eval()
    g = torch.Generator().manual_seed(3)
    x, caption = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    t, res, ar = torch.tensor([3.0, 900.0]), torch.tensor([[64.0, 96.0]] * 2), torch.tensor([[64 / 96]] * 2)
    with torch.no_grad():
        a = ours(x, t, caption, mask, resolution=res, aspect_ratio=ar)
        b = theirs(
            x,
            encoder_hidden_states=caption,
            timestep=t,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": res, "aspect_ratio": ar},
        ).sample
    return (a - b).abs().max().item()


CHECKS: list[tuple[str, Callable[[Path], float], float]] = [
    ("init-from-dit: PixArt(t=500, any caption) = DiT(t=500, null class)", _init_from_dit, 1e-5),
    ("convert → diffusers: same output (multi-scale, non-square, padded captions)", _diffusers_parity, 1e-5),
]


def run_selfcheck(on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="pixart-selfcheck-") as tmp:
        for name, check, tolerance in CHECKS:
            workdir = Path(tmp) / str(len(results))
            workdir.mkdir()
            result = CheckResult(name, check(workdir), tolerance)
            results.append(result)
            if on_result:
                on_result(result)
    return results
