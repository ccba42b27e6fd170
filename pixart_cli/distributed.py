"""Processes launched together by ``torchrun`` or ``accelerate launch``: which one this is, and how they meet.

Commands that split a job between processes (``pixart caption``, ``pixart prepare``) need no collective beyond a
barrier: each process writes its own share of files and one process merges them. A CPU ``gloo`` group is enough
for that on any machine, and it never touches the accelerator the process computes on.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch

# How long a process waits at a barrier for the others. Each wait is the others' share of work (the shard plan on
# process 0, the last shard of another process), which can be long; a process that dies is stopped by the
# launcher (torchrun ends the others when one fails), so this is only the backstop for a launcher that does not.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)

# gloo's worker threads (torch 2.13) release each finished collective after its caller has woken, and the release
# takes the GIL. A process that exits in that moment aborts ("terminate called without an active exception": 12 of
# 70 four-process CPU launches on two cores), and one that destroys its group then, the GIL held, waits forever. A
# pause without the GIL before leaving lets the threads finish: 0 of 100 (experiments/2026-12-07-gloo-teardown).
GLOO_DRAIN_SECONDS = 0.5


@dataclass(frozen=True)
class Dist:
    """This process's place among the processes launched together (``torchrun``/``accelerate launch`` set it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Dist:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device | str) -> torch.device:
        """Where this process computes: a bare ``cuda`` means this process's own GPU, ``cuda:LOCAL_RANK``, when
        several processes share a machine; an explicit index (``cuda:1``) or another device is kept."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.world == 1:
            return
        if not torch.distributed.is_initialized():
            # CPU-only sync: no tensors travel, any launch works.
            torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group (a group left open aborts the interpreter at exit)."""
        if self.world > 1:
            leave_process_group()


def leave_process_group(destroy: bool = True) -> None:
    """Leave this process's default process group, if it has one, once gloo's threads are idle.

    Every multi-process command ends here: the library at the end of its work (after a last barrier, ``destroy``),
    and the CLI on any other way out (an error, an interrupt: ``destroy=False``, only the pause, since collectives
    of other processes may still be in flight and the launcher ends the job).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if "gloo" in str(torch.distributed.get_backend()):
        time.sleep(GLOO_DRAIN_SECONDS)
    if destroy:
        torch.distributed.destroy_process_group()
