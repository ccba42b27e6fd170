"""Initialise a PixArt-α model from a class-conditional DiT by the paper's re-parameterisation.

PixArt replaces DiT's per-block adaLN MLPs with one shared ``t_block`` plus a learned table per block
(adaLN-single). The paper initialises the tables so that, at one chosen timestep t* (500) and without class
conditioning, every block receives exactly the modulation DiT computes. With c* = t_emb(t*) + y_emb(null):

* copy ``x_embedder``, ``t_embedder``, self-attention, MLPs and ``final_layer.linear`` from DiT;
* ``t_block`` = the mean over blocks of DiT's ``adaLN_modulation.1`` (weight and bias) — our choice; the official
  repository has no code for this step. With it, the modulation of block i at another t differs from DiT's by
  (W_i − W̄)·(SiLU(t_emb(t)) − SiLU(t_emb(t*))): every block starts with the average block's response to time
  rather than none (a zero ``t_block`` would freeze the modulation at its t* value);
* ``blocks.i.scale_shift_table`` = adaLN_i(c*) − t_block(t_emb(t*)), reshaped (6, hidden);
* ``final_layer.scale_shift_table`` = final_adaLN(c*) − t_emb(t*), reshaped (2, hidden);
* cross-attention output projections are zero (so the caption has no effect yet), the caption projection,
  cross-attention q/kv and the null caption are freshly initialised (seeded); DiT's class table and adaLN
  weights are dropped.

Then PixArt(x, t*, any caption) = DiT(x, t*, null class) exactly (up to float rounding; computed in float64).
DiT's released weights are licensed CC-BY-NC 4.0; models initialised from them inherit that licence.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from pixart_cli.checkpoints.format import (
    Checkpoint,
    CheckpointMeta,
    check_state_dict,
    is_checkpoint_dir,
    latest_in_run,
    load_checkpoint,
)
from pixart_cli.errors import PixartError
from pixart_cli.io import load_torch_file
from pixart_cli.models import DiTConfig, PixArtConfig, build_pixart, heads_for_width
from pixart_cli.models.layers import FREQUENCY_EMBEDDING_SIZE, sincos_pos_embed_2d, timestep_embedding

StateDict = dict[str, torch.Tensor]

# DiT keys that have no PixArt counterpart: consumed by the re-parameterisation, then dropped.
DIT_CONSUMED = ("y_embedder.embedding_table.weight", "pos_embed", "adaLN_modulation")


def read_dit(path: str | Path, num_heads: int | None = None) -> tuple[StateDict, DiTConfig]:
    """A DiT state dict (raw, DiT ``train.py`` checkpoint → its ``ema``, or our DiT directory) and its config."""
    path = latest_in_run(path)
    if path.is_dir():
        if not is_checkpoint_dir(path):
            raise PixartError(f"{path}: not a DiT checkpoint file or pixart checkpoint directory")
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.config, DiTConfig):
            raise PixartError(f"{path}: a PixArt checkpoint, not a DiT one")
        if num_heads is not None and num_heads != ckpt.config.num_heads:
            raise PixartError(f"--num-heads {num_heads}: {path} records {ckpt.config.num_heads} heads (leave it out)")
        check_dit_pos_embed(ckpt.weights(), ckpt.config, str(path))
        return ckpt.weights(), ckpt.config
    obj = load_torch_file(path)
    if isinstance(obj, dict) and "ema" in obj and "model" in obj:
        obj = obj["ema"]  # DiT's train.py: {"model", "ema", "opt", "args"}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PixartError(f"{path}: not a DiT checkpoint (expected a state dict of tensors)")
    state_dict = {k.removeprefix("module."): v for k, v in obj.items()}
    if "y_embedder.y_proj.fc1.weight" in state_dict:
        raise PixartError(f"{path}: already a PixArt checkpoint (use `pixart convert`)")
    config = dit_config_from_weights(state_dict, num_heads, str(path))
    check_state_dict(state_dict, config, str(path))
    check_dit_pos_embed(state_dict, config, str(path))
    return state_dict, config


def check_dit_pos_embed(state_dict: StateDict, config: DiTConfig, what: str) -> None:
    """DiT stores its fixed sin-cos ``pos_embed``; PixArt recomputes its own, which equals DiT's only if the stored
    one is the standard embedding for this grid. Check that rather than drop it unread (as ``pixart convert`` does
    for PixArt's)."""
    g = config.grid_size
    expected = sincos_pos_embed_2d(config.hidden_size, g, g, base_size=g)[None]
    stored = state_dict["pos_embed"]
    if stored.shape != expected.shape or (stored.float() - expected).abs().max() > 1e-3:
        raise PixartError(
            f"{what}: stored pos_embed is not the sin-cos embedding of a {g}×{g} grid, so the PixArt made from it "
            "would not see positions as this DiT did"
        )


def dit_config_from_weights(state_dict: StateDict, num_heads: int | None, what: str) -> DiTConfig:
    required = (
        "x_embedder.proj.weight",
        "final_layer.linear.weight",
        "y_embedder.embedding_table.weight",
        "pos_embed",
        "blocks.0.mlp.fc1.weight",
    )
    for key in required:
        if key not in state_dict:
            raise PixartError(f"{what}: missing key {key} (is this a DiT checkpoint?)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    tokens = state_dict["pos_embed"].shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens or out_channels not in (in_channels, 2 * in_channels):
        raise PixartError(f"{what}: inconsistent DiT shapes (pos_embed {tokens} tokens, {out_channels} outputs)")
    heads = num_heads or heads_for_width(hidden)
    if heads is None:
        raise PixartError(f"{what}: width {hidden} is not a DiT family size; pass --num-heads")
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.attn\.qkv\.weight$", k))})
    try:
        return DiTConfig(
            depth=depth,
            hidden_size=hidden,
            num_heads=heads,
            patch_size=patch,
            input_size=side * patch,
            in_channels=in_channels,
            learn_sigma=out_channels == 2 * in_channels,
            mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
            num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        )
    except ValueError as exc:
        raise PixartError(f"{what}: inconsistent DiT shapes ({exc})") from None


def _linear(sd: StateDict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].double().T + sd[f"{name}.bias"].double()


def reparameterise(
    dit: StateDict,
    config: DiTConfig,
    t: float = 500.0,
    caption_channels: int = 4096,
    max_length: int = 120,
    seed: int = 0,
) -> tuple[StateDict, PixArtConfig]:
    """PixArt weights that compute DiT(x, t, null class) at timestep ``t`` for any caption (module docstring)."""
    if not 0 <= t < 1000:
        raise PixartError(f"--t {t}: the timestep must be in [0, 1000)")
    pixart_config = PixArtConfig(
        depth=config.depth,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        patch_size=config.patch_size,
        input_size=config.input_size,
        in_channels=config.in_channels,
        learn_sigma=config.learn_sigma,
        prediction_type=config.prediction_type,
        mlp_ratio=config.mlp_ratio,
        caption_channels=caption_channels,
        max_length=max_length,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_pixart(pixart_config).state_dict()  # official init for the new (caption) parts
    dtype = dit["t_embedder.mlp.0.weight"].dtype
    h = config.hidden_size

    # Conditioning at t: DiT's c* and PixArt's shared timestep embedding, in float64.
    t_freq = timestep_embedding(torch.tensor([t]), FREQUENCY_EMBEDDING_SIZE).double()
    t_emb = _linear(dit, "t_embedder.mlp.2", F.silu(_linear(dit, "t_embedder.mlp.0", t_freq)))
    c = t_emb + dit["y_embedder.embedding_table.weight"][config.num_classes].double()

    adaln_w = torch.stack([dit[f"blocks.{i}.adaLN_modulation.1.weight"].double() for i in range(config.depth)])
    adaln_b = torch.stack([dit[f"blocks.{i}.adaLN_modulation.1.bias"].double() for i in range(config.depth)])
    t_block_w, t_block_b = adaln_w.mean(0), adaln_b.mean(0)
    t0 = F.silu(t_emb) @ t_block_w.T + t_block_b

    out: StateDict = {}
    copied = [k for k in dit if not k.startswith(DIT_CONSUMED) and "adaLN_modulation" not in k]
    for key in copied:
        out[key] = dit[key].clone()
    out["t_block.1.weight"] = t_block_w.to(dtype)
    out["t_block.1.bias"] = t_block_b.to(dtype)
    for i in range(config.depth):
        modulation = F.silu(c) @ adaln_w[i].T + adaln_b[i]
        out[f"blocks.{i}.scale_shift_table"] = (modulation - t0).view(6, h).to(dtype)
    final = _linear(dit, "final_layer.adaLN_modulation.1", F.silu(c))
    out["final_layer.scale_shift_table"] = (final.view(2, h) - t_emb).to(dtype)
    for key, value in fresh.items():  # caption path: fresh init, cross-attention output projections zero
        if key not in out:
            out[key] = value.to(dtype)
    for i in range(config.depth):
        out[f"blocks.{i}.cross_attn.proj.weight"].zero_()
        out[f"blocks.{i}.cross_attn.proj.bias"].zero_()
    check_state_dict(out, pixart_config, "re-parameterised weights")
    return out, pixart_config


def in_dit_release_format(src: str | Path) -> bool:
    """Whether ``src`` is a file in DiT's own formats (a raw state dict, a DiT ``train.py`` checkpoint): the form of
    DiT's released weights, whose CC-BY-NC 4.0 licence a model initialised from them inherits. Our checkpoint
    directories (``builtin:shapes-dit``, a stage-1 run) hold models trained here, so no licence note is due."""
    return latest_in_run(src).is_file()


def init_from_dit(
    src: str | Path,
    t: float = 500.0,
    caption_channels: int = 4096,
    max_length: int = 120,
    num_heads: int | None = None,
    seed: int = 0,
) -> Checkpoint:
    """Read a DiT checkpoint and return the re-parameterised PixArt checkpoint (not yet saved)."""
    dit, config = read_dit(src, num_heads)
    weights, pixart_config = reparameterise(dit, config, t, caption_channels, max_length, seed)
    meta = CheckpointMeta(source=f"init-from-dit of {Path(src).name} at t={t:g}")
    return Checkpoint(pixart_config, weights, None, meta)
