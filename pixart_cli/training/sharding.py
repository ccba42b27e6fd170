"""Fully sharded data parallelism (``cluster.strategy: fsdp``) through accelerate's FSDP2 plugin.

Each transformer block (``PixArtBlock`` / ``DiTBlock``) is one ``fully_shard`` unit, so a process holds 1/N of
the weights, gradients, optimiser moments and EMA, and gathers one block's weights at a time. Checkpoints are
gathered into the ordinary directory (``model.safetensors``, ``ema.safetensors``, the optimiser state keyed by
parameter name), or with ``output.checkpoint: sharded`` written by each process as its own shard
(``checkpoints.sharded``); either is read as any checkpoint, and a run may resume under either strategy.

accelerate turns FSDP on only for accelerators: a multi-process CPU launch (gloo) gets DDP with no word said
(accelerate/state.py sets ``DistributedType.FSDP`` for MULTI_GPU-like types only). FSDP2 itself runs on gloo, so
:func:`make_fsdp_accelerator` sets the distributed type itself there — which is what lets CPU tests prove that
FSDP trains exactly what DDP trains.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from pixart_cli.checkpoints.sharded import local_tensors, read_layout, read_shard, shard_name, split, write_shard
from pixart_cli.errors import PixartError
from pixart_cli.training.ema import EMA


def make_fsdp_accelerator(mixed_precision: str, cpu: bool, block: str, **kwargs: Any) -> Any:
    """An Accelerator that shards with FSDP2, one unit per module of class ``block``."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[block],
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,  # every process builds the same initial weights (seeded) and shards them
    )
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, fsdp_plugin=plugin, **kwargs)
    if cpu and acc.num_processes > 1 and acc.distributed_type != DistributedType.FSDP:
        # Both states: every AcceleratorState() copies the type from PartialState again.
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
    return acc


def describe_shards(model: nn.Module, processes: int) -> str:
    """This process's share of the weights, in words (a shard is a DTensor's local part)."""
    mine = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())
    return f"this process holds {mine:,} of {whole:,} weights ({processes} processes, one unit per block)"


def is_sharded(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _full(options_only: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not options_only)


class PlainState:
    """Whole state dicts of an unsharded model (one process, or DDP: every process holds everything)."""

    sharded = False

    def model(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in model.state_dict().items()}

    def ema(self, model: nn.Module, ema: EMA) -> dict[str, torch.Tensor]:
        return ema.state_dict(model)

    def optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_model(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state_dict, strict=True)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        optimizer.load_state_dict(by_index(state_dict, model))


class ShardedState(PlainState):
    """Whole state dicts gathered from (and scattered back to) an FSDP2 model: collective calls, every process
    takes part; the main process receives the tensors (on the CPU), the others empty dicts. Sharded checkpoints
    (``output.checkpoint: sharded``) skip the gathering: each process writes and reads its own rows."""

    sharded = True

    def __init__(self, acc: Any) -> None:
        self.acc, self.rank, self.world = acc, acc.process_index, acc.num_processes

    def agree(self, problem: str) -> None:
        """Every process raises if any had a problem (one alone would leave the others waiting for it)."""
        flag = torch.tensor([1.0 if problem else 0.0], device=self.acc.device)
        if float(self.acc.reduce(flag, "sum")) > 0:
            raise PixartError(problem or "another process of the run failed here (its own error says why)")

    def write_shards(
        self, staging: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, list[int]], list[dict]]:
        """Write this process's shard into ``staging`` (every process; the main one makes the folder first, on a
        file system all of them see); returns the layout and the optimiser's groups by name, for ``shards.json``."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        problem = ""
        if self.rank == 0:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as exc:
                problem = f"cannot write checkpoint shards to {staging} ({exc.strerror})"
        self.agree(problem)
        tensors, whole = local_tensors(model, ema, optimizer, self.rank)
        try:
            write_shard(staging, self.rank, self.world, tensors)
        except (OSError, SafetensorError) as exc:
            problem = (
                f"process {self.rank} cannot write its checkpoint shard to {staging} ({exc})" if staging.is_dir()
                else f"process {self.rank} does not see {staging}: sharded checkpoints need one shared file system"
            )  # fmt: skip
        self.agree(problem)
        names = {p: n for n, p in model.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
                  for g in optimizer.param_groups]  # fmt: skip
        return whole, groups

    def read_own_shard(self, checkpoint: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> bool:
        """Load this process's rows from a sharded checkpoint written by as many processes; False when it was
        written by another number (the caller then reads the whole checkpoint and re-shards it)."""
        layout = read_layout(checkpoint)
        if layout["world_size"] != self.world:
            return False
        problem, tensors = "", {}
        expected = {f"model.{k}": v for k, v in model.state_dict().items()}
        expected.update({f"ema.{n}": v for n, v in zip(ema.names, ema.params, strict=True)})
        try:
            tensors = read_shard(checkpoint, self.rank, self.world)
            for key, value in expected.items():
                local = value.to_local() if hasattr(value, "to_local") else value
                if key not in tensors or tensors[key].shape != local.shape:
                    raise PixartError(f"{checkpoint / shard_name(self.rank, self.world)}: {key} missing or misshapen")
        except PixartError as exc:
            problem = str(exc)
        self.agree(problem)  # a damaged shard sets the checkpoint aside on every process alike
        sharded = layout["sharded"]
        with torch.no_grad():
            for key, value in model.state_dict().items():
                (value.to_local() if hasattr(value, "to_local") else value).copy_(tensors[f"model.{key}"])
            for name, value in zip(ema.names, ema.params, strict=True):
                (value.to_local() if hasattr(value, "to_local") else value).copy_(tensors[f"ema.{name}"])
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        index = {name: i for i, (name, _) in enumerate(trained)}
        state = {}
        for i, (name, param) in enumerate(trained):
            per_param = split(tensors, f"optim.{name}")
            state[i] = {
                key: _like(value, param) if f"optim.{name}.{key}" in sharded else value
                for key, value in per_param.items()
            }
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in layout["param_groups"]]
        optimizer.load_state_dict({"state": {i: v for i, v in state.items() if v}, "param_groups": groups})
        return True

    def model(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full())

    def ema(self, model: nn.Module, ema: EMA) -> dict[str, torch.Tensor]:
        state = self.model(model)
        averaged = {name: p.full_tensor().cpu() for name, p in zip(ema.names, ema.params, strict=True)}
        return {**state, **averaged} if state else {}

    def optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # cpu_offload leaves the step counters shared with the live optimiser: copy before anything keeps them.
        return copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=_full()))

    def load_model(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, dict(state_dict), options=_full(options_only=True))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        named = copy.deepcopy(by_name(state_dict, model))  # the call turns the values into shards in place
        set_optimizer_state_dict(model, optimizer, named, options=_full(options_only=True))


def state_io(acc: Any) -> PlainState:
    return ShardedState(acc) if is_sharded(acc) else PlainState()


def _like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A DTensor placed as ``param`` from this process's rows ``local``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.to(param.device), param.device_mesh, param.placements, run_check=False, shape=param.shape,
        stride=param.stride(),
    )  # fmt: skip


def shard_ema_like(ema: EMA, model: nn.Module) -> None:
    """Give each EMA tensor the placement of its (sharded) parameter: the average is sharded as the weights are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    trained = [p for p in model.parameters() if p.requires_grad]
    ema.params = [
        distribute_tensor(e.to(p.device), p.device_mesh, p.placements) if isinstance(p, DTensor) else e
        for e, p in zip(ema.params, trained, strict=True)
    ]


# The optimiser's state dict names a parameter by its position among the trained ones (torch's own state_dict) or
# by its name (torch.distributed.checkpoint's, which FSDP needs); a checkpoint holds either, and resumes either way.
def _trained_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def by_name(state_dict: dict, model: nn.Module) -> dict:
    if not _keyed_by_index(state_dict):
        return state_dict
    names = _trained_names(model)
    return {
        "state": {names[i]: value for i, value in state_dict["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state_dict["param_groups"]],
    }


def by_index(state_dict: dict, model: nn.Module) -> dict:
    if _keyed_by_index(state_dict):
        return state_dict
    index = {name: i for i, name in enumerate(_trained_names(model))}
    return {
        "state": {index[name]: value for name, value in state_dict["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state_dict["param_groups"]],
    }


def _keyed_by_index(state_dict: dict) -> bool:
    groups = state_dict.get("param_groups") or [{}]
    params = [p for g in groups for p in g.get("params", [])]
    return all(isinstance(p, int) for p in params)
