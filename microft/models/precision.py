"""Autocast helpers shared by the model, its loss, LoRA and generation (safe on meta tensors)."""

from __future__ import annotations

import contextlib
import os

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
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


# set to 0 or 1 to override the CPU's bf16 detection (benchmarking an emulated AVX2-only CPU)
CPU_BF16_ENV = "MICROFT_CPU_BF16"


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls (AVX-512 BF16 or AMX); honours ATEN_CPU_CAPABILITY below avx512 and MICROFT_CPU_BF16."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return _NATIVE_CPU_BF16


def _native_cpu_bf16() -> bool:
    """The hardware's answer, asked once at import (models.linear asks on every bf16 product; a constant
    is also what torch.compile traces cleanly)."""
    with contextlib.suppress(Exception):
        if torch.backends.cpu.get_cpu_capability().lower() in ("default", "avx2"):
            return False  # the kernels run without AVX-512 (ATEN_CPU_CAPABILITY=avx2): bf16 is emulated
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


_NATIVE_CPU_BF16 = _native_cpu_bf16()
