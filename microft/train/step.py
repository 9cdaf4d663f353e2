"""One optimizer step's parts, shared by the training loop and the estimator's trace.

`micro_step` (one forward/backward), `finish_step` (unscale, clip, step: `clip_gradients`, `optimizer_step`),
and the precision policy
they run under (`precision_for`, `autocast_context`, `make_scaler`, `place_model`). The loop
(loop.py) composes them over real batches; memory/trace.py runs the very same functions on fake
tensors to measure a step's peak. Of microft it imports only its errors, the CPU's bf16 detection and the
precision policies (`resolved`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from microft.errors import ConfigError
from microft.models.precision import cpu_supports_bf16
from microft.resolved import Device, PrecisionPolicy, precision_policy
from microft.resolved import resolve_precision as resolve


def mps_available() -> bool:
    """Apple-silicon GPU (Metal) usable by this torch build."""
    with contextlib.suppress(Exception):
        return bool(torch.backends.mps.is_available())
    return False


def resolve_device(name: str) -> torch.device:
    """`auto`: Apple silicon's GPU (MPS) when there is one, else the CUDA GPU, else the CPU.

    MPS is asked first: a Mac never has CUDA, and the MPS path then makes no torch.cuda call.
    """
    if name == "auto":
        if mps_available():
            return torch.device("mps")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda given but no CUDA GPU is available")
    if dev.type == "mps" and not mps_available():
        raise ConfigError("--device mps given but MPS is not available (it needs Apple silicon and macOS "
                          "12.3+)")
    return dev


def mps_supports_bf16() -> bool:
    """bf16 on MPS needs macOS 14 (Sonoma) or newer; older systems run fp16/fp32 only."""
    with contextlib.suppress(Exception):
        return bool(torch.backends.mps.is_macos_or_newer(14, 0))
    return False


def supports_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: CUDA from compute capability 8.0 (Ampere), CPUs with
    AVX-512 BF16 or AMX (`models.precision.cpu_supports_bf16`), MPS on macOS 14+."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_supports_bf16()
    return device.type == "mps" and mps_supports_bf16()


def precision_for(precision: str, device: torch.device) -> PrecisionPolicy:
    """The policy a run asking `--precision precision` trains under on `device` (`resolved.resolve_precision`,
    told what the device supports)."""
    return resolve(precision, Device(device.type, str(device), supports_bf16(device)))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The `--precision` word a run trains under on `device` (auto: bf16-mixed on CUDA ≥ 8.0, bf16-capable
    CPUs or MPS on macOS 14+, fp16-mixed on older GPUs, else fp32): `precision_for`'s name."""
    return precision_for(precision, device).name


def autocast_context(precision: str | PrecisionPolicy, device: torch.device
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context (a no-op where the policy computes in its weights'
    dtype)."""
    policy = precision_policy(precision)
    if policy.autocast:
        dtype = getattr(torch, policy.compute_dtype)
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext


def make_scaler(precision: str | PrecisionPolicy, device: torch.device, init_scale: float = 2.0**16
                ) -> torch.amp.GradScaler:
    """A GradScaler that is live only where the policy scales the loss (fp16-mixed); else a no-op, same
    API."""
    enabled = precision_policy(precision).grad_scaler
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=enabled)


def place_model(model: torch.nn.Module, precision: str | PrecisionPolicy, device: torch.device) -> None:
    """Cast the weights to the policy's storage dtype (bf16 for bf16-true), then move them to `device`."""
    policy = precision_policy(precision)
    if policy.param_dtype != "float32":
        model.to(dtype=getattr(torch, policy.param_dtype))
    model.to(device)


def micro_step(runner: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None,
               denom: float, autocast: Callable, scaler: torch.amp.GradScaler,
               target_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
               ) -> torch.Tensor:
    """One forward/backward; the loss is scaled by the global batch's target count. Returns the loss sum.

    `position_ids` marks packed rows (--packing); plain batches leave it out of the call.
    """
    packed = {} if position_ids is None else {"position_ids": position_ids}
    with autocast():
        loss_sum = runner(x, y, w, target_pos=target_pos, **packed)
    scaler.scale(loss_sum / max(denom, 1e-12)).backward()
    return loss_sum.detach()


FOLDED_CLIP_DEVICES = ("cpu", "cuda")  # where microft folds the clip into the optimizer (see clip_gradients)


def clip_gradients(model: torch.nn.Module, max_norm: float | None,
                   optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Global grad norm of the trainable parameters, clipped to `max_norm` when given.

    With an `optimizer` that reads its gradients through a scale (`takes_grad_scale`), the clip is
    handed to it as `grad_scale` (its kernel divides each gradient as it reads it) rather than run as
    a pass of its own over every gradient: the same clipped gradients up to rounding (g / (1 / c) in
    place of g * c), one read and write of all gradients fewer per step. `optimizer_step` clears it.
    Sharded (FSDP's DTensor) gradients, and devices other than the CPU and CUDA (MPS: its fused kernel
    unchecked here), keep torch's clip.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if (not max_norm or optimizer is None or not takes_grad_scale(optimizer) or get_total_norm is None
            or any(type(g) is not torch.Tensor or g.device.type not in FOLDED_CLIP_DEVICES for g in grads)):
        if optimizer is not None:
            optimizer.__dict__.pop("grad_scale", None)  # none left from a step that did not finish
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)
    norm = get_total_norm(grads, foreach=True)
    # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as the divisor the kernel takes
    optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp_(min=1.0).reshape(1)
    return norm


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` divides the gradients by `optimizer.grad_scale` in its own kernel (torch's
    fused Adam/AdamW, microft's MasterAdamW)."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return bool(optimizer.defaults.get("fused"))
    return bool(getattr(optimizer, "reads_grad_scale", False))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Step (skipped by the fp16 scaler on overflow), then free the gradients. Returns True if skipped."""
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    optimizer.__dict__.pop("grad_scale", None)  # clip_gradients' factor served this step only
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale_before is not None and scaler.get_scale() < scale_before


def finish_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                max_norm: float | None, before_step: Callable[[], None] | None = None
                ) -> tuple[torch.Tensor, bool]:
    """The end of every optimizer step, in the loop and the memory trace alike: unscale (fp16), clip (handed
    to the optimizer where it reads a grad scale; not with the fp16 scaler, whose skipped steps must leave
    no divisor behind), `before_step()` (the loop checks the loss there, the trace marks the phase), step.
    Returns (the gradient norm, whether the fp16 scaler skipped the step)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model, max_norm, None if scaler.is_enabled() else optimizer)
    if before_step is not None:
        before_step()
    return grad_norm, optimizer_step(optimizer, scaler)
