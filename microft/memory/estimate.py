"""Peak training memory: the analytical estimate, the traced one, budgets and the batch planner.

Two engines answer "how many bytes does one training step of this run hold at its peak?":

- `estimate(...)` (analytical, the default): replays microft's training step from shapes alone
  (`replay.py` on the `sim.py` engine): weights, gradients, optimizer state, the tensors each block saves
  under the precision policy, the fused loss, checkpoint recomputes, gradient accumulation and the first
  step's optimizer-state creation. No torch import (presets); milliseconds for any model size.
- `trace(...)` (`--trace`): runs microft's real step twice on fake tensors (`trace.py`) and
  reports the exact peak of live tensors. Every family.

Both give the tensor peak `torch.cuda.max_memory_allocated` would report (CUDA's 512-byte
allocator rounding included). Runtime overhead (CUDA context, cuBLAS workspace, a fragmentation
margin) is listed separately and added only for the verdict against a memory budget.

This module imports neither torch nor rich (only `trace` and `--gpu-mem auto` load torch); the
CLI renders what it returns. The planner built on it is plan.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from microft.config import RunConfig
from microft.errors import ConfigError
from microft.memory.preference import PairReplay, reference_kind
from microft.memory.replay import Replay, Setup, nf4_buffers
from microft.memory.sim import OverLimit
from microft.models.config import ModelConfig, ce_chunk_rows, parse_lora_targets
from microft.models.source import read_model_config
from microft.resolved import Device, resolve_seq_len
from microft.resolved import resolve_precision as resolve

MiB, GiB = 2**20, 2**30
CUDA_CONTEXT = 500 * MiB  # driver context + kernels (lazy loading); varies 0.3-0.8 GiB by GPU and CUDA
FRAGMENTATION = 0.08  # reserved-but-unused share the caching allocator typically adds in training

# name -> (total MiB as the driver reports it, bf16 support, Hopper-class cuBLAS workspace)
DEVICES: dict[str, tuple[int, bool, bool]] = {
    "t4": (15360, False, False), "v100-16gb": (16384, False, False), "v100-32gb": (32768, False, False),
    "rtx2080ti": (11264, False, False), "rtx3060": (12288, True, False), "rtx3080": (10240, True, False),
    "rtx3090": (24576, True, False), "rtx4070": (12282, True, False), "rtx4080": (16376, True, False),
    "rtx4090": (24564, True, False), "a10": (23028, True, False), "a10g": (23028, True, False),
    "l4": (23034, True, False), "a6000": (49140, True, False), "l40s": (46068, True, False),
    "a100-40gb": (40960, True, False), "a100-80gb": (81920, True, False), "h100": (81559, True, True),
    "h100-nvl": (95830, True, True), "h200": (143771, True, True),
}


# --- model shapes ------------------------------------------------------------------------------
def with_dropout(mc: ModelConfig, dropout: float | None = None) -> ModelConfig:
    """`mc` with the run's dropout (`--dropout` overrides the config's): the one switch a run changes."""
    return mc if dropout is None or dropout == mc.dropout else mc.model_copy(update={"dropout": dropout})


def load_shape(spec: str, dropout: float | None = None) -> ModelConfig:
    """The ModelConfig of a preset, a microft checkpoint, an HF directory or config.json, or a cached hub repo
    id, read by `models.source.read_model_config` (JSON only, no torch). Never reads weights."""
    return with_dropout(read_model_config(spec), dropout)


# --- budgets and devices -----------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Memory available on one device, and what the device supports."""

    bytes: int
    label: str
    bf16: bool = True
    hopper: bool = False


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": MiB, "mb": 10**6, "mib": MiB,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_budget(spec: str) -> Budget:
    """`18GiB`, `24GB` (10^9), `16G` (GiB), a byte count, a device name (`rtx3090`, `a100-40gb`,
    `h100`, `t4`, ...; see DEVICES), or `auto` (the local CUDA device)."""
    s = spec.strip().lower().replace("_", "-").replace(" ", "")
    if s == "auto":
        return _local_budget()
    alias = s.replace("nvidia-", "").replace("geforce-", "").replace("tesla-", "")
    alias = {"a100": "a100-80gb", "a100-40g": "a100-40gb", "a100-80g": "a100-80gb", "v100": "v100-16gb",
             "rtx-3090": "rtx3090", "rtx-4090": "rtx4090", "3090": "rtx3090", "4090": "rtx4090"
             }.get(alias, alias)
    if alias in DEVICES:
        mib, bf16, hopper = DEVICES[alias]
        return Budget(mib * MiB, alias, bf16, hopper)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if m and not m.group(2):  # 18 bytes is never meant
        raise ConfigError(f"--gpu-mem {spec!r}: give a unit: {m.group(1)}GB or {m.group(1)}GiB")
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"--gpu-mem {spec!r}: give a size (18GiB, 24GB, 16G), 'auto', or a device: "
                          f"{', '.join(DEVICES)}")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ConfigError(f"--gpu-mem {spec!r} must be positive")
    return Budget(n, spec.strip())


def _local_budget() -> Budget:
    """This machine's GPU: Apple silicon's share of unified memory (asked first: no CUDA call on a
    Mac), else the CUDA device's total memory."""
    import torch

    from microft.train.step import mps_available, mps_supports_bf16

    if mps_available():
        from microft.perf import mps_memory_budget

        n, how = mps_memory_budget()
        return Budget(n, f"Apple GPU ({how}, {n / GiB:.1f} GiB)", mps_supports_bf16())
    if not torch.cuda.is_available():
        raise ConfigError("--gpu-mem auto needs a CUDA GPU or Apple silicon; give a size (18GiB) or a device "
                          "name (rtx3090)")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Budget(props.total_memory, props.name, props.major >= 8, props.major >= 9)


def runtime_overhead(peak: int, budget: Budget | None = None) -> dict[str, int]:
    """What a CUDA process holds beyond its tensors. Not part of the tensor peak; added for the
    verdict. The cuBLAS workspace is allocated through the caching allocator, so on a GPU
    `max_memory_allocated` includes it."""
    hopper = bool(budget and budget.hopper)
    return {
        "CUDA context": CUDA_CONTEXT,
        "cuBLAS workspace": (32 if hopper else 8) * MiB + 128 * 1024,
        "fragmentation margin": max(64 * MiB, int(FRAGMENTATION * peak)),
    }


# --- the run being estimated -------------------------------------------------------------------
def lora_targets(spec: str, family: str = "gpt2") -> tuple[str, ...]:
    """`"qkv,proj"`, `"attn"`, `"q_proj,v_proj"`, `"all"` -> the family's target names, as the trainer reads
    them."""
    return tuple(parse_lora_targets(spec, family))


def budget_device(budget: Budget | None) -> Device:
    """The CUDA GPU a budget describes, as the run resolver reads a device (no budget: a GPU with bf16 and
    memory unknown)."""
    if budget is None:
        return Device("cuda", "cuda")
    return Device("cuda", "cuda", budget.bf16, budget.bytes, f"{budget.label} ({budget.bytes / GiB:.1f} GiB)",
                  budget.hopper)


def resolve_precision(precision: str, budget: Budget | None = None) -> str:
    """`auto` as the trainer resolves it on the target GPU (`resolved.resolve_precision`): bf16-mixed, or
    fp16-mixed without bf16. Returns the --precision word."""
    return resolve(precision, budget_device(budget)).name


def scale_out(cfg: RunConfig) -> tuple[int, str]:
    """(devices, "none" | "ddp" | "fsdp"): more than one device without --shard means DDP."""
    if cfg.devices <= 1:
        return 1, "none"
    return cfg.devices, "fsdp" if cfg.shard == "fsdp" else "ddp"


def setup_for(cfg: RunConfig, arch: ModelConfig, micro_bs: int, accum: int = 1, precision: str | None = None
              ) -> Setup:
    """The simulated setup of a run config (accumulation beyond 2 micro-steps repeats micro-step 2)."""
    seq = resolve_seq_len(cfg.max_seq_len, arch.n_positions, "--seq-len")
    if micro_bs < 1:
        raise ConfigError(f"--micro-bs must be positive, got {micro_bs}")
    return Setup(
        micro_bs=micro_bs, seq_len=seq, precision=precision or resolve_precision(cfg.precision),
        accum=min(accum, 2),
        grad_ckpt=cfg.grad_ckpt, ckpt_every=cfg.grad_ckpt_every, optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay, momentum=cfg.momentum, lora=cfg.lora, lora_r=cfg.lora_r,
        lora_targets=lora_targets(cfg.lora_targets if cfg.lora else "qkv,proj", arch.model_type),
        lora_dropout=cfg.lora_dropout, quantize=cfg.quantize, double_quant=cfg.double_quant,
        packing=cfg.packing,
    )


# --- estimates ---------------------------------------------------------------------------------
COMPONENT_ORDER = (
    "weights", "gradients", "optimizer state", "activations", "autocast weight copies",
    "recomputed activations", "NF4 dequantization", "loss (fused cross-entropy)", "reference forward",
    "backward transients", "optimizer transients", "batch", "DDP gradient buckets",
    "FSDP unsharded parameters", "other",
)


@dataclass
class Estimate:
    """A peak-memory answer: the tensor peak by component, where it falls, and runtime overhead."""

    engine: str  # "analytical" or "trace"
    arch: ModelConfig
    setup: Setup
    peak_bytes: int
    peak_phase: str  # forward, loss, start of backward, backward, end of backward, clip, optimizer step
    peak_where: str  # e.g. "step 2, micro-step 1, backward of block 11"
    components: dict[str, int]  # at the peak; sums to peak_bytes
    step_peaks: list[int]  # per optimizer step: the first creates the optimizer state
    details: dict[str, int] = field(default_factory=dict)  # itemised sizes, not all live at the peak
    overhead: dict[str, int] = field(default_factory=dict)
    budget: Budget | None = None
    world: int = 1
    shard: str = "none"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ops: list[str] = field(default_factory=list)  # trace only: the aten ops the real step dispatched

    @property
    def overhead_bytes(self) -> int:
        return sum(self.overhead.values())

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total_bytes <= self.budget.bytes

    def to_dict(self) -> dict[str, Any]:
        s = self.setup
        return {
            "peak_bytes": self.peak_bytes, "engine": self.engine, "peak_phase": self.peak_phase,
            "peak_where": self.peak_where, "components": self.components, "overhead": self.overhead,
            "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes,
            "budget_bytes": self.budget.bytes if self.budget else None,
            "budget": self.budget.label if self.budget else None, "fits": self.fits,
            "step_peaks": self.step_peaks, "details": self.details,
            "run": {"model": self.arch.name, "family": self.arch.model_type, "micro_bs": s.micro_bs,
                    "seq_len": s.seq_len, "accum_simulated": s.accum, "precision": s.precision,
                    "grad_ckpt": s.grad_ckpt, "grad_ckpt_every": s.ckpt_every, "optimizer": s.optimizer,
                    "lora": s.lora, "lora_r": s.lora_r if s.lora else None,
                    "lora_targets": list(s.lora_targets) if s.lora else None, "devices": self.world,
                    "shard": self.shard},
            "notes": self.notes, "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """One line for a banner: '6.26 GiB tensors at start of backward (+1.0 GiB runtime)'."""
        return (f"{self.peak_bytes / GiB:.2f} GiB tensors at {self.peak_phase} "
                f"(+{self.overhead_bytes / GiB:.2f} GiB runtime overhead; {self.engine})")


def _ordered(comp: dict[str, int]) -> dict[str, int]:
    out = {k: comp[k] for k in COMPONENT_ORDER if comp.get(k)}
    out.update({k: v for k, v in comp.items() if v and k not in out})
    return out


def _details(arch: ModelConfig, s: Setup, r: Replay) -> dict[str, int]:
    """Itemised sizes that explain the peak (bytes; not all of them are live at once)."""
    params = r.m.params
    train = [p for p in params if p.train]
    C, Vp = arch.n_embd, arch.padded_vocab_size
    nf4 = {lo.W.name: sum(nf4_buffers(lo.W.numel, s.double_quant)) for b in r.m.blocks
           for lo in b.lin.values() if lo.nf4}
    pad = (Vp - arch.vocab_size) * C  # the padded vocabulary's rows, not the model's parameters
    d = {
        "parameters": sum(p.numel for p in params) - pad * (1 if arch.tie_embeddings else 2),
        "trainable parameters": sum(p.numel for p in train) - (0 if s.lora else pad),
        # NF4: codes + scales (replay.nf4_buffers)
        "weights": sum(nf4.get(p.name, p.numel * p.es) for p in params),
        "gradients": sum(p.numel * p.es for p in train),
        "optimizer state": (sum(st.nbytes for sts in r.opt_state.values() for st in sts)
                            + sum(q.nbytes for q in r.qmaps)),
        "activations per block": r.block_bytes,
        **(_head_details(arch, s, r) if isinstance(r, PairReplay) else _loss_details(arch, s, r)),
        # a tied, trainable head hands its gradient to the embedding's backward (model.HeadGradLink):
        # only an untied trainable embedding pays the zero-filled (vocab, C) gradient of its lookup
        "embedding gradient transient": (Vp * C * s.param_bytes if not arch.tie_embeddings and r.m.wte.train
                                         else 0),
        "gradients held across accumulation": sum(p.numel * p.es for p in train) if s.accum > 1 else 0,
        # microft dpo, full fine-tuning: the reference policy is a frozen copy of the weights
        "frozen reference copy": sum(p.numel * p.es for p in r.frozen[1].params)
        if getattr(r, "frozen", None) else 0,
    }
    return {k: v for k, v in d.items() if v}


def _loss_details(arch: ModelConfig, s: Setup, r: Replay) -> dict[str, int]:
    """SFT's fused cross-entropy (model._FusedCrossEntropy): its logits per chunk, and what it saves."""
    C, Vp, N, dt = arch.n_embd, arch.padded_vocab_size, r.N, s.compute_bytes
    rows = min(ce_chunk_rows(N, Vp), N)
    return {
        "loss: logits per chunk (fp32)": rows * Vp * 4,
        "loss: low-precision logits copies per chunk": 2 * rows * Vp * dt if s.policy.low_precision else 0,
        "loss: saved grad_h + grad_w": N * C * s.policy.param_bytes + (Vp * C * dt if r.m.head.train else 0),
    }


def _head_details(arch: ModelConfig, s: Setup, r: PairReplay) -> dict[str, int]:
    """The preference step's log-prob head (memory/preference.py): per chunk of response rows, the logits
    over the vocabulary in the compute dtype and their fp32 log-softmax (formed again in the backward); the
    response rows' hidden states and targets its node saves; the head's gradient in the weight's dtype."""
    C, V, Vp, N, W = arch.n_embd, arch.vocab_size, arch.padded_vocab_size, r.N, r.m.head
    rows, dt = min(ce_chunk_rows(N, Vp), N), s.compute_bytes
    return {
        "log-prob head: log-softmax per chunk (fp32)": rows * V * 4,
        "log-prob head: low-precision logits per chunk": rows * V * dt if s.policy.low_precision else 0,
        "log-prob head: saved response rows + targets": N * C * s.policy.param_bytes + N * 8,
        "log-prob head: head gradient": Vp * C * W.es if W.train else 0,
    }


def max_tensor_peak(budget: Budget) -> int:
    """The largest tensor peak whose total with runtime overhead fits `budget`."""
    ctx = sum(v for k, v in runtime_overhead(0, budget).items() if k != "fragmentation margin")
    p = int((budget.bytes - ctx) / (1 + FRAGMENTATION))
    if FRAGMENTATION * p < 64 * MiB:
        p = budget.bytes - ctx - 64 * MiB
    return max(0, p)


def estimate(arch: ModelConfig, setup: Setup, budget: Budget | None = None, world: int = 1,
             shard: str = "none", fast: bool = False) -> Estimate:
    """The analytical estimate: replay two optimizer steps of microft's step from shapes.

    `fast` (the planner): the same peak from a shorter replay, and a replay that stops as soon as
    the budget is exceeded (then `peak_bytes` is only a lower bound and `fits` is False)."""
    import time

    t0 = time.perf_counter()
    r = replay_of(arch, setup, grad_buckets=world > 1 and shard == "ddp")
    if fast and budget is not None and not (world > 1 and shard == "fsdp"):
        r.sim.limit = max_tensor_peak(budget)
    try:
        sim = r.run(fast=fast)
    except OverLimit:
        sim = r.sim
        sim.peak, sim.peak_phase = max(sim.peak, sim.live), sim.phase
    est = Estimate(engine="analytical", arch=arch, setup=setup, peak_bytes=sim.peak,
                   peak_phase=sim.peak_phase, peak_where=sim.peak_where, components=_ordered(sim.peak_cats),
                   step_peaks=r.step_peaks,
                   details=_details(arch, setup, r), budget=budget, world=world, shard=shard)
    if world > 1 and shard == "fsdp":
        _fsdp_adjust(est, r)
    est.notes += _notes(arch, setup)
    est.overhead = runtime_overhead(est.peak_bytes, budget)
    est.seconds = time.perf_counter() - t0
    return est


def replay_of(arch: ModelConfig, setup: Setup, grad_buckets: bool = False) -> Replay:
    """The replay of the setup's step: SFT's (`Replay`), or `microft dpo`'s (`PairReplay`)."""
    if setup.method == "dpo":
        return PairReplay(arch, setup, grad_buckets)
    return Replay(arch, setup, grad_buckets)


def _fsdp_adjust(est: Estimate, r: Replay) -> None:
    """FSDP (full shard, one unit per block): model states split over the devices, plus the
    gathered parameters of the current and the prefetched block. Approximate."""
    w = est.world
    comp = est.components
    saved = 0
    for k in ("weights", "gradients", "optimizer state"):
        if k in comp:
            cut = comp[k] - comp[k] // w
            comp[k] -= cut
            saved += cut
    block = sum(p.numel * p.es for p in r.m.params if p.name.startswith("h.0."))
    comp["FSDP unsharded parameters"] = 2 * block
    est.peak_bytes += 2 * block - saved
    est.components = _ordered(comp)
    est.notes.append(f"FSDP over {w} devices: weights, gradients and optimizer state divided by {w}, plus "
                     f"two gathered blocks; approximate (the trace does not model FSDP)")


def _notes(arch: ModelConfig, s: Setup) -> list[str]:
    notes = [f"every sample is taken to fill all {s.seq_len} positions (packed or the longest batch)"]
    if s.method == "dpo":
        notes.insert(0, preference_note(s))
    if arch.attn_softcap:
        notes.append("soft-capped attention (Gemma 2): microft's own kernel (no flash), which keeps the "
                     "(T, T) tanh and probabilities of every head for backward")
    elif arch.sliding_window and s.seq_len > arch.sliding_window:
        notes.append(f"sliding window {arch.sliding_window} < {s.seq_len} positions: SDPA gets a (T, T) mask "
                     f"per sliding layer; CUDA then runs the memory-efficient kernel (flash takes no mask), "
                     f"sized here as flash")
    if s.optimizer == "adamw-8bit":
        notes.append("adamw-8bit: microft's AdamW8bit (uint8 moments, fp32 absmax per 256 values)")
    return notes


REFERENCE_NOTES = {  # by memory.preference.reference_kind
    None: "no reference (reference-free loss)",
    "cached": "cached reference log-probs (no reference forward)",
    "adapters off": "the reference: the base with the adapters off (a forward without gradients)",
    "frozen copy": "the reference: a frozen copy of the weights and its forward without gradients",
}


def preference_note(setup: Setup) -> str:
    """What a `microft dpo` step holds beside an SFT step's."""
    ref = REFERENCE_NOTES[reference_kind(setup)]
    return (f"microft dpo --loss {setup.pref_loss}: {setup.micro_bs} pairs a micro-step, "
            f"{2 * setup.micro_bs} sequences of {setup.seq_len} tokens in one forward, every position scored "
            f"as a response token (the most the loss head holds); {ref}")


def trace(arch: ModelConfig, setup: Setup, budget: Budget | None = None, world: int = 1, shard: str = "none",
          max_grad_norm: float | None = 1.0, steps: int = 2) -> Estimate:
    """The traced peak: microft's real step on fake tensors (any family; imports torch)."""
    if world > 1 and shard == "fsdp":
        raise ConfigError("--trace does not model FSDP; drop --trace for the analytical estimate")
    from microft.memory.trace import trace_training

    sgd = {"momentum": setup.momentum} if setup.optimizer == "sgd" else {}  # only SGD reads it
    cfg = RunConfig(precision=setup.precision, optimizer=setup.optimizer, weight_decay=setup.weight_decay,
                    **sgd, grad_ckpt=setup.grad_ckpt, grad_ckpt_every=setup.ckpt_every,
                    lora=setup.lora, lora_r=setup.lora_r, lora_dropout=setup.lora_dropout,
                    lora_targets=",".join(setup.lora_targets), quantize=setup.quantize,
                    double_quant=setup.double_quant, max_grad_norm=max_grad_norm, loss=setup.pref_loss,
                    precompute_ref=setup.precompute_ref)
    # RoPE frequencies (theta, llama3 scaling) change no memory; the tables are made at init, outside the step
    mc = arch.model_copy(update={"rope_scaling": None})
    preference = setup.method == "dpo"
    t = trace_training(mc, cfg, setup.policy, setup.micro_bs, setup.seq_len, accum=setup.accum,
                       steps=steps, preference=preference)
    comp = dict(t.components)
    peak = t.peak_bytes
    r = replay_of(arch, setup)  # the details (weights, states): the same model
    r.run()
    if world > 1 and shard == "ddp":
        buckets = sum(p.numel * p.es for p in r.m.params if p.train)
        comp["DDP gradient buckets"] = buckets
        peak += buckets
    est = Estimate(engine="trace", arch=arch, setup=setup, peak_bytes=peak, peak_phase=t.peak_phase,
                   peak_where=t.peak_where, components=_ordered(comp), step_peaks=t.step_peaks,
                   budget=budget, world=world, shard=shard, seconds=t.seconds, ops=t.ops)
    est.details = _details(arch, setup, r)
    est.notes = _notes(arch, setup) + [f"emulated CUDA: {e}" for e in t.emulated]
    est.overhead = runtime_overhead(peak, budget)
    return est
