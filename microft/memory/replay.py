"""The training step as a byte-level replay: what microft's step allocates, op by op, from shapes.

Each function mirrors the code it stands for: `Replay.block` is `model.Block`, `Replay.loss` is
`model._FusedCrossEntropy`, `Replay.optimizer_step` the optimizers `optim.build_optimizer` makes,
`Replay.micro_step` / `clip` / `optimizer_step` those of train/step.py. Autocast's casts (and their
cache), the tensors each op saves for backward (only those a needed gradient uses), Python's
variable lifetimes, CUDA's kernels (SDPA flash / memory-efficient, fused dropout, fp32 norm
statistics, one-allocation foreach norms) are followed as they are. The engine (`sim.Sim`)
does the reference counting, backward order and checkpoint recomputes.

Llama-style shapes (GQA, SwiGLU, RMSNorm, RoPE, untied head) follow a microft-style step for
planning: fused qkv and gate/up projections, a fused RMSNorm, SDPA with native GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

from microft.config import ce_chunks
from microft.memory.sim import Node, Par, Sim, St, Ten, cuda_bytes


@dataclass(frozen=True)
class Arch:
    """A decoder's shape: GPT-2 (microft's model) or Llama-style (GQA, SwiGLU, RMSNorm, RoPE)."""

    name: str
    family: str  # "gpt2" | "llama"
    vocab_size: int
    padded_vocab: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn: int  # MLP hidden width
    n_positions: int
    bias: bool = True  # biases on every linear (GPT-2)
    qkv_bias: bool = True
    tied: bool = True  # LM head shares the token embedding
    dropout: float = 0.0

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.n_head * self.head_dim + 2 * self.kv_dim


@dataclass(frozen=True)
class Setup:
    """What is simulated: the batch, precision policy and memory switches of a run."""

    micro_bs: int
    seq_len: int
    precision: str = "fp32"  # fp32 | bf16-mixed | fp16-mixed | bf16-true
    accum: int = 1
    grad_ckpt: bool = False
    ckpt_every: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    momentum: float = 0.9
    lora: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("qkv", "proj")
    lora_dropout: float = 0.0
    steps: int = 2
    packing: bool = False  # packed rows: position ids and a block-diagonal (B, 1, T, T) attention mask

    @property
    def mixed(self) -> bool:
        return self.precision in ("bf16-mixed", "fp16-mixed")

    @property
    def pes(self) -> int:  # parameter bytes
        return 2 if self.precision == "bf16-true" else 4

    @property
    def aes(self) -> int:  # matmul output bytes
        return 4 if self.precision == "fp32" else 2


NO_DECAY_MARKERS = ("bias", "ln_", "wte", "wpe", "norm")  # optim.NO_DECAY_MARKERS
MASTER_CHUNK = 1 << 20  # optim.MASTER_CHUNK


@dataclass
class Lin:
    W: Par
    b: Par | None
    inp: int
    out: int
    A: Par | None = None
    B: Par | None = None


@dataclass
class Blk:
    ln_1: tuple[Par, Par | None]
    qkv: Lin
    proj: Lin
    ln_2: tuple[Par, Par | None]
    fc: Lin
    mproj: Lin


@dataclass
class Model:
    arch: Arch
    wte: Par
    wpe: Par | None
    blocks: list[Blk]
    ln_f: tuple[Par, Par | None]
    head: Par
    params: list[Par]  # in named_parameters() order


def build_model(arch: Arch, s: Setup) -> Model:
    """Parameters in `named_parameters()` order, trainability as LoRA leaves it."""
    es, full = s.pes, not s.lora
    params: list[Par] = []

    def par(name: str, *shape: int, train: bool = full) -> Par:
        params.append(Par(name, shape, es, train))
        return params[-1]

    def lin(prefix: str, site: str, inp: int, out: int, bias: bool) -> Lin:
        lo = Lin(par(f"{prefix}.weight", out, inp), par(f"{prefix}.bias", out) if bias else None, inp, out)
        if s.lora and site in s.lora_targets:
            lo.A = par(f"{prefix}.lora_A.weight", s.lora_r, inp, train=True)
            lo.B = par(f"{prefix}.lora_B.weight", out, s.lora_r, train=True)
        return lo

    a, C = arch, arch.n_embd
    gpt2 = a.family == "gpt2"
    wte = par("wte.weight", a.padded_vocab, C)
    wpe = par("wpe.weight", a.n_positions, C) if gpt2 else None
    blocks = []
    for i in range(a.n_layer):
        h = f"h.{i}"
        ln1 = (par(f"{h}.ln_1.weight", C), par(f"{h}.ln_1.bias", C) if gpt2 else None)
        qkv = lin(f"{h}.attn.c_attn", "qkv", C, a.qkv_dim, a.qkv_bias)
        proj = lin(f"{h}.attn.c_proj", "proj", a.n_head * a.head_dim, C, a.bias)
        ln2 = (par(f"{h}.ln_2.weight", C), par(f"{h}.ln_2.bias", C) if gpt2 else None)
        fc = lin(f"{h}.mlp.c_fc", "fc", C, a.ffn if gpt2 else 2 * a.ffn, a.bias)
        mproj = lin(f"{h}.mlp.c_proj", "mlp_proj", a.ffn, C, a.bias)
        blocks.append(Blk(ln1, qkv, proj, ln2, fc, mproj))
    ln_f = (par("ln_f.weight", C), par("ln_f.bias", C) if gpt2 else None)
    head = wte if a.tied else par("lm_head.weight", a.padded_vocab, C)
    return Model(arch, wte, wpe, blocks, ln_f, head, params)


class Replay:
    """Replays `setup.steps` optimizer steps of microft's training step on `Sim`."""

    def __init__(self, arch: Arch, setup: Setup, keep_timeline: bool = False, grad_buckets: bool = False):
        self.a, self.s = arch, setup
        self.sim = Sim(keep_timeline)
        self.m = build_model(arch, setup)
        self.N = setup.micro_bs * setup.seq_len
        self.opt_state: dict[str, list[St]] = {}
        self.qmaps: list[St] = []
        self.scaler: list[St] = []
        self.packed: Ten | None = None  # the micro-step's boolean attention mask (--packing)
        self.step_peaks: list[int] = []
        self.block_bytes = 0
        # model.HeadGradLink: a trainable tied head hands its gradient to the embedding's backward
        self.linked = arch.tied and self.m.head.train
        sim = self.sim
        sim.mark("setup", "setup")
        for p in self.m.params:
            p.st = sim.alloc(p.numel * p.es, "weights", p.name)
        if grad_buckets:  # DDP's flat gradient buckets, one copy of every trainable gradient
            for p in self.m.params:
                if p.train:
                    sim.alloc(p.numel * p.es, "DDP gradient buckets", "bucket")

    # --- layers ---------------------------------------------------------------------------
    def cast(self, x: Ten) -> Ten:
        """Autocast's cast of an activation to the low dtype (a new tensor, or the same one)."""
        if x.es == 2:
            return self.sim.alias(x)
        return self.sim.op("to_copy", [x], [(x.numel, 2, "activations")], bwd=(("g", 0, x.numel, x.es),))[0]

    def cast_param(self, p: Par | None) -> Ten | Par | None:
        """Autocast's weight cast: cached for the autocast region when the weight is trainable."""
        sim = self.sim
        if p is None or sim.cache is None:
            return p
        if p in sim.cache:
            return sim.alias(sim.cache[p])
        t = sim.op("to_copy", [p], [(p.numel, 2, "autocast weight copies")], bwd=(("g", 0, p.numel, p.es),))[0]
        if p.train:
            sim.cache[p] = sim.alias(t)
            if sim.rec is not None:  # the cache's reference is not a local variable of the recompute
                sim.rec["held"].remove(t.st)
        return t

    def matmul(self, x: Ten, lin_w: Par, bias: Par | None, out: int, inp: int) -> Ten:
        """F.linear: autocast casts (bias, weight, input: C++ evaluates them right to left), addmm."""
        sim, aes = self.sim, self.s.aes
        n = x.numel // inp
        bc = self.cast_param(bias)
        wc = self.cast_param(lin_w)
        xc = self.cast(x) if sim.cache is not None else x
        bwd = (("g", 0, n * inp, aes), ("g", 1, out * inp, aes)) + ((("g", 2, out, aes),) if bias is not None else ())
        y = sim.op("addmm" if bias is not None else "mm", [xc, wc, bc], [(n * out, aes, "activations")],
                   save_in=((0, (1,)), (1, (0,))), bwd=bwd)[0]
        if sim.cache is not None:
            sim.drop(xc, wc if isinstance(wc, Ten) else None, bc if isinstance(bc, Ten) else None)
        return y

    def linear(self, x: Ten, lo: Lin) -> Ten:
        y = self.matmul(x, lo.W, lo.b, lo.out, lo.inp)
        if lo.A is None:
            return y
        sim, aes, r = self.sim, self.s.aes, self.s.lora_r
        n = x.numel // lo.inp
        xd = self.dropout(x) if self.s.lora_dropout > 0 else sim.alias(x)
        a = self.matmul(xd, lo.A, None, r, lo.inp)
        sim.drop(xd)
        d = self.matmul(a, lo.B, None, lo.out, r)
        sim.drop(a)
        sc = sim.op("mul", [d], [(n * lo.out, aes, "activations")], bwd=(("g", 0, n * lo.out, aes),))[0]
        out = sim.op("add", [y, sc], [(n * lo.out, aes, "activations")], bwd=(("p", 0), ("p", 1)))[0]
        sim.drop(y, d, sc)
        return out

    def gelu_linear(self, f: Ten, lo: Lin) -> Ten:
        """model._GeluLinear: saves its input (and the weight's cast), recomputes gelu in backward."""
        sim, aes = self.sim, self.s.aes
        W, b = lo.W, lo.b
        wc = sim.new(W.numel, aes, "autocast weight copies", "weight.to") if W.es != aes else None
        act = sim.new(f.numel, aes, "activations", "gelu")
        bc = sim.new(b.numel, aes, "activations", "bias.to") if b is not None and b.es != aes else None
        dw = ((("t", "dw", W.numel, aes, 1), ("g", 1, W.numel, W.es), ("f", "dw")) if W.es != aes
              else (("g", 1, W.numel, W.es),))
        db = () if b is None else ((("t", "db", b.numel, aes, 2), ("g", 2, b.numel, b.es), ("f", "db"))
                                   if b.es != aes else (("g", 2, b.numel, b.es),))
        bwd = ((("t", "a", f.numel, aes, 1),) + dw + (("f", "a"),) + db
               + (("t", "da", f.numel, aes, 0), ("g", 0, f.numel, f.es), ("f", "da")))
        ins = [f, W, b] + ([wc] if wc is not None else [])
        save = ((0, (0, 1, 2)),) + (((3, (0, 1, 2)),) if wc is not None else ())
        y = sim.op("gelu_linear", ins, [(f.numel // lo.inp * lo.out, aes, "activations")], save_in=save, bwd=bwd)[0]
        sim.drop(act, bc, wc)
        return y

    def norm(self, x: Ten, ln: tuple[Par, Par | None]) -> Ten:
        """LayerNorm / RMSNorm: saves its input and fp32 statistics (CUDA keeps them in fp32)."""
        sim, N = self.sim, self.N
        w, b = ln
        stats = 2 if b is not None else 1
        outs = [(x.numel, x.es, "activations")] + [(N, 4, "activations")] * stats
        bwd = (("g", 0, x.numel, x.es), ("g", 1, w.numel, w.es)) + ((("g", 2, b.numel, b.es),) if b else ())
        res = sim.op("layer_norm" if b else "rms_norm", [x, w, b], outs, save_in=((0, (0, 1, 2)),),
                     save_out=tuple((k, (0, 1, 2)) for k in range(1, stats + 1)), bwd=bwd)
        sim.drop(*res[1:])
        return res[0]

    def dropout(self, x: Ten) -> Ten:
        """CUDA's fused dropout: the output plus a saved bool mask."""
        y, mask = self.sim.op("dropout", [x], [(x.numel, x.es, "activations"), (x.numel, 1, "activations")],
                              save_out=((1, (0,)),), bwd=(("g", 0, x.numel, x.es),))
        self.sim.drop(mask)
        return y

    def add(self, x: Ten, y: Ten) -> Ten:
        es = max(x.es, y.es)
        return self.sim.op("add", [x, y], [(x.numel, es, "activations")], bwd=(("p", 0), ("p", 1)))[0]

    def sdpa(self, q: Ten, k: Ten, v: Ten) -> Ten:
        """CUDA SDPA: flash (bf16/fp16) or memory-efficient (fp32) keep out + fp32 logsumexp."""
        a, s, sim = self.a, self.s, self.sim
        B, T, H = s.micro_bs, s.seq_len, a.n_head
        low = s.aes == 2 and self.packed is None  # a mask rules out flash: the memory-efficient kernel runs
        t_lse = T if low else -(-T // 32) * 32
        ws = sdpa_workspace(B, H, T, a.head_dim, low)
        ins, save_in = [q, k, v], ((0, (0, 1, 2)), (1, (0, 1, 2)), (2, (0, 1, 2)))
        if self.packed is not None:  # SDPA turns the boolean mask into an additive bias of q's dtype, kept for backward
            bias = sim.new(B * T * T, s.aes, "activations", "attention mask bias")
            ins, save_in = [q, k, v, bias], (*save_in, (3, (0, 1, 2)))
        o, lse = sim.op("sdpa", ins, [(q.numel, s.aes, "activations"), (B * H * t_lse, 4, "activations")],
                        save_in=save_in, save_out=((0, (0, 1, 2)), (1, (0, 1, 2))),
                        bwd=(("g", 0, q.numel, q.es), ("g", 1, k.numel, k.es), ("g", 2, v.numel, v.es),
                             ("s", 0, ws, 1)))
        if self.packed is not None:
            sim.drop(bias)
        sim.drop(lse)
        return o

    def elementwise(self, name: str, x: Ten, save_input: bool = True) -> Ten:
        return self.sim.op(name, [x], [(x.numel, x.es, "activations")], save_in=((0, (0,)),) if save_input else (),
                           bwd=(("g", 0, x.numel, x.es),))[0]

    # --- blocks ---------------------------------------------------------------------------
    def block(self, x: Ten, blk: Blk) -> Ten:
        a, sim, N = self.a, self.sim, self.N
        h = self.norm(x, blk.ln_1)
        qkv = self.linear(h, blk.qkv)
        qd, kvd = a.n_head * a.head_dim, a.kv_dim
        q, k, v = sim.views("split", qkv, [N * qd, N * kvd, N * kvd])
        sim.drop(qkv)
        if a.family == "llama":  # RoPE: new rotated q and k; nothing large is saved
            q2 = self.rope(q)
            k2 = self.rope(k)
            sim.drop(q, k)
            q, k = q2, k2
        y = self.sdpa(q, k, v)
        p = self.linear(y, blk.proj)
        if a.dropout > 0:
            p2 = self.dropout(p)
            sim.drop(p)
            p = p2
        sim.drop(q, k, v, y, h)  # the attention's locals
        x1 = self.add(x, p)
        sim.drop(p)
        h2 = self.norm(x1, blk.ln_2)
        if a.family == "gpt2" and blk.mproj.A is None:  # model._GeluLinear: gelu(f) is not kept
            f = self.linear(h2, blk.fc)
            mo = self.gelu_linear(f, blk.mproj)
            sim.drop(f)
            g = None
        elif a.family == "gpt2":
            f = self.linear(h2, blk.fc)
            g = self.elementwise("gelu", f)
            sim.drop(f)
        else:  # SwiGLU: silu(gate) * up
            gu = self.linear(h2, blk.fc)
            gate, up = sim.views("split", gu, [N * a.ffn, N * a.ffn])
            sim.drop(gu)
            sg = self.elementwise("silu", gate)
            g = sim.op("mul", [sg, up], [(sg.numel, sg.es, "activations")], save_in=((0, (1,)), (1, (0,))),
                       bwd=(("g", 0, sg.numel, sg.es), ("g", 1, up.numel, up.es)))[0]
            sim.drop(gate, up, sg)
        if g is not None:
            mo = self.linear(g, blk.mproj)
            sim.drop(g)
        if a.dropout > 0:
            m2 = self.dropout(mo)
            sim.drop(mo)
            mo = m2
        sim.drop(h2)
        out = self.add(x1, mo)
        sim.drop(x1, mo)
        return out

    def rope(self, t: Ten) -> Ten:
        sim = self.sim
        tmp = sim.new(t.numel, t.es, "activations", "rope")
        out = sim.op("rope", [t], [(t.numel, t.es, "activations")], bwd=(("g", 0, t.numel, t.es),))[0]
        sim.drop(tmp)
        return out

    def forward(self, x_ids: Ten) -> Ten:
        """GPT.hidden: embeddings, blocks (checkpointed every N-th), final norm."""
        a, s, sim, N = self.a, self.s, self.sim, self.N
        C, T, pes = a.n_embd, s.seq_len, s.pes
        m = self.m
        sim.tag = "embeddings"
        emb_bwd = (("u", 0, "head") if self.linked else ("g", 0, m.wte.numel, pes),)  # model._TiedEmbedding
        tok = sim.op("embedding", [m.wte, x_ids], [(N * C, pes, "activations")], save_in=((1, (0,)),),
                     bwd=emb_bwd)[0]
        if m.wpe is not None:
            pos = sim.new(T, 8, "activations", "arange")
            pe = sim.op("embedding", [m.wpe, pos], [(T * C, pes, "activations")], save_in=((1, (0,)),),
                        bwd=(("g", 0, m.wpe.numel, pes),))[0]
            x = sim.op("add", [tok, pe], [(N * C, pes, "activations")], bwd=(("p", 0), ("g", 1, T * C, pes)))[0]
            sim.drop(tok, pe, pos)
        else:
            x = tok
        if a.dropout > 0:
            x2 = self.dropout(x)
            sim.drop(x)
            x = x2
        start = sim.live
        for i, blk in enumerate(m.blocks):
            sim.tag = f"block {i}"
            if s.grad_ckpt and i % s.ckpt_every == 0:
                nxt = sim.checkpoint(lambda x=x, blk=blk: self.block(x, blk), x)
            else:
                nxt = self.block(x, blk)
            sim.drop(x)
            x = nxt
        self.block_bytes = (sim.live - start) // a.n_layer  # what each block leaves behind
        sim.tag = "loss"
        h = self.norm(x, m.ln_f)
        sim.drop(x)
        return h

    # --- the fused chunked cross-entropy (model._FusedCrossEntropy) -------------------------
    def loss(self, h: Ten) -> Ten:
        a, s, sim, N = self.a, self.s, self.sim, self.N
        C, Vp, V = a.n_embd, a.padded_vocab, a.vocab_size
        W = self.m.head
        cat = "loss (fused cross-entropy)"
        dt = 2 if s.precision != "fp32" else 4  # autocast dtype, or h's dtype
        need_h, need_w = h.rg, W.train
        Wc = sim.new(Vp * C, dt, cat, "weight.to") if W.es != dt else None
        valid = sim.new(N, 1, cat, "valid")
        tw = sim.new(N, 4, cat, "tw")
        sim.transient(8, cat, "scalar")
        safe_t = sim.new(N, 8, cat, "safe_t")
        grad_h = sim.new(N * C, h.es, cat, "grad_h") if need_h else None
        grad_w = None  # made by the first chunk's product, then accumulated in place
        loss = sim.new(1, 4, cat, "loss")
        hc = g = lse = None
        chunks = ce_chunks(N, Vp)
        if len(chunks) > 3:  # full chunks after the second repeat it exactly: replay 2 and the last
            chunks = chunks[:2] + chunks[-1:]
        probs = z_max = z_t = wcol = hw = None
        for _, n in chunks:
            hc_new = sim.new(n * C, dt, cat, "hc") if h.es != dt else None
            sim.drop(hc)
            hc = hc_new
            z = sim.new(n * Vp, dt, cat, "logits")
            if Vp > V:
                sim.transient(4, cat, "-inf")
            zm_new, zt_new = sim.new(n, dt, cat, "max"), sim.new(n, dt, cat, "z_t")
            sim.drop(z_max, z_t)
            z_max, z_t = zm_new, zt_new
            p_new = sim.new(n * Vp, 4, cat, "logits.float()") if dt != 4 else sim.alias(z)  # softmax in place
            sim.drop(probs)  # still alive here only when no gradient is needed (no `del`)
            probs = p_new
            sim.drop(z)
            zm32 = sim.new(n, 4, cat, "max.float()") if dt != 4 else None  # lse = z_max - log p_max
            p_max = sim.new(n, 4, cat, "p_max")
            log_p = sim.new(n, 4, cat, "log p_max")
            sim.drop(p_max)
            lse_new = sim.new(n, 4, cat, "lse")
            sim.drop(zm32, log_p, lse)
            lse = lse_new
            zt32 = sim.new(n, 4, cat, "z_t.float()") if dt != 4 else None  # the token losses, weighted, summed
            diff = sim.new(n, 4, cat, "token loss")
            sim.drop(zt32)
            weighted = sim.new(n, 4, cat, "weighted loss")
            sim.drop(diff)
            sim.transient(4, cat, "sum")
            sim.drop(weighted)
            if not (need_h or need_w):
                continue
            sim.transient(n * 4, cat, "-1 at the targets")
            g_new = sim.new(n * Vp, dt, cat, "probs.to") if dt != 4 else sim.alias(probs)
            sim.drop(g)
            g = g_new
            sim.drop(probs)
            probs = None
            wcol_new = sim.new(n, dt, cat, "token weights") if dt != 4 else None
            sim.drop(wcol)
            wcol = wcol_new
            if need_h:
                sim.transient(n * C * dt, cat, "g @ W")
            if need_w:
                hw_new = sim.new(n * C, dt, cat, "h * w")
                sim.drop(hw)
                hw = hw_new
                if grad_w is None:
                    grad_w = sim.new(Vp * C, dt, cat, "grad_w")
        sim.drop(hc, probs, z_max, z_t, g, lse, wcol, hw, Wc, valid, tw, safe_t)
        # backward: grad_h * g_out; grad_w widened to the weight's dtype (a new tensor either way),
        # handed to the tied embedding's backward when the head is the embedding (HeadGradLink)
        if self.linked:
            bwd = (("g", 0, N * C, h.es), ("k", "head", Vp * C, W.es, W))
            sim.custom("fused_ce", [h, None], loss, [grad_h, grad_w], bwd)
        else:
            bwd = (("g", 0, N * C, h.es), ("g", 1, Vp * C, W.es))
            sim.custom("fused_ce", [h, W], loss, [grad_h, grad_w], bwd)
        sim.drop(grad_h, grad_w)
        return loss

    # --- one micro-step, clipping, the optimizer --------------------------------------------
    def micro_step(self, at: str) -> None:
        s, sim = self.s, self.sim
        sim.mark(f"{at}, batch", "forward")
        x = sim.new(self.N, 8, "batch", "x")
        y = sim.new(self.N, 8, "batch", "y")
        packed = (sim.new(self.N, 8, "batch", "position ids"),
                  sim.new(s.micro_bs * s.seq_len**2, 1, "batch", "packed attention mask")) if s.packing else ()
        self.packed = packed[1] if packed else None
        sim.mark(f"{at}, forward", "forward")
        sim.cache = {} if s.mixed else None
        h = self.forward(x)
        sim.mark(f"{at}, loss", "loss")
        loss = self.loss(h)
        sim.drop(h)
        if sim.cache is not None:  # autocast exit clears the cast cache
            for t in sim.cache.values():
                sim.unref(t.st)
        sim.cache = None
        sim.mark(f"{at}, backward of the loss", "start of backward")
        scaled = sim.op("div", [loss], [(1, 4, "backward transients")], bwd=(("g", 0, 1, 4),))[0]
        if s.precision == "fp16-mixed":
            if not self.scaler:  # the GradScaler's scale and growth tracker, created on first use
                self.scaler = [sim.alloc(4, "other", "scale"), sim.alloc(4, "other", "growth")]
            sc2 = sim.op("mul", [scaled], [(1, 4, "backward transients")], bwd=(("g", 0, 1, 4),))[0]
            sim.drop(scaled)
            scaled = sc2
        last = self.a.n_layer - 1

        def where(node: Node) -> tuple[str, str]:
            tag = node.where
            if tag.startswith("block"):
                i = int(tag.split()[1])
                return f"{at}, backward of {tag}", "start of backward" if i == last else "backward"
            if tag == "embeddings":
                return f"{at}, backward of the embeddings", "end of backward"
            return f"{at}, backward of the loss", "start of backward"

        sim.backward(scaled, where=where)
        sim.drop(scaled, loss, x, y, *packed)
        self.packed = None

    def _held_grads(self) -> None:
        for p in self.trainable():
            p.grad = self.sim.alloc(p.numel * p.es, "gradients", "grad")

    def trainable(self) -> list[Par]:
        return [p for p in self.m.params if p.train]

    def clip(self, at: str) -> None:
        """clip_grad_norm_(foreach=True): per-tensor norms (one allocation on CUDA), stack, total."""
        sim = self.sim
        sim.mark(f"{at}, clip", "clip")
        cat = "optimizer transients"
        if self.s.precision == "fp16-mixed":  # scaler.unscale_: inv_scale, found_inf
            sim.transient(4, cat, "inv_scale")
            self.found_inf = sim.alloc(4, cat, "found_inf")
        n = len(self.trainable())
        norms = sim.new(n, 4, cat, "norms")
        stacked = sim.new(n, 4, cat, "stack")
        total = sim.new(1, 4, cat, "total")
        sim.drop(norms, stacked)
        t1 = sim.new(1, 4, cat, "add")
        t2 = sim.new(1, 4, cat, "reciprocal")
        t3 = sim.new(1, 4, cat, "mul")
        sim.drop(t1, t2)
        t4 = sim.new(1, 4, cat, "clamp")
        sim.drop(t3, t4, total)

    def groups(self) -> list[tuple[list[Par], float]]:
        """optim.param_groups: (matrices, weight decay), (biases/norms/embeddings, 0)."""
        decay, no_decay = [], []
        for p in self.trainable():
            if p.ndim < 2 or any(mk in p.name for mk in NO_DECAY_MARKERS):
                no_decay.append(p)
            else:
                decay.append(p)
        return [(g, wd) for g, wd in ((decay, self.s.weight_decay), (no_decay, 0.0)) if g]

    def optimizer_step(self, at: str) -> None:
        sim, opt = self.sim, self.s.optimizer
        sim.mark(f"{at}, optimizer step", "optimizer step")
        st_cat, tr = "optimizer state", "optimizer transients"
        state = self.opt_state
        for params, wd in self.groups():
            if opt == "adamw" and self.s.precision == "bf16-true":
                self._master_adamw(params, state)
            elif opt == "adamw":  # fused: step, exp_avg, exp_avg_sq per parameter; no temporaries
                for p in params:
                    if p.name not in state:
                        state[p.name] = [sim.alloc(4, st_cat, "step"), sim.alloc(p.numel * p.es, st_cat, "exp_avg"),
                                         sim.alloc(p.numel * p.es, st_cat, "exp_avg_sq")]
            elif opt == "sgd":  # foreach: weight decay makes new gradients; momentum buffers
                tmp = [sim.alloc(p.numel * p.es, tr, "grad + wd * p") for p in params] if wd else []
                if self.s.momentum:
                    for p in params:
                        if p.name not in state:
                            state[p.name] = [sim.alloc(p.numel * p.es, st_cat, "momentum_buffer")]
                for t in tmp:
                    sim.unref(t)
            elif opt == "adafactor":
                self._adafactor(params, state)
            elif opt == "adamw-8bit":  # bitsandbytes: uint8 moments + fp32 absmax per 256 values
                for p in params:
                    if p.name in state:
                        continue
                    if p.numel < 4096:
                        state[p.name] = [sim.alloc(p.numel * 4, st_cat, "state1"), sim.alloc(p.numel * 4, st_cat, "state2")]
                        continue
                    if not self.qmaps:
                        self.qmaps = [sim.alloc(256 * 4, st_cat, "qmap") for _ in range(2)]
                    blocks = -(-p.numel // 256)
                    state[p.name] = [sim.alloc(p.numel, st_cat, "state1"), sim.alloc(p.numel, st_cat, "state2"),
                                     sim.alloc(blocks * 4, st_cat, "absmax1"), sim.alloc(blocks * 4, st_cat, "absmax2")]
            else:
                raise ValueError(f"unknown optimizer {opt!r}")
        if self.s.precision == "fp16-mixed":
            sim.unref(getattr(self, "found_inf", None))
            self.found_inf = None
        sim.mark(f"{at}, zero_grad", "optimizer step")
        for p in self.m.params:
            sim.unref(p.grad)
            p.grad = None

    def _master_adamw(self, params: list[Par], state: dict[str, list[St]]) -> None:
        """optim.MasterAdamW: bf16 moments + 16 low master bits; fp32 working copies one chunk at a time."""
        sim, st_cat, tr = self.sim, "optimizer state", "optimizer transients"
        for p in params:
            if p.name not in state:
                state[p.name] = [sim.alloc(4, st_cat, "step"), sim.alloc(p.numel * 2, st_cat, "exp_avg"),
                                 sim.alloc(p.numel * 2, st_cat, "exp_avg_sq"), sim.alloc(p.numel * 2, st_cat, "master_lo")]
            c = min(p.numel, MASTER_CHUNK)  # the first chunk is the largest; every chunk frees its copies
            work = [sim.alloc(c * 4, tr, what) for what in ("master", "exp_avg.float()", "exp_avg_sq.float()")]
            sim.transient(c * 4, tr, "grad.float()")
            for t in work:
                sim.unref(t)

    def _adafactor(self, params: list[Par], state: dict[str, list[St]]) -> None:
        """torch.optim.Adafactor(foreach=True): factored second moments; steps live on the CPU."""
        sim, st_cat, tr = self.sim, "optimizer state", "optimizer transients"
        for p in params:
            if p.name not in state:
                if p.ndim >= 2:
                    rows, cols = p.numel // p.shape[-1], p.numel // (p.numel // p.shape[-1])
                    state[p.name] = [sim.alloc(rows * p.es, st_cat, "row_var"), sim.alloc(cols * p.es, st_cat, "col_var")]
                else:
                    state[p.name] = [sim.alloc(p.numel * p.es, st_cat, "variance")]
        sub: dict[bool, list[Par]] = {}
        for p in params:
            sub.setdefault(p.ndim >= 2, []).append(p)
        prev: list[St] = []
        for multidim, ps in sub.items():
            for _ in ps:  # p.norm(2).item()
                sim.transient(4, tr, "norm")
            if multidim:
                means = [sim.alloc(p.numel // p.shape[-1] * p.es, tr, "row_means") for p in ps]
                for t in means:
                    sim.unref(t)
                means = [sim.alloc(p.shape[-1] * p.es, tr, "col_means") for p in ps]
                for t in means:
                    sim.unref(t)
                est = [sim.alloc(p.numel * p.es, tr, "row_var @ col_var") for p in ps]
                means = [sim.alloc(p.es, tr, "row_var_means") for p in ps]
                for t in means:
                    sim.unref(t)
            else:
                sq = [sim.alloc(p.numel * p.es, tr, "grad**2") for p in ps]
                for t in sq:
                    sim.unref(t)
                est = [sim.alloc(p.numel * p.es, tr, "variance.clone") for p in ps]
            for t in prev:  # the previous subgroup's estimates die when `updates` is rebound
                sim.unref(t)
            for _ in ps:  # update.norm(2).item()
                sim.transient(4, tr, "norm")
            prev = est
        for t in prev:
            sim.unref(t)

    def run(self, fast: bool = False) -> Sim:
        """Replay `steps` optimizer steps. `fast`: the same peak from less work (for the planner):
        step 1's optimizer step (gradients present, state created), then one micro-step of step 2,
        the last of its window (state present, gradients held when accumulating), clip, step. Step 1's
        forward/backward and earlier micro-steps hold a subset of those bytes, so the peak is equal."""
        sim, s = self.sim, self.s
        if fast:
            self._held_grads()
            self.clip("step 1")
            self.optimizer_step("step 1")
            sim.step_peak = sim.live
            if s.accum > 1:
                self._held_grads()
            self.micro_step(f"step 2, micro-step {min(s.accum, 2)}")
            self.clip("step 2")
            self.optimizer_step("step 2")
            self.step_peaks = [sim.peak]
            return sim
        for step in range(1, s.steps + 1):
            sim.step_peak = sim.live
            for m in range(1, s.accum + 1):
                self.micro_step(f"step {step}, micro-step {m}")
            self.clip(f"step {step}")
            self.optimizer_step(f"step {step}")
            self.step_peaks.append(sim.step_peak)
        return sim


def sdpa_workspace(B: int, nh: int, T: int, hs: int, low: bool) -> int:
    """CUDA SDPA backward scratch: flash's fp32 dq accumulator and softmax_d (bf16/fp16), or the
    memory-efficient kernel's delta (fp32)."""
    Tr = -(-T // 128) * 128
    if low:
        hsr = -(-hs // 32) * 32 if hs <= 192 else 256
        dq_accum = B * Tr * nh * hsr * 4 if T > (64 if hs > 64 else 128) else 0
        return cuda_bytes(dq_accum) + cuda_bytes(B * nh * Tr * 4)
    return cuda_bytes(B * nh * -(-T // 32) * 32 * 4)
