"""Preference tuning's step: DPO, IPO, SimPO and ORPO losses over pairs, as an `Objective` of the loop.

A micro-batch of B pairs is one forward of 2B rows (the B chosen sides, then the B rejected ones, right-
padded); each row's log-probability is summed over its response tokens only. The step's loss is the mean
over the pairs of the global batch: each micro-step returns the sum of its pairs' losses and the loop
divides by the global batch's pair count (`pair_count`), so any split into micro-batches gives the same
gradient, as the token mean does for SFT.

The losses, in TRL's terms (pc, pr: the policy's summed log-probs of chosen and rejected; rc, rr: the
reference's; nc, nr: the responses' token counts; ac, ar: pc / nc, pr / nr):
  dpo    -logsigmoid(beta × ((pc - rc) - (pr - rr)))              rewards beta × (pc - rc), beta × (pr - rr)
  ipo    ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 beta))²       rewards beta × (pc - rc), beta × (pr - rr)
  simpo  -logsigmoid(beta × (ac - ar) - gamma)                    rewards beta × ac, beta × ar
  orpo   -ac - lambda × logsigmoid(log odds(ac) - log odds(ar))   rewards lambda × ac, lambda × ar
with log odds(a) = a - log(1 - exp(a)). ORPO's NLL term is the chosen response's mean token NLL per pair
(the paper's per-example SFT loss, on the tokens every loss here scores), so every pair weighs the same;
TRL's ORPOTrainer takes it over the prompt's tokens too, as a token mean over each micro-batch. The
reference policy (dpo, ipo) is the model with its LoRA adapters switched off (no copy), a frozen copy of the
starting model for full fine-tuning, or log-probs computed once before training (`precompute`): then no
reference runs while training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from microft.config import NEEDS_REFERENCE
from microft.data.batches import Batch
from microft.models.config import IGNORE_INDEX, ModelConfig, ce_chunk_rows
from microft.models.loss import HeadGradLink
from microft.models.precision import autocast_off, compute_dtype

LOSSES = ("dpo", "ipo", "simpo", "orpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass(frozen=True)
class PreferenceLoss:
    """Which loss and its constants: `beta` (dpo, ipo, simpo), `gamma` (simpo's margin), `lam` (orpo)."""

    kind: str = "dpo"
    beta: float = 0.1
    gamma: float = 0.5
    lam: float = 0.1

    @property
    def needs_reference(self) -> bool:
        return self.kind in NEEDS_REFERENCE


def pair_losses(loss: PreferenceLoss, policy: torch.Tensor, ref: torch.Tensor | None,
                n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from (B, 2) summed log-probs (chosen, rejected)
    of the policy and the reference (None for simpo/orpo) and (B, 2) response token counts."""
    if loss.kind in NEEDS_REFERENCE:
        chosen, rejected = (policy - ref).unbind(1)  # the log-ratios, summed over the response
        if loss.kind == "dpo":
            losses = -F.logsigmoid(loss.beta * (chosen - rejected))
        else:  # ipo: on the log-ratios averaged over each response's tokens
            nc, nr = n_tokens.unbind(1)
            losses = (chosen / nc - rejected / nr - 1 / (2 * loss.beta)) ** 2
        return losses, loss.beta * chosen.detach(), loss.beta * rejected.detach()
    pc, pr = (policy / n_tokens).unbind(1)
    if loss.kind == "simpo":
        losses = -F.logsigmoid(loss.beta * (pc - pr) - loss.gamma)
        return losses, loss.beta * pc.detach(), loss.beta * pr.detach()
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    losses = -pc - loss.lam * F.logsigmoid(log_odds)
    return losses, loss.lam * pc.detach(), loss.lam * pr.detach()


def _log_softmax(hc: torch.Tensor, W: torch.Tensor, cfg: ModelConfig, keep_tanh: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 log-softmax of the logits of rows `hc`, formed as Transformer.logits forms them; the soft-cap's
    tanh when `keep_tanh`, else None) from `hc` and the head `W` (vocab, C) in the compute dtype."""
    z = torch.mm(hc, W.t())  # (n, V), what F.linear dispatches
    del hc, W  # the forward's casts die here (backward's caller keeps its own)
    if cfg.logits_scaling != 1.0:  # Granite
        z = z / cfg.logits_scaling
    t = None
    if cfg.final_softcap is not None:  # Gemma 2: cap × tanh(z / cap)
        if keep_tanh:
            t = torch.tanh(z / cfg.final_softcap)
            z = t * cfg.final_softcap
        else:
            z = torch.tanh(z / cfg.final_softcap) * cfg.final_softcap
    return torch.log_softmax(z.float(), dim=-1), t


def _head(weight: torch.Tensor, cfg: ModelConfig, h: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The head's unpadded rows in the compute dtype: `head_weight[:V].to(h.dtype)`, then autocast's cast."""
    return weight[: cfg.vocab_size].to(h.dtype).to(dt)


class _ResponseLogps(torch.autograd.Function):
    """fp32 log-probability of each row's target under the head's logits, a chunk of rows at a time.

    Only one chunk's (rows × vocab) logits exist at once, and none is kept for backward: backward forms each
    chunk's logits again (last chunk first, the order autograd runs per-chunk graphs in), writes the chunk's
    rows of h's gradient into one (N, C) tensor and adds the head's gradient into one weight-sized tensor,
    where autograd would make a full-size gradient for every chunk's slice of h and of the weight. The values
    are autograd's (the same ops, the chunks summed in the same order), but for the head's gradient from
    the second chunk on in fp32 and bf16-true (`_add_head_grad`). With a tied head `link` (HeadGradLink) takes
    that gradient to the embedding's backward, which adds its rows in place, as for the LM loss.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, cfg, rows, link):
        dt = compute_dtype(h)
        with autocast_off(h):
            parts = []
            for s in range(0, h.size(0), rows):
                lsm, _ = _log_softmax(h[s : s + rows].to(dt), _head(weight, cfg, h, dt), cfg)
                parts.append(lsm.gather(1, targets[s : s + rows].unsqueeze(1)).squeeze(1))
                del lsm
            logps = torch.cat(parts)
        ctx.save_for_backward(h, weight, targets)
        ctx.cfg, ctx.rows, ctx.dt, ctx.link = cfg, rows, dt, link
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets = ctx.saved_tensors
        cfg, rows, dt, link = ctx.cfg, ctx.rows, ctx.dt, ctx.link
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or link is not None
        cap, scale = cfg.final_softcap, cfg.logits_scaling
        with autocast_off(h):
            W = _head(weight, cfg, h, dt)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = None
            for s in reversed(range(0, h.size(0), rows)):
                hc = h[s : s + rows].to(dt)
                lsm, t = _log_softmax(hc, W, cfg, keep_tanh=True)
                if not need_w:
                    hc = None  # only the head's gradient reads it again
                # gather's backward, then log_softmax's: d log p(target) / d logits, times the row's gradient
                g = torch.zeros_like(lsm).scatter_add_(1, targets[s : s + rows].unsqueeze(1),
                                                       grad_out[s : s + rows].unsqueeze(1))
                g = torch._log_softmax_backward_data(g, lsm, 1, torch.float32)
                del lsm
                g = g.to(dt)
                if t is not None:  # through cap × tanh(z / cap)
                    g = torch.ops.aten.tanh_backward(g * cap, t) / cap
                    del t
                if scale != 1.0:
                    g = g / scale
                if need_h:
                    grad_h[s : s + rows] = torch.mm(g, W)
                if need_w:
                    grad_w = _add_head_grad(grad_w, g, hc, weight)
                del g, hc
        if link is not None and grad_w is not None:  # the tied embedding's backward adds its rows to it
            link.grad, grad_w = grad_w, None
        return grad_h, grad_w, None, None, None, None


def _add_head_grad(grad_w: torch.Tensor | None, g: torch.Tensor, hc: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
    """grad_w (weight's shape and dtype; made by the first chunk, its padded rows zero) += g.T @ hc, mm's
    weight gradient. In the weight's dtype (fp32, bf16-true) the product goes straight into place: the first
    chunk's as autograd's, the next ones' summed in by addmm_ (another summation order, no (V, C)
    temporary); in another (mixed precision) it is made, then widened as it is added, as autograd does."""
    V = g.size(1)
    same = g.dtype == weight.dtype
    if grad_w is None:
        grad_w = torch.empty_like(weight)
        grad_w[V:].zero_()
        if same:
            torch.mm(g.t(), hc, out=grad_w[:V])
        else:
            grad_w[:V] = torch.mm(g.t(), hc)
    elif same:
        grad_w[:V].addmm_(g.t(), hc)
    else:
        grad_w[:V] += torch.mm(g.t(), hc)
    return grad_w


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   target_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 log-prob of each row's targets summed, target count per row) for inputs `x` and shifted labels
    `y` (N, T); only the target positions' logits are formed, in chunks of rows (_ResponseLogps).
    `target_pos`: the targets' flat positions, found on the host by `collate_pairs` (else here, at the cost
    of a device sync)."""
    N, T = y.shape
    if target_pos is None:
        target_pos = (y != IGNORE_INDEX).view(-1).nonzero().squeeze(1)
    cfg, weight = model.config, model.head_weight
    link = None
    if cfg.tie_embeddings and torch.is_grad_enabled() and weight.requires_grad:
        link, weight = HeadGradLink(), weight.detach()  # the embedding's backward takes the head's gradient
    h = model.hidden(x, link=link).reshape(N * T, -1).index_select(0, target_pos)
    targets = y.reshape(-1).index_select(0, target_pos)
    rows = ce_chunk_rows(h.size(0), cfg.padded_vocab_size)
    token_logps = _ResponseLogps.apply(h, weight, targets, cfg, rows, link)
    sums = torch.zeros(N, dtype=torch.float32, device=x.device).index_add(0, target_pos // T, token_logps)
    return sums, (y != IGNORE_INDEX).sum(1).to(torch.float32)


def collate_pairs(samples: list[dict[str, Any]], pad_id: int = 0) -> Batch:
    """A micro-batch of pairs as one `Batch` of 2B rows (chosen sides, then rejected), right-padded. Its
    `weights` slot carries the cached reference log-probs (B, 2) when the samples have them; `target_pos` the
    response tokens' flat positions."""
    rows = [(s["chosen_ids"], s["chosen_labels"]) for s in samples]
    rows += [(s["rejected_ids"], s["rejected_labels"]) for s in samples]
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        x[i, : len(ids)] = torch.as_tensor(ids)
        y[i, : len(labels)] = torch.as_tensor(labels)
    ref = None
    if all("ref_logps" in s for s in samples):
        ref = torch.tensor([s["ref_logps"] for s in samples], dtype=torch.float32)
    return Batch(x, y, ref, (y != IGNORE_INDEX).view(-1).nonzero().squeeze(1))


def pair_count(samples: list[dict[str, Any]]) -> float:
    """A step's loss denominator: its number of pairs (each pair weighs the same)."""
    return float(len(samples))


class PreferenceRunner(torch.nn.Module):
    """What the loop's `micro_step` calls: forward(2B rows, their labels, cached reference log-probs or None)
    returns the fp32 sum of the B pairs' losses, and adds the pairs' rewards to `stats` (detached)."""

    def __init__(self, model: torch.nn.Module, loss: PreferenceLoss, reference: Callable | None):
        super().__init__()
        self.model, self.loss, self.reference = model, loss, reference
        self.stats = torch.zeros(4, dtype=torch.float64)  # chosen, rejected, accuracy sums; pairs

    def forward(self, x: torch.Tensor, y: torch.Tensor, cached_ref: torch.Tensor | None = None,
                target_pos: torch.Tensor | None = None) -> torch.Tensor:
        B = x.size(0) // 2
        logps, n = sequence_logps(self.model, x, y, target_pos)
        ref = None
        if self.loss.needs_reference:
            if cached_ref is None:
                with torch.no_grad():
                    ref = self.reference(x, y, target_pos).view(2, B).t()
            else:
                ref = cached_ref
        losses, chosen, rejected = pair_losses(self.loss, logps.view(2, B).t(), ref, n.view(2, B).t())
        got = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                           torch.tensor(float(B), device=chosen.device)]).double()
        self.stats = self.stats.to(got.device) + got
        return losses.sum()

    def take_stats(self) -> dict[str, float]:
        """The rewards metrics (TRL's names) over the pairs since the last call, then start again."""
        c, r, acc, n = (float(v) for v in self.stats)
        self.stats = torch.zeros_like(self.stats)
        n = max(n, 1.0)
        return {"rewards/chosen": c / n, "rewards/rejected": r / n, "rewards/margins": (c - r) / n,
                "rewards/accuracies": acc / n}


def reference_of(model: torch.nn.Module, loss: PreferenceLoss, lora: bool, copy_model: bool = True
                 ) -> Callable | None:
    """The reference policy's summed log-probs per row: the model with its adapters off (LoRA), else a frozen
    copy of `model` as it is now (made once, before any step; `copy_model` False: `model` itself, for
    log-probs taken before it trains); None where the loss needs none."""
    if not loss.needs_reference:
        return None
    if lora:
        from microft.models.lora import adapters_disabled

        def off(x: torch.Tensor, y: torch.Tensor, target_pos: torch.Tensor | None = None) -> torch.Tensor:
            with adapters_disabled(model):
                return sequence_logps(model, x, y, target_pos)[0]
        return off
    return FrozenReference(copy.deepcopy(model).requires_grad_(False).eval() if copy_model else model)


class FrozenReference:
    """A full fine-tune's reference policy: summed log-probs per row under `model`, a frozen copy of the
    starting weights (or the model itself, before it trains, for precomputed log-probs)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 target_pos: torch.Tensor | None = None) -> torch.Tensor:
        return sequence_logps(self.model, x, y, target_pos)[0]


@torch.no_grad()
def precompute_reference(reference: Callable, samples: Sequence[dict[str, Any]], micro_bs: int,
                         device: torch.device, autocast: Callable) -> None:
    """Each sample's reference log-probs (chosen, rejected), computed once in order and kept on the sample as
    "ref_logps", so training runs no reference forward."""
    for s in range(0, len(samples), micro_bs):
        part = [samples[i] for i in range(s, min(len(samples), s + micro_bs))]
        b = collate_pairs(part).to(device)
        with autocast():
            ref = reference(b.input_ids, b.labels, b.target_pos).view(2, len(part)).t().cpu()
        for sample, (c, r) in zip(part, ref.tolist(), strict=True):
            sample["ref_logps"] = (c, r)


@dataclass
class PreferenceObjective:
    """The loop's `Objective` for preference tuning: pair collation, the pair-count denominator, the runner
    (bound once the model sits on its device, before a resume loads any trained weights), the step's rewards
    metrics and the evaluation on held-out pairs."""

    loss: PreferenceLoss
    lora: bool
    precompute: bool = False
    runner: PreferenceRunner | None = field(default=None, init=False)

    collate = staticmethod(collate_pairs)
    weight = staticmethod(pair_count)

    def bind(self, model: torch.nn.Module, train_set: Sequence, val_set: Sequence | None, micro_bs: int,
             device: torch.device, autocast: Callable) -> torch.nn.Module:
        reference = reference_of(model, self.loss, self.lora, copy_model=not self.precompute)
        if self.precompute and reference is not None:
            was = model.training
            model.eval()
            for part in (train_set, val_set or []):
                precompute_reference(reference, part, micro_bs, device, autocast)
            model.train(was)
            reference = None  # training reads the cached values: no reference forward, no copy
        self.runner = PreferenceRunner(model, self.loss, reference)
        return self.runner

    @property
    def chance_vocab(self) -> float:
        """What the verdict takes as the vocabulary for its chance level ln(V): DPO's loss with no preference
        learnt is ln 2; the other losses have no such level (inf: never "near chance")."""
        return 2 if self.loss.kind == "dpo" else math.inf

    def step_metrics(self) -> dict[str, float]:
        return self.runner.take_stats() if self.runner is not None else {}

    @torch.no_grad()
    def evaluate(self, val: Sequence, micro_bs: int, max_batches: int, device: torch.device,
                 autocast: Callable) -> tuple[float, dict[str, float]]:
        """(mean pair loss, rewards metrics) over the first `max_batches` micro-batches of `val`, in order."""
        runner = self.runner
        was = runner.model.training
        runner.model.eval()
        runner.take_stats()  # nothing of a step is left (the loop takes those after it): start clean
        total, n = 0.0, min(len(val), micro_bs * max_batches)
        for s in range(0, n, micro_bs):
            b = collate_pairs([val[i] for i in range(s, min(n, s + micro_bs))]).to(device)
            with autocast():
                total += float(runner(b.input_ids, b.labels, b.weights, b.target_pos))
        runner.model.train(was)
        return total / max(n, 1), runner.take_stats()
