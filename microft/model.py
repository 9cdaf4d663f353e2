"""GPT-2, exactly: learned positions, pre-LN blocks, tanh-GELU MLP, SDPA attention, tied embeddings.

Internally the token embedding is padded to a multiple of 64 rows (aligned LM-head matmuls);
the padded rows are zero, never a target, masked out of every softmax and never saved.
The loss is a chunked, fused cross-entropy that never holds fp32 logits for a whole micro-batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from microft.config import IGNORE_INDEX, ModelConfig, ce_chunks


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for this device type (never for devices without autocast, like meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes matmuls in here, or `t`'s own."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if autocasting(dev) else t.dtype


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


@dataclass
class KVCache:
    """Preallocated keys and values for generation; `length` positions are filled."""

    k: torch.Tensor  # (L, B, nh, T_max, hs)
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))


CPU_MATH_ATTN_MAX_LEN = 256


def causal_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as three plain ops in q's dtype (bf16: the softmax accumulates in fp32).

    On CPU in bf16, up to ~512 positions, this runs forward + backward in 0.4-0.7× the time of
    SDPA's flash kernel; it keeps the (B, nh, T, T) probabilities for backward, which up to
    CPU_MATH_ATTN_MAX_LEN = 256 positions is no more than the MLP's hidden activation per token.
    """
    T = q.size(2)
    with autocast_off(q):  # q, k, v are already in the compute dtype
        att = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        return att.masked_fill_(future, float("-inf")).softmax(-1) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.cpu_math_max_len = CPU_MATH_ATTN_MAX_LEN  # 0: always SDPA (the memory trace emulates CUDA)

    def use_short_math(self, q: torch.Tensor) -> bool:
        return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(2) <= self.cpu_math_max_len

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
            if start > 0:  # new queries see the whole prefix plus themselves, causally
                causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None and dropout_p == 0.0 and self.use_short_math(q):
            y = causal_attention_math(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.c_fc(x)
        if hasattr(self.c_proj, "lora_A"):  # an adapted projection runs its own forward
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
            y = F.linear(F.gelu(zc, approximate="tanh"), wc, None if bias is None else bias.to(dt))
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
            dw = (dy2.t() @ a.reshape(-1, a.size(-1))).to(w_dt)
            del a
        if need_b:
            db = dy2.sum(0).to(b_dt)
        if need_z:
            da = (dy2 @ wc).view(zc.shape)
            dz = torch.ops.aten.gelu_backward(da, zc, approximate="tanh").to(z_dt)
        return dz, dw, db


def gelu_linear(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return F.linear(F.gelu(z, approximate="tanh"), weight, bias)
    return _GeluLinear.apply(z, weight, bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.grad_ckpt = False  # recompute this block's activations in backward

    def _forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x, cache, layer)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation; residual projections scaled by 1/sqrt(2 × n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # LayerNorm gains
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, 0.02)
        self.wte.weight[self.config.vocab_size :].zero_()

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, link: HeadGradLink | None = None
               ) -> torch.Tensor:
        """Final hidden states (B, T, C) after ln_f; `link` ties the embedding's gradient to the loss's."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.n_positions}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(tied_embedding(idx, self.wte.weight, link) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        cache: KVCache | None = None,
        target_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without labels; with labels the fp32 *sum* of token losses.

        The sum (not mean) lets the trainer divide by the target count of the whole global
        batch, which makes gradient accumulation exact. `weights` (B, T) scales each token.
        `target_pos` (flat positions of the targets) lets the loss head skip masked positions.
        """
        if labels is None:
            return F.linear(self.hidden(idx, cache), self.wte.weight[: self.config.vocab_size])
        # torch.compile traces the two functions apart and would drop the hand-over: plain autograd there
        link = None if torch.compiler.is_compiling() else HeadGradLink()
        h = self.hidden(idx, cache, link)
        h, labels = h.reshape(-1, h.size(-1)), labels.reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        if target_pos is not None:
            h, labels = h.index_select(0, target_pos), labels.index_select(0, target_pos)
            w = None if w is None else w.index_select(0, target_pos)
        return fused_cross_entropy(h, self.wte.weight, labels, w, self.config.vocab_size, link)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters as GPT-2 counts them (the padded embedding rows excluded)."""
        pad = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        total = 0
        for p in self.parameters():
            if not trainable_only or p.requires_grad:
                total += p.numel() - (pad if p is self.wte.weight else 0)
        return total


def set_grad_checkpointing(model: GPT, enabled: bool = True, every: int = 1) -> int:
    """Turn on non-reentrant activation checkpointing for every `every`-th block; returns how many."""
    n = 0
    for i, block in enumerate(model.h):
        block.grad_ckpt = enabled and i % every == 0
        n += block.grad_ckpt
    return n


class HeadGradLink:
    """Hands the tied LM head's weight gradient from the loss's backward to the embedding's.

    The token embedding and the LM head share one weight. Left to autograd, its two gradients
    meet in an out-of-place sum: a zero-filled (vocab, C) embedding gradient plus a new
    (vocab, C) tensor for the total, ~3 full-size passes per micro-step. With a link, the
    loss hands its gradient over and the embedding adds its few rows in place: one edge
    reaches the weight, and the result is the same sum.
    """

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


class _TiedEmbedding(torch.autograd.Function):
    """`F.embedding(idx, weight)` whose weight gradient adds onto the LM head's (see HeadGradLink)."""

    @staticmethod
    def forward(ctx, idx, weight, link):
        ctx.save_for_backward(idx)
        ctx.link, ctx.shape, ctx.dtype = link, weight.shape, weight.dtype
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        g, ctx.link.grad = ctx.link.grad, None
        if g is None:  # the loss did not pass through the head (or it was never backpropagated)
            g = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_out.device)
        rows = grad_out.reshape(-1, grad_out.size(-1)).to(g.dtype)
        g.index_put_((idx.reshape(-1),), rows, accumulate=True)  # repeated ids sum (deterministic)
        return None, g, None


def tied_embedding(idx: torch.Tensor, weight: torch.Tensor, link: HeadGradLink | None) -> torch.Tensor:
    if link is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.embedding(idx, weight)
    return _TiedEmbedding.apply(idx, weight, link)


class _FusedCrossEntropy(torch.autograd.Function):
    """Sum of (weighted) token cross-entropies of h @ W.T, with gradients computed in forward.

    Each chunk's logits are built, reduced to the loss and turned into gradients at once, so
    neither the fp32 logits nor the softmax of the whole micro-batch ever exist together.
    Token weights scale the chunk's rows of h (for W's gradient) and of the product g @ W
    (for h's), never the (rows, vocab) probabilities: one full pass fewer per chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, token_w, vocab_size, need_grads, link):
        need_h, need_w = need_grads
        dt = compute_dtype(h)
        with autocast_off(h):
            W = weight.to(dt)
            valid = targets != IGNORE_INDEX
            tw = valid.to(torch.float32) if token_w is None else token_w.float() * valid
            safe_t = torch.where(valid, targets, 0).unsqueeze(1)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            grad_w = None  # the first chunk's product initialises it: no zero-filled (vocab, C) pass
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for s, n in ce_chunks(h.size(0), W.size(0)):
                hc, tc, wc = h[s : s + n].to(dt), safe_t[s : s + n], tw[s : s + n]
                z = hc @ W.t()  # (n, Vp) logits in the compute dtype
                if W.size(0) > vocab_size:
                    z[:, vocab_size:] = float("-inf")
                z_max, z_t = z.amax(dim=1, keepdim=True), z.gather(1, tc)
                probs = z.float()  # fp32 (z itself in fp32), then softmax in place: no third (n, Vp) tensor
                del z
                torch._softmax(probs, 1, False, out=probs)
                # log-sum-exp = z_max - log p_max, with p_max >= 1/vocab: never underflows, fp32-exact
                lse = z_max.float() - probs.amax(dim=1, keepdim=True).log()
                loss += ((lse - z_t.float()).squeeze(1) * wc).sum()
                if not (need_h or need_w):
                    continue
                probs.scatter_add_(1, tc, torch.full_like(lse, -1.0))  # softmax minus one-hot: d CE / d logits
                g = probs.to(dt)
                del probs
                wcol = wc.to(dt).unsqueeze(1)
                if need_h:
                    torch.mul(g @ W, wcol, out=grad_h[s : s + n])
                if need_w:
                    hw = hc * wcol
                    grad_w = g.t() @ hw if grad_w is None else grad_w.addmm_(g.t(), hw)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype, ctx.link = weight.dtype, link
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out
        gw = None
        if grad_w is not None:  # widen first, then scale in place: one (Vp, C) temporary fewer at backward's peak
            gw = grad_w.to(ctx.weight_dtype)
            gw = gw.mul_(grad_out) if gw is not grad_w else gw * grad_out
        if ctx.link is not None and gw is not None:  # the tied embedding's backward adds its rows to it
            ctx.link.grad, gw = gw, None
        return gh, gw, None, None, None, None, None


def fused_cross_entropy(h, weight, targets, token_w=None, vocab_size: int | None = None,
                        link: HeadGradLink | None = None) -> torch.Tensor:
    """fp32 sum over tokens of weight × CE(h @ weight.T, target); targets of -100 are ignored.

    With `link` (the tied embedding's, see HeadGradLink) the weight's gradient reaches it
    through the embedding's backward, so `weight` gets no autograd edge from here.
    """
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and weight.requires_grad)
    if link is not None and need[1]:
        weight = weight.detach()
    else:
        link = None
    return _FusedCrossEntropy.apply(h, weight, targets, token_w, vocab_size or weight.size(0), need, link)
