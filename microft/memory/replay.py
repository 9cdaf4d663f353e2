"""The training step as a byte-level replay: what microft's step allocates, op by op, from shapes.

Each function mirrors the code it stands for: `Replay.block` is `model.Block`, `Replay.loss` is
`model._FusedCrossEntropy`, `Replay.optimizer_step` runs the optimizer's own replay (its entry in
`microft.optimizers`),
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
from functools import cached_property

from microft.layouts import DOUBLE_QUANT_BLOCK, NF4_BLOCK, nf4_nbytes
from microft.memory.sim import Node, Par, Sim, St, Ten, cuda_bytes
from microft.models.config import ModelConfig, ce_chunk_rows
from microft.optimizers import OPTIMIZERS, Settings, decays
from microft.resolved import PrecisionPolicy, precision_policy


@dataclass(frozen=True)
class Setup:
    """What is simulated: the batch, precision policy and memory switches of a run."""

    micro_bs: int
    seq_len: int
    precision: str = "fp32"  # the --precision word (resolved.POLICIES); the replay reads its `policy`
    accum: int = 1
    grad_ckpt: bool = False
    ckpt_every: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    momentum: float = 0.9
    lora: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("qkv", "proj")  # the family's names (models.config.parse_lora_targets)
    lora_dropout: float = 0.0
    quantize: str | None = None  # "nf4": block linear weights stored as quant.nf4_nbytes, dequantized per op
    double_quant: bool = False
    steps: int = 2
    packing: bool = False  # packed rows: position ids and a block-diagonal (B, 1, T, T) attention mask
    method: str = "sft"  # "dpo": `microft dpo`'s step, micro_bs pairs (memory/preference.py replays it)
    pref_loss: str = "dpo"  # the preference loss (dpo, ipo: a reference forward; simpo, orpo: none)
    precompute_ref: bool = False  # dpo, ipo: cached reference log-probs, no reference forward or copy

    @cached_property  # read per simulated op: looked up once (a frozen dataclass's __dict__ still takes it)
    def policy(self) -> PrecisionPolicy:
        """The precision policy the setup runs under (what train/step.py branches on)."""
        return precision_policy(self.precision)

    @property
    def mixed(self) -> bool:  # autocast: 16-bit matmuls over fp32 weights, with a cast cache
        return self.policy.autocast

    @property
    def param_bytes(self) -> int:  # bytes per parameter element
        return self.policy.param_bytes

    @property
    def compute_bytes(self) -> int:  # bytes per element of a matmul output (the compute dtype)
        return self.policy.compute_bytes




@dataclass
class Lin:
    W: Par
    b: Par | None
    inp: int
    out: int
    A: Par | None = None
    B: Par | None = None
    nf4: int | None = None  # bytes of the NF4 weight (Setup.quantize), else None


Norm = tuple[Par, Par | None]  # (weight, bias)


@dataclass
class Blk:
    ln_1: Norm
    lin: dict[str, Lin]  # by the family's LoRA target name: qkv, proj, fc, mlp_proj | q_proj ... down_proj
    ln_2: Norm
    q_norm: Par | None = None
    k_norm: Par | None = None
    layer: int = 0
    post_attn: Norm | None = None  # Gemma's norms on the attention's and the MLP's outputs
    post_mlp: Norm | None = None


@dataclass
class Model:
    arch: ModelConfig
    wte: Par
    wpe: Par | None
    blocks: list[Blk]
    ln_f: Norm
    head: Par
    params: list[Par]  # in named_parameters() order


def build_model(arch: ModelConfig, s: Setup) -> Model:
    """Parameters in `named_parameters()` order (models/transformer.py), trainability as LoRA leaves it."""
    es, full = s.param_bytes, not s.lora
    params: list[Par] = []

    def par(name: str, *shape: int, train: bool = full) -> Par:
        params.append(Par(name, shape, es, train))
        return params[-1]

    def lin(prefix: str, site: str, inp: int, out: int, bias: bool) -> tuple[str, Lin]:
        lo = Lin(par(f"{prefix}.weight", out, inp), par(f"{prefix}.bias", out) if bias else None, inp, out)
        if s.quantize:  # NF4Linear: codes + block scales instead of the weight (quant.nf4_nbytes)
            lo.nf4 = nf4_nbytes(out * inp, double_quant=s.double_quant)
        if s.lora and site in s.lora_targets:
            lo.A = par(f"{prefix}.lora_A.weight", s.lora_r, inp, train=True)
            lo.B = par(f"{prefix}.lora_B.weight", out, s.lora_r, train=True)
        return site, lo

    def norm(prefix: str, dim: int) -> Norm:
        return par(f"{prefix}.weight", dim), par(f"{prefix}.bias", dim) if a.norm == "layernorm" else None

    a, C = arch, arch.n_embd
    wte = par("wte.weight", a.padded_vocab_size, C)
    wpe = None if a.rotary else par("wpe.weight", a.n_positions, C)
    blocks = []
    for i in range(a.n_layer):
        h = f"h.{i}"
        ln1 = norm(f"{h}.ln_1", C)
        if a.fused_qkv:
            lins = [lin(f"{h}.attn.c_attn", "qkv", C, a.qkv_dim, a.qkv_bias),
                    lin(f"{h}.attn.c_proj", "proj", a.q_dim, C, a.attn_out_bias)]
        else:
            lins = [lin(f"{h}.attn.q_proj", "q_proj", C, a.q_dim, a.qkv_bias),
                    lin(f"{h}.attn.k_proj", "k_proj", C, a.kv_dim, a.qkv_bias),
                    lin(f"{h}.attn.v_proj", "v_proj", C, a.kv_dim, a.qkv_bias),
                    lin(f"{h}.attn.o_proj", "o_proj", a.q_dim, C, a.attn_out_bias)]
        qn = kn = None
        if a.qk_norm:  # per head, or over the whole projection (OLMo 2)
            qw, kw = (a.q_dim, a.kv_dim) if a.qk_norm_full else (a.head_dim, a.head_dim)
            qn, kn = par(f"{h}.attn.q_norm.weight", qw), par(f"{h}.attn.k_norm.weight", kw)
        post_attn = norm(f"{h}.post_attn_norm", C) if a.post_norms else None
        ln2 = norm(f"{h}.ln_2", C)
        if a.mlp == "swiglu":
            lins += [lin(f"{h}.mlp.gate_proj", "gate_proj", C, a.intermediate_size, a.mlp_bias),
                     lin(f"{h}.mlp.up_proj", "up_proj", C, a.intermediate_size, a.mlp_bias),
                     lin(f"{h}.mlp.down_proj", "down_proj", a.intermediate_size, C, a.mlp_bias)]
        else:
            lins += [lin(f"{h}.mlp.c_fc", "fc", C, a.intermediate_size, a.mlp_bias),
                     lin(f"{h}.mlp.c_proj", "mlp_proj", a.intermediate_size, C, a.mlp_bias)]
        post_mlp = norm(f"{h}.post_mlp_norm", C) if a.post_norms else None
        blocks.append(Blk(ln1, dict(lins), ln2, qn, kn, i, post_attn, post_mlp))
    ln_f = norm("ln_f", C)
    head = wte if a.tie_embeddings else par("lm_head.weight", a.padded_vocab_size, C)
    return Model(arch, wte, wpe, blocks, ln_f, head, params)


class Replay:
    """Replays `setup.steps` optimizer steps of microft's training step on `Sim`."""

    def __init__(self, arch: ModelConfig, setup: Setup, grad_buckets: bool = False):
        self.a, self.s = arch, setup
        self.sim = Sim()
        self.m = build_model(arch, setup)
        self.rows = setup.micro_bs * (2 if setup.method == "dpo" else 1)  # a pair's two sides in one forward
        self.N = self.rows * setup.seq_len
        self.adapters_off = False  # LoRA's adapters skipped (the preference step's reference forward)
        self.opt_state: dict[str, list[St]] = {}
        self.qmaps: list[St] = []
        self.scaler: list[St] = []
        self.packed: Ten | None = None  # the micro-step's boolean attention mask (--packing)
        self.step_peaks: list[int] = []
        self.grad_norm: Ten | None = None  # clip's total norm, alive until the step ends
        self.block_bytes = 0
        # model.HeadGradLink: a trainable tied head hands its gradient to the embedding's backward (the LM
        # loss's, and the preference step's log-prob head's)
        self.linked = arch.tie_embeddings and self.m.head.train
        sim = self.sim
        sim.mark("setup", "setup")
        nf4 = {lo.W.name for b in self.m.blocks for lo in b.lin.values() if lo.nf4}
        self.nf4_buffers: list[St] = []  # an NF4Linear's scales: buffers beside its codes
        for p in self.m.params:
            if p.name in nf4:
                codes, *scales = nf4_buffers(p.numel, self.s.double_quant)
                p.st = sim.alloc(codes, "weights", p.name)
                self.nf4_buffers += [sim.alloc(n, "weights", p.name + " scales") for n in scales]
            else:
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
        t = sim.op("to_copy", [p], [(p.numel, 2, "autocast weight copies")],
                   bwd=(("g", 0, p.numel, p.es),))[0]
        if p.train:
            sim.cache[p] = sim.alias(t)
            if sim.rec is not None:  # the cache's reference is not a local variable of the recompute
                sim.rec["held"].remove(t.st)
        return t

    def matmul(self, x: Ten, lin_w: Par, bias: Par | None, out: int, inp: int) -> Ten:
        """F.linear: autocast casts (bias, weight, input: C++ evaluates them right to left), addmm."""
        sim, aes = self.sim, self.s.compute_bytes
        n = x.numel // inp
        bc = self.cast_param(bias)
        wc = self.cast_param(lin_w)
        xc = self.cast(x) if sim.cache is not None else x
        bwd = (("g", 0, n * inp, aes), ("g", 1, out * inp, aes))
        bwd += (("g", 2, out, aes),) if bias is not None else ()
        y = sim.op("addmm" if bias is not None else "mm", [xc, wc, bc], [(n * out, aes, "activations")],
                   save_in=((0, (1,)), (1, (0,))), bwd=bwd)[0]
        if sim.cache is not None:
            sim.drop(xc, wc if isinstance(wc, Ten) else None, bc if isinstance(bc, Ten) else None)
        return y

    def nf4_matmul(self, x: Ten, lo: Lin) -> Ten:
        """NF4Linear.forward: the frozen bias and the input cast to the compute dtype, then
        quant._NF4LinearFn, which dequantizes the weight for this op only and saves nothing but the NF4
        buffers; its backward dequantizes again for grad_input (`nf4_dequantize_events`)."""
        sim, aes = self.sim, self.s.compute_bytes
        n, W, b = x.numel // lo.inp, lo.W, lo.b
        bc = None
        if b is not None and b.es != aes:
            bc = sim.new(b.numel, aes, "autocast weight copies", "bias.to")
        xc = self.cast(x) if aes == 2 else sim.alias(x)  # x.to(compute dtype): a copy only under autocast
        events, w_key = nf4_dequantize_events(W.numel, self.s.double_quant, aes)
        held: dict[str, St] = {}
        for kind, key, *nbytes in events:
            if kind == "a":
                held[key] = sim.alloc(nbytes[0], "NF4 dequantization", key, held=False)
            else:
                sim.unref(held.pop(key))
        bwd = tuple(("t", key, nbytes[0], 1) if kind == "a" else ("f", key) for kind, key, *nbytes in events)
        bwd += (("g", 0, n * lo.inp, aes), ("f", w_key))
        y = sim.op("nf4_linear", [xc], [(n * lo.out, aes, "activations")], bwd=bwd)[0]
        sim.unref(held.pop(w_key))
        sim.drop(xc, bc)
        return y

    def linear(self, x: Ten, lo: Lin) -> Ten:
        y = self.nf4_matmul(x, lo) if lo.nf4 else self.matmul(x, lo.W, lo.b, lo.out, lo.inp)
        if lo.A is None or self.adapters_off:
            return y
        sim, aes, r = self.sim, self.s.compute_bytes, self.s.lora_r
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
        sim, aes = self.sim, self.s.compute_bytes
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
        y = sim.op("gelu_linear", ins, [(f.numel // lo.inp * lo.out, aes, "activations")], save_in=save,
                   bwd=bwd)[0]
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

    def sdpa(self, q: Ten, k: Ten, v: Ten, mask: Ten | None = None) -> Ten:
        """CUDA SDPA: flash (bf16/fp16) or memory-efficient (fp32) keep out + fp32 logsumexp; GQA native
        (k and v keep their n_kv_head heads); autocast casts fp32 inputs (after a q/k norm) to bf16."""
        a, s, sim = self.a, self.s, self.sim
        B, T, H = self.rows, s.seq_len, a.n_head
        # a packed mask rules out flash: the memory-efficient kernel runs
        low = s.compute_bytes == 2 and self.packed is None
        casts = []
        if sim.cache is not None:
            casts = [self.cast(t) if t.es != 2 else None for t in (q, k, v)]
            q, k, v = (c or t for c, t in zip(casts, (q, k, v)))
        t_lse = T if low else -(-T // 32) * 32
        ws = sdpa_workspace(B, H, T, a.head_dim, low)
        bias = None
        if self.packed is not None:  # SDPA makes the (B, 1, T, T) boolean mask an additive bias, kept
            bias = sim.new(B * T * T, s.compute_bytes, "activations", "attention mask bias")
        o, lse = sim.op("sdpa", [q, k, v, bias or mask],
                        [(q.numel, s.compute_bytes, "activations"), (B * H * t_lse, 4, "activations")],
                        save_in=((0, (0, 1, 2)), (1, (0, 1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))),
                        save_out=((0, (0, 1, 2)), (1, (0, 1, 2))),
                        bwd=(("g", 0, q.numel, q.es), ("g", 1, k.numel, k.es), ("g", 2, v.numel, v.es),
                             ("s", 0, ws, 1)))
        sim.drop(lse, bias, *casts)
        return o

    def softcap_attention(self, q: Ten, k: Ten, v: Ten, layer: int) -> Ten:
        """model._SoftcapAttention (Gemma 2) as `Attention.masked` calls it: the boolean mask (causal, or
        the window's), its 0 / -inf bias; key/value heads repeated for the query heads, q copied for the
        batched matmul, the tanh and the probabilities saved; backward (written out in the model)
        repeats them again, copies the incoming gradient twice and sums the repeated heads' gradients.
        Then the (B, T, H, hs) copy of the output."""
        a, s, sim = self.a, self.s, self.sim
        B, T, H, es = self.rows, s.seq_len, a.n_head, q.es
        qn, P, kv_full = q.numel, B * H * T * T, q.numel
        window = a.layer_window(layer)
        if window is not None and T > window:  # attention_mask: aranges, kv <= q, q - window, kv > ..., &
            tmp = [sim.new(T, 8, "activations", "arange"), sim.new(T, 8, "activations", "arange"),
                   sim.new(T * T, 1, "activations", "kv <= q"), sim.new(T, 8, "activations", "q - window"),
                   sim.new(T * T, 1, "activations", "kv > q - window")]
            allowed = sim.new(T * T, 1, "activations", "mask")
            sim.drop(*tmp)
        else:
            allowed = None
        rows = 1
        if self.packed is not None:  # the packed rows' (B, 1, T, T) mask, and-ed with the window's
            rows = B
            both = sim.new(B * T * T, 1, "activations", "packed & window") if allowed \
                else sim.alias(self.packed)
            sim.drop(allowed)
            allowed = both
        elif allowed is None:
            allowed = sim.new(T * T, 1, "activations", "tril")
        consts = [sim.new(1, es, "activations", "0"), sim.new(1, es, "activations", "-inf")]
        bias = sim.new(rows * T * T, es, "activations", "additive mask")
        sim.drop(*consts)
        grouped = a.n_head != a.n_kv_head  # repeat_interleave, else .contiguous(): one copy of k and of v
        kk = sim.new(kv_full, es, "activations", "k heads")
        vv = sim.new(kv_full, es, "activations", "v heads")
        qc = sim.new(qn, es, "activations", "q.contiguous")
        t = sim.new(P, es, "activations", "tanh")
        sim.drop(qc)
        p = sim.new(P, es, "activations", "probs")
        # backward: dv = p^T dy, dp = dy v^T (each copying dy), the softmax's and the cap's gradient,
        # dq = ds k, dk = ds^T q (copying q); grouped heads' dk and dv are summed into their key/value heads
        dv = ("t", "dv", qn, es) if grouped else ("g", 2, v.numel, es)
        dk = ("t", "dk", qn, es) if grouped else ("g", 1, k.numel, es)
        bwd = (("t", "kk", kv_full, es), ("t", "vv", kv_full, es), ("t", "dy", qn, es), dv, ("f", "dy"),
               ("t", "dy2", qn, es), ("t", "dp", P, es), ("f", "dy2"), ("f", "vv"), ("t", "ds", P, es),
               ("f", "dp"), ("t", "sq", P, es), ("f", "sq"), ("g", 0, qn, es), ("t", "qc", qn, es), dk,
               ("f", "qc"))
        if grouped:
            bwd += (("g", 1, k.numel, es), ("g", 2, v.numel, es))
        saved = tuple((i, (0, 1, 2)) for i in range(5))
        y = sim.op("softcap_attention", [q, k, v, t, p], [(qn, es, "activations")], save_in=saved, bwd=bwd)[0]
        sim.drop(kk, vv, t, p, bias, allowed)
        # y.transpose(1, 2).contiguous()
        yc = sim.op("clone", [y], [(qn, es, "activations")], bwd=(("p", 0),))[0]
        sim.drop(y)
        return yc

    def elementwise(self, name: str, x: Ten, save_input: bool = True) -> Ten:
        return self.sim.op(name, [x], [(x.numel, x.es, "activations")],
                           save_in=((0, (0,)),) if save_input else (),
                           bwd=(("g", 0, x.numel, x.es),))[0]

    # --- blocks ---------------------------------------------------------------------------
    def block(self, x: Ten, blk: Blk) -> Ten:
        """model.Block: attention then MLP, each on a normed input added to the residual stream (OLMo 2: on
        the input itself, the norm on the output); Granite scales each output before the add."""
        a, sim, N = self.a, self.sim, self.N
        norm = self.norm_of(a)
        h = sim.alias(x) if a.norm_after else norm(x, blk.ln_1)
        if a.fused_qkv:
            qkv = self.linear(h, blk.lin["qkv"])
            q, k, v = sim.views("split", qkv, [N * a.q_dim, N * a.kv_dim, N * a.kv_dim])
            sim.drop(qkv)
        else:
            q, k, v = (self.linear(h, blk.lin[n]) for n in ("q_proj", "k_proj", "v_proj"))
        if blk.q_norm is not None:  # per head, before RoPE
            q2, k2 = norm(q, (blk.q_norm, None)), norm(k, (blk.k_norm, None))
            sim.drop(q, k)
            q, k = q2, k2
        if a.layer_rope(blk.layer):  # rotated q and k; the tables, cast to q's dtype once a block, are saved
            tables = self.local_tables if a.local_rope(blk.layer) else self.tables[:2]
            cos, sin = (sim.alias(c) if q.es == 4 else self.cast(c) for c in tables)
            q2, k2 = self.rope(q, cos, sin), self.rope(k, cos, sin)
            sim.drop(q, k, cos, sin)
            q, k = q2, k2
        if a.attn_softcap:
            y = self.softcap_attention(q, k, v, blk.layer)
        else:
            mask = self.window_mask(blk.layer)
            y = self.sdpa(q, k, v, mask)
            sim.drop(mask)
        p = self.linear(y, blk.lin["proj" if a.fused_qkv else "o_proj"])
        p = self.sublayer_out(p, blk.ln_1, blk.post_attn, (q, k, v, y, h))  # and the attention's locals
        x1 = self.add(x, p)
        sim.drop(p)
        h2 = sim.alias(x1) if a.norm_after else norm(x1, blk.ln_2)
        if a.mlp == "swiglu":  # down_proj(silu(gate_proj(x)) * up_proj(x))
            gate = self.linear(h2, blk.lin["gate_proj"])
            sg = self.elementwise("silu" if a.glu_act == "silu" else "gelu", gate)
            sim.drop(gate)  # a temporary: only silu's saved input (if a gradient needs it) outlives the call
            up = self.linear(h2, blk.lin["up_proj"])
            g = sim.op("mul", [sg, up], [(sg.numel, max(sg.es, up.es), "activations")],
                       save_in=((0, (1,)), (1, (0,))),
                       bwd=(("g", 0, sg.numel, sg.es), ("g", 1, up.numel, up.es)))[0]
            sim.drop(up, sg)
            mo = self.linear(g, blk.lin["down_proj"])
            sim.drop(g)
        elif blk.lin["mlp_proj"].A is None and not blk.lin["mlp_proj"].nf4:  # model._GeluLinear keeps no gelu
            f = self.linear(h2, blk.lin["fc"])
            mo = self.gelu_linear(f, blk.lin["mlp_proj"])
            sim.drop(f)
        else:
            f = self.linear(h2, blk.lin["fc"])
            g = self.elementwise("gelu", f)
            sim.drop(f)
            mo = self.linear(g, blk.lin["mlp_proj"])
            sim.drop(g)
        mo = self.sublayer_out(mo, blk.ln_2, blk.post_mlp, (h2,))
        out = self.add(x1, mo)
        sim.drop(x1, mo)
        return out

    def sublayer_out(self, y: Ten, ln: Norm, post: Norm | None, done: tuple[Ten, ...]) -> Ten:
        """A sublayer's output on its way to the residual add, as Block runs it: dropout, then the sublayer's
        locals (`done`) freed, OLMo 2's norm or Granite's multiplier (`after`), Gemma's post-norm."""
        sim = self.sim
        if self.a.dropout > 0:
            y2 = self.dropout(y)
            sim.drop(y)
            y = y2
        sim.drop(*done)
        y = self.after(y, ln)
        if post is not None:
            yn = self.norm_of(self.a)(y, post)
            sim.drop(y)
            y = yn
        return y

    def after(self, y: Ten, ln: Norm) -> Ten:
        """Block._forward's treatment of a sublayer's output: OLMo 2's norm, Granite's residual multiplier."""
        a, sim = self.a, self.sim
        if a.norm_after:
            y2 = self.rms_norm(y, ln)
            sim.drop(y)
            y = y2
        if a.residual_multiplier != 1.0:
            y2 = self.elementwise("mul", y, save_input=False)
            sim.drop(y)
            y = y2
        return y

    def rms_norm(self, x: Ten, ln: Norm) -> Ten:
        """model.RMSNorm, op by op: x.float(), pow, mean, +eps, rsqrt, mul, .to(x.dtype), weight * (.)."""
        sim, w = self.sim, ln[0]
        n, dim = x.numel, w.numel
        y = self.rms_stats(x, dim)
        if self.a.rms_gain_first:  # OLMo 2: (weight * y) in fp32, then the cast back
            g = sim.op("mul", [w, y], [(n, 4, "activations")], save_in=((1, (0,)),),
                       bwd=(("t", "s", n, 4, 0), ("g", 0, dim, w.es), ("f", "s"), ("g", 1, n, 4)))[0]
            sim.drop(y)
            out = sim.alias(g) if x.es == 4 else sim.op("to_copy", [g], [(n, x.es, "activations")],
                                                         bwd=(("g", 0, n, 4),))[0]
            sim.drop(g)
            return out
        yl = sim.alias(y) if x.es == 4 else \
            sim.op("to_copy", [y], [(n, x.es, "activations")], bwd=(("g", 0, n, 4),))[0]
        sim.drop(y)
        oes = max(w.es, x.es)  # type promotion: an fp32 gain times bf16 is fp32
        out = sim.op("mul", [w, yl], [(n, oes, "activations")], save_in=((1, (0,)),),
                     bwd=(("t", "s", n, oes, 0), ("g", 0, dim, w.es), ("f", "s"), ("g", 1, n, oes)))[0]
        sim.drop(yl)
        return out

    def norm_of(self, a: ModelConfig):
        """The replay of the family's norm: LayerNorm, RMSNorm, or Gemma's (1 + w) RMSNorm."""
        if a.norm == "layernorm":
            return self.norm
        return self.offset_rms_norm if a.norm_unit_offset else self.rms_norm

    def offset_rms_norm(self, x: Ten, ln: Norm) -> Ten:
        """model.OffsetRMSNorm (Gemma), op by op: x.float(), the statistics as RMSNorm, then
        × (1 + weight.float()) in fp32 and .to(x.dtype)."""
        sim, w = self.sim, ln[0]
        n, dim = x.numel, w.numel
        y = self.rms_stats(x, dim)
        wf = w if w.es == 4 else \
            sim.op("to_copy", [w], [(dim, 4, "activations")], bwd=(("g", 0, dim, w.es),))[0]
        w1 = sim.op("add", [wf], [(dim, 4, "activations")], bwd=(("p", 0),))[0]
        if wf is not w:
            sim.drop(wf)
        out = sim.op("mul", [y, w1], [(n, 4, "activations")], save_in=((0, (1,)), (1, (0,))),
                     bwd=(("g", 0, n, 4), ("t", "s", n, 4, 1), ("g", 1, dim, 4), ("f", "s")))[0]
        sim.drop(y, w1)
        if x.es == 4:
            return out
        low = sim.op("to_copy", [out], [(n, x.es, "activations")], bwd=(("g", 0, n, 4),))[0]
        sim.drop(out)
        return low

    def rms_stats(self, x: Ten, dim: int) -> Ten:
        """x.float() × rsqrt(mean(x²) + eps), in fp32: the part both RMSNorms share."""
        sim, n = self.sim, x.numel
        rows = n // dim
        xf = sim.alias(x) if x.es == 4 else \
            sim.op("to_copy", [x], [(n, 4, "activations")], bwd=(("g", 0, n, x.es),))[0]
        sq = sim.op("pow", [xf], [(n, 4, "activations")], save_in=((0, (0,)),),
                    bwd=(("t", "a", n, 4), ("t", "b", n, 4), ("g", 0, n, 4)))[0]  # x^1, 2 x^1, grad * (.)
        ms = sim.op("mean", [sq], [(rows, 4, "activations")], bwd=(("g", 0, n, 4),))[0]
        sim.drop(sq)
        ad = sim.op("add", [ms], [(rows, 4, "activations")], bwd=(("p", 0),))[0]
        sim.drop(ms)
        r = sim.op("rsqrt", [ad], [(rows, 4, "activations")], save_out=((0, (0,)),),
                   bwd=(("t", "a", rows, 4), ("t", "b", rows, 4), ("f", "a"), ("g", 0, rows, 4)))[0]
        sim.drop(ad)
        y = sim.op("mul", [xf, r], [(n, 4, "activations")], save_in=((0, (1,)), (1, (0,))),
                   bwd=(("g", 0, n, 4), ("t", "s", n, 4, 1), ("g", 1, rows, 4), ("f", "s")))[0]
        sim.drop(xf, r)
        return y

    def rope_tables(self, linear: bool = False) -> tuple[Ten, Ten]:
        """models.transformer.rope_cos_sin: positions, inverse frequencies, (T, rotary_dim) fp32 cos and sin
        (LongRoPE: both × its attention factor). `linear`: the inverse frequencies divided by Gemma 3's
        linear factor (one more small tensor)."""
        sim, T, d = self.sim, self.s.seq_len, self.a.rotary_dim
        if linear:
            sim.transient(d // 2 * 4, "activations", "inv_freq")
        tmp = [sim.new(T, 4, "activations", "positions"), sim.new(d // 2, 4, "activations", "inv_freq"),
               sim.new(T * d // 2, 4, "activations", "freqs"), sim.new(T * d, 4, "activations", "emb")]
        cos, sin = sim.new(T * d, 4, "activations", "cos"), sim.new(T * d, 4, "activations", "sin")
        lr = self.a.longrope
        if lr is not None and lr.attention_factor != 1.0:
            scaled = (sim.new(T * d, 4, "activations", "cos * factor"),
                      sim.new(T * d, 4, "activations", "sin * factor"))
            sim.drop(cos, sin)
            cos, sin = scaled
        sim.drop(*tmp)
        return cos, sin

    def rope(self, t: Ten, cos: Ten, sin: Ten) -> Ten:
        """apply_rope; a partial rotary (Phi-4-mini) turns the slice t[..., :rotary_dim] and concatenates the
        rest: each slice's backward makes a gradient of t's whole size (slice_backward)."""
        a, sim = self.a, self.sim
        if a.rotary_dim == a.head_dim:
            return self.rope_full(t, cos, sin)
        n_rot = t.numel // a.head_dim * a.rotary_dim
        (head,) = sim.views("slice", t, [n_rot])
        turned = self.rope_full(head, cos, sin)
        (rest,) = sim.views("slice", t, [t.numel - n_rot])
        out = sim.op("cat", [turned, rest], [(t.numel, t.es, "activations")], bwd=(("p", 0), ("p", 1)))[0]
        sim.drop(head, turned, rest)
        return out

    def rope_full(self, t: Ten, cos: Ten, sin: Ten) -> Ten:
        """apply_rope: x * cos + cat(-x2, x1) * sin; the muls save the tables."""
        sim, n, es = self.sim, t.numel, t.es
        xc = sim.op("mul", [t, cos], [(n, es, "activations")], save_in=((1, (0,)),),
                    bwd=(("g", 0, n, es),))[0]
        neg = sim.new(n // 2, es, "activations", "neg")
        rot = sim.op("cat", [t], [(n, es, "activations")],
                     bwd=(("t", "a", n // 2, es), ("g", 0, n, es), ("f", "a")))[0]
        sim.drop(neg)
        xs = sim.op("mul", [rot, sin], [(n, es, "activations")], save_in=((1, (0,)),),
                    bwd=(("g", 0, n, es),))[0]
        sim.drop(rot)
        out = sim.op("add", [xc, xs], [(n, es, "activations")], bwd=(("p", 0), ("p", 1)))[0]
        sim.drop(xc, xs)
        return out

    def window_mask(self, layer: int) -> Ten | None:
        """attention_mask: a (T, T) boolean mask, built per layer, when the sequence exceeds the window."""
        a, sim, T = self.a, self.sim, self.s.seq_len
        if a.layer_window(layer) is None or T <= a.sliding_window:
            return None
        qpos, kpos = sim.new(T, 8, "activations", "arange"), sim.new(T, 8, "activations", "arange")
        allowed = sim.new(T * T, 1, "activations", "kv <= q")
        lo = sim.new(T, 8, "activations", "q - window")
        far = sim.new(T * T, 1, "activations", "kv > q - window")
        mask = sim.new(T * T, 1, "activations", "mask")
        sim.drop(qpos, kpos, allowed, lo, far)
        # SDPA turns the boolean mask into an additive one in q's dtype: where(mask, 0, -inf); it is saved
        zero, ninf = sim.new(1, 4, "activations", "0"), sim.new(1, 4, "activations", "-inf")
        add = sim.new(T * T, self.s.compute_bytes, "activations", "additive mask")
        sim.drop(zero, ninf, mask)
        return add

    def forward(self, x_ids: Ten) -> Ten:
        """Transformer.hidden: embeddings, blocks (checkpointed every N-th), final norm."""
        a, s, sim, N = self.a, self.s, self.sim, self.N
        C, T, pes = a.n_embd, s.seq_len, s.param_bytes
        m = self.m
        sim.tag = "embeddings"
        emb_bwd = (("u", 0, "head") if self.linked else ("g", 0, m.wte.numel, pes),)  # model._TiedEmbedding
        tok = sim.op("embedding", [m.wte, x_ids], [(N * C, pes, "activations")], save_in=((1, (0,)),),
                     bwd=emb_bwd)[0]
        if m.wpe is not None:
            pos = sim.new(T, 8, "activations", "arange")
            pe = sim.op("embedding", [m.wpe, pos], [(T * C, pes, "activations")], save_in=((1, (0,)),),
                        bwd=(("g", 0, m.wpe.numel, pes),))[0]
            x = sim.op("add", [tok, pe], [(N * C, pes, "activations")],
                       bwd=(("p", 0), ("g", 1, T * C, pes)))[0]
            sim.drop(tok, pe, pos)
        else:
            x = tok
        if a.embedding_multiplier != 1.0:  # Granite: a new tensor; a scalar product saves nothing
            x2 = self.elementwise("mul", x, save_input=False)
            sim.drop(x)
            x = x2
        if a.scale_embeddings:  # x * tensor(sqrt(C)).to(dtype): the factor saved for the embedding's gradient
            f = sim.new(1, 4, "activations", "sqrt(C)")
            if pes != 4:
                f2 = sim.new(1, pes, "activations", "sqrt(C).to")
                sim.drop(f)
                f = f2
            x2 = sim.op("mul", [x, f], [(N * C, pes, "activations")], save_in=((1, (0,)),),
                        bwd=(("g", 0, N * C, pes),))[0]
            sim.drop(x, f)
            x = x2
        if a.dropout > 0:
            x2 = self.dropout(x)
            sim.drop(x)
            x = x2
        self.tables = self.rope_tables(bool(a.rope_linear_factor)) if a.rotary else (None, None)
        two = a.rotary and bool(a.rope_local_theta or a.rope_linear_factor)
        self.local_tables = self.rope_tables() if two else ()  # Gemma 3: the sliding layers' own
        start = sim.live
        for i, blk in enumerate(m.blocks):
            sim.tag = f"block {i}"
            if s.grad_ckpt and i % s.ckpt_every == 0 and sim.grad:  # no_grad: the block runs plainly
                # the checkpoint holds the RoPE tables its block takes until its backward is done
                tables = () if not a.layer_rope(i) else self.local_tables if a.local_rope(i) else self.tables
                nxt = sim.checkpoint(lambda x=x, blk=blk: self.block(x, blk), x, tuple(tables))
            else:
                nxt = self.block(x, blk)
            sim.drop(x)
            x = nxt
        if sim.grad:
            self.block_bytes = (sim.live - start) // a.n_layer  # what each block leaves behind
        sim.tag = "loss"
        h = self.norm_of(a)(x, m.ln_f)
        sim.drop(x, *self.tables[:2], *self.local_tables)
        return h

    # --- the fused chunked cross-entropy (model._FusedCrossEntropy) -------------------------
    def loss(self, h: Ten) -> Ten:
        a, s, sim, N = self.a, self.s, self.sim, self.N
        C, Vp, V = a.n_embd, a.padded_vocab_size, a.vocab_size
        W = self.m.head
        cat = "loss (fused cross-entropy)"
        dt = s.compute_bytes  # autocast dtype, or h's dtype
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
        probs = z_max = z_t = wcol = hw = t_cap = None
        for n in self.ce_chunk_sizes(N, Vp):
            hc_new = sim.new(n * C, dt, cat, "hc") if h.es != dt else None
            sim.drop(hc)
            hc = hc_new
            z = sim.new(n * Vp, dt, cat, "logits")
            zdt = dt
            if a.final_softcap:  # t = tanh(z.float() / cap) kept for the gradient; z = t × cap, in fp32
                sim.drop(t_cap)
                t_cap = sim.new(n * Vp, 4, cat, "tanh") if dt != 4 else sim.alias(z)
                sim.drop(z)
                z, zdt = sim.new(n * Vp, 4, cat, "capped logits"), 4
            if Vp > V:
                sim.transient(4, cat, "-inf")
            zm_new, zt_new = sim.new(n, zdt, cat, "max"), sim.new(n, zdt, cat, "z_t")
            sim.drop(z_max, z_t)
            z_max, z_t = zm_new, zt_new
            # softmax in place
            p_new = sim.new(n * Vp, 4, cat, "logits.float()") if zdt != 4 else sim.alias(z)
            sim.drop(probs)  # still alive here only when no gradient is needed (no `del`)
            probs = p_new
            sim.drop(z)
            zm32 = sim.new(n, 4, cat, "max.float()") if zdt != 4 else None  # lse = z_max - log p_max
            p_max = sim.new(n, 4, cat, "p_max")
            log_p = sim.new(n, 4, cat, "log p_max")
            sim.drop(p_max)
            lse_new = sim.new(n, 4, cat, "lse")
            sim.drop(zm32, log_p, lse)
            lse = lse_new
            # the token losses, weighted, summed
            zt32 = sim.new(n, 4, cat, "z_t.float()") if zdt != 4 else None
            diff = sim.new(n, 4, cat, "token loss")
            sim.drop(zt32)
            weighted = sim.new(n, 4, cat, "weighted loss")
            sim.drop(diff)
            sim.transient(4, cat, "sum")
            sim.drop(weighted)
            if not (need_h or need_w):
                continue
            sim.transient(n * 4, cat, "-1 at the targets")
            sim.drop(t_cap)  # the cap's derivative 1 - t² multiplied in place, then `del t`
            t_cap = None
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
        sim.drop(hc, probs, z_max, z_t, g, lse, wcol, hw, Wc, valid, tw, safe_t, t_cap)
        self.attach_loss(h, loss, grad_h, grad_w)
        return loss

    @staticmethod
    def ce_chunk_sizes(N: int, Vp: int) -> list[int]:
        """Rows of the chunks the fused loss walks (models.config.ce_chunks, not listed: a planner's batch may
        be huge); full chunks after the second repeat it exactly: replay 2 and the last."""
        size = ce_chunk_rows(N, Vp)
        starts = range(0, N, size)
        if len(starts) > 3:
            starts = [starts[0], starts[1], starts[-1]]
        return [min(size, N - s0) for s0 in starts]

    def attach_loss(self, h: Ten, loss: Ten, grad_h: Ten | None, grad_w: Ten | None) -> None:
        """The fused loss's backward: grad_h * g_out; grad_w widened to the weight's dtype (a new tensor
        either way), handed to the tied embedding's backward when the head is the embedding (HeadGradLink).
        A low-precision head (bf16-true) also casts the fp32 g_out to its dtype, a scalar held to the end."""
        sim, N, C, Vp, W = self.sim, self.N, self.a.n_embd, self.a.padded_vocab_size, self.m.head
        scale = (("t", "g_out.to", 1, W.es),) if grad_w is not None and W.es != 4 else ()
        if self.linked:
            bwd = (("g", 0, N * C, h.es), *scale, ("k", "head", Vp * C, W.es, W))
            sim.custom("fused_ce", [h, None], loss, [grad_h, grad_w], bwd)
        else:
            bwd = (("g", 0, N * C, h.es), *scale, ("g", 1, Vp * C, W.es))
            sim.custom("fused_ce", [h, W], loss, [grad_h, grad_w], bwd)
        sim.drop(grad_h, grad_w)

    # --- one micro-step, clipping, the optimizer --------------------------------------------
    def micro_step(self, at: str) -> None:
        s, sim = self.s, self.sim
        sim.mark(f"{at}, batch", "forward")
        x = sim.new(self.N, 8, "batch", "x")
        y = sim.new(self.N, 8, "batch", "y")
        packed = ()
        if s.packing:
            packed = (sim.new(self.N, 8, "batch", "position ids"),
                      sim.new(s.micro_bs * s.seq_len**2, 1, "batch", "packed attention mask"))
        self.packed = packed[1] if packed else None
        sim.mark(f"{at}, forward", "forward")
        sim.cache = {} if s.mixed else None
        h = self.forward(x)
        sim.mark(f"{at}, loss", "loss")
        if self.a.logits_scaling != 1.0:  # Granite: h / s before the head (Transformer.forward), after ln_f
            h2 = sim.op("div", [h], [(h.numel, h.es, "loss (fused cross-entropy)")],
                        bwd=(("g", 0, h.numel, h.es),))[0]
            sim.drop(h)
            h = h2
        loss = self.loss(h)
        sim.drop(h)
        self.backward_of(loss, at)
        sim.drop(loss, x, y, *packed)
        self.packed = None

    def backward_of(self, loss: Ten, at: str) -> None:
        """The micro-step after its forward: autocast's exit (its cast cache cleared), the loss divided by
        the global batch's count (× the GradScaler's scale in fp16), backward."""
        s, sim = self.s, self.sim
        if sim.cache is not None:  # autocast exit clears the cast cache
            for t in sim.cache.values():
                sim.unref(t.st)
        sim.cache = None
        sim.mark(f"{at}, backward of the loss", "start of backward")
        scaled = sim.op("div", [loss], [(1, 4, "backward transients")], bwd=(("g", 0, 1, 4),))[0]
        if s.policy.grad_scaler:
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
        sim.drop(scaled)

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
        if self.s.policy.grad_scaler:  # scaler.unscale_
            self.found_inf = self.unscale(cat)
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
        sim.drop(t3, t4)
        self.grad_norm = total  # returned: step.finish_step holds it through the optimizer step

    def unscale(self, cat: str) -> St:
        """GradScaler.unscale_: inv_scale = scale.double().reciprocal().float(), found_inf = full(0.), then
        each copied to the gradients' device (`copy=True`: a copy on the same device too) for the in-place
        unscale; only found_inf's copy outlives it (the optimizer state's found_inf_per_device, until
        update). Not a peak in practice (the optimizer step after it holds more: new state or temporaries
        the size of a gradient), but replayed as it runs, byte for byte with the trace's ops."""
        sim = self.sim
        double = sim.alloc(8, cat, "scale.double()")
        reciprocal = sim.alloc(8, cat, "reciprocal")
        sim.unref(double)
        inv_scale = sim.alloc(4, cat, "inv_scale")
        sim.unref(reciprocal)
        found_inf = sim.alloc(4, cat, "found_inf")
        found_copy, inv_copy = sim.alloc(4, cat, "found_inf copy"), sim.alloc(4, cat, "inv_scale copy")
        for st in (inv_copy, inv_scale, found_inf):
            sim.unref(st)
        return found_copy

    def groups(self) -> list[tuple[list[Par], float]]:
        """optim.param_groups: (matrices, weight decay), (biases/norms/embeddings, 0)."""
        decay = [p for p in self.trainable() if decays(p.name, p.ndim)]
        no_decay = [p for p in self.trainable() if not decays(p.name, p.ndim)]
        return [(g, wd) for g, wd in ((decay, self.s.weight_decay), (no_decay, 0.0)) if g]

    def optimizer_step(self, at: str) -> None:
        """The optimizer's step as its registry entry replays it (microft.optimizers), then zero_grad."""
        sim = self.sim
        sim.mark(f"{at}, optimizer step", "optimizer step")
        settings = Settings(bf16_weights=self.s.policy.master_weights, momentum=self.s.momentum)
        # scaler.step on an optimizer that takes the overflow flag itself: found_inf = sum(the per-device
        # flags) is a new tensor (0 + flag), set as optimizer.found_inf for the step, deleted after it
        summed = (sim.alloc(4, "optimizer transients", "found_inf sum")
                  if self.s.policy.grad_scaler and OPTIMIZERS[self.s.optimizer].amp_scaling else None)
        OPTIMIZERS[self.s.optimizer].replay(sim, self.groups(), self.opt_state, settings)
        sim.unref(summed)
        if self.s.policy.grad_scaler:
            sim.unref(getattr(self, "found_inf", None))
            self.found_inf = None
        sim.mark(f"{at}, zero_grad", "optimizer step")
        for p in self.m.params:
            sim.unref(p.grad)
            p.grad = None
        sim.drop(self.grad_norm)  # finish_step returns
        self.grad_norm = None

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


def nf4_buffers(numel: int, double_quant: bool) -> list[int]:
    """Bytes of an NF4Linear's buffers (each its own allocation): codes, absmax [, absmax2, offset]."""
    nb = -(-numel // NF4_BLOCK)
    if double_quant:
        return [(numel + 1) // 2, nb, 4 * -(-nb // DOUBLE_QUANT_BLOCK), 4]
    return [(numel + 1) // 2, 4 * nb]


def nf4_dequantize_events(numel: int, double_quant: bool, es: int) -> tuple[list[tuple], str]:
    """quant._dequantize's allocations in order, as ("a", key, bytes) / ("f", key), and the key of the
    storage it returns (the weight in the compute dtype; the fp32 values themselves when that is fp32)."""
    nb, half = -(-numel // NF4_BLOCK), (numel + 1) // 2
    ev: list[tuple] = [("a", "codes.int()", half * 4),
                       # _pair_table: levels, arange(256), levels[b >> 4], levels[b & 15], stack
                       ("a", "levels", 64), ("a", "b", 2048), ("a", "b >> 4", 2048), ("a", "high", 1024),
                       ("f", "b >> 4"), ("a", "b & 15", 2048), ("a", "low", 1024), ("f", "b & 15"),
                       ("a", "pair table", 2048), ("f", "high"), ("f", "low"), ("f", "b"), ("f", "levels"),
                       ("a", "values", half * 8), ("f", "codes.int()"), ("f", "pair table")]
    vals = "values"
    if 2 * half != nb * NF4_BLOCK:  # F.pad to whole blocks
        ev += [("a", "padded values", nb * NF4_BLOCK * 4), ("f", "values")]
        vals = "padded values"
    # _absmax_fp32: dynamic map, absmax.int() (padded to whole blocks), code[idx] * absmax2, + offset
    if double_quant:
        padded = -(-nb // DOUBLE_QUANT_BLOCK) * DOUBLE_QUANT_BLOCK
        ev += [("a", "dynamic map", 1024), ("a", "absmax.int()", nb * 4)]
        idx = "absmax.int()"
        if padded != nb:
            ev += [("a", "padded absmax", padded * 4), ("f", "absmax.int()")]
            idx = "padded absmax"
        ev += [("a", "code[idx]", padded * 4), ("a", "scaled", padded * 4), ("f", "code[idx]"),
               ("a", "scale", nb * 4), ("f", "scaled"), ("f", idx), ("f", "dynamic map")]
    if es != 4:
        ev += [("a", "dequantized weight", numel * es), ("f", vals)]
        vals = "dequantized weight"
    if double_quant:
        ev += [("f", "scale")]
    return ev, vals


def sdpa_workspace(B: int, nh: int, T: int, hs: int, low: bool) -> int:
    """CUDA SDPA backward scratch: flash's fp32 dq accumulator and softmax_d (bf16/fp16), or the
    memory-efficient kernel's delta (fp32)."""
    Tr = -(-T // 128) * 128
    if low:
        hsr = -(-hs // 32) * 32 if hs <= 192 else 256
        dq_accum = B * Tr * nh * hsr * 4 if T > (64 if hs > 64 else 128) else 0
        return cuda_bytes(dq_accum) + cuda_bytes(B * nh * Tr * 4)
    return cuda_bytes(B * nh * -(-T // 32) * 32 * 4)


# Every aten op microft's real step dispatches (as the fake-tensor trace sees it) -> the Replay
# method that accounts for its bytes. tests/test_memory_sync.py fails, naming the op, when the
# model or the step starts dispatching an op that is not listed here: model it, then list it.
_MODELLED_BY: dict[str, tuple[str, ...]] = {
    "micro_step": ("aten.zeros.default", "aten.ones_like.default", "aten.div.Tensor", "aten.detach.default",
                   "prim.device.default", "profiler._record_function_enter_new.default",
                   "profiler._record_function_exit._RecordFunction", "aten.lift_fresh.default"),
    "forward": ("aten.embedding.default", "aten.embedding_dense_backward.default", "aten.index_put_.default",
                "aten.new_zeros.default", "aten.arange.default", "aten.arange.start", "aten.expand.default"),
    "rope_tables": ("aten.arange.start_step", "aten.div.Scalar", "aten.pow.Scalar", "aten.where.self",
                    "aten.sub.Tensor", "aten.cat.default", "aten.cos.default", "aten.sin.default",
                    "aten.bitwise_and.Tensor", "aten.gt.Tensor", "aten.le.Tensor", "aten.mul.Scalar"),
    "rope": ("aten.neg.default", "aten.slice.Tensor", "aten.slice_backward.default"),
    "window_mask": ("aten.scalar_tensor.default",),
    "softcap_attention": ("aten.ones.default", "aten.tril_.default", "aten.bmm.default", "aten.tanh_.default",
                          "aten._softmax_backward_data.default", "aten.neg_.default", "aten.div_.Tensor"),
    "matmul": ("aten.mm.default", "aten.addmm.default", "aten.t.default", "aten._unsafe_view.default",
               "aten.view.default", "aten.sum.dim_IntList", "aten._to_copy.default", "aten.clone.default"),
    "linear": ("aten.mul.Tensor", "aten.add.Tensor"),
    "nf4_matmul": ("aten.__rshift__.Scalar", "aten.bitwise_and.Scalar", "aten.index.Tensor",
                   "aten.constant_pad_nd.default"),
    "gelu_linear": ("aten.gelu.default", "aten.gelu_backward.default"),
    "elementwise": ("aten.silu.default", "aten.silu_backward.default"),
    "norm": ("aten.native_layer_norm.default", "aten.native_layer_norm_backward.default"),
    "rms_norm": ("aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.rsqrt.default"),
    "dropout": ("aten.native_dropout.default", "aten.native_dropout_backward.default"),
    "sdpa": ("aten._scaled_dot_product_flash_attention_for_cpu.default",
             "aten._scaled_dot_product_flash_attention_for_cpu_backward.default", "aten.transpose.int",
             "aten.split.Tensor", "aten.split_with_sizes.default"),
    "loss": ("aten.ne.Scalar", "aten.empty.memory_format", "aten.amax.default", "aten.gather.default",
             "aten.log.default", "aten.squeeze.dim", "aten.sum.default", "aten.full_like.default",
             "aten.scatter_add_.default", "aten.unsqueeze.default", "aten.mul.out", "aten._softmax.out",
             "aten.fill_.Tensor", "aten.full.default", "aten.add_.Tensor", "aten.mul_.Tensor",
             "mkldnn._linear_pointwise.default"),  # the head's logits on a CPU in fp32 (loss.head_logits)
    "clip": ("aten._foreach_norm.Scalar", "aten.stack.default", "aten.linalg_vector_norm.default",
             "aten.reciprocal.default", "aten.clamp.default", "aten._foreach_mul_.Tensor",  # also rope_tables
             "aten._amp_foreach_non_finite_check_and_unscale_.default"),
    # the step's own (fp16's GradScaler.update); each optimizer's ops are in its entry (microft.optimizers)
    "optimizer_step": ("aten._amp_update_scale_.default",),
    # microft dpo's step (memory/preference.py, PairReplay); the reference's no-grad Gemma 2 attention
    "sequence_logps": ("aten.index_select.default", "aten.floor_divide.default", "aten.index_add.default",
                       "aten.unbind.int", "aten._softmax.default"),
    "response_logps": ("aten._log_softmax.default", "aten._log_softmax_backward_data.default",
                       "aten.tanh.default", "aten.tanh_backward.default", "aten.addmm_.default",
                       "aten.empty_like.default", "aten.zero_.default", "aten.mm.out"),
    "pair_losses": ("aten.log_sigmoid_forward.default", "aten.log_sigmoid_backward.default",
                    "aten.exp.default", "aten.log1p.default", "aten.add.Scalar"),
}
TRACED_OPS: dict[str, str] = {**{op: "optimizer_step" for o in OPTIMIZERS.values() for op in o.ops},
                              **{op: method for method, ops in _MODELLED_BY.items() for op in ops}}
