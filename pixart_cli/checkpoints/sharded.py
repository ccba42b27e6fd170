"""Sharded training checkpoints: each process of an FSDP run writes only the rows it holds.

A sharded checkpoint directory is self-describing and needs no process group to read::

    step-0001000/
        config.yaml  recipe.yaml  position.json  training_state.pt    # as every training checkpoint
        shards.json                                                   # the layout below
        shard-00000-of-00004.safetensors ... shard-00003-of-00004.safetensors

Shard ``r`` holds process ``r``'s rows of every sharded tensor — ``model.<name>``, ``ema.<name>``,
``optim.<name>.<state>`` (FSDP2 shards each parameter along dim 0 in ``torch.chunk``'s pieces, so the whole
tensor is the shards concatenated in rank order) — and every shard the small unsharded ones (buffers, the
optimiser's step counters). ``shards.json`` names which tensors are sharded and their whole shapes. Only
safetensors and JSON: nothing is unpickled beyond ``training_state.pt``'s plain tensors (``weights_only``).

``pixart sample``, ``pixart convert`` and ``model.init`` read such a directory as the whole checkpoint
(:func:`read_sharded` concatenates); a resumed run with as many processes reads only its own shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pixart_cli.errors import PixartError

SHARDS_FILE = "shards.json"
FORMAT = "pixart-sharded-1"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def is_sharded_dir(path: str | Path) -> bool:
    return (Path(path) / SHARDS_FILE).is_file()


def local_tensors(model: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer, rank: int):
    """This process's tensors of a sharded model, EMA and optimiser, keyed as in a shard file, and the layout
    (sharded names → whole shape) that ``shards.json`` records."""
    tensors: dict[str, torch.Tensor] = {}
    whole: dict[str, list[int]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        if hasattr(value, "to_local"):
            tensors[key] = value.to_local().detach().cpu().contiguous()
            whole[key] = list(value.shape)
        else:  # small and equal everywhere (buffers, step counters): in every shard, so each reads back alone
            tensors[key] = value.detach().cpu().contiguous()

    names = {p: n for n, p in model.named_parameters()}
    for key, value in model.state_dict().items():
        add(f"model.{key}", value)
    for name, value in zip(ema.names, ema.params, strict=True):
        add(f"ema.{name}", value)
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                add(f"optim.{names[param]}.{key}", value)
    return tensors, whole


def write_shard(directory: Path, rank: int, world: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(directory / shard_name(rank, world)))


def write_layout(directory: Path, world: int, whole: dict[str, list[int]], param_groups: list[dict]) -> None:
    """``shards.json``: the format, the number of shards, which tensors are sharded (and their whole shapes), and
    the optimiser's hyper-parameters by group (parameters by name)."""
    layout = {"format": FORMAT, "world_size": world, "sharded": whole, "param_groups": param_groups}
    (directory / SHARDS_FILE).write_text(json.dumps(layout, indent=1))


def read_layout(directory: Path) -> dict:
    """``shards.json``, checked: a PixartError naming the file for anything not of the layout above."""
    path = directory / SHARDS_FILE
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PixartError(f"{path}: not a sharded checkpoint layout ({exc})") from None
    world = layout.get("world_size") if isinstance(layout, dict) else None
    well_formed = (
        isinstance(layout, dict)
        and layout.get("format") == FORMAT
        and isinstance(world, int) and not isinstance(world, bool) and world >= 1
        and isinstance(layout.get("sharded"), dict)
        and all(isinstance(v, list) and all(isinstance(n, int) for n in v) for v in layout["sharded"].values())
        and isinstance(layout.get("param_groups"), list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in layout["param_groups"])
    )  # fmt: skip
    if not well_formed:
        raise PixartError(f"{path}: not a sharded checkpoint layout of format {FORMAT}")
    return layout


def read_shard(directory: Path, rank: int, world: int, prefixes: tuple[str, ...] | None = None) -> dict:
    """One process's tensors (those whose key starts with one of ``prefixes``: all by default)."""
    path = directory / shard_name(rank, world)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if prefixes is None or k.startswith(prefixes)}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise PixartError(f"{path}: not a readable shard ({exc})") from None


def read_sharded(directory: str | Path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint (under ``prefixes``), whole: sharded ones concatenated along dim 0 in
    rank order, the others as shard 0 holds them. One shard is read at a time."""
    directory = Path(directory)
    layout = read_layout(directory)
    world, sharded = layout["world_size"], layout["sharded"]
    pieces: dict[str, list[torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for rank in range(world):
        for key, value in read_shard(directory, rank, world, prefixes).items():
            if key in sharded:
                pieces.setdefault(key, []).append(value)
            elif rank == 0:
                out[key] = value
    for key, parts in pieces.items():
        try:
            out[key] = torch.cat(parts)
        except RuntimeError:
            out[key] = torch.empty(0)  # the shape check below names it
        if len(parts) != world or list(out[key].shape) != sharded[key]:
            raise PixartError(f"{directory}: the shards of {key} do not make its shape {sharded[key]}")
    return out


def read_sharded_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's state dict, the EMA of its trained weights) of a sharded checkpoint, whole; a PixartError when
    the shards hold no EMA (it is never restarted from the raw weights unsaid)."""
    tensors = read_sharded(directory, ("model.", "ema."))
    state_dict, averaged = split(tensors, "model"), split(tensors, "ema")
    if not averaged or not averaged.keys() <= state_dict.keys():
        raise PixartError(f"{directory}: the shards hold no EMA of the model's weights")
    return state_dict, averaged


def split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix taken off."""
    return {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


def optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    """The optimiser's state dict keyed by parameter name, from a checkpoint's ``optim.<name>.<key>`` tensors."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    names = [name for group in param_groups for name in group["params"]]
    for name in names:
        per_param = split(tensors, f"optim.{name}")
        if per_param:
            state[name] = per_param
    return {"state": state, "param_groups": param_groups}
