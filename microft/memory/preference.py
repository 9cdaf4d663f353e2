"""`microft dpo`'s training step as a byte-level replay: train/preference.py, op by op, on the SFT replay.

A micro-step of B pairs is one forward of 2B rows (`Replay.rows`: the chosen sides, then the rejected
ones). Its final hidden states feed the log-prob head (`sequence_logps`): the response positions' rows
picked out, then chunks of rows (`ce_chunk_rows`) whose logits are formed, log-softmaxed and gathered at the
targets (`_ResponseLogps`: one node, whose backward forms each chunk's logits again and sums the head's
gradient in one tensor, handed to a tied embedding's backward), summed per row. Then the reference policy's
log-probs: the same head after a forward without gradients (the base with LoRA's adapters off, or a frozen
copy of the starting weights, which the replay holds as further weights), or none (cached log-probs, a
reference-free loss). Then the loss's own small tensors (`pair_losses`: per loss, as the code writes them)
and the rewards statistics the runner keeps. Blocks, clipping and the optimizer are the SFT replay's. Every
position of every row is taken as a response token (the most the head holds), as the trace does
(memory/trace.py).
"""

from __future__ import annotations

from dataclasses import replace

from microft.config import NEEDS_REFERENCE
from microft.memory.replay import Model, Replay, Setup, build_model
from microft.memory.sim import Sim, Ten, cuda_bytes
from microft.models.config import ModelConfig, ce_chunk_rows

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
        lp = self.response_logps(hs, targets)
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

    every_chunk = False  # True: replay every chunk of the head (what `chunks` shortens; a test compares)

    def chunks(self) -> list[int]:
        """Rows of the chunks of the log-prob head the replay walks, in order (models.config.ce_chunk_rows):
        every chunk up to three; beyond, the first, the last full one and the last, as the SFT loss's
        `ce_chunk_sizes` (a planner's batch may hold thousands). The full chunks between repeat the first
        exactly but for the gathered log-probs they leave behind (`skipped_parts`): each chunk's peak is
        the same on more such parts, so the last full chunk's is the highest, and the backward (which
        keeps nothing from chunk to chunk past the first done) repeats them exactly."""
        N = self.N
        rows = ce_chunk_rows(N, self.a.padded_vocab_size)
        sizes = [min(rows, N - s0) for s0 in range(0, N, rows)]
        return sizes if self.every_chunk or len(sizes) <= 3 else [sizes[0], sizes[-2], sizes[-1]]

    def skipped_parts(self) -> int:
        """Bytes of the gathered log-probs the full chunks `chunks` leaves out hold until the concatenation
        (each its own allocation: a multiple of 128 rows of fp32, whole 512-byte blocks)."""
        rows = ce_chunk_rows(self.N, self.a.padded_vocab_size)
        listed = self.chunks()
        return (-(-self.N // rows) - len(listed)) * cuda_bytes(rows * 4)

    def response_logps(self, h: Ten, targets: Ten) -> Ten:
        """train.preference._ResponseLogps's forward: chunk by chunk, the logits' log-softmax gathered at the
        targets, then the (N,) log-probs concatenated; its node saves h and the targets, and its backward
        forms each chunk's logits again (`response_logps_backward`)."""
        a, sim, W = self.a, self.sim, self.m.head
        C, V, dt = a.n_embd, a.vocab_size, self.s.compute_bytes
        ev, parts = _Steps(), []
        for i, n in enumerate(self.chunks()):
            hc = ev.new(n * C * dt) if h.es != dt else None  # h[s:s + rows].to(dt), then the head's cast
            w = ev.new(V * C * dt) if W.es != dt else None
            lsm, _ = self.log_softmax(ev, n, (hc, w), keep_tanh=False)
            parts.append(ev.new(n * 4))  # gather
            ev.free(lsm)
            if i == 0 and (skipped := self.skipped_parts()):  # the chunks `chunks` leaves out: their parts
                parts.append(ev.new(skipped))
        held = {}
        for step in ev.steps:  # no_grad inside an autograd.Function's forward: plain allocations
            if step[0] == "t":
                held[step[1]] = sim.alloc(step[2], LOSS, "log-prob head")
            else:
                sim.unref(held.pop(step[1]))
        lp = sim.new(self.N, 4, LOSS, "cat")
        for st in held.values():  # the chunks' gathered log-probs: the forward's `parts`
            sim.unref(st)
        linked = self.linked and sim.grad
        bwd = self.response_logps_backward(h, linked)
        sim.custom("response_logps", [h, None if linked else W], lp, [h, targets], bwd)
        return lp

    def log_softmax(self, ev: _Steps, n: int, casts: tuple[str | None, ...], keep_tanh: bool
                    ) -> tuple[str, str | None]:
        """train.preference._log_softmax on `n` rows, as steps: the (n, V) logits in the compute dtype (then
        `casts` die: the forward's), Granite's scaling, Gemma 2's soft-cap, the fp32 log-softmax. Returns the
        keys of the log-softmax and of the cap's tanh (if kept)."""
        a, es = self.a, self.s.compute_bytes
        nv = n * a.vocab_size * es
        z = ev.new(nv)
        ev.free(*casts)
        if a.logits_scaling != 1.0:  # z = z / s
            z = ev.replace(z, ev.new(nv))
        t = None
        if a.final_softcap:  # t = tanh(z / cap) (its input a temporary); z = t * cap
            zc = ev.new(nv)
            t = ev.new(nv)
            ev.free(zc)
            capped = ev.new(nv)
            if not keep_tanh:
                ev.free(t)
                t = None
            z = ev.replace(z, capped)
        zf = ev.new(n * a.vocab_size * 4) if es != 4 else None  # z.float()
        lsm = ev.new(n * a.vocab_size * 4)
        ev.free(zf, z)
        return lsm, t

    def response_logps_backward(self, h: Ten, linked: bool) -> tuple:
        """_ResponseLogps.backward as the engine's steps: the head's cast, h's gradient, then each chunk
        from the last: its logits again, gather's and log-softmax's gradients, back through the cap and the
        scaling, its rows of h's gradient, its product into the head's gradient (made by the first chunk
        done; through a (V, C) temporary where the product's dtype is not the weight's)."""
        a, s, W = self.a, self.s, self.m.head
        C, V, Vp, es = a.n_embd, a.vocab_size, a.padded_vocab_size, s.compute_bytes
        ev = _Steps()
        if W.es != es:
            ev.new(V * C * es)  # held to the end
        ev.steps.append(("g", 0, h.numel, h.es))
        first = True
        for n in reversed(self.chunks()):
            nv = n * V
            hc = ev.new(n * C * es) if h.es != es else None
            lsm, t = self.log_softmax(ev, n, (), keep_tanh=True)
            if not W.train:  # the cast dies: only the head's gradient reads it again
                ev.free(hc)
                hc = None
            g = ev.replace(ev.new(nv * 4), ev.new(nv * 4))  # zeros + scatter_add_, _log_softmax_backward_data
            ev.free(lsm)
            if es != 4:  # g.to(dt)
                g = ev.replace(g, ev.new(nv * es))
            if t is not None:  # tanh_backward(g * cap, t) / cap
                gc = ev.new(nv * es)
                gt = ev.new(nv * es)
                ev.free(gc)
                g = ev.replace(g, ev.new(nv * es), gt)
                ev.free(t)
            if a.logits_scaling != 1.0:
                g = ev.replace(g, ev.new(nv * es))
            if h.rg:  # grad_h[s:s + rows] = g @ W
                ev.free(ev.new(n * C * es))
            if W.train:
                if first:  # the head's gradient: handed to the tied embedding's backward, or the weight's
                    ev.steps.append(("k", "head", Vp * C, W.es, W) if linked else ("g", 1, Vp * C, W.es))
                if es != W.es:
                    ev.free(ev.new(V * C * es))  # the chunk's product, widened as it is added
                first = False
            ev.free(g, hc)
        return tuple(ev.steps)

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


class _Steps:
    """A list of `Sim` backward steps being written: allocations ("t", key, bytes, 1) under fresh keys, frees
    ("f", key), and any other step appended as it is."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self.n = 0

    def new(self, nbytes: int) -> str:
        self.n += 1
        self.steps.append(("t", str(self.n), nbytes, 1))
        return str(self.n)

    def free(self, *keys: str | None) -> None:
        self.steps += [("f", k) for k in keys if k is not None]

    def replace(self, old: str, new: str, *temps: str) -> str:
        """`x = f(x)`: `new` made, the call's temporaries then the old `x` freed; returns `new`."""
        self.free(*temps, old)
        return new
