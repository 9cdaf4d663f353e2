"""AdamW with 8-bit blockwise-quantized moments, in plain torch (CPU, CUDA, any device torch runs on).

Each moment of a tensor with at least `min_8bit_numel` elements is stored as one uint8 code per element
plus one fp32 absmax per block of 256 elements (~2.03 bytes/param for both moments, against 8 for fp32
AdamW). Smaller tensors (biases, norms) keep fp32 moments: they cost little and gain most from precision.

Why a dynamic-exponent map (the 256-value map of `microft.models.quant.dynamic_map`) rather than linear int8:
the second moment spans many orders of magnitude inside a block; on a linear grid every entry below
absmax/255 rounds to zero, and then m / (sqrt(v) + eps) blows up for exactly the entries whose
gradients were small. The dynamic map keeps ~2 significant digits over seven decades (1e-6..1 of
the block's absmax), so small moments survive. The first moment uses the signed map, the second the
unsigned one (twice the resolution, as v >= 0). Codes are the nearest map entry (ties to the lower).

Each step, per tensor and `CHUNK` elements at a time: dequantize m and v to fp32, update them exactly as
torch's AdamW does (lerp / addcmul, decoupled weight decay p *= 1 - lr*wd, bias-corrected step), apply
the step with the unquantized new moments, then requantize. Vectorised; no per-element Python loops.
Small tensors follow the same formulas in fp32, so they match `torch.optim.AdamW(foreach=False)` exactly.
Parameters of any float dtype; non-fp32 parameters are updated through an fp32 copy of each chunk.

Memory an estimator should count: `state_nbytes(numel)` per parameter tensor, plus per step a
transient of about 5 fp32 chunks (m, v, grad, denom, param copy): <= 5 * 4 * CHUNK bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from microft.errors import ConfigError
from microft.layouts import ADAMW8_BLOCK, ADAMW8_CHUNK, ADAMW8_MIN_NUMEL
from microft.models.quant import dynamic_map

BLOCK, MIN_8BIT_NUMEL, CHUNK = ADAMW8_BLOCK, ADAMW8_MIN_NUMEL, ADAMW8_CHUNK


def state_nbytes(numel: int, min_8bit_numel: int = MIN_8BIT_NUMEL) -> int:
    """Optimizer-state bytes AdamW8bit holds for one parameter tensor of `numel` elements."""
    if numel < min_8bit_numel:
        return 8 * numel
    return 2 * (numel + 4 * -(-numel // BLOCK))


def _quantize(x: torch.Tensor, mids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 absmax per BLOCK) for a flat fp32 chunk; the nearest map entry via its midpoints."""
    n = x.numel()
    blocks = F.pad(x, (0, -n % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    codes = torch.bucketize(blocks * scale[:, None], mids).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    n = codes.numel()
    vals = F.pad(code[codes.int()], (0, -n % BLOCK)).view(-1, BLOCK)
    return (vals * absmax[:, None]).view(-1)[:n]


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """`Optimizer.step(closure)`'s loss: the closure re-evaluated with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def load_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict,
                        load: Callable[[dict], None]) -> None:
    """Load a saved optimizer state with `load` (torch's `load_state_dict`, which casts every state tensor but
    `step` to its parameter's dtype), then give back each saved tensor its own dtype (uint8 codes, int16
    master bits, bf16 moments): a checkpoint resumes bit-exactly. Shared by AdamW8bit and MasterAdamW."""
    saved = {i: {k: t for k, t in s.items() if torch.is_tensor(t) and k != "step"}
             for i, s in state_dict["state"].items()}
    load(state_dict)
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in zip(ids, params, strict=True):
        for k, t in saved.get(i, {}).items():
            optimizer.state[p][k] = t.to(p.device, copy=True)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are 8-bit blockwise-quantized (see the module docstring).

    Same arguments and semantics as `torch.optim.AdamW` (decoupled weight decay, param groups);
    `min_8bit_numel` sets the size below which a tensor keeps fp32 moments. No amsgrad, no maximize,
    no sparse gradients. `state_dict()` / `load_state_dict()` round-trip bit-exactly, dtypes included.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_numel: int = MIN_8BIT_NUMEL):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"AdamW8bit: invalid lr={lr}, betas={betas}, eps={eps} or "
                              f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_numel = min_8bit_numel

    def _init_state(self, p: torch.Tensor) -> dict:
        n = p.numel()
        if n < self.min_8bit_numel:
            z = torch.zeros(n, dtype=torch.float32, device=p.device)
            return {"step": 0, "exp_avg": z, "exp_avg_sq": z.clone()}
        nb = -(-n // BLOCK)
        state = {"step": 0}
        for k in ("exp_avg", "exp_avg_sq"):
            state[k + "_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)  # overwritten at step 1
            state[k + "_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        maps: dict[torch.device, tuple] = {}
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                t = state["step"]
                step_size = lr / (1 - beta1 ** t)
                bc2_sqrt = math.sqrt(1 - beta2 ** t)
                if p.device not in maps:
                    ms, mu = dynamic_map(True, p.device), dynamic_map(False, p.device)
                    maps[p.device] = (ms, (ms[:-1] + ms[1:]) / 2, mu, (mu[:-1] + mu[1:]) / 2)
                code_m, mids_m, code_v, mids_v = maps[p.device]
                flat, grad = p.view(-1), p.grad.reshape(-1)
                quantized = "exp_avg_codes" in state
                chunk = CHUNK if quantized else max(p.numel(), 1)
                for s in range(0, p.numel(), chunk):
                    e = min(s + chunk, p.numel())
                    g = grad[s:e].float()
                    if quantized:
                        b0, b1 = s // BLOCK, -(-e // BLOCK)
                        m = _dequantize(state["exp_avg_codes"][s:e], state["exp_avg_absmax"][b0:b1], code_m)
                        v = _dequantize(state["exp_avg_sq_codes"][s:e], state["exp_avg_sq_absmax"][b0:b1],
                                        code_v)
                    else:
                        m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    w = flat[s:e].float()  # a view when p is fp32: updated in place
                    if wd:
                        w.mul_(1 - lr * wd)
                    w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
                    if p.dtype != torch.float32:  # w is a copy, not a view
                        flat[s:e].copy_(w)
                    if quantized:
                        state["exp_avg_codes"][s:e], state["exp_avg_absmax"][b0:b1] = _quantize(m, mids_m)
                        state["exp_avg_sq_codes"][s:e], state["exp_avg_sq_absmax"][b0:b1] = _quantize(
                            v, mids_v)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state tensors keep their dtypes (torch would cast uint8 codes to the param's
        dtype)."""
        load_keeping_dtypes(self, state_dict, super().load_state_dict)
