"""Configuration: the run config, batch plans and recipes (the model's shapes: microft.models.config).

Plain pydantic models; this module never imports torch so the CLI stays fast and the
config can be validated (and printed with --dry-run) before anything heavy loads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from microft.errors import ConfigError
from microft.optimizers import HYPERPARAMETERS, OPTIMIZERS, readers

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The global batch of a run given no batch flag (nor recipe value). Batch 1 made every step one sample's noisy
# gradient, which the default lr (3e-4, a batch-sized lr) then follows badly; 16 is the global batch of
# the Qwen3 and Llama LoRA recipes (4 × 4, 2 × 8) and half the demo's 32, small enough that a few hundred
# records give dozens of steps an epoch. The micro-batch is the largest that fits (as --micro-bs auto): it
# only splits the step, never changes what a step sees, so the default costs no correctness where memory is
# short.
DEFAULT_GLOBAL_BS = 16
EVALS_PER_RUN = 10  # default cadence: evaluations per run (plus one at the start and one at the end)

Precision = Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true"]
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]  # the registry's names, in its order
Schedule = Literal["cosine", "linear", "constant"]
LogFormat = Literal["auto", "rich", "plain", "json"]
NEEDS_REFERENCE = ("dpo", "ipo")  # the `dpo --loss` values that compare the policy to a reference


class RunConfig(BaseModel):
    """Everything a training run needs. Recipes and flags both resolve into this one object."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no nan/inf in any float option

    # what to train on
    model: str | None = None
    data: str | None = None
    val_data: str | None = None
    out: str = "runs/microft"
    # batch plan: any two of the three; the third is derived
    micro_bs: int | Literal["auto"] | None = None
    accum: int | None = None
    global_bs: int | None = None
    max_seq_len: int | None = None
    # schedule
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 3e-4
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup: float = Field(0.0, ge=0.0)  # < 1: fraction of total steps; >= 1: steps
    schedule: Schedule = "cosine"
    # optimizer
    optimizer: OptimizerName = "adamw"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)  # these four: only the optimizers in OPTIMIZER_KEYS read them
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    max_grad_norm: float | None = Field(1.0, ge=0.0)  # 0 or None: no clipping
    # numerics and memory
    precision: Precision = "auto"
    grad_ckpt: bool = False
    grad_ckpt_every: int = Field(1, ge=1)
    compile: bool = False
    tf32: bool = True  # TF32 tensor cores for fp32 matmuls and convolutions on CUDA
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    seed: int = 1337
    device: str = "auto"
    # evaluation and saving
    eval_every: int | None = Field(None, ge=0)  # None: about EVALS_PER_RUN evaluations a run; 0: never
    eval_batches: int = Field(20, ge=1)
    val_frac: float = Field(0.1, ge=0.0, lt=1.0)
    patience: int | None = Field(None, ge=0)
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    resume: str | None = None
    log_format: LogFormat = "auto"
    log_every: int = Field(1, ge=1)
    # experiment trackers (train.trackers.TRACKERS): "tensorboard,mlflow" or a recipe's list
    report_to: list[str] = Field(default_factory=list)
    report_dir: str | None = None  # TensorBoard's log directory (default: OUT/tensorboard)
    run_name: str | None = None  # the tracker run's name (default: --out's name)
    experiment: str | None = None  # MLflow's experiment, W&B's and Trackio's project (default: microft)
    # fine-tuning
    template: str = "auto"  # the model's chat template when it has one, else alpaca
    mask_prompt: bool = True
    test_frac: float = Field(0.0, ge=0.0, lt=1.0)
    skip_bad: bool = False
    # the data's own key or column for each of microft's fields: "instruction=question,output=answer"
    columns: dict[str, str] | None = None
    data_split: str | None = None  # a dataset directory's (or hub repo's) split: its files named for it
    data_files: list[str] | None = None  # glob patterns of the files to read, relative to the dataset's root
    group_by_length: bool = True
    shuffle: bool = True  # False: steps take the training records in file order
    packing: bool = False  # whole samples packed into rows of max_seq_len; attention stays within each
    predict: bool = False
    samples_per_eval: int = Field(3, ge=0)  # generated samples shown at each evaluation
    lora: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: str = "qkv,proj"
    quantize: Literal["nf4"] | None = None  # QLoRA: frozen block linears in NF4 (microft.models.quant)
    double_quant: bool = False
    # preference tuning (`microft dpo`; train.preference has the formulas)
    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"  # NEEDS_REFERENCE: those with a reference policy
    beta: float = Field(0.1, gt=0.0)  # dpo, ipo, simpo: the inverse temperature (TRL's default)
    gamma: float = Field(0.5, ge=0.0)  # simpo: the target margin (TRL's simpo_gamma default)
    orpo_lambda: float = Field(0.1, ge=0.0)  # orpo: the odds-ratio term's weight (the paper's lambda)
    precompute_ref: bool = False  # dpo, ipo: reference log-probs computed once before training
    # scale-out
    devices: int = Field(1, ge=1)
    shard: Literal["none", "ddp", "fsdp"] = "none"

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, v: Any) -> Any:
        return parse_columns(v) if isinstance(v, str) else v

    @field_validator("report_to", "data_files", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # the flag's "tensorboard,mlflow"
            v = [p.strip() for p in v.split(",")]
        return [p.strip() for p in v if isinstance(p, str) and p.strip()] if isinstance(v, list) else v

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v: list[str]) -> list[str]:
        v = list(dict.fromkeys(n.lower() for n in v))
        return [] if v == ["none"] else v

    @field_validator("columns")
    @classmethod
    def _column_fields(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for name, key in (v or {}).items():
            if name not in RECORD_FIELDS:
                raise ValueError(f"unknown field {name!r} (fields: {', '.join(RECORD_FIELDS)}); "
                                 "e.g. --columns instruction=question,output=answer")
            if not key.strip():
                raise ValueError(f"no column named for {name!r}; e.g. --columns instruction=question")
        return v or None

    @model_validator(mode="after")
    def _positive(self) -> RunConfig:
        for name in ("accum", "global_bs", "max_steps", "max_seq_len"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {v}")
        if isinstance(self.micro_bs, int) and self.micro_bs <= 0:
            raise ValueError(f"--micro-bs must be positive or 'auto', got {self.micro_bs}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.quantize and not self.lora:
            raise ValueError(f"--quantize {self.quantize} stores the frozen base in 4 bits: it needs --lora")
        if self.double_quant and not self.quantize:
            raise ValueError("--double-quant needs --quantize nf4")
        # with --device cpu given (auto's device: the run resolver asks the same question)
        if problem := quantized_fp16_problem(self.quantize, self.precision, self.device):
            raise ValueError(problem)
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if self.shard == "fsdp" and self.lora:  # checked before torchrun starts any worker
            raise ValueError("--shard fsdp does not support --lora (adapters are small); use --shard ddp")
        if self.shard == "fsdp" and self.precision == "bf16-true":
            raise ValueError("--shard fsdp does not support --precision bf16-true (its fp32 master bits are "
                             "not sharded); use --precision bf16-mixed")
        # an optimizer setting the chosen optimizer would ignore is refused, not dropped in silence
        for name, optimizers in OPTIMIZER_KEYS.items():
            if name in self.model_fields_set and self.optimizer not in optimizers:
                raise ValueError(f"{flag_of(name)} applies to --optimizer {' and '.join(optimizers)}, not "
                                 f"{self.optimizer}")
        return self


def quantized_fp16_problem(quantize: str | None, precision: str, device_kind: str) -> str | None:
    """Why an NF4 base can't train under fp16 autocast on `device_kind` (a CPU has no fp16 kernels for the
    dequantized matmuls), or None. The validator asks it of `--device cpu`, the run resolver of the device
    `auto` finds."""
    if quantize and precision == "fp16-mixed" and device_kind == "cpu":
        return (f"--quantize {quantize} with --precision fp16-mixed needs a GPU; on a CPU use bf16-mixed, "
                "bf16-true or fp32")
    return None


RECORD_FIELDS = ("instruction", "input", "output", "messages", "weight")  # what --columns can map


def parse_columns(text: str) -> dict[str, str]:
    """`instruction=question,output=answer` as {"instruction": "question", "output": "answer"}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, key = part.partition("=")
        if not eq:
            raise ValueError(f"{part!r} is not FIELD=COLUMN; "
                             "e.g. --columns instruction=question,output=answer")
        if name.strip() in out:
            raise ValueError(f"{name.strip()!r} is given twice")
        out[name.strip()] = key.strip()
    return out


# the optimizer keys that only some optimizers read, and which (their entries' `reads` in microft.optimizers)
OPTIMIZER_KEYS = {name: readers(name) for name in HYPERPARAMETERS}


def flag_of(field: str) -> str:
    """The command-line flag that sets the RunConfig field `field` (micro_bs: --micro-bs)."""
    return "--" + field.replace("_", "-")


def choices_of(field: str) -> list[str]:
    """The words a RunConfig field accepts (its Literal values), in the order they are declared."""
    found: list[str] = []

    def walk(tp: Any) -> None:
        if get_origin(tp) is Literal:
            found.extend(a for a in get_args(tp) if isinstance(a, str))
        else:
            for a in get_args(tp):
                walk(a)

    info = RunConfig.model_fields.get(field)
    if info is not None:
        walk(info.annotation)
    return found


def did_you_mean(value: str, choices: list[str], prefixes: bool = True) -> str | None:
    """The choice the user probably meant: with `prefixes`, one the value starts (bf16: bf16-mixed), else
    the closest spelling."""
    low = value.lower()
    starts = [c for c in choices if c.startswith(low)] or [c for c in choices if low.startswith(c)]
    if starts and prefixes:
        return starts[0]
    import difflib

    close = difflib.get_close_matches(low, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fmt_error(field: str, errs: list[dict[str, Any]], recipe: str | None) -> str:
    """One field's errors in the user's words: the flag (or the recipe key) as typed, what it must be."""
    value = errs[0].get("input")
    if errs[0]["type"] == "extra_forbidden":  # only a recipe can carry an unknown key
        near = did_you_mean(field, list(RunConfig.model_fields), prefixes=False)
        return (f"recipe {recipe}: unknown key {field!r}" + (f" (did you mean {near!r}?)" if near else "")
                + "; keys are the flags' names with _ for -")
    where = f"recipe {recipe}: {field} = {value!r}" if recipe else f"{flag_of(field)} {_shown(value)}"
    if field == "micro_bs":  # int | 'auto': pydantic reports each member of the union
        return f"{where}: must be a positive integer or 'auto'"
    choices = choices_of(field)
    if choices and any(e["type"] == "literal_error" for e in errs):
        words = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        near = did_you_mean(str(value), choices) if isinstance(value, str) else None
        return f"{where}: choose {words}" + (f"; did you mean {near}?" if near else "")
    own = [e["msg"].removeprefix("Value error, ") for e in errs if e["msg"].startswith("Value error, ")]
    if own:  # a field validator's own sentence
        return f"{where}: {'; '.join(own)}"
    musts = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in errs))
    return f"{where}: must be {musts}"


def _fmt_validation(e: ValidationError, recipe_keys: set[str] = frozenset(), recipe: str | None = None
                    ) -> str:
    """pydantic's errors as one line in the user's words: each names the flag (or recipe key), the value."""
    fields: dict[str, list[dict[str, Any]]] = {}
    parts = []
    for err in e.errors():
        if err["loc"]:
            fields.setdefault(str(err["loc"][0]), []).append(err)
        else:  # a validator's own sentence, already in flag words
            parts.append(err["msg"].removeprefix("Value error, "))
    for field, errs in fields.items():
        parts.append(_fmt_error(field, errs, recipe if field in recipe_keys else None))
    return "; ".join(parts)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe TOML into a flat dict of RunConfig fields (dashes become underscores)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {p} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "columns" and isinstance(v, dict):  # columns = { instruction = "q" }: a value, not a table
            flat[k] = v
        elif isinstance(v, dict):  # allow [train] / [lora] style tables
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            flat[k.replace("-", "_")] = v
    return flat


def resolve_config(recipe: str | None = None, defaults: dict[str, Any] | None = None, **flags: Any
                   ) -> RunConfig:
    """Merge recipe values (or `defaults`, the built-in demo's) with flags (flags win; None means 'not
    given') and validate once."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else dict(defaults or {})
    given = {k: v for k, v in flags.items() if v is not None}
    batch_flags = {"micro_bs", "accum", "global_bs"}
    if len(batch_flags & given.keys()) >= 2:  # two batch flags fix the plan: drop the recipe's third
        for k in batch_flags - given.keys():
            values.pop(k, None)
    from_recipe = set(values) - set(given) if recipe else set()
    values.update(given)
    try:
        return RunConfig(**values)
    except ValidationError as e:
        raise ConfigError(_fmt_validation(e, from_recipe, recipe)) from None


class BatchPlan(BaseModel):
    """How one optimizer step's global batch is split: global = micro × accum × world."""

    micro_bs: int
    accum: int
    world_size: int = 1

    @property
    def global_bs(self) -> int:
        return self.micro_bs * self.accum * self.world_size

    def describe(self) -> str:
        return (
            f"{self.global_bs} = {self.micro_bs} (micro) × {self.accum} (accum) × {self.world_size} "
            f"(device{'s' if self.world_size > 1 else ''})"
        )


def default_batch(cfg: RunConfig) -> bool:
    """Whether the run gives no batch flag nor recipe value, so it takes `DEFAULT_GLOBAL_BS`."""
    return cfg.micro_bs is None and cfg.accum is None and cfg.global_bs is None


def _nearest_divisible(target: int, unit: int) -> list[int]:
    lo = max(unit, (target // unit) * unit)
    hi = lo if lo >= target else lo + unit
    return sorted({lo, hi})


def resolve_batch_plan(
    micro_bs: int | None, accum: int | None, global_bs: int | None, world_size: int = 1
) -> BatchPlan:
    """Give any two of micro-batch, accumulation and global batch; derive the third.

    Defaults when fewer than two are given: micro-batch 1, then accumulation 1.
    """
    if micro_bs is not None and accum is not None and global_bs is not None:
        if micro_bs * accum * world_size != global_bs:
            raise ConfigError(
                f"--micro-bs {micro_bs} × --accum {accum} × {world_size} device(s) = "
                f"{micro_bs * accum * world_size}, not --global-bs {global_bs}; give only two of the three"
            )
        return BatchPlan(micro_bs=micro_bs, accum=accum, world_size=world_size)
    if global_bs is not None:
        if micro_bs is None and accum is None:
            micro_bs = 1
        if micro_bs is not None:
            return BatchPlan(micro_bs=micro_bs, accum=_divide(global_bs, "--micro-bs", micro_bs, world_size),
                             world_size=world_size)
        assert accum is not None
        return BatchPlan(micro_bs=_divide(global_bs, "--accum", accum, world_size), accum=accum,
                         world_size=world_size)
    return BatchPlan(micro_bs=micro_bs or 1, accum=accum or 1, world_size=world_size)


def _divide(global_bs: int, flag: str, value: int, world_size: int) -> int:
    """global_bs / (value × world_size), or a ConfigError naming the nearest global batches that divide."""
    unit = value * world_size
    if global_bs % unit:
        near = " or ".join(str(x) for x in _nearest_divisible(global_bs, unit))
        raise ConfigError(f"--global-bs {global_bs} is not divisible by {flag} {value} × {world_size} "
                          f"device(s); nearest valid global batch: {near}")
    return global_bs // unit

