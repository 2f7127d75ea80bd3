"""Which device to run on, and the fastest correct precision and memory format for it.

The rule was chosen by measurement (benchmarks/throughput.py and README "Performance"):
- CUDA: bf16 autocast where the GPU supports it (fp16 with loss scaling otherwise),
  channels_last, TF32 matmuls.
- CPU with native bf16 instructions (AVX512_BF16 or AMX): bf16 autocast, channels_last.
  On an AMD EPYC with AVX512_BF16 a ResNet-18 training step ran at 112 img/s in bf16 against
  62 in fp32 (both channels_last, batch 128, benchmarks/throughput.py).
- other CPUs: fp32, channels_last. On an AVX-512 CPU without them bf16 autocast was slower
  than fp32 (50 against 61 img/s); on a 2-core AMD EPYC with AVX2 only it was over 24x slower
  (8 warm-up steps of batch 128 unfinished after 905 s, against 29.4 img/s in fp32).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.options import UsageError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def resolve_accelerator(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise UsageError("--accelerator cuda was asked for but no CUDA GPU is visible")
    return "cuda" if name == "gpu" else name


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_precision(accelerator: str) -> str:
    if accelerator == "cuda":
        # Emulated bf16 (pre-Ampere GPUs) is slow: fp16 with loss scaling there.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if accelerator == "cpu":
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"


def prepare_backend() -> None:
    """Process-wide settings that make these convolutions fast."""
    # Denormals once the loss of an easy batch collapses made CPU steps ~50x slower.
    torch.set_flush_denormal(True)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def torchrun_world() -> tuple[int, int] | None:
    """(devices per node, nodes) when started by torchrun, else None.

    Fabric's devices="auto" does not join torchrun's ranks into one group on the CPU: it
    starts N independent runs. Reading torchrun's variables does.
    """
    if "LOCAL_WORLD_SIZE" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    return local, max(1, world // local)
