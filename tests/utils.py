"""Small helpers shared by the tests: tiny configs, randomised weights, independent reference models."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pixart_cli.models import DiTConfig, PixArtConfig

TINY_PIXART = PixArtConfig(
    depth=2,
    hidden_size=48,
    num_heads=4,
    patch_size=2,
    input_size=8,
    in_channels=4,
    caption_channels=24,
    max_length=10,
    variant="tiny",
)
TINY_PIXART_MS = dataclasses.replace(TINY_PIXART, multi_scale=True, interpolation_scale=2.0, variant="tiny-ms")
TINY_DIT = DiTConfig(depth=3, hidden_size=48, num_heads=4, patch_size=2, input_size=8, num_classes=10, variant="tiny")


def randomize(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Fill every parameter with N(0, std²): the official init zeroes output layers, which would hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def dit_to_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Test-side key map from DiT's layout to diffusers' ``DiTTransformer2DModel`` (an independent reference).

    diffusers keeps a copy of the timestep and class embedders in every block's AdaLayerNormZero.
    """
    sd = dict(sd)
    out = {
        "pos_embed.proj.weight": sd.pop("x_embedder.proj.weight"),
        "pos_embed.proj.bias": sd.pop("x_embedder.proj.bias"),
    }
    t0w, t0b, t2w, t2b = (sd.pop(f"t_embedder.mlp.{i}.{s}") for i in (0, 2) for s in ("weight", "bias"))
    table = sd.pop("y_embedder.embedding_table.weight")
    sd.pop("pos_embed")
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[d + "norm1.emb.timestep_embedder.linear_1.weight"] = t0w
        out[d + "norm1.emb.timestep_embedder.linear_1.bias"] = t0b
        out[d + "norm1.emb.timestep_embedder.linear_2.weight"] = t2w
        out[d + "norm1.emb.timestep_embedder.linear_2.bias"] = t2b
        out[d + "norm1.emb.class_embedder.embedding_table.weight"] = table
        for s in ("weight", "bias"):
            q, k, v = sd.pop(b + f"attn.qkv.{s}").chunk(3)
            out[d + f"attn1.to_q.{s}"], out[d + f"attn1.to_k.{s}"], out[d + f"attn1.to_v.{s}"] = q, k, v
            out[d + f"attn1.to_out.0.{s}"] = sd.pop(b + f"attn.proj.{s}")
            out[d + f"ff.net.0.proj.{s}"] = sd.pop(b + f"mlp.fc1.{s}")
            out[d + f"ff.net.2.{s}"] = sd.pop(b + f"mlp.fc2.{s}")
            out[d + f"norm1.linear.{s}"] = sd.pop(b + f"adaLN_modulation.1.{s}")
    for s in ("weight", "bias"):
        out[f"proj_out_1.{s}"] = sd.pop(f"final_layer.adaLN_modulation.1.{s}")
        out[f"proj_out_2.{s}"] = sd.pop(f"final_layer.linear.{s}")
    assert not sd, f"unmapped DiT keys: {sorted(sd)}"
    return out


def diffusers_dit(config: DiTConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' DiT loaded with our DiT weights, with the official timestep frequencies (docs/reference.md §2)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
        norm_eps=1e-6,
    )
    model.load_state_dict(dit_to_diffusers_state_dict(state_dict, config.depth), strict=True)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # diffusers' DiT divides by half-1; DiT by half
    return model.eval()


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, grandchildren first (Linux /proc), so a launcher's workers are found too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found[::-1]


def run_launcher(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a multi-process launch (torchrun) and, if it hangs, fail with every process's Python stack.

    Faulthandler is on in every process: at the timeout each of them (workers, then the launcher) gets SIGABRT
    and prints where it was stuck, then all are killed.
    """
    env = dict(os.environ if kwargs.get("env") is None else kwargs.pop("env"), PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stuck = [*_descendants(proc.pid), proc.pid]
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
                time.sleep(0.5)  # one stack at a time in the shared stderr
        time.sleep(2)
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:4]} hung for {timeout} s; the stacks of its processes:\n{out[-3000:]}\n{err[-15000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_report(done: subprocess.CompletedProcess) -> str:
    """What a failed launch said: the workers' own error lines first (torchrun's summary would bury them)."""
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line.lower()]
    return "\n".join([*errors[:20], "--- tails ---", done.stdout[-2000:], done.stderr[-2000:]])
