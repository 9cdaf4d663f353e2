"""MasterAdamW: AdamW for bf16 parameters (bf16-true) that keeps their exact fp32 master weights.

Imports neither the run config nor the registry (`microft.optimizers` builds it lazily), so the registry's
one arrow into `train/` makes no cycle.
"""

from __future__ import annotations

import torch

from microft.errors import ConfigError
from microft.layouts import MASTER_CHUNK
from microft.train.optim8bit import closure_loss, load_keeping_dtypes


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
            dense = torch.contiguous_format
            st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=dense)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=dense)
            st["master_lo"] = torch.full_like(p, -0x8000, dtype=torch.int16, memory_format=dense)
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
                                        lr=group["lr"], beta1=b1, beta2=b2,
                                        weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                        maximize=False, grad_scale=scale)
                    if m.dtype != torch.float32:
                        m[s:e].copy_(m32)
                        v[s:e].copy_(v32)
                    split_fp32(master, w[s:e], lo[s:e])
                    del master, m32, v32  # at most one chunk's fp32 working copies at a time
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating state to the parameter's dtype on load: keep the saved dtypes instead."""
        load_keeping_dtypes(self, state_dict, super().load_state_dict)
