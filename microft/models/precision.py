"""Autocast helpers shared by the model, its loss, LoRA and generation (safe on meta tensors)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for this device type (never for devices without autocast, like meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes matmuls in here, or `t`'s own."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if autocasting(dev) else t.dtype


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    dev = t.device.type
    if torch.amp.is_autocast_available(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


# 0 or 1 overrides the detected answer for what microft does about bf16 (auto's pick, the fp32 route for
# bf16 products; benchmarking an AVX2-only CPU on a bigger one); kernels stay the ones the CPU can run
# (models.linear)
CPU_BF16_ENV = "MICROFT_CPU_BF16"
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA) without bf16 instructions: held
# to one of these, oneDNN has no native bf16 kernel (and no bf16 linear at all below AVX-512)
ONEDNN_ISA_ENVS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})


def cpu_supports_bf16() -> bool:
    """Whether to treat this CPU as one with native bf16 matmuls (AVX-512 BF16 or AMX): the hardware's answer,
    off where ATEN_CPU_CAPABILITY holds torch below AVX-512 or ONEDNN_MAX_CPU_ISA holds oneDNN below AVX-512
    BF16; MICROFT_CPU_BF16=0|1 overrides it. `native_cpu_bf16` is the answer no variable can force on."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return _NATIVE_CPU_BF16


def native_cpu_bf16() -> bool:
    """Whether the kernels may use native bf16 here (the hardware, as the environment restricts it; never
    forced)."""
    return _NATIVE_CPU_BF16


def onednn_isa_without_bf16(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment holds oneDNN to an instruction set without bf16 (ONEDNN_MAX_CPU_ISA=AVX2,
    say)."""
    isa = next((environ[k] for k in ONEDNN_ISA_ENVS if environ.get(k)), "")
    return isa.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16


def _native_cpu_bf16() -> bool:
    """The hardware's answer, as far as the environment lets the kernels use it, asked once at import
    (models.linear asks on every bf16 product; a constant is also what torch.compile traces cleanly)."""
    if onednn_isa_without_bf16():
        return False  # torch's bf16 GEMMs are oneDNN's: held below AVX-512 BF16, bf16 is emulated
    with contextlib.suppress(Exception):
        if torch.backends.cpu.get_cpu_capability().lower() in ("default", "avx2"):
            return False  # the kernels run without AVX-512 (ATEN_CPU_CAPABILITY=avx2): bf16 is emulated
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


_NATIVE_CPU_BF16 = _native_cpu_bf16()
