"""One decoder-only transformer for every family, driven by `ModelConfig` switches.

GPT-2 is the configuration with learned positions, LayerNorm, a fused `c_attn`, tanh-GELU MLP
and a tied head; Llama, Mistral, Qwen2 and Qwen3 use RMSNorm, RoPE (optionally Llama 3
scaled), grouped-query attention, SwiGLU and HF's module names inside blocks (q_proj ... down_proj).
Module containers are the same for every family (`wte`, `wpe`, `h.{i}.ln_1/attn/ln_2/mlp`,
`ln_f`, `lm_head` when untied); `models/hf.py` maps them to each family's HF keys.
Phi-3 / Phi-4-mini (partial rotary, LongRoPE; HF's fused projections split in `models/hf.py`), SmolLM3
(layers without RoPE), OLMo 2 (norms after the sublayers, full-width q/k norms) and Granite 3 (multipliers,
logits scaling) are more switches on the Llama layout.

Gemma 2 and Gemma 3 add (1 + w) RMSNorms in fp32 (`OffsetRMSNorm`), norms on the attention's and the
MLP's outputs, scaled embeddings, GeGLU, per-layer sliding windows, a second RoPE table for Gemma 3's
sliding layers, and soft-capping: of the attention scores (`_SoftcapAttention`, SDPA has none) and of the
logits (in `logits`, and inside the fused loss).

The token embedding (and an untied head) is padded to a multiple of 64 rows (aligned LM-head
matmuls); the padded rows are zero, never a target, masked out of every softmax, never saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from microft.models.config import ModelConfig
from microft.models.linear import half_via_fp32, linear, mm, run_linear
from microft.models.loss import HeadGradLink, fused_cross_entropy, tied_embedding
from microft.models.precision import autocast_off, compute_dtype

CPU_MATH_ATTN_MAX_LEN = 256
Packed = torch.Tensor | tuple[list[int], ...] | None  # packed rows: their mask, or each row's sample lengths
RESIDUAL_PROJ = ("c_proj.weight", "o_proj.weight", "down_proj.weight")  # scaled init: they add to the stream


@dataclass
class Kernels:
    """The forward's choices where a CPU takes other kernels than CUDA, and a hook on block recomputes: one
    object per model, shared by its blocks (`Transformer.kernels`). The defaults are the fast CPU paths; the
    memory trace sets `Kernels.cuda_like()` so a CPU runs the step as CUDA would, and labels what a
    checkpoint recomputes through `recompute_context` (torch.utils.checkpoint's `context_fn`)."""

    cpu_math_attention_max_len: int = CPU_MATH_ATTN_MAX_LEN  # bf16 CPU attention this short: plain ops
    cpu_packed_segments: bool = True  # packed rows attend sample by sample on a CPU (else through the mask)
    recompute_context: Callable | None = None

    @classmethod
    def cuda_like(cls, recompute_context: Callable | None = None) -> Kernels:
        """SDPA at every length and the packed rows' mask, as on CUDA."""
        return cls(cpu_math_attention_max_len=0, cpu_packed_segments=False,
                   recompute_context=recompute_context)


@torch.no_grad()
def init_weight_(name: str, p: torch.Tensor, n_layer: int, unit_offset: bool = False) -> None:
    """GPT-2's init of one named tensor (what `Transformer.reset_parameters` does to each, in order).
    `unit_offset`: norm gains are 1 + weight (Gemma), so their weights start at 0."""
    if name.endswith("bias"):
        p.zero_()
    elif p.dim() == 1:  # norm gains
        p.fill_(0.0 if unit_offset else 1.0)
    elif name.endswith(RESIDUAL_PROJ):
        p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer))
    else:
        p.normal_(0.0, 0.02)


@dataclass
class KVCache:
    """Preallocated keys and values of the key/value heads for generation; `length` positions are filled."""

    k: torch.Tensor  # (L, B, n_kv_head, T_max, hs)
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype),
                   torch.empty(shape, device=device, dtype=dtype))


# --- norms and positions -----------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) × weight, computed in fp32 and cast back before the gain (as HF Llama does), or after it
    (`gain_first`: OLMo 2)."""

    def __init__(self, dim: int, eps: float, gain_first: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.gain_first = gain_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gain_first:
            return (self.weight * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) × (1 + weight), all in fp32, cast back to x's dtype at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
    if cfg.norm_unit_offset:  # Gemma
        return OffsetRMSNorm(dim, cfg.layer_norm_eps)
    return RMSNorm(dim, cfg.layer_norm_eps, cfg.rms_gain_first)


def rope_inv_freq(cfg: ModelConfig, device=None, long: bool = False, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim / 2,) in fp32, with Llama 3's scaling or LongRoPE's factors (the long
    ones if `long`) when configured. `local`: the sliding layers' table (Gemma 3: its own base, no scaling);
    else a linear factor divides them."""
    d = cfg.rotary_dim
    theta = (cfg.rope_local_theta or cfg.rope_theta) if local else cfg.rope_theta
    base = theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    if cfg.longrope is not None:
        lr = cfg.longrope
        return 1.0 / (torch.tensor(lr.long_factor if long else lr.short_factor, device=device) * base)
    inv = 1.0 / base
    if cfg.rope_linear_factor and not local:
        return inv / cfg.rope_linear_factor
    s = cfg.rope_scaling
    if s is None:
        return inv
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, start: int, T: int, device, positions: torch.Tensor | None = None,
                 local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, rotary_dim) in fp32 for positions start .. start + T - 1, or (B, 1, T, rotary_dim)
    for explicit (B, T) `positions` (packed rows: positions restart at every sample); `local`: the sliding
    layers' table (Gemma 3).

    LongRoPE takes its long factors when this forward's furthest position passes the original context (as
    transformers decides, per forward) and scales cos and sin by its attention factor.
    """
    lr = cfg.longrope
    if positions is not None:
        inv = rope_inv_freq(cfg, device, local=local)
        if lr is not None:  # decided on the device: no host sync
            far = positions.max() + 1 > lr.original_max_position_embeddings
            inv = torch.where(far, rope_inv_freq(cfg, device, long=True, local=local), inv)
        freqs = positions.float()[:, None, :, None] * inv
    else:
        pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
        long = lr is not None and start + T > lr.original_max_position_embeddings
        freqs = pos[:, None] * rope_inv_freq(cfg, device, long, local)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if lr is not None and lr.attention_factor != 1.0:
        cos, sin = cos * lr.attention_factor, sin * lr.attention_factor
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position, halves layout (HF's `rotate_half`); with tables narrower than hs
    (partial rotary) only the leading dims turn, the rest pass through."""
    rd = cos.size(-1)
    if rd < x.size(-1):
        # joined in the (B, T, nh, hs) order of the projection x views, as the full rotation's
        # output is: the attention's output then keeps that order and its reshape for o_proj copies nothing
        turned = apply_rope(x[..., :rd], cos, sin)
        return torch.cat((turned.transpose(1, 2), x[..., rd:].transpose(1, 2)), dim=-1).transpose(1, 2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --- attention ---------------------------------------------------------------------------------
def causal_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          allowed: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention as three plain ops in q's dtype (bf16: the softmax accumulates in fp32).

    On CPU in bf16, up to ~512 positions, this runs forward + backward in 0.4-0.7× the time of
    SDPA's flash kernel; it keeps the (B, nh, T, T) probabilities for backward, which up to
    CPU_MATH_ATTN_MAX_LEN = 256 positions is no more than the MLP's hidden activation per token.
    k and v may have fewer (key/value) heads than q: each serves a group of query heads.
    `allowed` (B, 1, T, T), when given, replaces the causal mask (packed rows: block-diagonal causal).
    `scale` multiplies the scores (None: head_dim^-1/2).
    """
    T, groups = q.size(2), q.size(1) // k.size(1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if allowed is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()
    # the mask added as 0 / -inf: the same scores as masked_fill_, which on a CPU ran ~5x slower than an
    # add and needs a second masked pass in backward (an add passes its gradient through)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    with autocast_off(q):  # q, k, v are already in the compute dtype
        att = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
        return att.add_(bias).softmax(-1) @ v


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask of allowed keys as 0 / -inf in `dtype` (what SDPA makes of a boolean mask)."""
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype, device=allowed.device),
                       torch.tensor(float("-inf"), dtype=dtype, device=allowed.device))


def _softcap_probs(q: torch.Tensor, k: torch.Tensor, scale: float, cap: float, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tanh(q k^T × scale / cap), softmax of cap × that + bias): Gemma 2's soft-capped attention
    probabilities, and the tanh its backward needs. k has q's heads already."""
    t = torch.matmul(q, k.transpose(-2, -1)).mul_(scale / cap).tanh_()
    p = t * cap
    if bias is not None:
        p.add_(bias)
    torch._softmax(p, -1, False, out=p)  # in place: no third (B, H, T, S) tensor
    return t, p


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Keys or values with a head per query head, contiguous (one copy either way: the batched matmuls
    would copy the transposed heads themselves, and the memory replay counts one)."""
    return x.contiguous() if groups == 1 else x.repeat_interleave(groups, dim=1)


class _SoftcapAttention(torch.autograd.Function):
    """Attention with tanh soft-capped scores (Gemma 2): softmax(cap × tanh(q k^T × scale / cap) + bias) v.

    SDPA has no soft-capping; autograd over the plain ops would keep ~4 (B, H, T, S) tensors a layer.
    This keeps two (the tanh and the probabilities) and its backward writes the score gradient in place.
    k and v may have fewer (key/value) heads than q; `bias` is the additive mask (0 / -inf) or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, cap, bias):
        groups = q.size(1) // k.size(1)
        kk, vv = _expand_kv(k, groups), _expand_kv(v, groups)
        t, p = _softcap_probs(q, kk, scale, cap, bias)
        y = torch.matmul(p, vv)
        ctx.save_for_backward(q, k, v, t, p)
        ctx.scale, ctx.groups = scale, groups
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, t, p = ctx.saved_tensors
        groups, (B, Hk, S, hs) = ctx.groups, k.shape
        kk, vv = _expand_kv(k, groups), _expand_kv(v, groups)
        dv = torch.matmul(p.transpose(-2, -1), dy)
        dp = torch.matmul(dy, vv.transpose(-2, -1))
        del vv
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # d loss / d (capped scores + bias)
        del dp
        ds.mul_(t.square().neg_().add_(1.0)).mul_(ctx.scale)  # through cap × tanh(. / cap), then the scale
        dq = torch.matmul(ds, kk)
        dk = torch.matmul(ds.transpose(-2, -1), q)
        if groups > 1:  # each key/value head served `groups` query heads: their gradients sum
            dk, dv = dk.view(B, Hk, groups, S, hs).sum(2), dv.view(B, Hk, groups, S, hs).sum(2)
        return dq, dk, dv, None, None, None


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float,
                      allowed: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Soft-capped attention (see `_SoftcapAttention`); `allowed` is a boolean mask of the keys each query
    sees (None: all). With dropout, plain autograd ops (dropout on the probabilities, as transformers)."""
    bias = None if allowed is None else additive_mask(allowed, q.dtype)
    with autocast_off(q):
        if dropout_p == 0.0 and torch.is_grad_enabled():
            return _SoftcapAttention.apply(q, k, v, scale, cap, bias)
        groups = q.size(1) // k.size(1)
        t = torch.matmul(q, _expand_kv(k, groups).transpose(-2, -1)).mul(scale / cap).tanh()
        p = t.mul(cap) if bias is None else t.mul(cap).add(bias)
        p = F.dropout(p.softmax(-1), dropout_p, training=dropout_p > 0)
        return torch.matmul(p, _expand_kv(v, groups))


def packed_attention_mask(positions: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) of packed rows, from their (B, T) positions.

    A sample starts where its position is 0; query i sees key j <= i of the same sample only.
    One mask per row, shared by every head and layer (built once per forward).
    """
    doc = (positions == 0).cumsum(-1)  # (B, T) sample number within the row
    T = positions.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril_()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def packed_segments(positions: torch.Tensor) -> tuple[list[int], ...]:
    """Each packed row's sample lengths, in order, from its (B, T) positions (a sample starts at 0)."""
    out = []
    for row in positions.tolist():
        starts = [0] + [i for i, p in enumerate(row) if p == 0 and i > 0] + [len(row)]
        out.append([b - a for a, b in zip(starts, starts[1:])])
    return tuple(out)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: tuple[list[int], ...],
                      causal) -> torch.Tensor:
    """Attention of packed rows sample by sample: each row split at its samples' boundaries, `causal`
    attention (q, k, v of one sample, (1, heads, n, hs)) per sample, the outputs joined again.

    Exact (the same attention the block-diagonal mask gives) and, on a CPU, cheaper than the masked call:
    a row of 512 positions holding four samples of ~128 attends over ~4x fewer scores (on an AVX2
    EPYC, fp32: 0.5x the CPU time of SDPA with the mask for one layer of GPT-2, `bench/packing.py`).
    """
    rows = []
    for qb, kb, vb, segs in zip(q.unbind(0), k.unbind(0), v.unbind(0), segments, strict=True):
        parts = zip(qb.split(segs, 1), kb.split(segs, 1), vb.split(segs, 1), strict=True)
        rows.append(torch.cat([causal(qs[None], ks[None], vs[None]) for qs, ks, vs in parts], 2))
    return torch.cat(rows)


def attention_mask(T: int, start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, start + T) mask of the keys each new query may see, or None for plain causal.

    Query i (absolute position start + i) sees keys j <= start + i, and with a sliding window
    only j > start + i - window. The window matters only where the sequence exceeds it.
    """
    S = start + T
    if window is not None and S <= window:
        window = None
    if window is None and (start == 0 or T == 1):
        return None
    q = torch.arange(start, S, device=device)[:, None]
    kv = torch.arange(S, device=device)[None, :]
    allowed = kv <= q
    return allowed & (kv > q - window) if window is not None else allowed


class Attention(nn.Module):
    """Multi-head or grouped-query self-attention; GPT-2 keeps a fused `c_attn` and `c_proj`."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, layer: int = 0):
        super().__init__()
        self.kernels = kernels
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # the scores' scale: Granite's attention_multiplier, Gemma's query_pre_attn_scalar^-1/2 (None: SDPA's
        # head_dim^-1/2); soft-capped scores (Gemma 2)
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else (
            cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None)
        self.softcap = cfg.attn_softcap
        C, qd, kvd = cfg.n_embd, cfg.q_dim, cfg.kv_dim
        self.fused = cfg.fused_qkv
        if self.fused:
            self.c_attn = nn.Linear(C, qd + 2 * kvd, bias=cfg.qkv_bias)
            self.c_proj = nn.Linear(qd, C, bias=cfg.attn_out_bias)
        else:
            self.q_proj = nn.Linear(C, qd, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(C, kvd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(C, kvd, bias=cfg.qkv_bias)
            self.o_proj = nn.Linear(qd, C, bias=cfg.attn_out_bias)
        if cfg.qk_norm:  # per head (Qwen3, Gemma 3), or over the whole projection (OLMo 2)
            self.q_norm = make_norm(cfg, qd if cfg.qk_norm_full else cfg.head_dim)
            self.k_norm = make_norm(cfg, kvd if cfg.qk_norm_full else cfg.head_dim)
        self.qk_norm, self.qk_norm_full = cfg.qk_norm, cfg.qk_norm_full
        self.sliding_window = cfg.layer_window(layer)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def use_short_math(self, q: torch.Tensor) -> bool:
        short = q.size(2) <= self.kernels.cpu_math_attention_max_len
        return short and q.device.type == "cpu" and q.dtype == torch.bfloat16

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Causal attention of fresh sequences (q, k, v all of the same positions)."""
        if self.softcap:
            T = q.size(2)
            allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_() if T > 1 else None
            return softcap_attention(q, k, v, self._scale(q), self.softcap, allowed, dropout_p)
        if dropout_p == 0.0 and self.use_short_math(q):
            return causal_attention_math(q, k, v, scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1, dropout_p=dropout_p,
                                              enable_gqa=k.size(1) != q.size(1), scale=self.scale)

    def _scale(self, q: torch.Tensor) -> float:
        return self.scale if self.scale is not None else q.size(-1) ** -0.5

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
               packed: torch.Tensor | None, fresh: bool, dropout_p: float) -> torch.Tensor:
        """Attention of new queries at `start` over the cached and new keys: causal, windowed and/or a
        packed rows' block-diagonal mask."""
        T = q.size(2)
        mask = attention_mask(T, start, self.sliding_window, q.device)
        if packed is not None:
            mask = packed if mask is None else packed & mask
        # causal for a fresh sequence; a single new query (or a masked one) needs no causal flag
        causal = mask is None and start == 0 and T > 1
        if self.softcap:
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()
            return softcap_attention(q, k, v, self._scale(q), self.softcap, mask, dropout_p)
        if fresh and (causal or packed is not None) and dropout_p == 0.0 and self.use_short_math(q):
            return causal_attention_math(q, k, v, mask, self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                              enable_gqa=k.size(1) != q.size(1), scale=self.scale)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, packed: Packed = None) -> torch.Tensor:
        """`packed`: packed rows, as the block-diagonal causal mask (see `packed_attention_mask`) or as
        each row's sample lengths (`packed_segments`: attention per sample)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if self.fused:
            q, k, v = run_linear(self.c_attn, x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        else:
            q, k, v = run_linear(self.q_proj, x), run_linear(self.k_proj, x), run_linear(self.v_proj, x)
        if self.qk_norm_full:  # over every head at once, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, nh, hs), k.view(B, T, nkv, hs), v.view(B, T, nkv, hs)
        if self.qk_norm and not self.qk_norm_full:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh | nkv, T, hs)
        if rope is not None:
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
        dropout_p = self.dropout if self.training else 0.0

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if isinstance(packed, tuple):  # each row's sample lengths (Transformer.hidden checked the window)
                return segment_attention(q, k, v, packed, lambda q, k, v: self.causal(q, k, v, dropout_p))
            return self.masked(q, k, v, start, packed, cache is None, dropout_p)

        # bf16 on a CPU that emulates it: attention in fp32 (models.linear); dropout would not replay
        y = half_via_fp32(attend, q, k, v) if dropout_p == 0.0 else attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)
        return self.resid_drop(run_linear(self.c_proj if self.fused else self.o_proj, y))


# --- MLP ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    """tanh-GELU (`c_fc`, `c_proj`) or SwiGLU (`gate_proj`, `up_proj`, `down_proj`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, hidden = cfg.n_embd, cfg.intermediate_size
        self.swiglu = cfg.mlp == "swiglu"
        self.act = F.silu if cfg.glu_act == "silu" else partial(F.gelu, approximate="tanh")  # SwiGLU / GeGLU
        if self.swiglu:
            self.gate_proj = nn.Linear(C, hidden, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(C, hidden, bias=cfg.mlp_bias)
            self.down_proj = nn.Linear(hidden, C, bias=cfg.mlp_bias)
        else:
            self.c_fc = nn.Linear(C, hidden, bias=cfg.mlp_bias)
            self.c_proj = nn.Linear(hidden, C, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gated = self.act(run_linear(self.gate_proj, x)) * run_linear(self.up_proj, x)
            return self.drop(run_linear(self.down_proj, gated))
        z = run_linear(self.c_fc, x)
        # an adapted (LoRA) or quantised projection runs its own forward
        if type(self.c_proj) is not nn.Linear:
            return self.drop(self.c_proj(F.gelu(z, approximate="tanh")))
        return self.drop(gelu_linear(z, self.c_proj.weight, self.c_proj.bias))


class _GeluLinear(torch.autograd.Function):
    """`F.linear(gelu(z), W, b)` that saves z but not gelu(z): backward recomputes the GELU.

    The MLP's hidden activation is the largest a block keeps; the recompute is one elementwise
    pass. Every op and dtype matches the unfused path (autocast's casts included), so the
    results are the same bits.
    """

    @staticmethod
    def forward(ctx, z, weight, bias):
        dt = compute_dtype(z)
        with autocast_off(z):
            zc, wc = z.to(dt), weight.to(dt)
            y = linear(F.gelu(zc, approximate="tanh"), wc, None if bias is None else bias.to(dt))
        ctx.save_for_backward(zc, wc)
        ctx.dtypes = (z.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        zc, wc = ctx.saved_tensors
        z_dt, w_dt, b_dt = ctx.dtypes
        need_z, need_w, need_b = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.size(-1)).to(wc.dtype)
        dz = dw = db = None
        if need_w:
            a = F.gelu(zc, approximate="tanh")
            dw = mm(dy2.t(), a.reshape(-1, a.size(-1))).to(w_dt)
            del a
        if need_b:
            db = dy2.sum(0).to(b_dt)
        if need_z:
            da = mm(dy2, wc).view(zc.shape)
            dz = torch.ops.aten.gelu_backward(da, zc, approximate="tanh").to(z_dt)
        return dz, dw, db


def gelu_linear(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return F.linear(F.gelu(z, approximate="tanh"), weight, bias)
    return _GeluLinear.apply(z, weight, bias)


# --- the model ---------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, layer: int = 0):
        super().__init__()
        self.kernels = kernels
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, kernels, layer)
        if cfg.post_norms:  # Gemma: the attention's output is normed before it joins the residual stream
            self.post_attn_norm = make_norm(cfg, cfg.n_embd)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        if cfg.post_norms:
            self.post_mlp_norm = make_norm(cfg, cfg.n_embd)
        self.post_norms = cfg.post_norms
        self.grad_ckpt = False  # recompute this block's activations in backward
        self.norm_after = cfg.norm_after  # OLMo 2: ln_1 / ln_2 norm the sublayers' outputs
        self.residual_multiplier = cfg.residual_multiplier  # Granite

    def _forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None, layer: int = 0,
                 packed: Packed = None) -> torch.Tensor:
        if self.norm_after:  # OLMo 2: the norms act on the sublayers' outputs
            x = x + self._scaled(self.ln_1(self.attn(x, rope, cache, layer, packed)))
            return x + self._scaled(self.ln_2(self.mlp(x)))
        if self.post_norms:  # Gemma: pre- and post-norms around both sublayers
            x = x + self.post_attn_norm(self.attn(self.ln_1(x), rope, cache, layer, packed))
            return x + self.post_mlp_norm(self.mlp(self.ln_2(x)))
        x = x + self._scaled(self.attn(self.ln_1(x), rope, cache, layer, packed))
        return x + self._scaled(self.mlp(self.ln_2(x)))

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None, layer: int = 0,
                packed: Packed = None) -> torch.Tensor:
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            ctx = self.kernels.recompute_context
            return checkpoint(self._forward, x, rope, None, 0, packed, use_reentrant=False,
                              **({"context_fn": ctx} if ctx else {}))
        return self._forward(x, rope, cache, layer, packed)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.kernels = Kernels()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, self.kernels, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.reset_parameters()

    def set_kernels(self, kernels: Kernels) -> None:
        """Use `kernels` in every block (they share the model's one `Kernels`)."""
        for m in self.modules():
            if isinstance(m, Transformer | Block | Attention):
                m.kernels = kernels

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's (padded) weight: the token embedding's when tied."""
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation; residual projections scaled by 1/sqrt(2 × n_layer)."""
        for name, p in self.named_parameters():
            init_weight_(name, p, self.config.n_layer, self.config.norm_unit_offset)
        self.zero_padded_rows()

    @torch.no_grad()
    def zero_padded_rows(self) -> None:
        V = self.config.vocab_size
        self.wte.weight[V:].zero_()
        if not self.config.tie_embeddings:
            self.lm_head.weight[V:].zero_()

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, link: HeadGradLink | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) after ln_f; `link` ties the embedding's gradient to the loss's.

        `position_ids` (B, T) marks packed rows: positions restart at 0 for every sample, and
        attention stays within each sample (block-diagonal causal).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of "
                             f"{self.config.n_positions}")
        x = tied_embedding(idx, self.wte.weight, link)
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        if self.config.scale_embeddings:  # Gemma: × sqrt(C), the factor rounded to the weights' dtype first
            x = x * torch.tensor(self.config.n_embd**0.5, device=x.device).to(x.dtype)
        rope, rope_local, packed = None, None, None
        if position_ids is not None:
            if cache is not None:
                raise ValueError("packed rows (position_ids) are for training, not cached generation")
            window = self.config.sliding_window
            if (self.kernels.cpu_packed_segments and idx.device.type == "cpu"
                    and (window is None or T <= window)):
                packed = packed_segments(position_ids)  # attention sample by sample: no masked scores
            else:
                packed = packed_attention_mask(position_ids)
        if self.config.positions == "learned":
            pos = position_ids if position_ids is not None else torch.arange(start, start + T,
                                                                             device=idx.device)
            x = x + self.wpe(pos)
        else:
            rope = rope_cos_sin(self.config, start, T, idx.device, position_ids)
            if self.config.rope_local_theta or self.config.rope_linear_factor:  # Gemma 3: the sliding layers'
                rope_local = rope_cos_sin(self.config, start, T, idx.device, position_ids, local=True)
        x = self.drop(x)
        for i, block in enumerate(self.h):
            r = rope_local if self.config.local_rope(i) else rope
            x = block(x, r if self.config.layer_rope(i) else None, cache, i, packed)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, vocab) logits of final hidden states (the padded rows left out; Granite's divided by its
        logits_scaling, soft-capped where the family caps them: Gemma 2)."""
        head = self.head_weight[: self.config.vocab_size].to(h.dtype)
        return self.softcap(self._unscale(F.linear(h, head)))

    def _unscale(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.config.logits_scaling
        return logits if s == 1.0 else logits / s

    def softcap(self, z: torch.Tensor) -> torch.Tensor:
        """Logits soft-capped as transformers' Gemma 2 does: cap × tanh(z / cap) (unchanged without a
        cap)."""
        cap = self.config.final_softcap
        return z if cap is None else torch.tanh(z / cap) * cap

    def forward(
        self,
        idx: torch.Tensor,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        cache: KVCache | None = None,
        target_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without labels; with labels the fp32 *sum* of token losses.

        The sum (not mean) lets the trainer divide by the target count of the whole global
        batch, which makes gradient accumulation exact. `weights` (B, T) scales each token.
        `target_pos` (flat positions of the targets) lets the loss head skip masked positions.
        `position_ids` (B, T): packed rows of several samples each (see `hidden`).
        """
        if labels is None:
            h = self.hidden(idx, cache, position_ids=position_ids)
            return self.softcap(self._unscale(F.linear(h, self.head_weight[: self.config.vocab_size])))
        # torch.compile traces the two functions apart and would drop the hand-over: plain autograd there
        tied = self.config.tie_embeddings
        link = HeadGradLink() if tied and not torch.compiler.is_compiling() else None
        h = self.hidden(idx, cache, link, position_ids)
        h, labels = h.reshape(-1, h.size(-1)), labels.reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        if target_pos is not None:
            h, labels = h.index_select(0, target_pos), labels.index_select(0, target_pos)
            w = None if w is None else w.index_select(0, target_pos)
        if self.config.logits_scaling != 1.0:  # (h / s) W^T: Granite's logits / s, without the logits
            h = h / self.config.logits_scaling
        return fused_cross_entropy(h, self.head_weight, labels, w, self.config.vocab_size, link,
                                   self.config.final_softcap)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters as the family reports them (padded vocabulary rows excluded)."""
        pad = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        padded = {id(self.wte.weight), id(self.head_weight)}
        total = 0
        for p in self.parameters():
            if not trainable_only or p.requires_grad:
                total += p.numel() - (pad if id(p) in padded else 0)
        return total




def set_grad_checkpointing(model: Transformer, enabled: bool = True, every: int = 1) -> int:
    """Turn on non-reentrant activation checkpointing for every `every`-th block; returns how many."""
    n = 0
    for i, block in enumerate(model.h):
        block.grad_ckpt = enabled and i % every == 0
        n += block.grad_ckpt
    return n
