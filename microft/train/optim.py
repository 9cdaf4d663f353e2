"""The optimizer a run builds (its entry in microft.optimizers, over `param_groups`) and learning-rate
schedules: small functions the loop composes (precision lives in step.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from microft.config import RunConfig
from microft.errors import ConfigError
from microft.optimizers import OPTIMIZERS, decays
from microft.resolved import PrecisionPolicy, precision_policy


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norms and embeddings don't. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p.dim()) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device,
                    precision: str | PrecisionPolicy | None = None) -> torch.optim.Optimizer:
    """`cfg.optimizer`'s registry entry (microft.optimizers) built over the model's trainable parameters,
    under the run's resolved `precision` (default: `cfg.precision`; `auto` never resolves to a policy with
    master weights)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    policy = precision or cfg.precision
    bf16_weights = policy != "auto" and precision_policy(policy).master_weights  # bf16-true
    return OPTIMIZERS[cfg.optimizer].build(groups, cfg, device, bf16_weights)


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


def schedule_multiplier(schedule: dict[str, Any]) -> Callable[[int], float]:
    """`lr_lambda` of a schedule record (schedule, total_steps, warmup, min_ratio; its peak `lr` aside)."""
    return lr_lambda(schedule["schedule"], schedule["total_steps"], schedule["warmup"], schedule["min_ratio"])


def describe_schedule(schedule: dict[str, Any]) -> str:
    """A schedule record in words, for the banner and notes."""
    return (f"{schedule['schedule']} over {schedule['total_steps']} steps, "
            f"warmup {schedule['warmup']} steps, min lr ×{schedule['min_ratio']:g}")


def schedule_note(asked: dict[str, Any], kept: dict[str, Any], step: int, total_steps: int,
                  out: object = "OUT") -> str | None:
    """One line for a resumed run whose flags ask for another schedule than the one its checkpoint follows
    (None when they agree): the checkpoint's is kept, so the lr never jumps, and what that means."""
    changed = [k for k in ("total_steps", "schedule", "warmup", "min_ratio", "lr") if asked[k] != kept[k]]
    if not changed:
        return None
    final_lr = kept["lr"] * schedule_multiplier(kept)(kept["total_steps"])
    what = (f"resumed at step {step}: the lr keeps the checkpoint's schedule ({describe_schedule(kept)}, "
            f"peak {kept['lr']:.3g})")
    if total_steps > kept["total_steps"]:
        what += f"; steps {kept['total_steps'] + 1}-{total_steps} run at its final lr {final_lr:.3g}"
    elif total_steps < kept["total_steps"]:
        what += f"; the run ends at step {total_steps}, before that schedule does"
    flags = {"schedule": "--schedule", "warmup": "--warmup", "min_ratio": "--min-lr-ratio", "lr": "--lr"}
    ignored = [flags[k] for k in changed if k in flags]
    return what + (f"; {', '.join(ignored)} given now not applied" if ignored else "") + (
        f". For a new schedule, train from its weights as a new run (--model {out}/final, a new --out)")
