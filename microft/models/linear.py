"""Linear layers' matmuls on a CPU: forwards through oneDNN where it is faster, backwards as autograd's.

torch's fp32 `addmm`/`mm` on a CPU call MKL's sgemm. On AMD CPUs (MKL's slower code path there)
the forward shapes of a transformer's linears ran 1.0-1.7x faster through oneDNN's linear
(`mkldnn._linear_pointwise`, shipped with torch) on a 2-core AVX2 EPYC, interleaved
micro-benchmarks of GPT-2's and Qwen3-1.7B's block shapes at 256 and 1024 rows; the backward's
`mm`s (grad_input = dy @ W, grad_weight = dy.T @ x) were no faster there, so they stay `mm`.
Both compute the same fp32 products and sum them in another order. On Intel CPUs oneDNN showed no gain
(a GPT-2 step 1.03x faster with MKL everywhere on a Xeon held to AVX2, `bench/linear_kernels.py
--intel-avx2`; 0.8-1.1x per shape with AVX-512), so the fp32 route is taken on AMD x86 CPUs only
(`MICROFT_ONEDNN=1`: on any CPU). On a CPU with native bf16
(AVX-512 BF16 / AMX) bf16 forwards take oneDNN's linear too, autocast's casts done first: the same
bits as `F.linear` (which reaches oneDNN through `addmm`), 1.0-1.2x its rate on GPT-2's block shapes
on a 2-core Xeon with AMX (`bench/linear_kernels.py`). Elsewhere (other dtypes, CUDA, a handful of
rows as in token-by-token generation, layers narrower than 256) these are `F.linear`. A dtype goes to oneDNN
only where its linear runs here (tried once at import): held to AVX2 (an AVX2-only CPU, or
ONEDNN_MAX_CPU_ISA=AVX2) oneDNN has no bf16 or fp16 linear ("could not create a primitive descriptor"),
whatever MICROFT_CPU_BF16 says.
`MICROFT_ONEDNN=0` turns oneDNN off (`bench/linear_kernels.py` measures both ways).

bf16 on a CPU without native bf16 (no AVX-512 BF16 / AMX): torch's kernels emulate it, at a speed that
depends on the operands' layout. On a 2-core AVX2 EPYC a (512, 2048) x (2048, 2048) product ran at
17-19 GFLOP/s with one operand transposed (a linear's forward, its weight gradient) but 0.27 GFLOP/s
with neither (its input gradient, dy @ W) and 1 with both, against 75-130 in fp32. There `linear`
(after autocast's casts, under autocast), `mm`, `addmm_` and `half_via_fp32` (attention) multiply the
bf16 operands in fp32 and round the result to bf16 once: the fp32 accumulation of a native bf16 GEMM,
in another order.
They keep what the native ops keep for backward (bf16 tensors; fp32 copies live for one product).
`MICROFT_HALF_VIA_FP32=0` turns this off.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from microft.models.precision import autocast_off, autocasting, cpu_supports_bf16, native_cpu_bf16

ONEDNN_ENV = "MICROFT_ONEDNN"  # set to 0: every linear and the head through torch's own F.linear / mm
# set to 0: bf16 matmuls on a CPU without native bf16 run torch's emulation
HALF_ENV = "MICROFT_HALF_VIA_FP32"
_half_via_fp32 = os.environ.get(HALF_ENV) != "0"
_own_half_routes = True  # False inside native_half_matmuls(): bf16 products as torch's own ops run them
ADDMM_SLICE_ROWS = 8192  # addmm_'s fp32 working copy of the accumulator, in slices of this many rows
MM_SLICE_ELEMS = 2**24  # mm's fp32 copy of a large second operand (the LM head), this many elements at a time


@contextlib.contextmanager
def native_half_matmuls():
    """bf16 matmuls as torch runs them inside (no fp32 route, no oneDNN route): the memory trace emulates
    CUDA with it, whatever this CPU has."""
    global _own_half_routes
    before, _own_half_routes = _own_half_routes, False
    try:
        yield
    finally:
        _own_half_routes = before


def emulated_half(*tensors: torch.Tensor) -> bool:
    """Whether these are bf16 CPU tensors whose products microft runs in fp32 here: a CPU that emulates
    bf16 (see the module doc)."""
    return (_half_via_fp32 and _own_half_routes
            and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
            and not cpu_supports_bf16())


def bf16_products_in_fp32() -> bool:
    """Whether microft multiplies bf16 CPU tensors in fp32 here (a CPU that emulates bf16; the MFU's peak is
    then fp32's)."""
    return _half_via_fp32 and not cpu_supports_bf16()


def _autocast_taken_over(x: torch.Tensor) -> bool:
    """Autocast to bf16 on a CPU where `linear` casts as autocast would and then runs the bf16 product
    itself: through fp32 where the CPU emulates bf16, through oneDNN where it has bf16 natively."""
    if not (_own_half_routes and autocasting("cpu") and x.device.type == "cpu"
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    return _ONEDNN_BF16 if cpu_supports_bf16() else _half_via_fp32


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 2-D tensors; bf16 where the CPU emulates it: the fp32 product, rounded once.

    A large b (the LM head's (vocab, C) weight) is widened MM_SLICE_ELEMS at a time: in column slices
    when it is wide (logits), else in slices of the summed dimension, accumulated in fp32 (g @ W); a
    large output (the head's weight gradient) is computed in row slices.
    """
    if not emulated_half(a, b):
        return a @ b
    a32 = a.float()
    if b.numel() <= MM_SLICE_ELEMS:
        b32 = b.float()
        if a.size(0) * b.size(1) <= MM_SLICE_ELEMS:
            return (a32 @ b32).to(a.dtype)
        # a tall output (W's gradient)
        out = torch.empty(a.size(0), b.size(1), dtype=a.dtype, device=a.device)
        step = max(1, MM_SLICE_ELEMS // b.size(1))
        for s in range(0, a.size(0), step):
            out[s : s + step] = a32[s : s + step] @ b32
        return out
    k, n = b.shape
    if n >= k:
        step = max(1, MM_SLICE_ELEMS // k)
        out = torch.empty(a.size(0), n, dtype=a.dtype, device=a.device)
        for s in range(0, n, step):
            out[:, s : s + step] = a32 @ b[:, s : s + step].float()
        return out
    step = max(1, MM_SLICE_ELEMS // n)
    acc = a32[:, :step] @ b[:step].float()
    for s in range(step, k, step):
        acc.addmm_(a32[:, s : s + step], b[s : s + step].float())
    return acc.to(a.dtype)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place; bf16 where the CPU emulates it: acc + the product summed in fp32 and rounded
    once, as a native bf16 addmm does, the accumulator widened ADDMM_SLICE_ROWS rows at a time."""
    if not emulated_half(acc, a, b):
        return acc.addmm_(a, b)
    a32, b32 = a.float(), b.float()
    for s in range(0, acc.size(0), ADDMM_SLICE_ROWS):
        part = acc[s : s + ADDMM_SLICE_ROWS]
        part.copy_(torch.addmm(part.float(), a32[s : s + ADDMM_SLICE_ROWS], b32))
    return acc


class _HalfViaFp32(torch.autograd.Function):
    """`fn` (bf16 in, bf16 out) computed on fp32 copies of its inputs; saves the bf16 inputs only and
    recomputes `fn` in fp32 for backward (attention: the extra forward is a few % of a block's FLOPs)."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return _in_fp32(fn, inputs)

    @staticmethod
    def backward(ctx, dy):
        inputs = ctx.saved_tensors
        wide = [t.detach().float().requires_grad_(need) for t, need in zip(inputs, ctx.needs_input_grad[1:])]
        with torch.enable_grad(), autocast_off(inputs[0]):
            y = ctx.fn(*wide)
        grads = torch.autograd.grad(y, [w for w in wide if w.requires_grad], dy.float())
        it = iter(grads)
        return (None, *(next(it).to(t.dtype) if need else None
                        for t, need in zip(inputs, ctx.needs_input_grad[1:])))


def half_via_fp32(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs); bf16 where the CPU emulates it: computed in fp32 and rounded once (deterministic `fn`
    only: backward runs it again)."""
    if not emulated_half(*inputs):
        return fn(*inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _HalfViaFp32.apply(fn, *inputs)
    return _in_fp32(fn, inputs)


def _in_fp32(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """fn on fp32 copies of `inputs` (autocast off), rounded back to their dtype."""
    with autocast_off(inputs[0]):
        return fn(*(t.float() for t in inputs)).to(inputs[0].dtype)


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


def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs `dtype` on this CPU, as the environment holds it, tried once on the
    smallest product microft routes there: held to AVX2 (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2) it has
    no bf16 or fp16 linear and raises "could not create a primitive descriptor"."""
    if _ONEDNN_LINEAR is None:
        return False
    x = torch.ones(ONEDNN_MIN_ROWS, ONEDNN_MIN_FEATURES, dtype=dtype)
    try:
        w = torch.ones(ONEDNN_MIN_FEATURES, ONEDNN_MIN_FEATURES, dtype=dtype)
        _ONEDNN_LINEAR(x, w, None, "none", [None], "")
    except Exception:  # RuntimeError from oneDNN; any other failure (another platform's build) means no, too
        return False
    return True


# asked once at import: constants are what torch.compile traces cleanly, and the answer cannot change in a
# process
_ONEDNN_DTYPES = frozenset(d for d in (torch.float32, torch.bfloat16, torch.float16) if _onednn_runs(d))
# bf16 linears through oneDNN: where the CPU has bf16 natively (never by MICROFT_CPU_BF16 alone) and oneDNN
# runs it
_ONEDNN_BF16 = native_cpu_bf16() and torch.bfloat16 in _ONEDNN_DTYPES


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear can run `dtype` here (the MFU probe times only engines that can)."""
    return dtype in _ONEDNN_DTYPES


def amd_x86(cpuinfo: str | None = None) -> bool:
    """Whether this is an AMD x86 CPU (`cpuinfo`: /proc/cpuinfo's text, read when not given; elsewhere than
    Linux, the processor string Windows reports)."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(4096)  # the first processor's fields
        except OSError:
            return "AuthenticAMD" in platform.processor()
    return any(line.split(":", 1)[0].strip() == "vendor_id" and "AuthenticAMD" in line
               for line in cpuinfo.splitlines())


def _fp32_onednn_default() -> bool:
    """fp32 forwards through oneDNN: on AMD x86 CPUs (MICROFT_ONEDNN=1: on any CPU). On an AMD EPYC they made
    the fp32 GPT-2 step 1.13x faster than MKL everywhere; on an Intel Xeon held to AVX2 (an Intel laptop
    without AVX-512) 0.97x, and 0.8-1.1x per shape with AVX-512 (within that host's noise): no gain over MKL's
    Intel code path there, so Intel and other CPUs keep torch's own products in fp32."""
    return os.environ.get(ONEDNN_ENV) == "1" or amd_x86()


_fp32_onednn = _fp32_onednn_default()


def _onednn_dtype(dtype: torch.dtype) -> bool:
    """fp32 on AMD x86 CPUs (see _fp32_onednn_default); bf16 where the CPU has it natively and oneDNN runs it
    (the same bits as F.linear, up to ~15 % faster); never a dtype oneDNN cannot run here."""
    if dtype == torch.float32:
        return _fp32_onednn and dtype in _ONEDNN_DTYPES
    return dtype == torch.bfloat16 and _own_half_routes and _ONEDNN_BF16 and cpu_supports_bf16()


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN, for x of any rank (flattened to rows and back)."""
    y = _ONEDNN_LINEAR(x.reshape(-1, x.size(-1)), weight, bias, "none", [None], "")
    return y.view(*x.shape[:-1], weight.size(0))


def head_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight.T for the LM head: (rows, C) x (vocab, C) -> (rows, vocab).

    On an AMD CPU in fp32 (see _fp32_onednn_default), with a real tokenizer's vocabulary, this runs through
    oneDNN rather than the BLAS `mm`: for this shape (a few hundred rows, tens of thousands of columns)
    MKL's sgemm ran at ~60 % of its rate on the blocks' matmuls on an AVX2 EPYC (GPT-2 step under
    torch.profiler: 69 vs 115-136 GFLOP/s); oneDNN ran it 1.3x faster in an interleaved micro-benchmark and
    1.8x in the profiled step. Same fp32 products and sums, in another order; small heads (the demo's 1,088
    tokens) keep `mm`.
    """
    if (_ONEDNN_LINEAR is not None and _fp32_onednn and h.device.type == "cpu"
            and not torch.compiler.is_compiling() and h.dtype == weight.dtype == torch.float32
            and weight.size(0) >= ONEDNN_HEAD_MIN_VOCAB):
        return _onednn(h.contiguous(), weight.contiguous(), None)
    return mm(h, weight.t())


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


class _Fp32Linear(torch.autograd.Function):
    """F.linear of bf16 tensors computed in fp32 (a CPU that emulates bf16); saves the bf16 input and weight,
    as F.linear does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _fp32_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.size(-1)).float()
        gx = (dy2 @ weight.float()).to(x.dtype).view(x.shape) if need_x else None
        gw = (dy2.t() @ x.reshape(-1, x.size(-1)).float()).to(weight.dtype) if need_w else None
        gb = dy2.sum(0).to(ctx.bias_dtype) if need_b else None
        return gx, gw, gb


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = None if bias is None else bias.float()
    return linear(x.float(), weight.float(), b).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); its forward through oneDNN on a CPU in fp32 and in bf16 where the CPU has it
    natively, bf16 through fp32 on a CPU that emulates bf16 (see the module doc)."""
    if _autocast_taken_over(x):  # autocast's casts (the bias's too), then bf16 through fp32 or oneDNN
        with autocast_off(x):
            half = torch.bfloat16
            return linear(x.to(half), weight.to(half), None if bias is None else bias.to(half))
    if emulated_half(x, weight) and (bias is None or bias.dtype == torch.bfloat16) and weight.dim() == 2:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _Fp32Linear.apply(x, weight, bias)
        return _fp32_linear(x, weight, bias)
    if (_ONEDNN_LINEAR is None or x.device.type != "cpu" or not _onednn_dtype(x.dtype)
            or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)
            or min(weight.shape) < ONEDNN_MIN_FEATURES or weight.dim() != 2
            or x.dim() < 2 or x.numel() < ONEDNN_MIN_ROWS * x.size(-1) or not x.is_contiguous()
            or not weight.is_contiguous() or autocasting("cpu") or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)  # (compiled: inductor picks the kernel; it cannot lower the op)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def run_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`; a plain nn.Linear through `linear` (adapted or quantized linears run their own
    forward)."""
    if type(module) is nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)
