"""Which autocast precision a run uses on this machine: ``train.mixed_precision: auto`` and its warnings.

bf16 autocast is only fast where the hardware computes bf16. On a CPU that means AVX-512 BF16 (or AMX) with
PyTorch's kernels at the AVX-512 level; a CPU whose capability is AVX2 emulates it. Measured on
``recipes/shapes/quick.yaml`` (2 cores of an AMD EPYC, 2026-12-07; ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2 rows): bf16 84 img/s and fp32 56 img/s at AVX512 with AVX-512 BF16;
fp32 55 img/s and bf16 3.3 img/s at AVX2. So ``auto`` takes bf16 only where it is native, and an explicit bf16
on a CPU without it is warned about once.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["fp32", "fp16", "bf16"]
# The slowdown of bf16 against fp32 on an AVX2 CPU, measured as above (55 / 3.3 img/s).
AVX2_BF16_SLOWDOWN = 17


def cpu_capability() -> str:
    """PyTorch's CPU kernel level here ("AVX512", "AVX2", "DEFAULT", ...), as benchmarks and docs report it."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware *and* PyTorch uses it (not forced down to AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # other CPUs: not measured; fp32 is the safe choice
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return native and cpu_capability() == "AVX512"


def describe_cpu() -> str:
    """One phrase naming the CPU capability, for logs, benchmarks and docs (e.g. "AVX512, native bf16")."""
    return f"{cpu_capability()}, {'native' if cpu_has_native_bf16() else 'no native'} bf16"


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str  # what the recipe says: auto, fp32, fp16 or bf16
    precision: Precision  # what runs
    reason: str  # one phrase: why this precision here
    warning: str | None = None  # said once when the requested precision will be slow here

    @property
    def accelerate(self) -> str:
        """accelerate's name for it ("no" for fp32)."""
        return "no" if self.precision == "fp32" else self.precision

    def describe(self) -> str:
        """What runs and why, e.g. "fp32 (auto: this CPU: AVX2, no native bf16)"."""
        if self.requested == "auto":
            return f"{self.precision} (auto: {self.reason})"
        return f"{self.precision} ({self.reason})"


def choose_precision(requested: str, device_type: str) -> PrecisionChoice:
    """Resolve ``train.mixed_precision`` for a device type ("cpu", "cuda", "mps")."""
    if device_type == "cuda":
        if requested == "auto":
            if torch.cuda.is_bf16_supported():
                return PrecisionChoice(requested, "bf16", "the GPU computes bf16")
            return PrecisionChoice(requested, "fp16", "the GPU has no bf16")
        return PrecisionChoice(requested, requested, "as the recipe says")  # type: ignore[arg-type]
    if device_type != "cpu":
        if requested == "auto":
            return PrecisionChoice(requested, "fp32", f"autocast on {device_type} is not measured")
        return PrecisionChoice(requested, requested, "as the recipe says")  # type: ignore[arg-type]
    native = cpu_has_native_bf16()
    cpu = f"this CPU: {describe_cpu()}"
    if requested == "auto":
        return PrecisionChoice(requested, "bf16" if native else "fp32", cpu)
    warning = None
    if requested == "bf16" and not native:
        warning = (
            f"train.mixed_precision: bf16 on a CPU without native bf16 ({cpu_capability()}) runs about "
            f"{AVX2_BF16_SLOWDOWN}× slower than fp32 (measured on recipes/shapes/quick.yaml); "
            "use --set train.mixed_precision=auto (or fp32)"
        )
    return PrecisionChoice(requested, requested, f"as the recipe says; {cpu}", warning)  # type: ignore[arg-type]


def describe_device(device: str | None = None) -> str:
    """The machine a measurement ran on, for benchmark headers: the GPU's name, or the CPU's kernel level, bf16
    support and threads (CPU figures differ ~17× in bf16 between AVX2 and AVX-512 BF16 CPUs)."""
    if (device or "cpu").startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"CPU ({describe_cpu()}), {torch.get_num_threads()} threads, torch {torch.__version__}"
