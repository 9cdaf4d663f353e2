"""NF4 storage for frozen base weights (QLoRA's 4-bit NormalFloat) and the linear that computes with it.

Format (bitsandbytes' `quant_type="nf4"`, so its kernels can read our codes and vice versa):

* the weight is flattened and cut into blocks of `block` (64) values; each block keeps its absmax
  (fp32) and each value the index of its nearest NF4 level after scaling by `1 / absmax`
  (a multiplication by the fp32 reciprocal, as bitsandbytes' kernel does, not a division);
* "nearest" is decided by bitsandbytes' 15 decision-tree pivots `NF4_PIVOTS` (fp32 midpoints between
  neighbouring levels) with a strict `x > pivot`: a value exactly on a midpoint takes the lower code;
* two 4-bit codes per uint8, the first element in the high nibble; `(numel + 1) // 2` bytes;
* a last partial block is padded with zeros (they never change an absmax);
* double quantization (`double_quant=True`): absmax minus its mean (`offset`, fp32) is quantized in blocks
  of 256 to uint8 indices into the signed 8-bit dynamic map (`dynamic_map`), choosing the index with
  bitsandbytes' CUDA binary search (`_dynamic_codes`), with one fp32 absmax per 256 blocks (`absmax2`).

Deliberate differences from bitsandbytes, both in blocks it turns into NaN: an all-zero block gets code 7
(exact 0.0) where bitsandbytes' `0 * (1/0)` NaN falls through its tree to code 0 (which dequantizes to -0.0);
a block whose absmax is so small that its reciprocal overflows is scaled by a division instead.
Non-finite weights are refused with a ConfigError naming the tensor.

Memory an estimator should count, per quantized weight of n elements (n_blocks = ceil(n / 64)):
  storage   n/2 bytes of codes + 4 * n_blocks (plain) or n_blocks + 4 * ceil(n_blocks / 256) + 4 (double)
            -> 4.5 bits/weight plain, ~4.127 bits/weight double-quantized;
  forward   one dequantized weight in the compute dtype, built and dropped inside the op, plus its
            transients (fp32 values 4 B/elem + int32 indices 2 B/elem); nothing dequantized is saved
            for backward (only the NF4 buffers, which already exist);
  backward  the same dequantized weight again (recomputed), then `grad_out @ W`; no weight grad.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from microft.errors import ConfigError
from microft.layouts import DOUBLE_QUANT_BLOCK, NF4_BLOCK, nf4_nbytes  # noqa: F401 (re-exported)
from microft.models.linear import linear, mm

BLOCK = NF4_BLOCK
QUANT_CHUNK = 1 << 20  # elements quantized at a time: bounds the fp32 transients of quantize_nf4

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023; bitsandbytes' nf4 code), low to high.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' dQuantizeNF4 pivots, low to high: code = number of pivots strictly below x.
NF4_PIVOTS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)


@cache
def _dynamic_map_values(signed: bool) -> tuple[float, ...]:
    from torch.utils._python_dispatch import _disable_current_modes

    # computed on real CPU tensors even when first asked for under a fake-tensor (or any dispatch) mode:
    # values read from fake tensors are placeholders, and they would be cached for the whole process
    with _disable_current_modes(), torch.device("cpu"):
        vals: list[torch.Tensor] = [torch.tensor([0.0, 1.0])]
        for i in range(7):  # decades 1e-6 .. 1; each gets twice the fraction steps of the one below
            edges = torch.linspace(0.1, 1.0, 2 ** (i + (0 if signed else 1)) + 1, dtype=torch.float32)
            means = (edges[:-1] + edges[1:]) / 2.0
            scaled = means * 10.0 ** (i - 6)
            vals += [scaled, -scaled] if signed else [scaled]
        out = torch.sort(torch.cat(vals)).values
    assert out.numel() == 256
    return tuple(out.tolist())  # plain floats (exact fp32 values), so fake/meta modes can build the tensor


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 fp32 values of the 8-bit dynamic-exponent map (Dettmers 2015; bitsandbytes' default code).

    Seven decades (1e-6 .. 1), each split linearly into 2^i (signed: per sign) or 2^(i+1) steps,
    plus 0 and 1.0; sorted. Used for double-quantized NF4 absmax and for AdamW8bit's moments.
    """
    return torch.tensor(_dynamic_map_values(signed), dtype=torch.float32, device=device)


def _dynamic_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index into `code` for each x in [-1, 1], by bitsandbytes' 7-step binary search (CUDA dQuantize).

    Vectorised: seven fixed rounds of `where`, no data-dependent Python branching. Ties at a midpoint
    go toward the search's last pivot, exactly as the kernel's `x > mid` / `x < mid` tests do.
    """
    pivot = torch.full(x.shape, 127, dtype=torch.int64, device=x.device)
    lo_p, hi_p = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lo, hi = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lo_p, lo = torch.where(up, pivot, lo_p), torch.where(up, val, lo)
        hi_p, hi = torch.where(up, hi_p, pivot), torch.where(up, hi, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    hi = torch.where(hi_p == 255, code[255], hi)
    lo = torch.where(lo_p == 0, code[0], lo)
    up = x > val
    idx = torch.where(up, torch.where(x > (hi + val) * 0.5, hi_p, pivot),
                      torch.where(x < (lo + val) * 0.5, lo_p, pivot))
    return idx.to(torch.uint8)


def _is_symbolic(t: torch.Tensor) -> bool:
    """True for meta and fake tensors, whose values can't be inspected."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _check_finite(w: torch.Tensor, name: str) -> None:
    if not _is_symbolic(w) and not bool(torch.isfinite(w).all()):
        raise ConfigError(f"can't quantize {name} to NF4: it has non-finite values (inf or nan)")


def _blockwise_scale(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x (rows of a block) times 1/absmax as bitsandbytes does; 0 for all-zero rows, x/absmax where
    1/absmax overflows."""
    inv = 1.0 / absmax
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    return torch.where(torch.isfinite(inv)[:, None], x * inv[:, None], x / safe[:, None])


@dataclass
class NF4Weight:
    """A weight in NF4: packed codes, per-block absmax (fp32, or uint8 + `absmax2`/`offset` when
    double-quantized)."""

    codes: torch.Tensor            # uint8 ((numel + 1) // 2,), first element in the high nibble
    absmax: torch.Tensor           # fp32 (n_blocks,) or uint8 (n_blocks,) with double quantization
    shape: torch.Size
    dtype: torch.dtype             # the dtype the weight had (what `dequantize_nf4` returns by default)
    block: int = BLOCK
    absmax2: torch.Tensor | None = None  # fp32 (ceil(n_blocks / 256),)
    offset: torch.Tensor | None = None   # fp32 scalar: mean of the absmax before double quantization

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes held: codes + block scales (+ second-level scales and offset)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.absmax2, self.offset)
                   if t is not None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block: int = BLOCK, double_quant: bool = False,
                 name: str = "weight") -> NF4Weight:
    """NF4-quantize `w` (any shape, any float dtype, any device incl. meta/fake) in blocks of `block` values.

    Works through `QUANT_CHUNK` elements at a time, so its transients stay ~10 MB on top of the output.
    """
    if block % 2 or block <= 0:
        raise ConfigError(f"NF4 block size must be a positive even number, got {block}")
    _check_finite(w, name)
    numel = w.numel()
    n_blocks = -(-numel // block)
    flat = w.reshape(-1)
    codes = torch.empty(n_blocks * block // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    pivots = torch.tensor(NF4_PIVOTS, dtype=torch.float32, device=w.device)
    step = max(QUANT_CHUNK // block, 1) * block
    for start in range(0, n_blocks * block, step):
        x = flat[start:start + step].float()
        if x.numel() % block:
            x = F.pad(x, (0, block - x.numel() % block))
        x = x.view(-1, block)
        am = x.abs().amax(dim=1)
        # count of pivots < x
        c = torch.bucketize(_blockwise_scale(x, am), pivots).to(torch.uint8).view(-1, 2)
        codes[start // 2:start // 2 + c.shape[0]] = (c[:, 0] << 4) | c[:, 1]
        absmax[start // block:start // block + am.numel()] = am
    if codes.numel() != (numel + 1) // 2:
        codes = codes[:(numel + 1) // 2].clone()
    q = NF4Weight(codes, absmax, torch.Size(w.shape), w.dtype, block)
    return _double_quantize(q) if double_quant else q


def _double_quantize(q: NF4Weight) -> NF4Weight:
    n = q.absmax.numel()
    offset = q.absmax.mean()
    x = q.absmax - offset
    if n % DOUBLE_QUANT_BLOCK:
        x = F.pad(x, (0, DOUBLE_QUANT_BLOCK - n % DOUBLE_QUANT_BLOCK))
    x = x.view(-1, DOUBLE_QUANT_BLOCK)
    absmax2 = x.abs().amax(dim=1)
    idx = _dynamic_codes(_blockwise_scale(x, absmax2), dynamic_map(True, x.device)).view(-1)[:n]
    return NF4Weight(q.codes, idx.clone(), q.shape, q.dtype, q.block, absmax2, offset)


def _absmax_fp32(absmax: torch.Tensor, absmax2: torch.Tensor | None,
                 offset: torch.Tensor | None) -> torch.Tensor:
    if absmax2 is None:
        return absmax
    n = absmax.numel()
    code = dynamic_map(True, absmax.device)
    idx = absmax.int()
    if n % DOUBLE_QUANT_BLOCK:
        idx = F.pad(idx, (0, DOUBLE_QUANT_BLOCK - n % DOUBLE_QUANT_BLOCK))
    vals = (code[idx].view(-1, DOUBLE_QUANT_BLOCK) * absmax2[:, None]).view(-1)[:n]
    return vals + offset


def _pair_table(device: torch.device) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    b = torch.arange(256, device=device)
    return torch.stack((levels[b >> 4], levels[b & 15]), dim=1)  # (256, 2): both levels of each byte


def _dequantize(codes, absmax, absmax2, offset, shape, block, dtype) -> torch.Tensor:
    numel = math.prod(shape)
    n_blocks = -(-numel // block)
    vals = F.embedding(codes.int(), _pair_table(codes.device)).view(-1)  # fp32 levels, 2 per byte
    if vals.numel() != n_blocks * block:
        vals = F.pad(vals, (0, n_blocks * block - vals.numel()))
    scale = _absmax_fp32(absmax, absmax2, offset)
    # fp32 product, then one cast (as bitsandbytes)
    out = vals.view(n_blocks, block).mul_(scale[:, None]).view(-1)
    if out.numel() != numel:
        out = out[:numel]
    return out.to(dtype).view(shape)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight `q` stands for, in `dtype` (default: its original dtype): level * absmax in fp32, cast."""
    return _dequantize(q.codes, q.absmax, q.absmax2, q.offset, tuple(q.shape), q.block, dtype or q.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matmuls in here, or x's own."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _NF4LinearFn(torch.autograd.Function):
    """y = x @ dequant(W).T + b. Saves only the NF4 buffers; backward dequantizes W again for grad_input."""

    @staticmethod
    def forward(ctx, x, bias, codes, absmax, absmax2, offset, shape, block, observe):
        with observe():  # NF4Linear.observe_dequantize: the memory trace labels these bytes
            w = _dequantize(codes, absmax, absmax2, offset, shape, block, x.dtype)
        ctx.save_for_backward(codes, absmax, absmax2, offset)
        ctx.shape, ctx.block = shape, block
        return linear(x, w, bias)  # no autograd in here: a plain (oneDNN on a CPU in fp32) forward

    @staticmethod
    def backward(ctx, grad):
        codes, absmax, absmax2, offset = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(codes, absmax, absmax2, offset, ctx.shape, ctx.block, grad.dtype)
            grad_x = mm(grad.reshape(-1, grad.shape[-1]), w).view(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear whose weight is stored in NF4 (buffers `weight_nf4`, `weight_absmax`
    [, `weight_absmax2`, `weight_offset`]); the bias, if any, is a frozen parameter `bias`.

    forward(x) = F.linear(x, W, b) with W dequantized into the compute dtype (x's dtype, or autocast's)
    for this call only. `weight` is an `NF4Weight` view (shape, dtype, device, `.dequantize()`), so code
    that inspects a base linear's weight works, and code that would matmul with it fails loudly instead
    of silently materializing a full-precision copy. Loading a plain `weight` tensor through
    `load_state_dict` quantizes it on the way in (one layer at a time: see `quantize_tensor_for_load`).
    """

    # a context around the forward's dequantization (and a checkpoint's recompute of it), not backward's:
    # the memory trace sets it to count those bytes as "NF4 dequantization"
    observe_dequantize: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block: int = BLOCK,
                 double_quant: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.double_quant, self.weight_dtype = block, double_quant, dtype
        numel = in_features * out_features
        n_blocks = -(-numel // block)
        self.register_buffer("weight_nf4", torch.zeros((numel + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax2",
                                 torch.zeros(-(-n_blocks // DOUBLE_QUANT_BLOCK), device=device))
            self.register_buffer("weight_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, device=device))
            self.register_buffer("weight_absmax2", None)
            self.register_buffer("weight_offset", None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = BLOCK, double_quant: bool = False,
                    name: str = "weight") -> NF4Linear:
        """An NF4Linear holding `linear`'s weight quantized (on the weight's device) and its bias (shared)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, False, block, double_quant, "meta", w.dtype)
        mod.set_weight(quantize_nf4(w, block, double_quant, name))
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return mod

    def set_weight(self, q: NF4Weight) -> None:
        """Take `q` as this layer's weight (its tensors become the buffers; no copy)."""
        if tuple(q.shape) != (self.out_features, self.in_features) or q.block != self.block \
                or q.double_quant != self.double_quant:
            raise ConfigError(f"NF4 weight {tuple(q.shape)} (block {q.block}, double_quant {q.double_quant}) "
                              f"doesn't fit NF4Linear({self.in_features}, {self.out_features}, "
                              f"block={self.block}, double_quant={self.double_quant})")
        self.weight_nf4, self.weight_absmax = q.codes, q.absmax
        self.weight_absmax2, self.weight_offset = q.absmax2, q.offset
        self.weight_dtype = q.dtype

    def load_full_weight(self, w: torch.Tensor, name: str = "weight") -> None:
        """Quantize a full-precision (out, in) weight into this layer (on w's device); drop w after."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"{name} has shape {tuple(w.shape)}, NF4Linear expects "
                              f"{(self.out_features, self.in_features)}")
        self.set_weight(quantize_nf4(w, self.block, self.double_quant, name))

    @property
    def weight(self) -> NF4Weight:
        return NF4Weight(self.weight_nf4, self.weight_absmax,
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.block,
                         self.weight_absmax2, self.weight_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return _NF4LinearFn.apply(x.to(dtype), bias, self.weight_nf4, self.weight_absmax, self.weight_absmax2,
                                  self.weight_offset, (self.out_features, self.in_features), self.block,
                                  self.observe_dequantize)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:  # a full-precision checkpoint: quantize on the way in
            w = state_dict.pop(prefix + "weight")
            if self.weight_nf4.device.type != "meta":
                w = w.to(self.weight_nf4.device)
            state_dict.update(quantize_tensor_for_load(prefix + "weight", w, self.block, self.double_quant))
            self.weight_dtype = w.dtype
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # `.to(bf16)` / `.half()` must move the fp32 block scales, never round them.
        scales = {k: b for k, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, old in scales.items():
            if self._buffers[k].dtype != torch.float32:
                self._buffers[k] = old.to(self._buffers[k].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block={self.block}, double_quant={self.double_quant}")


def quantize_tensor_for_load(name: str, tensor: torch.Tensor, block: int = BLOCK,
                             double_quant: bool = False) -> dict[str, torch.Tensor]:
    """The NF4Linear state-dict entries for a full-precision `<module>.weight` tensor.

    For a loader that reads a checkpoint one tensor at a time: for each linear weight it has decided to
    quantize, it loads these entries instead of the tensor, and can drop the tensor at once, so the peak
    is the NF4 model plus one full-precision layer (plus `QUANT_CHUNK` fp32 transients).
    """
    if not name.endswith("weight"):
        raise ConfigError(f"only a linear's weight can be stored in NF4, not {name}")
    prefix = name[: -len("weight")]
    q = quantize_nf4(tensor, block, double_quant, name)
    out = {prefix + "weight_nf4": q.codes, prefix + "weight_absmax": q.absmax}
    if q.double_quant:
        out |= {prefix + "weight_absmax2": q.absmax2, prefix + "weight_offset": q.offset}
    return out


def quantize_model_(model: nn.Module, should_quantize: Callable[[str, nn.Module], bool], block: int = BLOCK,
                    double_quant: bool = False) -> list[str]:
    """Replace each `nn.Linear` for which `should_quantize(name, module)` holds by an NF4Linear, in place.

    Each full-precision weight is released as soon as its layer is quantized (peak: the model plus one
    layer's quantization transients). Quantize before adding adapters. A weight shared with another
    module (a tied head) is refused. Returns the names of the replaced modules.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and should_quantize(n, m)]
    for name, lin in chosen:
        if uses.get(id(lin.weight), 0) > 1:
            raise ConfigError(f"can't quantize {name} to NF4: its weight is shared with another "
                              "module (tied)")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                NF4Linear.from_linear(lin, block, double_quant, name + ".weight"))
        lin.weight = None  # drop our reference now; the old module may still be referenced elsewhere
    return [n for n, _ in chosen]


# --- QLoRA: which linears are quantized, the record a checkpoint keeps, undoing it for merge ---

SCHEMES = ("nf4",)
QUANT_RECORD = "quantization.json"


def is_block_linear(name: str, module: nn.Module) -> bool:
    """The frozen linears QLoRA stores in NF4: every nn.Linear inside a block (`h.N....`).

    Embeddings, norms and the LM head stay in the compute dtype (they are few weights and the head's
    error would reach every logit).
    """
    return name.startswith("h.") and type(module) is nn.Linear


def _no_block_linears(model: nn.Module) -> ConfigError:
    name = getattr(getattr(model, "config", None), "name", "the model")
    return ConfigError(f"--quantize nf4: {name} has no block linears to quantize")


def quantize_blocks_(model: nn.Module, block: int = BLOCK, double_quant: bool = False) -> list[str]:
    """NF4-quantize every block linear of an allocated model in place; ConfigError if it has none."""
    names = quantize_model_(model, is_block_linear, block, double_quant)
    if not names:
        raise _no_block_linears(model)
    return names


def nf4_meta_blocks_(model: nn.Module, block: int = BLOCK, double_quant: bool = False) -> list[str]:
    """On a meta-device model, replace every block linear by an empty (meta) NF4Linear; returns their names.

    The loader then reads each full-precision weight and hands it to `NF4Linear.load_full_weight`, so
    only one full-precision layer exists at a time.
    """
    chosen = [(n, m) for n, m in model.named_modules() if is_block_linear(n, m)]
    if not chosen:
        raise _no_block_linears(model)
    for name, lin in chosen:
        parent, _, attr = name.rpartition(".")
        q = NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, block, double_quant, "meta",
                      lin.weight.dtype)
        setattr(model.get_submodule(parent), attr, q)
    return [n for n, _ in chosen]


@torch.no_grad()
def dequantize_model_(model: nn.Module) -> int:
    """Replace every NF4Linear by an nn.Linear holding its dequantized weight (for merge / export)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name, q in found:
        parent, _, attr = name.rpartition(".")
        with torch.device("meta"):
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight = nn.Parameter(q.weight.dequantize(), requires_grad=False)
        lin.bias = q.bias
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
    if found and hasattr(model, "quantization"):
        del model.quantization
    return len(found)


def quant_record(scheme: str, double_quant: bool, base_model: str, block: int = BLOCK) -> dict:
    """What a QLoRA checkpoint records instead of base weights: how to rebuild the NF4 base."""
    return {"scheme": scheme, "block": block, "double_quant": double_quant, "base_model": base_model}


def write_quant_record(directory, model: nn.Module, extra: dict | None = None) -> None:
    """A QLoRA checkpoint's `quantization.json`: the scheme, the base to rebuild and the model shape."""
    import json
    from pathlib import Path

    rec = {"format": "microft-qlora", **model.quantization, "model": model.config.model_dump(),
           **(extra or {})}
    (Path(directory) / QUANT_RECORD).write_text(json.dumps(rec, indent=2))


def read_quant_record(directory) -> dict | None:
    """The parsed `quantization.json` of a QLoRA checkpoint, or None when the directory has none."""
    import json
    from pathlib import Path

    from microft.errors import CheckpointError

    p = Path(directory) / QUANT_RECORD
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None
    if not isinstance(rec, dict) or rec.get("scheme") not in SCHEMES or not rec.get("base_model"):
        raise CheckpointError(f"{p}: not a quantization record microft understands")
    return rec
