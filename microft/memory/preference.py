"""`microft dpo`'s training step as a byte-level replay: train/preference.py, op by op, on the SFT replay.

A micro-step of B pairs is one forward of 2B rows (`Replay.rows`: the chosen sides, then the rejected
ones). Its final hidden states feed the log-prob head (`sequence_logps`): the response positions' rows
picked out, then chunks of rows (`ce_chunk_rows`) whose logits are formed, log-softmaxed and gathered at the
targets under a checkpoint (recomputed in backward), summed per row. Then the reference policy's log-probs:
the same head after a forward without gradients (the base with LoRA's adapters off, or a frozen copy of the
starting weights, which the replay holds as further weights), or none (cached log-probs, a reference-free
loss). Then the loss's own small tensors (`pair_losses`: per loss, as the code writes them) and the rewards
statistics the runner keeps. Blocks, clipping and the optimizer are the SFT replay's. Every position of
every row is taken as a response token (the most the head holds), as the trace does (memory/trace.py).
"""

from __future__ import annotations

from dataclasses import replace

from microft.memory.replay import Model, Replay, Setup, build_model
from microft.memory.sim import Sim, Ten
from microft.models.config import ModelConfig, ce_chunk_rows

NEEDS_REFERENCE = ("dpo", "ipo")  # train.preference.NEEDS_REFERENCE, torch-free (a test holds them equal)
LOSS = "loss (fused cross-entropy)"  # the trace's label from the final norm on: the head and the loss
REFERENCE = "reference forward"


def reference_kind(s: Setup) -> str | None:
    """Where the step's reference log-probs come from: "adapters off" (LoRA/QLoRA: the base, one more
    forward), "frozen copy" (full fine-tuning: a second model), "cached" (--precompute-ref) or None (simpo,
    orpo)."""
    if s.pref_loss not in NEEDS_REFERENCE:
        return None
    if s.precompute_ref:
        return "cached"
    return "adapters off" if s.lora else "frozen copy"


class PairReplay(Replay):
    """`Replay` with the preference step's micro-step (a subclass: every other part of the step is shared)."""

    def __init__(self, arch: ModelConfig, setup: Setup, grad_buckets: bool = False):
        super().__init__(arch, setup, grad_buckets)
        self.reference = reference_kind(setup)
        self.frozen: tuple[ModelConfig, Model] | None = None
        if self.reference == "frozen copy":  # reference_of: a deep copy, frozen, in eval mode (no dropout)
            frozen_arch = arch.model_copy(update={"dropout": 0.0})
            frozen = build_model(frozen_arch, replace(setup, lora=True, lora_targets=(), quantize=None))
            for p in frozen.params:
                p.st = self.sim.alloc(p.numel * p.es, "weights", "reference " + p.name)
            self.frozen = (frozen_arch, frozen)
        self.stats: Ten | None = None  # PreferenceRunner.stats, rebuilt by every micro-step

    def run(self, fast: bool = False) -> Sim:
        """`Replay.run`; the fast replay (the planner's) starts with the rewards statistics an earlier
        micro-step left, as the full one has them by then."""
        if fast:
            self.stats = self.sim.new(4, 8, LOSS, "stats")
        return super().run(fast)

    def micro_step(self, at: str) -> None:
        """train.step.micro_step on PreferenceRunner.forward: the batch, the policy's log-probs, the
        reference's, the per-pair losses and rewards, their sum; backward as for SFT."""
        s, sim = self.s, self.sim
        sim.mark(f"{at}, batch", "forward")
        x, y = sim.new(self.N, 8, "batch", "x"), sim.new(self.N, 8, "batch", "y")
        cached = None
        if self.reference == "cached":
            cached = sim.new(2 * s.micro_bs, 4, "batch", "reference log-probs")
        pos = sim.new(self.N, 8, "batch", "target positions")
        sim.mark(f"{at}, forward", "forward")
        sim.cache = {} if s.mixed else None
        logps, n = self.sequence_logps(x, pos, at)
        ref = sim.alias(cached) if cached is not None else None
        if self.reference in ("adapters off", "frozen copy"):
            ref = self.reference_logps(x, pos, at)
        losses, chosen, rejected = self.pair_losses(logps, ref, n)
        self.rewards(chosen, rejected)
        total = sim.op("sum", [losses], [(1, 4, LOSS)], bwd=(("p", 0),))[0]
        sim.drop(logps, n, ref, losses, chosen, rejected)  # the runner's forward returns
        self.backward_of(total, at)
        sim.drop(total, x, y, cached, pos)

    def reference_logps(self, x: Ten, pos: Ten, at: str) -> Ten:
        """The reference's summed log-probs per row, under no_grad: the same model with its adapters off, or
        the frozen copy; everything it allocates is labelled "reference forward"."""
        sim = self.sim
        sim.mark(f"{at}, reference forward", "reference forward")
        # what the forward rebinds: a checkpointed policy block's recompute reads the policy's RoPE tables
        kept = self.a, self.m, self.adapters_off, self.block_bytes, self.tables, self.local_tables
        if self.frozen is not None:
            self.a, self.m = self.frozen
        else:
            self.adapters_off = True
        sim.grad, sim.override = False, REFERENCE
        try:
            sums, n = self.sequence_logps(x, pos, at)
            sim.drop(n)
        finally:
            sim.grad, sim.override = True, None
            self.a, self.m, self.adapters_off, self.block_bytes, self.tables, self.local_tables = kept
        sim.mark(f"{at}, loss", "loss")
        return sums

    def sequence_logps(self, x: Ten, pos: Ten, at: str) -> tuple[Ten, Ten]:
        """train.preference.sequence_logps: (each row's summed target log-probs, each row's target count)."""
        a, sim, N = self.a, self.sim, self.N
        C = a.n_embd
        h = self.forward(x)
        if sim.grad:  # the final norm's hook (the trace's label); the reference keeps its own
            sim.mark(f"{at}, loss", "loss")
        hs = sim.op("index_select", [h, pos], [(N * C, h.es, LOSS)], save_in=((1, (0,)),),
                    bwd=(("g", 0, N * C, h.es),))[0]
        sim.drop(h)
        targets = sim.new(N, 8, LOSS, "targets")
        rows = ce_chunk_rows(N, a.padded_vocab_size)
        recompute = sim.grad and hs.rg
        outs = []
        for s0 in range(0, N, rows):
            n = min(rows, N - s0)
            hc = sim.views("slice", hs, [n * C])[0]  # h[s:s + rows]: its gradient is h-sized (slice_backward)
            if recompute:
                out = sim.checkpoint(lambda hc=hc, n=n: self.token_logps(hc, targets, n), hc, (targets,))
            else:
                out = self.token_logps(hc, targets, n)
            sim.drop(hc)
            outs.append(out)
        lp = sim.op("cat", outs, [(N, 4, LOSS)], bwd=tuple(("p", i) for i in range(len(outs))))[0]
        sim.drop(*outs)
        zeros, row_of = sim.new(self.rows, 4, LOSS, "zeros"), sim.new(N, 8, LOSS, "target_pos // T")
        sums = sim.op("index_add", [zeros, row_of, lp], [(self.rows, 4, LOSS)], save_in=((1, (2,)),),
                      bwd=(("g", 2, N, 4),))[0]
        sim.drop(zeros, row_of)
        mask = sim.new(N, 1, LOSS, "y != ignore")
        count = sim.new(self.rows, 8, LOSS, "count")
        sim.drop(mask)
        n_tokens = sim.new(self.rows, 4, LOSS, "count.float()")
        sim.drop(count, hs, targets, lp)  # the function's locals die as it returns
        return sums, n_tokens

    def token_logps(self, h: Ten, targets: Ten, n: int) -> Ten:
        """train.preference._token_logps on `n` rows: fp32 log-softmax of the head's logits, gathered at the
        targets. A recompute's tensors carry the backward's label (this checkpoint has no context of its
        own)."""
        a, s, sim = self.a, self.s, self.sim
        cat = "backward transients" if sim.rec is not None else LOSS
        C, V, W = a.n_embd, a.vocab_size, self.m.head
        # head_weight[:V]: a view (its gradient the whole weight's size), never the leaf autocast caches
        w = sim.op("slice", [W], [(0, W.es, cat)], bwd=(("g", 0, W.numel, W.es),))[0]
        es = s.compute_bytes
        if s.mixed:  # autocast: the weight's cast first, then the input's
            wc = sim.op("to_copy", [w], [(V * C, 2, cat)], bwd=(("g", 0, V * C, W.es),))[0]
            hc = sim.op("to_copy", [h], [(n * C, 2, cat)], bwd=(("g", 0, n * C, h.es),))[0]
        else:
            wc, hc = sim.alias(w), sim.alias(h)
        z = sim.op("mm", [hc, wc], [(n * V, es, cat)], save_in=((0, (1,)), (1, (0,))),
                   bwd=(("g", 1, V * C, es), ("g", 0, n * C, es)))[0]  # mm's backward: the weight's first
        sim.drop(hc, wc, w)
        if a.logits_scaling != 1.0:  # Granite: logits / s
            z = self._elementwise(z, "div", cat, save=False)
        if a.final_softcap:  # Gemma 2: tanh(z / cap) * cap, the tanh's output saved
            z = self._elementwise(z, "div", cat, save=False)
            t = sim.op("tanh", [z], [(z.numel, z.es, cat)], save_out=((0, (0,)),),
                       bwd=(("g", 0, z.numel, z.es),))[0]
            sim.drop(z)
            z = self._elementwise(t, "mul", cat, save=False)
        if z.es != 4:  # .float()
            z = self._elementwise(z, "to_copy", cat, save=False, es=4)
        lsm = sim.op("log_softmax", [z], [(z.numel, 4, cat)], save_out=((0, (0,)),),
                     bwd=(("g", 0, z.numel, 4),))[0]
        sim.drop(z)
        # gather saves the targets; its gradient: new_zeros, then an out-of-place scatter_add
        out = sim.op("gather", [lsm, targets], [(n, 4, cat)], save_in=((1, (0,)),),
                     bwd=(("t", "zeros", n * V, 4), ("g", 0, n * V, 4), ("f", "zeros")))[0]
        sim.drop(lsm)
        return out

    def _elementwise(self, x: Ten, name: str, cat: str, save: bool, es: int | None = None) -> Ten:
        """A one-input op that replaces `x` (dropped); its gradient is a new tensor of x's size and dtype."""
        y = self.sim.op(name, [x], [(x.numel, es or x.es, cat)], save_in=((0, (0,)),) if save else (),
                        bwd=(("g", 0, x.numel, x.es),))[0]
        self.sim.drop(x)
        return y

    # --- the losses (train.preference.pair_losses) and the runner's rewards ------------------------
    def op1(self, name: str, ins: list, numel: int, save_in: tuple = (), save_out: tuple = (),
            bwd: tuple | None = None) -> Ten:
        """An op of the loss's small tensors: one fp32 output; by default its gradient is a new tensor for
        input 0 (and for input 1: a sub's negated gradient)."""
        if bwd is None:  # a sub passes its gradient on to the first input and negates it for the second
            bwd = (("p", 0),) if name == "sub" else (("g", 0, ins[0].numel, 4),)
            bwd += tuple(("g", i, x.numel, 4) for i, x in enumerate(ins) if i and x is not None)
        return self.sim.op(name, ins, [(numel, 4, LOSS)], save_in=save_in, save_out=save_out, bwd=bwd)[0]

    def log_sigmoid(self, z: Ten) -> Ten:
        """F.logsigmoid: the output and the buffer CPU's kernel returns (both saved with the input)."""
        ls, buf = self.sim.op("log_sigmoid", [z], [(z.numel, 4, LOSS), (z.numel, 4, LOSS)],
                              save_in=((0, (0,)),), save_out=((1, (0,)),), bwd=(("g", 0, z.numel, 4),))
        self.sim.drop(z, buf)
        return ls

    def pair_losses(self, logps: Ten, ref: Ten | None, n: Ten) -> tuple[Ten, Ten, Ten]:
        """(per-pair losses, chosen rewards, rejected rewards), each (B,), as pair_losses computes them."""
        sim, B, kind = self.sim, self.s.micro_bs, self.s.pref_loss
        if kind in NEEDS_REFERENCE:
            d = self.op1("sub", [logps, ref], 2 * B, bwd=(("p", 0), ("g", 1, 2 * B, 4)))
        else:  # mean log-probs: (policy / n_tokens), n_tokens saved for the gradient
            d = self.op1("div", [logps, n], 2 * B, save_in=((1, (0,)),), bwd=(("g", 0, 2 * B, 4),))
        c, r = sim.views("unbind", d, [B, B])
        sim.drop(d)
        if kind == "dpo":
            diff = self.op1("sub", [c, r], B)
            losses = self._scalar_op(self.log_sigmoid(self._scalar_op(diff, "mul")), "neg")
        elif kind == "ipo":  # on the log-ratios averaged over each response's tokens
            nc, nr = sim.views("unbind", n, [B, B])
            a1 = self.op1("div", [c, nc], B, save_in=((1, (0,)),), bwd=(("g", 0, B, 4),))
            a2 = self.op1("div", [r, nr], B, save_in=((1, (0,)),), bwd=(("g", 0, B, 4),))
            d2 = self.op1("sub", [a1, a2], B)
            sim.drop(a1, a2, nc, nr)
            d3 = self._scalar_op(d2, "sub", ("p", 0))
            losses = self.op1("pow", [d3], B, save_in=((0, (0,)),), bwd=(("t", "a", B, 4), ("t", "b", B, 4),
                                                                        ("g", 0, B, 4)))
            sim.drop(d3)
        elif kind == "simpo":
            diff = self.op1("sub", [c, r], B)
            z = self._scalar_op(self._scalar_op(diff, "mul"), "sub", ("p", 0))
            losses = self._scalar_op(self.log_sigmoid(z), "neg")
        else:  # orpo: -pc - lambda × logsigmoid((pc - pr) - (log1p(-exp(pc)) - log1p(-exp(pr))))
            losses = self.orpo(c, r)
        chosen, rejected = sim.new(B, 4, LOSS, "chosen reward"), sim.new(B, 4, LOSS, "rejected reward")
        sim.drop(c, r)
        return losses, chosen, rejected

    def orpo(self, pc: Ten, pr: Ten) -> Ten:
        """ORPO's losses from the mean log-probs, in the code's order of evaluation."""
        sim, B = self.sim, self.s.micro_bs
        t1 = self.op1("sub", [pc, pr], B)
        logs = []
        for p in (pc, pr):
            e = self.op1("exp", [p], B, save_out=((0, (0,)),))
            ne = self._scalar_op(e, "neg")
            logs.append(self.op1("log1p", [ne], B, save_in=((0, (0,)),),
                                 bwd=(("t", "a", B, 4), ("g", 0, B, 4))))
            sim.drop(ne)
        t2 = self.op1("sub", logs, B)
        sim.drop(*logs)
        log_odds = self.op1("sub", [t1, t2], B)
        sim.drop(t1, t2)
        nll = self.op1("neg", [pc], B)
        odds = self._scalar_op(self.log_sigmoid(log_odds), "mul")
        losses = self.op1("sub", [nll, odds], B)
        sim.drop(nll, odds)
        return losses

    def _scalar_op(self, x: Ten, name: str, step: tuple = ("g", 0)) -> Ten:
        """x op a Python scalar: a new tensor, nothing saved; `x` dropped."""
        bwd = (("p", 0),) if step == ("p", 0) else (("g", 0, x.numel, 4),)
        y = self.op1(name, [x], x.numel, bwd=bwd)
        self.sim.drop(x)
        return y

    def rewards(self, chosen: Ten, rejected: Ten) -> None:
        """PreferenceRunner.forward's statistics: the rewards' sums and accuracy, stacked in float64 and added
        to `stats`, which lives on (a new tensor each micro-step)."""
        sim, B = self.sim, self.s.micro_bs
        sums = [sim.new(1, 4, LOSS, "chosen.sum()"), sim.new(1, 4, LOSS, "rejected.sum()")]
        better = sim.new(B, 1, LOSS, "chosen > rejected")
        as_float = sim.new(B, 4, LOSS, ".float()")
        sim.drop(better)
        sums.append(sim.new(1, 4, LOSS, "accuracy sum"))
        sim.drop(as_float)
        sums.append(sim.new(1, 4, LOSS, "pair count"))
        stacked = sim.new(4, 4, LOSS, "stack")
        sim.drop(*sums)
        got = sim.new(4, 8, LOSS, ".double()")
        sim.drop(stacked)
        stats = sim.new(4, 8, LOSS, "stats")
        sim.drop(self.stats, got)
        self.stats = stats
