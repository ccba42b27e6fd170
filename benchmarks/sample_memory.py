"""Peak memory of `pixart sample` for PixArt-XL/2 + T5-XXL (random bf16 weights), with and without --offload.

What it runs: ``Pipeline.generate`` (the code behind ``pixart sample``) on a PixArt-XL/2 transformer, a T5 encoder
with T5-XXL's shape (d_model 4096, d_kv 64, d_ff 10240, 64 heads, vocab 32128, gated GELU) and an SD-shaped VAE,
all with random weights in bf16 (nothing to download). Each configuration runs in its own process, so each peak
is its own:

* CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; the caching allocator reserves somewhat more).
* CPU: resident set size (RSS) of the process, sampled every 5 ms with psutil, and ``ru_maxrss`` at exit; it
  includes the Python interpreter and libraries (reported as ``baseline``).

On the CPU a 24-layer T5-XXL forward and 20 XL/2 steps at 512 px take far too long, so the CPU defaults are
smaller: ``--t5-layers 2 --size 256 --steps 2``. Each T5-XXL layer holds 193M parameters (386 MB in bf16), so the
full encoder adds 22 × 386 MB ≈ 8.5 GB to the phase where T5 runs. The script prints what it measured.

    python benchmarks/sample_memory.py                     # CUDA when available, else the CPU defaults
    python benchmarks/sample_memory.py --device cpu --t5-layers 2 --size 256 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from pixart_cli import sampling
from pixart_cli.components.autoencoders import VAE
from pixart_cli.components.text import TextEncoder
from pixart_cli.models import build_pixart, pixart_config
from pixart_cli.precision import describe_device
from pixart_cli.sampling.guidance import sample_latents
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import Job, SampleSettings
from pixart_cli.tiny import train_tokenizer

GB = 1024**3
T5_XXL = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


class PeakMeter:
    """Peak memory per phase: CUDA allocator statistics, or RSS sampled by a background thread on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.process = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        if device.type == "cpu":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self.process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._now())
            time.sleep(0.005)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = self._now()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        self._peak = max(self._peak, self._now())
        return self._peak

    def close(self) -> None:
        self._stop.set()


def _random_module(build, device: torch.device) -> torch.nn.Module:
    """Build with random init directly in bf16 on ``device`` (no fp32 copy on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return build().eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def _vae(device: torch.device) -> VAE:
    from diffusers import AutoencoderKL

    # Stable Diffusion's VAE shape (83.7M parameters), as sd-vae-ft-ema.
    return VAE(
        _random_module(
            lambda: AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=512,
            ),
            device,
        )
    )


def _t5_loader(tokenizer_dir: Path, layers: int, device: torch.device):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    def load():
        tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir), extra_ids=0)
        config = T5Config(**{**T5_XXL, "num_layers": layers}, tie_word_embeddings=False)
        return tokenizer, _random_module(lambda: T5EncoderModel(config), device)

    return load


def child(args: argparse.Namespace) -> dict:
    """One configuration, measured in this process."""
    device = torch.device(args.device)
    offload = args.child == "offload"
    meter = PeakMeter(device)
    baseline = meter.peak()
    torch.manual_seed(0)
    rest = torch.device("cpu") if offload else device
    config = pixart_config("PixArt-XL/2", input_size=args.size // 8)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(tmp, [PROMPT] * 20, vocab_size=64)
        meter.reset()
        model = _random_module(lambda: build_pixart(config), rest)
        text = TextEncoder(_t5_loader(Path(tmp), args.t5_layers, device), dtype=torch.bfloat16, device=device)
        pipeline = Pipeline(model, text, _vae(rest), device=device, offload=offload, name="random XL/2")
        phases = {"load (transformer + VAE)": meter.peak()}

        # Phase boundaries: encoding is pipeline.encode; sampling starts at the first sample_latents call, after
        # the text encoder was freed (offload) and the transformer moved to the device.
        encode = pipeline.encode

        def measured_encode(prompts):
            meter.reset()
            out = encode(prompts)
            phases["encode (T5 loaded + run)"] = meter.peak()
            return out

        def measured_sample_latents(*a, **kw):
            if "sample + decode" not in phases:
                meter.reset()
                phases["sample + decode"] = 0
            return sample_latents(*a, **kw)

        pipeline.encode = measured_encode
        sampling.sample_latents = measured_sample_latents
        jobs = [Job(0, PROMPT, seed) for seed in range(args.batch_size)]
        t0 = time.perf_counter()
        settings = SampleSettings(steps=args.steps, height=args.size, width=args.size, batch_size=len(jobs))
        for _ in pipeline.generate(jobs, settings):
            phases["sample + decode"] = meter.peak()
        seconds = time.perf_counter() - t0
    overall = max(phases.values())
    if device.type == "cpu":
        overall = max(overall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    meter.close()
    return {
        "mode": "offload" if offload else "no offload",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "baseline_gb": baseline / GB,
        "phases_gb": {k: v / GB for k, v in phases.items()},
        "peak_gb": overall / GB,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--t5-layers", type=int, default=None, help="T5 encoder layers (T5-XXL: 24; CPU default 2)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (CUDA default 512, CPU 256)")
    parser.add_argument("--steps", type=int, default=None, help="dpm-solver steps (CUDA default 20, CPU 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per batch (CFG doubles the forward batch)")
    parser.add_argument("--child", choices=["offload", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.t5_layers = args.t5_layers or (24 if cuda else 2)
    args.size = args.size or (512 if cuda else 256)
    args.steps = args.steps or (20 if cuda else 2)
    if args.child:
        print(json.dumps(child(args)))
        return

    print(
        f"PixArt-XL/2 at {args.size}×{args.size} px, T5-XXL shape with {args.t5_layers}/24 layers, SD-shaped VAE; "
        f"random bf16 weights; batch {args.batch_size} (CFG: {2 * args.batch_size} per forward), "
        f"dpm-solver {args.steps} steps, device {describe_device(args.device)}",
        flush=True,
    )
    results = []
    for mode in ("plain", "offload"):
        command = [sys.executable, __file__, "--child", mode, "--device", args.device]
        command += ["--t5-layers", str(args.t5_layers), "--size", str(args.size), "--steps", str(args.steps)]
        command += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    what = "GPU memory allocated" if cuda else "process RSS"
    print(f"\npeak {what} (GiB) on {results[0]['device']}")
    phases = list(results[0]["phases_gb"])
    print("| mode | " + " | ".join(phases) + " | peak | baseline | sampling time (s) |")
    print("|---" * (len(phases) + 4) + "|")
    for r in results:
        cells = " | ".join(f"{r['phases_gb'][p]:.2f}" for p in phases)
        print(f"| {r['mode']} | {cells} | {r['peak_gb']:.2f} | {r['baseline_gb']:.2f} | {r['seconds']:.1f} |")
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
