"""The compute dtype: ``auto`` picks it from the hardware the model runs on, and says why.

Rule (``resolve_dtype``), measured on the machines we can reach (docs/benchmarks.md):
- CUDA: bfloat16 from compute capability 8.0 (bf16 tensor cores: Ampere, Hopper and newer), else
  float32 (fp16 is not a compute dtype here).
- CPU: bfloat16 where the CPU has AVX-512 BF16 or AMX (oneDNN then runs bf16 matmuls natively,
  ~1.7x faster than fp32 in decode, which reads half the bytes); float32 otherwise, where bf16
  matmuls are emulated and run tens of times slower.

Weights may still be stored more compactly than the compute dtype (``weight_dtype``: bf16, int8,
fp8), which is a separate, explicit choice: it changes numerics (int8, fp8) or needs a conversion
per use. One exception is automatic because it is lossless and measured faster: a CPU serving actor
computing in fp32 keeps bf16-stored routed experts in bf16, which the expert kernel widens in
registers (``platform.worker.keep_bf16_experts``; a bench-mini decode step 50 vs 75 ms).

CPU flags come from ``/proc/cpuinfo`` (Linux); a test passes its own ``CpuFeatures``. A cap on
oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA`` below ``AVX512_CORE_BF16``, e.g. ``AVX2``) makes
bf16 matmuls emulated whatever the CPU has, so ``auto`` then picks float32 (measured here: a 16 x
1024 x 4096 bf16 linear went from 1.3 ms to 10-11 ms, fp32 4.4 ms). Each decision is logged once
with its reason.
"""

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # either one: native bf16 dot products
MIN_BF16_CUDA_CAPABILITY = (8, 0)
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no native bf16 dot products
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    flags: frozenset[str]
    onednn_isa_cap: str = ""   # ONEDNN_MAX_CPU_ISA, upper-cased; "" = none


@functools.cache
def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> CpuFeatures:
    """Model name and flags of the first CPU in ``cpuinfo`` (empty where the file is missing), and
    the oneDNN ISA cap of this process's environment."""
    model, flags = "", frozenset()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return CpuFeatures(model, flags, cap)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return CpuFeatures(model, flags, cap)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str   # "float32" | "bfloat16"
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32


def resolve_dtype(requested: str, device="cpu", features: CpuFeatures | None = None,
                  capability: tuple[int, int] | None = None) -> DtypeChoice:
    """``requested`` ("auto", "float32" or "bfloat16") for a model on ``device``."""
    if requested != "auto":
        assert requested in COMPUTE_DTYPES, f"unknown compute dtype {requested!r}; use auto or one of {COMPUTE_DTYPES}"
        return DtypeChoice(requested, "set explicitly")
    dev = torch.device(device)
    if dev.type == "cuda":
        cap = capability or torch.cuda.get_device_capability(dev)
        if tuple(cap) >= MIN_BF16_CUDA_CAPABILITY:
            return DtypeChoice("bfloat16", f"CUDA compute capability {cap[0]}.{cap[1]} has bf16 tensor cores")
        return DtypeChoice("float32", f"CUDA compute capability {cap[0]}.{cap[1]} < 8.0 has no bf16 tensor cores")
    f = features or cpu_features()
    have = [flag for flag in BF16_CPU_FLAGS if flag in f.flags]
    if have and f.onednn_isa_cap in ONEDNN_ISAS_WITHOUT_BF16:
        return DtypeChoice("float32", f"the CPU has {' and '.join(have)}, but ONEDNN_MAX_CPU_ISA="
                           f"{f.onednn_isa_cap} caps oneDNN below AVX512_CORE_BF16: bf16 matmuls would be emulated")
    if have:
        return DtypeChoice("bfloat16", f"the CPU has {' and '.join(have)}: native bf16 matmuls")
    return DtypeChoice("float32", "the CPU has neither avx512_bf16 nor amx_bf16: bf16 matmuls would be emulated "
                       "(tens of times slower than fp32)")


@functools.cache
def log_choice(requested: str, choice: DtypeChoice, where: str) -> None:
    log.info("compute dtype %s (%s%s) on %s", choice.dtype, "auto: " if requested == "auto" else "",
             choice.reason, where)
