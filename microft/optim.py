"""Optimizers, learning-rate schedules and precision policy: small functions the trainer composes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from microft.config import RunConfig
from microft.errors import ConfigError

NO_DECAY_MARKERS = ("bias", "ln_", "wte", "wpe", "norm")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norms and embeddings don't. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or any(m in name for m in NO_DECAY_MARKERS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw_impl(device: torch.device) -> dict[str, bool]:
    """Fused AdamW where this torch supports it on the device (CUDA, CPU), else foreach."""
    if device.type in ("cuda", "cpu", "mps", "xpu"):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **adamw_impl(device))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if cfg.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise ConfigError("--optimizer adafactor needs torch >= 2.5")
        return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)
    if cfg.optimizer == "adamw-8bit":
        if device.type != "cuda":
            raise ConfigError("--optimizer adamw-8bit needs a CUDA GPU (bitsandbytes); use adamw or adafactor here")
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("--optimizer adamw-8bit needs bitsandbytes: pip install 'microft[cuda]'") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` < 1 is a fraction of the run; >= 1 a step count."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def lr_lambda(schedule: str, total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `s` (0-based): linear warmup, then the schedule."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * p
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return f


def cpu_supports_bf16() -> bool:
    with contextlib.suppress(Exception):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16-mixed on CUDA ≥ 8.0 or bf16-capable CPUs, fp16-mixed on older GPUs, else fp32."""
    if precision != "auto":
        return precision  # fp16-mixed runs on CPUs too (slowly): useful to test the scaler without a GPU
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16-mixed"
    if device.type == "cpu":
        return "bf16-mixed" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context (a no-op for fp32 and bf16-true)."""
    if precision in ("bf16-mixed", "fp16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext


def make_scaler(precision: str, device: torch.device, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
    """A GradScaler that is live only for fp16-mixed; otherwise a no-op with the same API."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=precision == "fp16-mixed")
