"""Optimizers and learning-rate schedules: small functions the loop composes (precision lives in step.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from microft.config import RunConfig
from microft.errors import ConfigError
from microft.layouts import MASTER_CHUNK, NO_DECAY_MARKERS
from microft.optim8bit import closure_loss
from microft.resolved import PrecisionPolicy, precision_policy


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




def split_fp32(master: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """Store fp32 `master` as its bf16 rounding `hi` plus 16 more bits `lo` (int16); in place.

    Adding half a bf16 unit (0x8000) to the bits rounds to nearest in the top half, which is
    `hi`; the bottom half of that sum is `lo`. `master`'s storage is clobbered.
    """
    halves = master.view(torch.int32).add_(0x8000).view(torch.int16).view(-1, 2)  # little-endian: [low, high]
    hi.view(torch.int16).view(-1).copy_(halves[:, 1])
    lo.view(-1).copy_(halves[:, 0])


def join_fp32(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor `split_fp32` stored as `hi` and `lo` (a new tensor, bit-exact)."""
    bits = torch.empty(hi.shape, dtype=torch.int32, device=hi.device)
    halves = bits.view(torch.int16).view(-1, 2)
    halves[:, 1] = hi.view(torch.int16).reshape(-1)
    halves[:, 0] = lo.reshape(-1)
    return bits.sub_(0x8000).view(torch.float32)


class MasterAdamW(torch.optim.Optimizer):
    """AdamW for bf16 parameters that updates their exact fp32 master weights.

    An fp32 weight is its bf16 rounding (the parameter the model computes with) plus 16 more
    bits (state `master_lo`, see `split_fp32`): 2 bytes per weight instead of a 4-byte fp32
    copy, and no update is lost to bf16's 8-bit mantissa. The moments are kept in `state_dtype`
    (bf16 by default; fp32 makes every step equal torch's fused AdamW on fp32 weights). The
    update runs torch's fused AdamW kernel on fp32 working copies, 2^20 elements at a time; a
    `grad_scale` attribute (a 1-element fp32 tensor: the gradient clip's divisor) goes to that kernel.
    """

    reads_grad_scale = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ConfigError(f"MasterAdamW needs bf16 parameters, got {p.dtype}")

    def _init_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            st["master_lo"] = torch.full_like(p, -0x8000, dtype=torch.int16, memory_format=torch.contiguous_format)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or not p.is_contiguous():
                    raise RuntimeError("MasterAdamW needs dense gradients and contiguous parameters")
                st = self._init_state(p)
                st["step"] += 1
                w, g, lo = p.view(-1), p.grad.reshape(-1), st["master_lo"].view(-1)
                m, v = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
                for s in range(0, w.numel(), MASTER_CHUNK):
                    e = min(s + MASTER_CHUNK, w.numel())
                    master = join_fp32(w[s:e], lo[s:e])
                    m32, v32 = m[s:e].float(), v[s:e].float()  # the state itself when it is fp32
                    torch._fused_adamw_([master], [g[s:e].float()], [m32], [v32], [], [st["step"]],
                                        lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                                        eps=group["eps"], amsgrad=False, maximize=False, grad_scale=scale)
                    if m.dtype != torch.float32:
                        m[s:e].copy_(m32)
                        v[s:e].copy_(v32)
                    split_fp32(master, w[s:e], lo[s:e])
                    del master, m32, v32  # at most one chunk's fp32 working copies at a time
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating state to the parameter's dtype on load: keep the saved dtypes instead."""
        saved = {k: {n: t for n, t in v.items() if n != "step"} for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            for name, t in saved.get(i, {}).items():
                self.state[p][name] = t.to(p.device, copy=True)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device,
                    precision: str | PrecisionPolicy | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg` names over the model's trainable parameters, under the run's resolved `precision`
    (default: `cfg.precision`; `auto` never resolves to a policy with master weights)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    policy = precision or cfg.precision
    if cfg.optimizer == "adamw":
        if policy != "auto" and precision_policy(policy).master_weights:  # bf16-true: exact fp32 masters
            return MasterAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 **adamw_impl(device))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if cfg.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise ConfigError("--optimizer adafactor needs torch >= 2.5")
        return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)
    if cfg.optimizer == "adamw-8bit":  # microft's own blockwise 8-bit moments: same bits on every device
        from microft.optim8bit import AdamW8bit

        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
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
