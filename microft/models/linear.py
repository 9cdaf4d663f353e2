"""Linear layers' matmuls on a CPU in fp32: forwards through oneDNN, backwards as autograd's.

torch's fp32 `addmm`/`mm` on a CPU call MKL's sgemm. On AMD CPUs (MKL's slower code path there)
the forward shapes of a transformer's linears ran 1.0-1.7x faster through oneDNN's linear
(`mkldnn._linear_pointwise`, shipped with torch) on a 2-core AVX2 EPYC, interleaved
micro-benchmarks of GPT-2's and Qwen3-1.7B's block shapes at 256 and 1024 rows; the backward's
`mm`s (grad_input = dy @ W, grad_weight = dy.T @ x) were no faster there, so they stay `mm`.
Both compute the same fp32 products and sum them in another order. Elsewhere (other dtypes,
autocast, CUDA, a handful of rows as in token-by-token generation, layers narrower than 256) these
are `F.linear`.
`MICROFT_ONEDNN=0` turns oneDNN off (`bench/linear_kernels.py` measures both ways).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from microft.models.precision import autocasting

ONEDNN_ENV = "MICROFT_ONEDNN"  # set to 0: every linear and the head through torch's own F.linear / mm


def _onednn_linear():
    """torch's oneDNN linear (`mkldnn._linear_pointwise`) where this build has it (and MICROFT_ONEDNN is
    not 0), else None."""
    if os.environ.get(ONEDNN_ENV) == "0" or not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear()
ONEDNN_HEAD_MIN_VOCAB = 16384
ONEDNN_MIN_ROWS = 64  # below, a decode step's few rows: F.linear
ONEDNN_MIN_FEATURES = 256  # in and out; smaller layers (the demo's 128-wide model) keep F.linear and its bits


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN, for x of any rank (flattened to rows and back)."""
    y = _ONEDNN_LINEAR(x.reshape(-1, x.size(-1)), weight, bias, "none", [None], "")
    return y.view(*x.shape[:-1], weight.size(0))


def head_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight.T for the LM head: (rows, C) x (vocab, C) -> (rows, vocab).

    On a CPU in fp32, with a real tokenizer's vocabulary, this runs through oneDNN rather than the BLAS
    `mm`: for this shape (a few hundred rows, tens of thousands of columns) MKL's sgemm ran at ~60 % of
    its rate on the blocks' matmuls on an AVX2 EPYC (GPT-2 step under torch.profiler: 69 vs 115-136
    GFLOP/s); oneDNN ran it 1.3x faster in an interleaved micro-benchmark and 1.8x in the profiled step.
    Same fp32 products and sums, in another order; small heads (the demo's 1,088 tokens) keep `mm`.
    """
    if (_ONEDNN_LINEAR is not None and h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32
            and weight.size(0) >= ONEDNN_HEAD_MIN_VOCAB):
        return _onednn(h.contiguous(), weight.contiguous(), None)
    return h @ weight.t()


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with a oneDNN forward; saves what F.linear saves (input, weight), backward in `mm`s."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.size(-1))
        gx = (dy2 @ weight).view(x.shape) if need_x else None
        gw = dy2.t() @ x.reshape(-1, x.size(-1)) if need_w else None
        gb = dy2.sum(0) if need_b else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); its forward through oneDNN on a CPU in fp32 (see the module doc)."""
    if (_ONEDNN_LINEAR is None or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)
            or min(weight.shape) < ONEDNN_MIN_FEATURES or weight.dim() != 2
            or x.dim() < 2 or x.numel() < ONEDNN_MIN_ROWS * x.size(-1) or not x.is_contiguous()
            or not weight.is_contiguous() or autocasting("cpu")):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def run_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`; a plain nn.Linear through `linear` (adapted or quantized linears run their own forward)."""
    if type(module) is nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)
