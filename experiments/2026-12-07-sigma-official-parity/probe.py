"""Parity of our PixArt-Σ transformer with the official PixArt-Σ code, run on random weights (fp32, CPU).

Needs a checkout of PixArt-alpha/PixArt-sigma (its ``diffusion/`` folder) and timm + einops on the path; xformers'
memory_efficient_attention is replaced by an exact SDPA equivalent (the CPU has no xformers kernels), and mmcv's
registry by a no-op. Usage:

    PYTHONPATH=/path/to/timm-and-einops python probe.py /path/to/PixArt-sigma
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def _xformers_shim() -> None:
    class BlockDiagonalMask:  # packed variable-length keys: (query lengths, key lengths) per sample
        def __init__(self, q: list[int], kv: list[int]) -> None:
            self.q, self.kv = q, kv

        @classmethod
        def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int]) -> BlockDiagonalMask:
            return cls(list(q_seqlen), list(kv_seqlen))

    def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None):  # (B, N, H, D) in and out
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if isinstance(attn_bias, BlockDiagonalMask):
            outs, qi, ki = [], 0, 0
            for nq, nk in zip(attn_bias.q, attn_bias.kv, strict=True):
                outs.append(
                    F.scaled_dot_product_attention(q[:, :, qi : qi + nq], k[:, :, ki : ki + nk], v[:, :, ki : ki + nk])
                )
                qi, ki = qi + nq, ki + nk
            return torch.cat(outs, dim=2).transpose(1, 2).contiguous()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias).transpose(1, 2).contiguous()

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)
    xformers = types.ModuleType("xformers")
    xformers.ops = ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops})


def _load_official(root: Path):
    _xformers_shim()
    for name in ("diffusion", "diffusion.model", "diffusion.model.nets", "diffusion.utils"):
        module = types.ModuleType(name)
        module.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = module
    builder = types.ModuleType("diffusion.model.builder")
    builder.MODELS = types.SimpleNamespace(register_module=lambda *a, **k: lambda cls: cls)
    logger = types.ModuleType("diffusion.utils.logger")
    logger.get_root_logger = lambda *a, **k: __import__("logging").getLogger("official")
    sys.modules.update({"diffusion.model.builder": builder, "diffusion.utils.logger": logger})
    for name in ("diffusion.model.utils", "diffusion.model.nets.PixArt_blocks", "diffusion.model.nets.PixArt",
                 "diffusion.model.nets.PixArtMS"):  # fmt: skip
        spec = importlib.util.spec_from_file_location(name, root / (name.replace(".", "/") + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["diffusion.model.nets.PixArtMS"].PixArtMS, sys.modules["diffusion.model.nets.PixArt"].PixArt


def main(root: Path) -> None:
    from pixart_cli.checkpoints.convert import official_config, official_to_ours
    from pixart_cli.models import build_pixart

    PixArtMS, PixArt = _load_official(root)
    torch.manual_seed(0)
    worst = 0.0
    cases = [
        # (official class, extra args, latent h, w, compression)
        (
            "PixArtMS 1024-like, conv x2 in layers 2-3",
            PixArtMS,
            dict(pe_interpolation=2.0),
            24,
            32,
            {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [2, 3]},
        ),
        (
            "PixArtMS, ave x2",
            PixArtMS,
            dict(pe_interpolation=2.0),
            16,
            16,
            {"sampling": "ave", "scale_factor": 2, "kv_compress_layer": [0, 3]},
        ),
        (
            "PixArtMS, uniform x2",
            PixArtMS,
            dict(pe_interpolation=1.0),
            16,
            24,
            {"sampling": "uniform", "scale_factor": 2, "kv_compress_layer": [1]},
        ),
        ("PixArtMS, no compression", PixArtMS, dict(pe_interpolation=2.0), 16, 24, None),
        (
            "PixArt 256-like (pe 0.5), conv x2",
            PixArt,
            dict(pe_interpolation=0.5),
            16,
            16,
            {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1, 2]},
        ),
    ]
    for label, cls, extra, h, w, kv in cases:
        official = cls(
            input_size=16,
            patch_size=2,
            in_channels=4,
            hidden_size=96,
            depth=4,
            num_heads=4,
            caption_channels=32,
            model_max_length=300,
            kv_compress_config=kv,
            **extra,
        ).eval()
        for p in official.parameters():  # the zero-initialised layers would hide most of the maths
            p.data.normal_(0, 0.05)
        sd = {k: v.clone() for k, v in official.state_dict().items()}
        config = official_config(sd, num_heads=4)
        if kv is not None and kv["sampling"] != "conv":  # no weights say so: the user states it (model.config)
            import dataclasses

            from pixart_cli.models import KVCompress

            config = dataclasses.replace(
                config, kv_compress=KVCompress(tuple(kv["kv_compress_layer"]), kv["sampling"], 2)
            )
        ours = build_pixart(config).eval()
        ours.load_state_dict(official_to_ours(sd, config, "official"), strict=True)
        x, t = torch.randn(2, 4, h, w), torch.tensor([3.0, 700.0])
        y = torch.randn(2, 1, 300, 32)
        mask = torch.zeros(2, 300, dtype=torch.long)
        mask[0, :17], mask[1, :300] = 1, 1
        with torch.no_grad():
            if cls is PixArt:
                ref = official(x, t, y, mask=mask[:, None, None])
            else:
                ref = official(x, t, y, mask=mask[:, None, None], data_info={})
            out = ours(x, t, y[:, 0], mask)
        err = (out - ref).abs().max().item()
        worst = max(worst, err)
        print(f"{label:45s} max |ours - official| = {err:.2e}  (output scale {ref.abs().max():.2f})")
    print(f"worst: {worst:.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
