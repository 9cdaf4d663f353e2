"""The fused, chunked cross-entropy loss head, and the tied embedding's gradient hand-off.

The loss never holds fp32 logits for a whole micro-batch: each chunk's logits are reduced to
the loss and turned into gradients at once. It works on any head weight (tied or not); with a
tied head, `HeadGradLink` passes the head's weight gradient to the embedding's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from microft.models.config import IGNORE_INDEX, ce_chunks
from microft.models.linear import addmm_, head_logits, mm
from microft.models.precision import autocast_off, compute_dtype


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
    def forward(ctx, h, weight, targets, token_w, vocab_size, need_grads, link, cap):
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
                z = head_logits(hc, W)  # (n, Vp) logits in the compute dtype
                t = None
                if cap is not None:  # soft-capped logits cap × tanh(z / cap) in fp32; t kept for the gradient
                    t = z.float().div_(cap).tanh_()
                    del z
                    z = t * cap
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
                # softmax minus one-hot: d CE / d logits
                probs.scatter_add_(1, tc, torch.full_like(lse, -1.0))
                if t is not None:  # through the cap: d(cap × tanh(z / cap)) / dz = 1 - tanh²
                    probs.mul_(t.mul_(t).neg_().add_(1.0))
                    del t
                g = probs.to(dt)
                del probs
                wcol = wc.to(dt).unsqueeze(1)
                if need_h:
                    torch.mul(mm(g, W), wcol, out=grad_h[s : s + n])
                if need_w:
                    hw = hc * wcol
                    grad_w = mm(g.t(), hw) if grad_w is None else addmm_(grad_w, g.t(), hw)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype, ctx.link = weight.dtype, link
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out
        gw = None
        if grad_w is not None:
            # widened to the weight's dtype, then scaled in place: two same-dtype passes ran faster than one
            # mixed-dtype product (its promoting loop), with the same values
            gw, scale = grad_w.to(ctx.weight_dtype), grad_out.to(ctx.weight_dtype)
            gw = gw * scale if gw is grad_w else gw.mul_(scale)
        if ctx.link is not None and gw is not None:  # the tied embedding's backward adds its rows to it
            ctx.link.grad, gw = gw, None
        return gh, gw, None, None, None, None, None, None


def fused_cross_entropy(h, weight, targets, token_w=None, vocab_size: int | None = None,
                        link: HeadGradLink | None = None, cap: float | None = None) -> torch.Tensor:
    """fp32 sum over tokens of weight × CE(h @ weight.T, target); targets of -100 are ignored.
    `cap`: the logits are soft-capped first, cap × tanh(logits / cap) (Gemma 2's final soft-capping).

    With `link` (the tied embedding's, see HeadGradLink) the weight's gradient reaches it
    through the embedding's backward, so `weight` gets no autograd edge from here.
    """
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and weight.requires_grad)
    if link is not None and need[1]:
        weight = weight.detach()
    else:
        link = None
    V = vocab_size or weight.size(0)
    return _FusedCrossEntropy.apply(h, weight, targets, token_w, V, need, link, cap)
