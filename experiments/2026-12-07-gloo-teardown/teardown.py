"""One gloo process group's life: a few DDP steps, an all-reduce per step, a barrier, then one way to leave.

MODE=open     exit with the group still open
MODE=destroy  destroy_process_group() straight after the barrier (what accelerate's end_training does)
MODE=drain    sleep 0.2 s without the GIL, then destroy_process_group() (pixart_cli.distributed)

    torchrun --standalone --nproc_per_node 4 teardown.py
"""

import os
import time

import torch
import torch.distributed as dist

mode = os.environ.get("MODE", "open")
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
)
optimizer = torch.optim.AdamW(model.parameters())
for _ in range(20):
    loss = model(torch.randn(8, 64)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    dist.all_reduce(loss.detach().clone())
dist.barrier()
if mode == "drain":
    time.sleep(0.2)
if mode in ("destroy", "drain"):
    dist.destroy_process_group()
