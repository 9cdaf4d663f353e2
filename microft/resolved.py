"""A run resolved once: device, precision policy, sequence length, batch plan, sources and method.

`resolve_run` turns a RunConfig, the model's shape and the target device into one immutable `ResolvedRun`;
`plan_batch` gives it its batch plan once the training set's size is known. `finetune`, `pretrain`, `dpo`
and `estimate-mem` all go through these two functions, so the estimator plans the run the trainer runs.
The rules here are plain data (no torch): the caller probes the device (`runs.local_device`, or for
`estimate-mem` the `--gpu-mem` budget) and hands in the planner of `--micro-bs auto`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from microft.config import (
    DEFAULT_GLOBAL_BS,
    BatchPlan,
    RunConfig,
    default_batch,
    quantized_fp16_problem,
    resolve_batch_plan,
)
from microft.errors import ConfigError, MicroftError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run stores its weights and computes: what `--precision` names, as attributes to branch on."""

    name: str  # the --precision word, for output and records
    param_dtype: str  # the weights as stored: float32, or bfloat16 (bf16-true)
    compute_dtype: str  # the dtype of the forward's matmuls (autocast's, where it differs from the weights)
    master_weights: bool = False  # the optimizer keeps fp32 master bits beside bf16 weights (bf16-true)
    grad_scaler: bool = False  # fp16's dynamic loss scaling

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under autocast (the compute dtype is not the weights')."""
        return self.compute_dtype != self.param_dtype

    @property
    def low_precision(self) -> bool:
        """Whether the matmuls run in a 16-bit dtype."""
        return self.compute_dtype != "float32"

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    def __str__(self) -> str:
        return self.name


POLICIES = {p.name: p for p in (
    PrecisionPolicy("fp32", "float32", "float32"),
    PrecisionPolicy("bf16-mixed", "float32", "bfloat16"),
    PrecisionPolicy("fp16-mixed", "float32", "float16", grad_scaler=True),
    PrecisionPolicy("bf16-true", "bfloat16", "bfloat16", master_weights=True),
)}


def precision_policy(precision: str | PrecisionPolicy) -> PrecisionPolicy:
    """The policy of a resolved `--precision` word (not `auto`: that needs the device,
    `resolve_precision`)."""
    if isinstance(precision, PrecisionPolicy):
        return precision
    if precision not in POLICIES:
        raise ConfigError(f"--precision {precision}: choose {', '.join(POLICIES)} (or auto, given a device)")
    return POLICIES[precision]


@dataclass(frozen=True)
class Device:
    """Where a run trains, as the resolver needs it: its kind, whether it multiplies bf16 natively, and the
    memory a run may use there (None: not known, as for `estimate-mem` without `--gpu-mem`)."""

    kind: str  # cpu | cuda | mps
    name: str = ""  # torch's name (cuda:1), or the budget's label for a planned GPU
    bf16: bool = True
    memory_bytes: int | None = None
    memory_label: str = ""
    hopper: bool = False  # Hopper-class cuBLAS workspace (the estimator's runtime overhead)


def auto_precision(device: Device) -> PrecisionPolicy:
    """`--precision auto`: bf16-mixed where the device multiplies bf16 natively; else fp16-mixed on a CUDA
    GPU (its tensor cores), fp32 elsewhere (CPUs and older Macs emulate 16-bit matmuls)."""
    if device.bf16 and device.kind in ("cuda", "cpu", "mps"):
        return POLICIES["bf16-mixed"]
    return POLICIES["fp16-mixed"] if device.kind == "cuda" else POLICIES["fp32"]


def resolve_precision(precision: str, device: Device) -> PrecisionPolicy:
    """The policy a run on `device` trains under (fp16-mixed runs on CPUs too, slowly: it tests the
    scaler)."""
    return auto_precision(device) if precision == "auto" else precision_policy(precision)


def resolve_seq_len(asked: int | None, context: int, flag: str = "--max-seq-len") -> int:
    """Tokens per sample: `asked` (as typed with `flag`), at most the model's context; else the context."""
    if asked is None:
        return context
    if asked > context:
        raise ConfigError(f"{flag} {asked} exceeds the model's context of {context}")
    return asked


@dataclass(frozen=True)
class ResolvedRun:
    """Everything about a run that is decided before it starts, decided once.

    `plan` is None until `plan_batch` (the default and `--micro-bs auto` plans need the training set's size);
    `notes` are what resolving has to say (a default batch cut to the data, a planner's fallback)."""

    method: str  # sft (finetune, pretrain) | dpo
    device: Device
    precision: PrecisionPolicy
    seq_len: int  # tokens per sample at most (the model's context, or --max-seq-len)
    model: str  # the model source: a preset, directory or repo id ("demo": the demo's own model)
    tokenizer: str  # where the tokenizer comes from (the model's source, or "demo")
    template: str  # the prompt template as asked (auto: the model's chat template, else alpaca)
    world_size: int = 1
    plan: BatchPlan | None = None
    plan_seq_len: int | None = None  # the tokens a planned micro-batch row holds: the longest sample
    default_batch: bool = False  # the plan is microft's default (no batch flag nor recipe value)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """The resolved run as plain JSON values (estimate-mem --json's `resolved`)."""
        return {"method": self.method, "device": asdict(self.device), "precision": self.precision.name,
                "seq_len": self.seq_len, "model": self.model, "tokenizer": self.tokenizer,
                "template": self.template, "world_size": self.world_size,
                "plan": self.plan.model_dump() if self.plan else None, "plan_seq_len": self.plan_seq_len,
                "default_batch": self.default_batch}


def resolve_run(cfg: RunConfig, shape: Any, device: Device, method: str = "sft", *, world_size: int = 1,
                seq_flag: str = "--max-seq-len", model: str | None = None) -> ResolvedRun:
    """The run `cfg` asks for, on `device`, of the model whose shape (a ModelConfig) is `shape`: its precision
    policy, sequence length (checked against the context) and sources. `model`: the source when it is not
    `cfg.model` (the demo's own model). The batch plan follows with `plan_batch`."""
    precision = resolve_precision(cfg.precision, device)
    if problem := quantized_fp16_problem(cfg.quantize, precision.name, device.kind):
        raise ConfigError(problem)
    source = model or cfg.model or "gpt2-tiny"
    return ResolvedRun(method=method, device=device, precision=precision,
                       seq_len=resolve_seq_len(cfg.max_seq_len, shape.n_positions, seq_flag), model=source,
                       tokenizer=source, template=cfg.template, world_size=world_size)


def default_global_bs(n_train: int | None, world_size: int = 1) -> int:
    """`DEFAULT_GLOBAL_BS`, or the whole training set when it is smaller (in whole shares of the devices)."""
    if n_train is None:
        return DEFAULT_GLOBAL_BS
    return max(world_size, min(DEFAULT_GLOBAL_BS, n_train // world_size * world_size))


# `--micro-bs auto`'s planner: (config with the resolved precision, shape, device, world size, training
# samples) -> the plan; raises a MicroftError where nothing fits (memory.plan.auto_batch_plan, via runs)
Planner = Callable[[RunConfig, Any, Device, int, "int | None"], BatchPlan]


def plan_batch(run: ResolvedRun, cfg: RunConfig, shape: Any, n_train: int | None = None,
               planner: Planner | None = None, world_size: int | None = None,
               longest: int | None = None) -> ResolvedRun:
    """`run` with its batch plan: the flags' own (any two of micro-batch, accumulation, global batch), or
    `--micro-bs auto`'s (the largest micro-batch whose estimated peak fits the device's memory), or with no
    batch flag at all `DEFAULT_GLOBAL_BS` samples a step (at most the `n_train` training samples) split as
    `--micro-bs auto` would; micro-batch 1 where the planner can't answer, with a note saying why.
    `planner` None: the method has no memory planner (micro-batch 1 for the default); `world_size`: the
    processes sharing the global batch (default: the run's); `longest`: the longest training sample, the
    row length a micro-batch is padded to (unless --packing fills rows to `seq_len`)."""
    world = run.world_size if world_size is None else world_size
    rows = run.seq_len if cfg.packing or longest is None else min(longest, run.seq_len)
    run = replace(run, world_size=world, plan_seq_len=rows)
    # the planner sees the resolved policy and the rows a micro-batch holds
    planned = cfg.model_copy(update={"precision": run.precision.name, "max_seq_len": rows})
    if not default_batch(cfg):
        if cfg.micro_bs != "auto" or planner is None:
            micro = cfg.micro_bs if isinstance(cfg.micro_bs, int) else None
            return replace(run, plan=resolve_batch_plan(micro, cfg.accum, cfg.global_bs, world))
        if run.device.memory_bytes is None:
            raise ConfigError("--micro-bs auto needs a --gpu-mem budget")
        plan = planner(planned, shape, run.device, world, n_train)
        note = f"--micro-bs auto: {plan.describe()} fits {run.device.memory_label}"
        return replace(run, plan=plan, notes=(*run.notes, note))
    gbs = default_global_bs(n_train, world)
    said = []  # what the banner's "(default, ...)" can't say
    if gbs < DEFAULT_GLOBAL_BS:
        said.append(f"global batch {gbs}: the default {DEFAULT_GLOBAL_BS} cut to the {n_train} training "
                    "samples")
    plan = None
    if planner is not None and run.device.memory_bytes is None:
        said.append(f"global batch {gbs} (the default), at micro-batch 1: a run splits it into the largest "
                    "micro-batch that fits its device, and no device memory is given (--gpu-mem plans the "
                    "split)")
    elif planner is not None:
        try:
            auto = planned.model_copy(update={"micro_bs": "auto", "global_bs": gbs})
            plan = planner(auto, shape, run.device, world, n_train)
        except MicroftError as e:  # the run goes on at micro-batch 1, as it did before there was a default
            said.append(f"micro-batch 1, though the estimator says: {e}")
    plan = plan or resolve_batch_plan(1, None, gbs, world)
    notes = (f"no batch flags: {'; '.join(said)}",) if said else ()
    return replace(run, plan=plan, default_batch=True, notes=(*run.notes, *notes))
