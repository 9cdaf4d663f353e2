"""The analytical engine's core: a byte-level replay of one training step, from shapes alone.

Every tensor microft's step allocates is described by its size, and every autograd node by
what it saves and what its backward allocates, exactly as `models.transformer.Transformer`, the
fused loss and the optimizers do under each precision policy. The replay keeps reference counts the way Python
and the autograd engine do (a tensor lives while a variable, a saved-tensor slot or a gradient
buffer holds it), runs backward in reverse creation order, recomputes checkpointed blocks with
early stop, and tracks live bytes (CUDA-rounded) with their category at every allocation. No
torch, no tensors: thousands of events, a few milliseconds, any model size.

`trace.py` runs the real code on fake tensors; tests check the two agree.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

CUDA_BLOCK = 512


def cuda_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of `nbytes` (512-byte blocks)."""
    return 0 if nbytes <= 0 else -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


class St:
    """A storage: bytes, holders, category."""

    __slots__ = ("nbytes", "refs", "cat")

    def __init__(self, nbytes: int, cat: str):
        self.nbytes, self.refs, self.cat = nbytes, 1, cat


class Ten:
    """A tensor: a storage plus its place in the autograd graph."""

    __slots__ = ("st", "node", "idx", "rg", "numel", "es")

    def __init__(self, st: St, numel: int, es: int, node: Node | None = None, idx: int = 0, rg: bool = False):
        self.st, self.numel, self.es, self.node, self.idx, self.rg = st, numel, es, node, idx, rg


class Par:
    """A parameter: its storage, trainability, gradient and pending gradient contributions."""

    __slots__ = ("name", "shape", "numel", "ndim", "es", "train", "st", "grad", "buf", "pending")

    def __init__(self, name: str, shape: tuple[int, ...], es: int, train: bool):
        self.name, self.shape, self.es, self.train = name, shape, es, train
        self.numel = math.prod(shape)
        self.ndim = len(shape)
        self.st: St | None = None
        self.grad: St | None = None  # .grad
        self.buf: St | None = None  # gradient contributions summed so far (AccumulateGrad's input)
        self.pending = 0  # contributions still to come this backward

    @property
    def rg(self) -> bool:
        return self.train


class Node:
    __slots__ = ("name", "ins", "saved", "bwd", "buf", "group", "nsaved", "where", "oes")

    def __init__(self, name: str, ins: list, bwd: tuple, nout: int, where: str):
        self.name, self.ins, self.bwd, self.where = name, ins, bwd, where
        self.oes = 4
        self.saved: list[St] = []
        self.buf: list[St | None] = [None] * nout
        self.group: Group | None = None
        self.nsaved = 0


@dataclass
class Group:
    """A checkpointed block: its nodes, how many tensors they save, and how to recompute it."""

    fn: Callable[[], Ten]
    nodes: list[Node]
    nsaved: int = 0
    done: bool = False
    keep: St | None = None  # the block input, held for the recompute
    extra: tuple[St, ...] = ()  # further inputs it holds (the RoPE tables its block takes)
    autocast: bool = False  # the recompute restores the forward's autocast state
    left: int = 0  # nodes with saved placeholders not yet run in backward


class _StopRecompute(Exception):
    pass


class OverLimit(Exception):
    """Live bytes passed `Sim.limit`: the run cannot fit, no need to finish the replay."""


def _grad_cat(x, summing: bool = False) -> str:
    """A gradient is counted under "gradients" when it is the tensor that becomes `.grad` (the
    only contribution, or the sum of all of them, on the first micro-step); else it is transient."""
    if isinstance(x, Par) and x.grad is None and x.pending == 1 and (summing or x.buf is None):
        return "gradients"
    return "backward transients"


class Sim:
    """Live-byte accounting plus a small autograd engine over `Ten`/`Par`/`Node`."""

    def __init__(self):
        self.live = 0
        self.by_cat: dict[str, int] = defaultdict(int)
        self.peak = 0
        self.peak_cats: dict[str, int] = {}
        self.peak_where = ""
        self.peak_phase = ""
        self.step_peak = 0
        self.where = ""
        self.phase = ""
        self.graph: list[Node] = []
        self.stash: dict[str, St] = {}  # gradients handed between backward nodes ("k" / "u" steps)
        self.tag = ""  # where new nodes belong ("block 3", "loss", ...), for naming backward phases
        self.group: Group | None = None  # checkpoint region being recorded
        self.rec: dict | None = None  # recompute in progress
        self.cache: dict[Par, Ten] | None = None  # autocast cast cache (None: autocast off)
        self.limit = float("inf")
        self.grad = True  # False: torch.no_grad() (no node is recorded, nothing saved)
        self.override: str | None = None  # the category of every allocation while set (a no-grad forward's)

    # --- bytes ---------------------------------------------------------------------------
    def alloc(self, nbytes: int, cat: str, what: str = "", held: bool = True) -> St:
        if self.override is not None:
            cat = self.override
        elif self.rec is not None and cat == "activations":
            cat = "recomputed activations"
        st = St(cuda_bytes(nbytes), cat)
        self.live += st.nbytes
        self.by_cat[cat] += st.nbytes
        if self.rec is not None and held:
            self.rec["held"].append(st)
        if self.live > self.step_peak:
            self.step_peak = self.live
            if self.live > self.limit:
                raise OverLimit
        if self.live > self.peak:
            self.peak = self.live
            self.peak_cats = dict(self.by_cat)
            self.peak_where, self.peak_phase = self.where, self.phase
        return st

    def transient(self, nbytes: int, cat: str, what: str = "") -> None:
        self.unref(self.alloc(nbytes, cat, what, held=False))

    def ref(self, st: St) -> None:
        st.refs += 1

    def unref(self, st: St | None) -> None:
        if st is None:
            return
        st.refs -= 1
        if st.refs == 0:
            self.live -= st.nbytes
            self.by_cat[st.cat] -= st.nbytes

    def recat(self, st: St, cat: str) -> None:
        self.by_cat[st.cat] -= st.nbytes
        st.cat = cat
        self.by_cat[cat] += st.nbytes

    def mark(self, where: str, phase: str) -> None:
        self.where, self.phase = where, phase

    # --- tensors -------------------------------------------------------------------------
    def new(self, numel: int, es: int, cat: str, what: str = "") -> Ten:
        return Ten(self.alloc(numel * es, cat, what), numel, es)

    def alias(self, t: Ten) -> Ten:
        """Another variable viewing the same storage (a view, or the same tensor)."""
        self.ref(t.st)
        if self.rec is not None:
            self.rec["held"].append(t.st)
        return Ten(t.st, t.numel, t.es, t.node, t.idx, t.rg)

    def drop(self, *ts: Ten | None) -> None:
        """Variables going out of scope."""
        for t in ts:
            if t is None:
                continue
            if self.rec is not None and t.st in self.rec["held"]:
                self.rec["held"].remove(t.st)
            self.unref(t.st)

    # --- ops -----------------------------------------------------------------------------
    def op(self, name: str, ins: list, outs: list[tuple[int, int, str]], save_in=(), save_out=(),
           bwd: tuple = ()) -> list[Ten]:
        """Run a differentiable op: pack saved inputs, allocate outputs, pack saved outputs.

        `save_in` / `save_out`: (index, needs) pairs; the tensor is saved only if one of the inputs
        in `needs` requires grad (autograd saves only what a needed gradient uses).
        `bwd`: backward steps, see `_run_backward`.
        """
        rg = [bool(self.grad and x is not None and x.rg) for x in ins]
        node = None
        if any(rg):
            if self.rec is not None:
                node = next(self.rec["nodes"])
            else:
                node = Node(name, ins, bwd, len(outs), self.tag)
                node.oes = outs[0][1] if outs else 4
                self.graph.append(node)
                for x in ins:
                    if isinstance(x, Par) and x.train:
                        x.pending += 1
                if self.group is not None:
                    node.group = self.group
                    self.group.nodes.append(node)
        if node is not None:
            for i, needs in save_in:
                if any(rg[j] for j in needs) and isinstance(ins[i], Ten):
                    self._pack(node, ins[i].st)
        res = [Ten(self.alloc(n * es, cat, name), n, es, node, k, node is not None)
               for k, (n, es, cat) in enumerate(outs)]
        if node is not None:
            for k, needs in save_out:
                if any(rg[j] for j in needs):
                    self._pack(node, res[k].st)
        return res

    def custom(self, name: str, ins: list, out: Ten, saved: list[Ten | None], bwd: tuple) -> None:
        """An autograd.Function: its forward already ran; attach the node to `out`, save `saved`."""
        if not self.grad or not any(x is not None and x.rg for x in ins):
            return
        node = Node(name, ins, bwd, 1, self.tag)
        node.oes = out.es
        self.graph.append(node)
        for x in ins:
            if isinstance(x, Par) and x.train:
                x.pending += 1
        for t in saved:
            if t is not None:
                self.ref(t.st)
                node.saved.append(t.st)
        out.node, out.idx, out.rg = node, 0, True

    def views(self, name: str, t: Ten, parts: list[int]) -> list[Ten]:
        """`t.split(...)`: views sharing t's storage; backward concatenates their gradients."""
        node, rg = None, t.rg and self.grad
        if rg and self.rec is None:
            node = Node(name, [t], (("g", 0, t.numel, t.es),), len(parts), self.tag)
            node.oes = t.es
            self.graph.append(node)
            if self.group is not None:
                node.group = self.group
                self.group.nodes.append(node)
        elif rg:
            node = next(self.rec["nodes"])
        out = []
        for k, n in enumerate(parts):
            self.ref(t.st)
            if self.rec is not None:
                self.rec["held"].append(t.st)
            out.append(Ten(t.st, n, t.es, node, k, rg))
        return out

    def _pack(self, node: Node, st: St) -> None:
        if self.rec is not None:
            self.ref(st)
            node.saved.append(st)
            self.rec["count"] += 1
            if self.rec["count"] >= self.rec["target"]:
                raise _StopRecompute
        elif self.group is not None:  # checkpointed: only a placeholder is kept
            node.nsaved += 1
            self.group.nsaved += 1
        else:
            self.ref(st)
            node.saved.append(st)

    # --- checkpointing -------------------------------------------------------------------
    def checkpoint(self, fn: Callable[[], Ten], inp: Ten, extra: tuple[Ten, ...] = ()) -> Ten:
        """Non-reentrant activation checkpointing of `fn` (which reads `inp`, and `extra`)."""
        self.ref(inp.st)  # the checkpoint keeps its inputs for the recompute
        for t in extra:
            self.ref(t.st)
        group = Group(fn=fn, nodes=[], autocast=self.cache is not None, extra=tuple(t.st for t in extra))
        outer, self.group = self.group, group
        try:
            out = fn()
        finally:
            self.group = outer
        group.keep = inp.st
        # the checkpoint's frame (its inputs) lives while a node holds one of its saved-tensor placeholders
        group.left = sum(1 for n in group.nodes if n.nsaved)
        if not group.left:
            for st in (inp.st, *group.extra):
                self.unref(st)
        return out

    def _recompute(self, group: Group) -> None:
        group.done = True
        if group.nsaved == 0:
            return
        self.rec = {"nodes": iter(group.nodes), "count": 0, "target": group.nsaved, "held": []}
        cache, self.cache = self.cache, ({} if group.autocast else None)
        try:
            out = group.fn()
            self.drop(out)
        except _StopRecompute:
            pass
        held, self.rec = self.rec["held"], None
        for st in held:  # the recompute's local variables die with its frame
            self.unref(st)
        if self.cache:
            for t in self.cache.values():
                self.unref(t.st)
        self.cache = cache

    # --- backward ------------------------------------------------------------------------
    def backward(self, root: Ten, grad_bytes: int = 4,
                 where: Callable[[Node], tuple[str, str]] | None = None) -> None:
        """Backward from scalar `root`, nodes in reverse creation order (the engine's order here)."""
        ones = self.alloc(grad_bytes, "backward transients", "ones_like")  # held by backward() throughout
        self.ref(ones)
        root.node.buf[root.idx] = ones
        for node in reversed(self.graph):
            if where is not None:
                self.mark(*where(node))
            self._run_backward(node)
        self.graph = []
        self.unref(ones)

    def _run_backward(self, node: Node) -> None:
        """Steps: ("g", i, numel, es) a new gradient for input i; ("p", i) the incoming gradient
        passed to input i; ("t", key, numel, es) a scratch tensor; ("f", key) frees it;
        ("s", i, numel, es) a scratch tensor only when input i needs a gradient;
        ("k", key, numel, es, par) a gradient for `par` handed to a later node (model.HeadGradLink);
        ("u", i, key) that gradient, updated in place, for input i (a new one if none was handed)."""
        if node.group is not None and not node.group.done and node.nsaved:
            self._recompute(node.group)
        incoming = node.buf
        produced: list[tuple[int, St]] = []
        if any(b is not None for b in incoming):
            tmp: dict[str, St] = {}
            g0 = next(b for b in incoming if b is not None)
            for step in node.bwd:
                kind = step[0]
                if kind == "g":
                    i, n, es = step[1], step[2], step[3]
                    x = node.ins[i]
                    if x is not None and x.rg:
                        produced.append((i, self.alloc(n * es, _grad_cat(x), node.name + " grad")))
                elif kind == "p":
                    x = node.ins[step[1]]
                    if x is not None and x.rg:
                        if x.es != node.oes:  # the engine casts a gradient to its input's dtype
                            cast = self.alloc(x.numel * x.es, "backward transients", "cast")
                            produced.append((step[1], cast))
                        else:
                            self.ref(g0)
                            produced.append((step[1], g0))
                elif kind == "t":
                    if len(step) < 5 or (node.ins[step[4]] is not None and node.ins[step[4]].rg):
                        tmp[step[1]] = self.alloc(step[2] * step[3], "backward transients",
                                                  node.name + " scratch")
                elif kind == "s":
                    if node.ins[step[1]] is not None and node.ins[step[1]].rg:
                        self.transient(step[2] * step[3], "backward transients", node.name + " workspace")
                elif kind == "f":
                    self.unref(tmp.pop(step[1], None))
                elif kind == "k":
                    self.stash[step[1]] = self.alloc(step[2] * step[3], _grad_cat(step[4]),
                                                     node.name + " grad")
                elif kind == "u":
                    x = node.ins[step[1]]
                    st = self.stash.pop(step[2], None)
                    if x is not None and x.rg:
                        st = st or self.alloc(x.numel * x.es, _grad_cat(x), node.name + " grad")
                        produced.append((step[1], st))
                    elif st is not None:
                        self.unref(st)
            for st in tmp.values():
                self.unref(st)
        for b in incoming:
            self.unref(b)
        node.buf = []
        for st in node.saved:
            self.unref(st)
        node.saved = []
        for i, g in produced:
            self._route(node.ins[i], g)
        if node.group is not None and node.nsaved:
            node.group.left -= 1
            if node.group.left == 0:  # the last holder of the checkpoint's inputs is gone
                for st in (node.group.keep, *node.group.extra):
                    self.unref(st)

    def _route(self, x, g: St) -> None:
        if isinstance(x, Par):
            x.buf = self._accumulate(x.buf, g, x.es * x.numel, _grad_cat(x, summing=True))
            x.pending -= 1
            if x.pending == 0:
                self._accumulate_grad(x)
        elif x.node is not None:
            x.node.buf[x.idx] = self._accumulate(x.node.buf[x.idx], g, x.numel * x.es, "backward transients")

    def _accumulate(self, old: St | None, g: St, nbytes: int, cat: str) -> St:
        if old is None:
            return g
        s = self.alloc(nbytes, cat, "accumulate")
        self.unref(old)
        self.unref(g)
        return s

    def _accumulate_grad(self, p: Par) -> None:
        g, p.buf = p.buf, None
        if p.grad is None:
            if g.cat != "gradients":
                self.recat(g, "gradients")
            p.grad = g
        else:
            self.unref(g)  # added in place into .grad
