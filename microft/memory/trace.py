"""Trace engine: microft's real training step run twice on fake tensors, live bytes counted.

The model is built on the meta device, materialised as `FakeTensorMode` tensors (shapes,
dtypes and strides, no data, no memory), and driven through the loop's own `train.step.micro_step` ×
accum and `train.step.finish_step` (unscale, clip, step) for two optimizer steps; the model's hooks
(`Kernels.cuda_like`, `NF4Linear.observe_dequantize`) pick CUDA's kernels and label recomputes. (On fake
tensors `clip_gradients` takes torch's clip: the fold into fused AdamW differs by a few 512-byte blocks.) A
`TorchDispatchMode` sees every op's outputs; each output's storage is counted once, rounded
up to the CUDA caching allocator's 512-byte blocks, and dropped from the live total when the
storage dies (checked through weak storage references whenever the running total could be a
new peak). The maximum over the run is the peak `torch.cuda.max_memory_allocated` would
report for the same step, less the cuBLAS workspace (listed as runtime overhead).

Fake CUDA tensors cannot run autograd on a CPU-only build, so the trace runs on fake CPU
tensors and emulates the CUDA differences that change memory (see `CUDA_EMULATION`).
"""

from __future__ import annotations

import functools
import time
import types
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from microft.config import RunConfig
from microft.memory.replay import sdpa_workspace
from microft.memory.sim import cuda_bytes
from microft.models.config import ModelConfig
from microft.models.linear import native_half_matmuls
from microft.models.transformer import Kernels, Transformer, set_grad_checkpointing
from microft.optimizers import OPTIMIZERS
from microft.resolved import PrecisionPolicy, precision_policy

CUDA_EMULATION = [
    "allocations rounded up to 512-byte blocks, as the CUDA caching allocator does",
    "SDPA runs the CPU flash kernel; its saved logsumexp is sized as CUDA's kernel keeps it (flash for "
    "bf16/fp16: (B, nh, T); memory-efficient for fp32: T padded to 32), and the backward scratch CUDA "
    "allocates inside the kernel (flash's fp32 dq accumulator, or the memory-efficient delta) is added",
    "attention dropout: CUDA's flash kernel keeps no mask (the CPU path would fall back to the math kernel)",
    "dropout uses the fused kernel (a bool mask), as on CUDA; layer-norm statistics are fp32, as on CUDA",
    "clip_grad_norm_'s per-tensor norms are one allocation, as CUDA's foreach norm makes them",
    "autocast uses the CPU op lists, which give microft's block the dtypes CUDA's do (linear and SDPA in "
    "low precision, layer norm and the loss in fp32); the analytical engine, written for CUDA, agrees",
    "fp16-mixed: the GradScaler runs but never skips a step (the overflow check needs data)",
    "Adafactor's step counters live on the CPU, as on CUDA",
    "not modelled: CUDA's embedding backward sorts indices and keeps partial sums (scratch up to "
    "micro-batch × seq × n_embd × 4 bytes at the end of backward)",
]
# the preference step (microft dpo) only: appended to CUDA_EMULATION where it runs
PREFERENCE_EMULATION = [
    "not emulated: the preference losses' F.logsigmoid keeps the buffer the CPU kernel returns (the pairs' "
    "size: one 512-byte block up to 128 pairs); CUDA's kernel returns an empty one",
]

# trace categories, in display order
CATEGORIES = (
    "weights", "gradients", "optimizer state", "activations", "autocast weight copies",
    "recomputed activations", "NF4 dequantization", "loss (fused cross-entropy)", "reference forward",
    "backward transients", "optimizer transients", "batch", "other",
)


@dataclass
class _Rec:
    ref: StorageWeakRef
    nbytes: int
    label: str
    serial: int


@dataclass
class TraceResult:
    """Peak of live tensor bytes over two traced optimizer steps, by category."""

    peak_bytes: int
    # coarse: forward, loss, reference forward, start of backward, backward, end of backward, clip,
    # optimizer step
    peak_phase: str
    peak_where: str  # fine: "step 2, micro-step 1, backward of block 11"
    components: dict[str, int]
    step_peaks: list[int]
    emulated: list[str]
    seconds: float
    ops: list[str] = field(default_factory=list)  # the aten ops dispatched, e.g. "aten.mm.default"


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live storages seen as op outputs (each storage once, CUDA-rounded)."""

    def __init__(self):
        super().__init__()
        self.recs: dict[int, _Rec] = {}
        self.live = 0
        self.peak = 0
        self.peak_serials: list[int] = []
        self.peak_where = ""
        self.peak_phase = ""
        self.where = "setup"
        self.phase = "setup"
        self.label = "other"  # label given to new storages
        self.labels_by_serial: dict[int, str] = {}
        self.sizes_by_serial: dict[int, int] = {}
        self.serial = 0
        self.size_override: Callable[[Any, list[torch.Tensor]], list[int | None] | None] | None = None
        self.workspaces: dict[Any, int] = {}  # op -> scratch bytes the CUDA kernel allocates inside it
        self.seen: set = set()  # ops dispatched
        self.step_peak = 0
        self.extra = 0  # kernel scratch counted in `live` right now
        self.peak_extra = 0

    # --- bookkeeping ----------------------------------------------------------------------
    def _sweep(self) -> None:
        expired = torch.UntypedStorage._expired
        dead = [k for k, r in self.recs.items() if expired(r.ref.cdata)]
        for k in dead:
            self.live -= self.recs.pop(k).nbytes

    def track(self, t: torch.Tensor, label: str | None = None, nbytes: int | None = None) -> None:
        """Count `t`'s storage if it is new; relabel it when `label` is given."""
        if t.layout != torch.strided:
            return
        st = t.untyped_storage()
        key = st._cdata
        rec = self.recs.get(key)
        if rec is not None and rec.ref.expired():  # address reused by a new storage
            self.live -= self.recs.pop(key).nbytes
            rec = None
        if rec is None:
            n = cuda_bytes(st.nbytes() if nbytes is None else nbytes)
            self.serial += 1
            rec = _Rec(StorageWeakRef(st), n, label or self.label, self.serial)
            self.recs[key] = rec
            self.live += n
            self.labels_by_serial[rec.serial] = rec.label
            self.sizes_by_serial[rec.serial] = n
        elif label is not None:
            rec.label = label
            self.labels_by_serial[rec.serial] = label

    def relabel(self, t: torch.Tensor, label: str) -> None:
        rec = self.recs.get(t.untyped_storage()._cdata)
        if rec is not None and not rec.ref.expired():
            rec.label = label
            self.labels_by_serial[rec.serial] = label

    def _check_peak(self, op: str) -> None:
        """`live` counts storages not yet swept, so it bounds the true total from above; only a
        bound above a peak so far needs the (costly) sweep to decide."""
        if self.live <= self.step_peak:
            return
        self._sweep()
        self.step_peak = max(self.step_peak, self.live)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_extra = self.extra
            self.peak_serials = [r.serial for r in self.recs.values()]
            self.peak_where = self.where
            self.peak_phase = self.phase

    def mark(self, where: str, phase: str | None = None, label: str | None = None) -> None:
        self.where = where
        if phase is not None:
            self.phase = phase
        if label is not None:
            self.label = label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(): fake tensors hold no data
            return False if args[0].dtype == torch.bool else 1 if not args[0].is_floating_point() else 1.0
        self.seen.add(func)
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not tensors:
            return out
        label = None
        if (func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter)
                and self.label in ("activations", "recomputed activations")):
            label = "autocast weight copies"
        sizes = self.size_override(func, tensors) if self.size_override else None
        for k, t in enumerate(tensors):
            self.track(t, label, sizes[k] if sizes else None)
        self._check_peak(str(func.overloadpacket.__name__))
        extra = self.workspaces.get(func, 0)
        if extra:  # scratch allocated (and freed) inside the CUDA kernel
            self.live += extra
            self.extra = extra
            self._check_peak(f"{func.overloadpacket.__name__} workspace")
            self.live -= extra
            self.extra = 0
        return out

    def components_at_peak(self) -> dict[str, int]:
        comp: dict[str, int] = defaultdict(int)
        for s in self.peak_serials:
            comp[self.labels_by_serial[s]] += self.sizes_by_serial[s]
        comp["backward transients"] += self.peak_extra
        return {c: comp[c] for c in CATEGORIES if comp.get(c)}


def _fused_dropout(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return torch.native_dropout(x, self.p, self.training)[0] if self.training else x


def _materialise_fake(model: nn.Module, fake_mode, device: torch.device) -> None:
    """Replace every (meta) parameter and buffer by a fake tensor of the same shape and dtype."""
    with fake_mode:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device)
                    mod._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype,
                                                             device=device)


class _TraceScaler(torch.amp.GradScaler):
    """A GradScaler whose data-dependent reads are replaced by constants (no step is ever skipped)."""

    def get_scale(self) -> float:
        return 65536.0 if self._enabled else 1.0

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)


class _Recomputing:
    """A checkpoint's recompute context: what it allocates is "recomputed activations". Entered and
    left by torch.utils.checkpoint itself, so an early-stopped recompute is closed too."""

    def __init__(self, tracker: LiveBytes):
        self.tracker = tracker

    def __enter__(self):
        self.tracker.mark(self.tracker.where, None, "recomputed activations")

    def __exit__(self, *exc):
        self.tracker.mark(self.tracker.where, None, "backward transients")
        return False


class _Dequantizing:
    """NF4Linear's `observe_dequantize`: what a forward (or its recompute) dequantizes counts as "NF4
    dequantization"; backward's dequantization stays a backward transient (it is not observed)."""

    def __init__(self, tracker: LiveBytes):
        self.tracker, self.label = tracker, None

    def __enter__(self):
        self.label = self.tracker.label
        if self.label in ("activations", "recomputed activations"):
            self.tracker.label = "NF4 dequantization"

    def __exit__(self, *exc):
        self.tracker.label = self.label
        return False


def _observe(model: Transformer, tracker: LiveBytes) -> None:
    """The model's hooks for the trace: CUDA's kernels on this CPU, block recomputes labelled, NF4
    dequantization labelled (explicit hooks of the model and its layers; nothing is patched)."""
    from microft.models.quant import NF4Linear

    model.set_kernels(Kernels.cuda_like(recompute_context=lambda: (nullcontext(), _Recomputing(tracker))))
    for mod in model.modules():
        if isinstance(mod, NF4Linear):
            mod.observe_dequantize = lambda: _Dequantizing(tracker)


def _step_hooks(top: nn.Module, tracker: LiveBytes, state: dict[str, str]) -> list:
    """Hooks on the module the micro-step calls (the model, or `microft dpo`'s runner): its forward starts the
    activations, its end the backward."""
    def fwd_pre(_m, _a):
        tracker.mark(f"{state['at']}, forward", "forward", "activations")

    def fwd_post(_m, _a, _out):
        tracker.mark(f"{state['at']}, backward of the loss", "start of backward", "backward transients")

    return [top.register_forward_pre_hook(fwd_pre), top.register_forward_hook(fwd_post)]


def _install_phase_hooks(model: Transformer, tracker: LiveBytes, state: dict[str, str]) -> list:
    """Forward/backward hooks that tell the tracker where in the step it is."""
    handles = []
    n = len(model.h)

    def ln_f_post(_m, _a, _out):
        if state.get("reference"):  # the LoRA reference's forward runs the same model: its label stays
            return
        tracker.mark(f"{state['at']}, loss", "loss", "loss (fused cross-entropy)")

    def block_post(i):
        def hook(_m, _a, out):
            if out.requires_grad and torch.is_grad_enabled():
                def on_grad(_g):
                    phase = "start of backward" if i == n - 1 else "backward"
                    tracker.mark(f"{state['at']}, backward of block {i}", phase, "backward transients")
                out.register_hook(on_grad)
        return hook

    def block0_pre(_m, args):
        x = args[0]
        if x.requires_grad and torch.is_grad_enabled():
            x.register_hook(lambda _g: tracker.mark(f"{state['at']}, backward of the embeddings",
                                                    "end of backward", "backward transients"))

    handles += _step_hooks(model, tracker, state)
    handles.append(model.ln_f.register_forward_hook(ln_f_post))
    handles.append(model.h[0].register_forward_pre_hook(block0_pre))
    for i, block in enumerate(model.h):
        handles.append(block.register_forward_hook(block_post(i)))
    return handles


def _trace_optimizer(model: nn.Module, cfg: RunConfig, policy: PrecisionPolicy) -> torch.optim.Optimizer:
    """The optimizer the run builds under the traced precision policy (adamw-8bit: microft's own AdamW8bit,
    the same on every device)."""
    from microft.train.optim import build_optimizer

    return build_optimizer(model, cfg, torch.device("cpu"), policy)


def _cuda_sizes(policy: PrecisionPolicy, tracker: LiveBytes, cpu_steps: bool):
    """Storage sizes CUDA would allocate where the CPU kernels differ (see CUDA_EMULATION)."""
    aten = torch.ops.aten
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    low = policy.low_precision

    def sizes(func, outs: list[torch.Tensor]) -> list[int | None] | None:
        if func is sdpa:  # (out, logsumexp (B, nh, T))
            B, nh, T = outs[1].shape
            return [None, B * nh * (T if low else -(-T // 32) * 32) * 4]
        if func is aten.native_layer_norm.default:  # CUDA keeps mean and rstd in fp32
            return [None] + [t.numel() * 4 for t in outs[1:]]
        if func is aten._foreach_norm.Scalar:  # CUDA: one (n,) tensor, the norms are views of it
            return [len(outs) * 4] + [0] * (len(outs) - 1)
        if cpu_steps and tracker.phase == "optimizer step" and func in (aten.lift_fresh_copy.default,
                                                                          aten.lift_fresh.default):
            return [0] * len(outs)  # state torch keeps on the CPU (Adafactor's step counters)
        return None

    return sizes


def trace_training(model_cfg: ModelConfig, cfg: RunConfig, precision: str | PrecisionPolicy, micro_bs: int,
                   seq_len: int, accum: int = 1, steps: int = 2, preference: bool = False) -> TraceResult:
    """Trace `steps` optimizer steps of microft's training step on fake tensors; see the module doc.
    `preference`: the step of `microft dpo` (`cfg.loss`, `cfg.precompute_ref`), `micro_bs` pairs of two
    `seq_len`-token sequences each, every position a response token (the most the loss head can take)."""
    with native_half_matmuls():  # CUDA multiplies bf16 natively: no fp32 copies of a CPU that emulates it
        return _trace_training(model_cfg, cfg, precision_policy(precision), micro_bs, seq_len, accum, steps,
                               preference)


def _frozen_copy(model_cfg: ModelConfig, cfg: RunConfig, policy: PrecisionPolicy, fake_mode
                 ) -> Transformer | None:
    """A full fine-tune's frozen reference (`reference_of` deep-copies the model; here a second fake model of
    the same shape, as a deep copy can't leave its fake mode), or None where the run keeps none."""
    from microft.train.preference import PreferenceLoss
    from microft.train.step import place_model

    if cfg.lora or cfg.precompute_ref or not PreferenceLoss(cfg.loss).needs_reference:
        return None
    with torch.device("meta"):
        frozen = Transformer(model_cfg.model_copy(update={"dropout": 0.0}))
    place_model(frozen, policy, torch.device("meta"))
    _materialise_fake(frozen, fake_mode, torch.device("cpu"))
    frozen.set_kernels(Kernels.cuda_like())  # CUDA's kernels, as the policy's (a run's deep copy keeps them)
    return frozen.requires_grad_(False).eval()


def _labelled(reference: Callable, tracker: LiveBytes, state: dict) -> Callable:
    """The reference policy, what its forward allocates labelled "reference forward" (no gradient: it saves
    nothing, each tensor dies as the forward moves on)."""
    def run(*args):
        state["reference"] = True
        tracker.mark(f"{state['at']}, reference forward", "reference forward", "reference forward")
        try:
            return reference(*args)
        finally:
            state["reference"] = False
            tracker.mark(f"{state['at']}, loss", "loss", "loss (fused cross-entropy)")
    return run


def _preference_step(model: Transformer, frozen: Transformer | None, cfg: RunConfig, tracker: LiveBytes,
                     state: dict) -> tuple[nn.Module, Callable]:
    """(the runner `microft dpo` steps through, a batch maker (B, T) -> (x, y, cached reference log-probs or
    None, target positions)) on the fake `model`; the `frozen` reference copy counts as weights."""
    from microft.train.preference import FrozenReference, PreferenceLoss, PreferenceRunner, reference_of

    loss = PreferenceLoss(cfg.loss)
    cached = cfg.precompute_ref and loss.needs_reference
    reference = None if cached else reference_of(model, loss, cfg.lora, copy_model=False)
    if frozen is not None:
        reference = FrozenReference(frozen)
        for t in [*frozen.parameters(), *frozen.buffers()]:
            tracker.track(t, "weights")
    if reference is not None:
        reference = _labelled(reference, tracker, state)

    def batch(B: int, T: int):
        x = torch.zeros(2 * B, T, dtype=torch.long)
        y = torch.zeros(2 * B, T, dtype=torch.long)
        ref = torch.zeros(B, 2, dtype=torch.float32) if cached else None
        return x, y, ref, torch.arange(2 * B * T)

    return PreferenceRunner(model, loss, reference), batch


def _fake_model(model_cfg: ModelConfig, cfg: RunConfig, policy: PrecisionPolicy):
    """The run's model (LoRA, NF4 base, checkpointing as configured) as fake tensors that behave as on CUDA;
    returns (model, its FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from microft.train.step import place_model

    if cfg.dropout is not None:
        model_cfg = model_cfg.model_copy(update={"dropout": cfg.dropout})
    with torch.device("meta"):
        model = Transformer(model_cfg)
    for block in model.h:
        block.attn.dropout = 0.0  # CUDA's flash kernel keeps no attention mask; the CPU one would
    if cfg.quantize:  # QLoRA: the block linears become the NF4Linear the run loads (quant.nf4_meta_blocks_)
        from microft.models.quant import nf4_meta_blocks_

        nf4_meta_blocks_(model, double_quant=cfg.double_quant)
    if cfg.lora:
        from microft.models.lora import apply_lora

        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    for mod in model.modules():  # CUDA's fused dropout keeps a bool mask; the CPU path a float one
        if isinstance(mod, nn.Dropout) and mod.p > 0:
            mod.forward = types.MethodType(_fused_dropout, mod)
    device = torch.device("cpu")
    place_model(model, policy, torch.device("meta"))  # bf16-true casts; weights stay on meta until faked
    fake_mode = FakeTensorMode()
    _materialise_fake(model, fake_mode, device)
    model.train()
    if cfg.grad_ckpt:
        set_grad_checkpointing(model, True, cfg.grad_ckpt_every)
    return model, fake_mode


def _trace_training(model_cfg: ModelConfig, cfg: RunConfig, policy: PrecisionPolicy, micro_bs: int,
                    seq_len: int, accum: int, steps: int, preference: bool = False) -> TraceResult:
    from microft.train.step import autocast_context, finish_step, micro_step

    t0 = time.perf_counter()
    model, fake_mode = _fake_model(model_cfg, cfg, policy)
    device = torch.device("cpu")
    tracker = LiveBytes()
    tracker.size_override = _cuda_sizes(policy, tracker, bool(OPTIMIZERS[cfg.optimizer].host_state))
    low = policy.low_precision
    hs = model_cfg.head_dim
    sdpa_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    workspace = sdpa_workspace(micro_bs, model_cfg.n_head, seq_len, hs, low)
    state = {"at": "setup"}
    handles = _install_phase_hooks(model, tracker, state)
    params = [p for p in model.parameters()]
    for t in params + [b for b in model.buffers()]:  # buffers: NF4 codes and block scales
        tracker.track(t, "weights")
    for p in params:
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(
                lambda q: tracker.relabel(q.grad, "gradients")))

    autocast = autocast_context(policy, device)
    step_peaks = []
    tracker.workspaces[sdpa_bwd] = workspace
    _observe(model, tracker)
    runner, pairs = model, None
    frozen = _frozen_copy(model_cfg, cfg, policy, fake_mode) if preference else None
    try:
        with fake_mode:
            if preference:
                runner, pairs = _preference_step(model, frozen, cfg, tracker, state)
                handles += _step_hooks(runner, tracker, state)
                rows = 2 * micro_bs  # a pair's two sides in one forward
                tracker.workspaces[sdpa_bwd] = sdpa_workspace(rows, model_cfg.n_head, seq_len, hs, low)
            scaler = _TraceScaler("cpu", enabled=policy.grad_scaler)
            optimizer = _trace_optimizer(model, cfg, policy)
            with tracker:
                for step in range(1, steps + 1):
                    tracker._sweep()
                    tracker.step_peak = tracker.live
                    for m in range(1, accum + 1):
                        state["at"] = f"step {step}, micro-step {m}"
                        tracker.mark(f"{state['at']}, batch", "forward", "batch")
                        if pairs is not None:
                            x, y, ref, pos = pairs(micro_bs, seq_len)
                            micro_step(runner, x, y, ref, float(micro_bs * accum), autocast, scaler, pos)
                            del x, y, ref, pos
                            continue
                        x = torch.zeros(micro_bs, seq_len, dtype=torch.long, device=device)
                        y = torch.zeros(micro_bs, seq_len, dtype=torch.long, device=device)
                        micro_step(model, x, y, None, float(micro_bs * seq_len * accum), autocast, scaler)
                        del x, y
                    # the GradScaler's scale and growth tracker, made on first use: state, not transients
                    for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)):
                        if t is not None:
                            tracker.relabel(t, "other")
                    tracker.mark(f"step {step}, clip", "clip", "optimizer transients")
                    finish_step(model, optimizer, scaler, cfg.max_grad_norm, before_step=functools.partial(
                        tracker.mark, f"step {step}, optimizer step", "optimizer step",
                        "optimizer transients"))
                    for st in optimizer.state.values():
                        for v in st.values():
                            if isinstance(v, torch.Tensor):
                                tracker.relabel(v, "optimizer state")
                    step_peaks.append(tracker.step_peak)
    finally:
        for h in handles:
            h.remove()
    emulated = list(CUDA_EMULATION) + (PREFERENCE_EMULATION if preference else [])
    if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in tracker.seen:
        emulated.append("WARNING: SDPA fell back to the CPU math kernel, which saves the attention matrix; "
                        "CUDA's flash/memory-efficient kernels do not, so this trace overcounts")
    return TraceResult(
        peak_bytes=tracker.peak, peak_phase=tracker.peak_phase, peak_where=tracker.peak_where,
        components=tracker.components_at_peak(), step_peaks=step_peaks, emulated=emulated,
        seconds=time.perf_counter() - t0, ops=sorted(str(f) for f in tracker.seen),
    )
