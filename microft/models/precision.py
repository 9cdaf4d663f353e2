"""Autocast helpers shared by the model, its loss, LoRA and generation (safe on meta tensors)."""

from __future__ import annotations

import contextlib

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
