"""Throughput and memory measurements: FLOPs per token, device peaks, MFU, process memory."""

from __future__ import annotations

import resource
import sys
import time
from functools import lru_cache

import torch

from microft.config import ModelConfig

# dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s; fp32 uses TF32 peak where it applies
GPU_PEAK_TFLOPS: dict[str, float] = {
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0, "a10": 125.0,
    "rtx 4090": 165.0, "rtx 3090": 71.0, "rtx 3080": 59.5, "t4": 65.0, "v100": 125.0,
}


def flops_per_token(cfg: ModelConfig, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs per token (see `ModelConfig.flops_per_token`: one formula for every family)."""
    return cfg.flops_per_token(seq_len, trainable_fraction)


@lru_cache(maxsize=4)
def measured_peak_flops(device_type: str, dtype_name: str) -> float:
    """A one-off matmul probe (FLOP/s) on this device in this dtype; used for CPU MFU."""
    dtype = getattr(torch, dtype_name)
    n = 2048 if device_type == "cuda" else 1024
    a = torch.randn(n, n, device=device_type).to(dtype)
    b = torch.randn(n, n, device=device_type).to(dtype)
    for _ in range(2):
        a @ b
    iters = 20 if device_type == "cuda" else 6
    if device_type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from): a table for known GPUs, a probe otherwise."""
    low = precision in ("bf16-mixed", "bf16-true", "fp16-mixed")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (tf if low else tf / 2) * 1e12, f"table ({key})"
    dtype = "bfloat16" if precision.startswith("bf16") else ("float16" if precision == "fp16-mixed" else "float32")
    return measured_peak_flops(device.type, dtype), f"measured {dtype} matmul"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def memory_stats(device: torch.device) -> dict[str, int]:
    """Peak memory so far: CUDA allocated/reserved, or the process RSS on CPU."""
    if device.type == "cuda":
        return {
            "cuda_max_allocated": torch.cuda.max_memory_allocated(device),
            "cuda_max_reserved": torch.cuda.max_memory_reserved(device),
        }
    return {"peak_rss": peak_rss_bytes()}
