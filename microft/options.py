"""The run options, defined once: `pretrain`, `finetune` and `estimate-mem` take them from here.

Each option is an `Annotated` alias (its flag and help); `run_options(NAMES)` gives a command
those options as keyword parameters, in that order, and hands their values to the command
as `**flags` (None: not given), ready for `config.resolve_config`. Option names are stable:
scripts and recipes depend on them. No torch import: `microft --help` stays fast.
"""

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from microft.optimizers import HYPERPARAMETERS, OPTIMIZERS, hyperparameter_help

Model = Annotated[str | None, typer.Option("--model", help=(
    "Preset (gpt2, gpt2-medium, llama-3.2-1b, qwen3-0.6b, …), HF model directory or cached repo id, or "
    "microft checkpoint (default: the demo's own model; with --data, gpt2-tiny)."))]
Data = Annotated[str | None, typer.Option("--data", help=(
    "Training data: a file or a directory of JSON/JSONL, CSV/TSV or Parquet records, or a hub dataset repo "
    "id (default: the built-in demo)."))]


def out_help(default: str) -> str:
    """--out's help with the command's default."""
    return (f"Output directory, created with its parents; one holding an earlier run is refused unless "
            f"--resume (default: {default}).")


Out = Annotated[str | None, typer.Option("--out", help=out_help(
    "runs/microft; the demo: a new runs/demo-DATE-TIME"))]


def micro_bs_help(unit: str) -> str:
    """--micro-bs's help, counting `unit` (samples; dpo: pairs)."""
    return (f"{unit[0].upper() + unit[1:]} per forward/backward, or 'auto': the largest that fits "
            f"(default: 1, or --global-bs / --accum; given no batch flag: the largest that fits the default "
            f"global batch of 16).")


def global_bs_help(unit: str) -> str:
    """--global-bs's help, counting `unit` (samples; dpo: pairs)."""
    return (f"{unit[0].upper() + unit[1:]} per optimizer step (default: micro × accum × devices; given no "
            f"batch flag: 16, at most the training set).")


MicroBS = Annotated[str | None, typer.Option("--micro-bs", help=micro_bs_help("samples"))]
Accum = Annotated[int | None, typer.Option("--accum", help=(
    "Micro-steps accumulated per optimizer step (default: 1, or --global-bs / --micro-bs)."))]
GlobalBS = Annotated[int | None, typer.Option("--global-bs", help=global_bs_help("samples"))]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", help=(
    "Optimizer steps to run (overrides --epochs) (default: from --epochs)."))]
Epochs = Annotated[float | None, typer.Option("--epochs", help=(
    "Passes over the training data (default: 1)."))]
LR = Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")]
MaxSeqLen = Annotated[int | None, typer.Option("--max-seq-len", help=(
    "Tokens per sample (≤ the model's context) (default: the model's context)."))]
Precision = Annotated[str | None, typer.Option("--precision", help=(
    "auto | fp32 | bf16-mixed | fp16-mixed | bf16-true."))]
GradCkpt = Annotated[bool | None, typer.Option("--grad-ckpt/--no-grad-ckpt", help=(
    "Recompute block activations in backward."))]
GradCkptEvery = Annotated[int | None, typer.Option("--grad-ckpt-every", help=(
    "Checkpoint every N-th block (with --grad-ckpt)."))]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for init, data order and the data split.")]
Resume = Annotated[str | None, typer.Option("--resume", help=(
    "Checkpoint directory, or 'auto' for the latest under --out (default: a new run)."))]
Recipe = Annotated[Path | None, typer.Option("--recipe", help=(
    "A recipes/*.toml file; flags override its values (default: none)."))]
EvalEvery = Annotated[int | None, typer.Option("--eval-every", help=(
    "Validate every N steps (0: never) (default: about 10 times a run, and at the end)."))]
SaveEvery = Annotated[int | None, typer.Option("--save-every", help=(
    "Checkpoint every N steps (0: only at the end)."))]
LogFormat = Annotated[str | None, typer.Option("--log-format", help="auto | rich | plain | json.")]
Optim = Annotated[str | None, typer.Option("--optimizer", help=" | ".join(OPTIMIZERS) + ".")]
Schedule = Annotated[str | None, typer.Option("--schedule", help="cosine | linear | constant.")]
Warmup = Annotated[float | None, typer.Option("--warmup", help=(
    "Warmup steps (≥ 1) or fraction of the run (< 1)."))]
MinLR = Annotated[float | None, typer.Option("--min-lr-ratio", help="Final lr as a fraction of the peak.")]
MaxGradNorm = Annotated[float | None, typer.Option("--max-grad-norm", help=(
    "Clip the global grad norm (0: off)."))]
WeightDecay = Annotated[float | None, typer.Option("--weight-decay", help=(
    "AdamW weight decay (matrices only)."))]
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: Apple silicon's GPU, else CUDA, else CPU)."
Device = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP)]
ValFrac = Annotated[float | None, typer.Option("--val-frac", help="Fraction held out for validation.")]
Patience = Annotated[int | None, typer.Option("--patience", help=(
    "Stop after N evaluations without improvement (default: never stop early)."))]
KeepLast = Annotated[int | None, typer.Option("--keep-last", help="Step checkpoints to keep.")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")]
TF32 = Annotated[bool | None, typer.Option("--tf32/--no-tf32", help=(
    "TF32 for fp32 matmuls on CUDA (default: on)."))]
Dropout = Annotated[float | None, typer.Option("--dropout", help=(
    "Dropout probability (default: the model config's, 0 for presets)."))]
Devices = Annotated[int | None, typer.Option("--devices", help=(
    "Processes to launch with torchrun (one per device)."))]
Shard = Annotated[str | None, typer.Option("--shard", help="none | ddp | fsdp (with --devices > 1).")]
ValData = Annotated[str | None, typer.Option("--val-data", help=(
    "Validation data (default: a seeded split of --data, --val-frac of it)."))]
TestFrac = Annotated[float | None, typer.Option("--test-frac", help=(
    "Fraction held out as a test split (for --predict)."))]
TEMPLATE_HELP = ("auto (the model's chat template if it has one, else alpaca) | chat | alpaca | chatml | "
                 "plain | a template file (TOML/JSON) | a .jinja chat template.")
Template = Annotated[str | None, typer.Option("--template", help=TEMPLATE_HELP)]
MaskPrompt = Annotated[bool | None, typer.Option("--mask-prompt/--no-mask-prompt", help=(
    "Train on the response tokens only; --no-mask-prompt: on every token."))]


def aliases_help() -> str:
    """The other key names a record without messages is read by for the fields it lacks
    (`data.formats.ALIASES`), in words."""
    from microft.data.formats import ALIASES  # light: no torch, no pydantic models

    def either(keys: tuple[str, ...]) -> str:
        return " or ".join(keys) if len(keys) < 3 else f"{', '.join(keys[:-1])} or {keys[-1]}"

    return ", ".join(f"{either(keys)} as the {name}" for name, keys in ALIASES.items())


Columns = Annotated[str | None, typer.Option("--columns", help=(
    "The data's own names for instruction, input, output, messages, weight: e.g. "
    "instruction=question,output=answer (default: a record without messages takes each field it lacks from "
    f"{aliases_help()})."))]
SkipBad = Annotated[bool | None, typer.Option("--skip-bad/--no-skip-bad", help=(
    "Skip and count bad records instead of refusing the data."))]
GroupByLength = Annotated[bool | None, typer.Option("--group-by-length/--no-group-by-length", help=(
    "Batch samples of similar length (less padding)."))]
Packing = Annotated[bool | None, typer.Option("--packing/--no-packing", help=(
    "Pack whole samples into rows of --max-seq-len (no padding; attention stays within each sample)."))]
Predict = Annotated[bool | None, typer.Option("--predict/--no-predict", help=(
    "Write responses for the test split to OUT/predictions.jsonl."))]
Lora = Annotated[bool | None, typer.Option("--lora/--no-lora", help=(
    "Train LoRA adapters; the base stays frozen."))]
LoraR = Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")]
LoraAlpha = Annotated[float | None, typer.Option("--lora-alpha", help=(
    "LoRA scale numerator (scale = alpha / r)."))]
LoraDropout = Annotated[float | None, typer.Option("--lora-dropout", help="Dropout on the LoRA input.")]


def lora_targets_help() -> str:
    """--lora-targets' help: each name of the family registry's LoRA tables (targets and groups), with the
    families that take it, so a new family's names show up here."""
    from microft.models.families import FAMILIES  # no torch

    takers: dict[str, list[str]] = {}
    for fam in FAMILIES.values():
        for name in (*fam.lora_targets, *fam.lora_groups):
            takers.setdefault(name, []).append(fam.model_type)
    by_takers: dict[tuple[str, ...], list[str]] = {}
    for name, fams in takers.items():
        by_takers.setdefault(tuple(fams), []).append(name)
    everyone = set(FAMILIES)

    def who(fams: tuple[str, ...]) -> str:
        if set(fams) == everyone:
            return "every family"
        left = [f for f in FAMILIES if f not in fams]
        return f"every family but {', '.join(left)}" if len(left) < len(fams) else ", ".join(fams)

    parts = [f"{', '.join(names)} ({who(fams)})" for fams, names in by_takers.items()]
    return ("Comma list of the linears to adapt: " + "; ".join(parts) + ". qkv and proj are attention's "
            "input and output, fc and mlp_proj the MLP's; PEFT's names (q_proj …) name the same linears one "
            "by one.")


LoraTargets = Annotated[str | None, typer.Option("--lora-targets", help=lora_targets_help())]
Quantize = Annotated[str | None, typer.Option("--quantize", help=(
    "nf4: store the frozen block linears in 4 bits (QLoRA; needs --lora)."))]
DoubleQuant = Annotated[bool | None, typer.Option("--double-quant", help=(
    "With --quantize nf4: quantize the block scales too (~0.37 bit/weight less)."))]
# the hyperparameters only some optimizers read: their flags and help from the registry (microft.optimizers)
HYPERPARAMETER_OPTIONS: dict[str, Any] = {
    name: Annotated[float | None, typer.Option("--" + name.replace("_", "-"), help=hyperparameter_help(name))]
    for name in HYPERPARAMETERS}
EvalBatches = Annotated[int | None, typer.Option("--eval-batches", help=(
    "Micro-batches of the validation set each evaluation reads (the first N, in order)."))]
SamplesPerEval = Annotated[int | None, typer.Option("--samples-per-eval", help=(
    "Validation prompts answered and shown at each evaluation (0: none)."))]
LogEvery = Annotated[int | None, typer.Option("--log-every", help=(
    "Write every N-th step to metrics.jsonl (and always the last)."))]
Shuffle = Annotated[bool | None, typer.Option("--shuffle/--no-shuffle", help=(
    "Shuffle the training data each epoch; --no-shuffle: take it in file order (consecutive records form "
    "each step, no length grouping)."))]
ReportTo = Annotated[str | None, typer.Option("--report-to", help=(
    "Experiment trackers that also get the run, comma-separated: tensorboard, mlflow, wandb, trackio "
    "(each an extra: pip install 'microft\\[mlflow]') (default: none)."))]
ReportDir = Annotated[str | None, typer.Option("--report-dir", help=(
    "Where --report-to tensorboard writes its event files (default: OUT/tensorboard)."))]
RunName = Annotated[str | None, typer.Option("--run-name", help=(
    "The tracker run's name (default: --out's directory name)."))]
Experiment = Annotated[str | None, typer.Option("--experiment", help=(
    "MLflow experiment, W&B and Trackio project (default: WANDB_PROJECT for W&B, else microft)."))]
DataSplit = Annotated[str | None, typer.Option("--data-split", help=(
    "With a dataset directory or hub repo id: read the files of this split (train, validation, …; named "
    "for it) (default: train, where the files name splits)."))]
DataFiles = Annotated[str | None, typer.Option("--data-files", help=(
    "With a dataset directory or hub repo id: comma-separated glob patterns of the files to read, e.g. "
    "'data/train-*.parquet' (default: the --data-split's files)."))]
PrefLoss = Annotated[str | None, typer.Option("--loss", help=(
    "dpo (sigmoid) | ipo | simpo | orpo: dpo and ipo compare the policy to a reference (the starting model), "
    "simpo and orpo need none."))]
Beta = Annotated[float | None, typer.Option("--beta", help=(
    "DPO/IPO/SimPO's beta: how far the policy may move from the reference (dpo, ipo) or the reward scale "
    "(simpo)."))]
Gamma = Annotated[float | None, typer.Option("--gamma", help="SimPO's target reward margin gamma.")]
OrpoLambda = Annotated[float | None, typer.Option("--orpo-lambda", help=(
    "ORPO's lambda: the weight of the odds-ratio term beside the chosen response's NLL."))]
PrecomputeRef = Annotated[bool | None, typer.Option("--precompute-ref/--no-precompute-ref", help=(
    "dpo/ipo: compute the reference log-probs once before training (full fine-tuning then keeps no "
    "reference copy in memory)."))]
SeqLen = Annotated[int | None, typer.Option("--seq-len", help=(
    "Tokens per sample, as --max-seq-len (default: the model's context)."))]

# every run option by its RunConfig field name (--seq-len is estimate-mem's name for max_seq_len)
RUN_OPTIONS: dict[str, Any] = {
    "model": Model, "data": Data, "out": Out, "micro_bs": MicroBS, "accum": Accum, "global_bs": GlobalBS,
    "max_steps": MaxSteps, "epochs": Epochs, "lr": LR, "max_seq_len": MaxSeqLen, "precision": Precision,
    "grad_ckpt": GradCkpt, "grad_ckpt_every": GradCkptEvery, "seed": Seed, "resume": Resume, "recipe": Recipe,
    "eval_every": EvalEvery, "save_every": SaveEvery, "log_format": LogFormat, "optimizer": Optim,
    "schedule": Schedule, "warmup": Warmup, "min_lr_ratio": MinLR, "max_grad_norm": MaxGradNorm,
    "weight_decay": WeightDecay, "device": Device, "val_frac": ValFrac, "patience": Patience,
    "keep_last": KeepLast, "compile": Compile, "tf32": TF32, "dropout": Dropout, "devices": Devices,
    "shard": Shard, "val_data": ValData, "test_frac": TestFrac, "template": Template,
    "mask_prompt": MaskPrompt,
    "skip_bad": SkipBad, "columns": Columns, "group_by_length": GroupByLength, "packing": Packing,
    "predict": Predict, "lora": Lora, "lora_r": LoraR, "lora_alpha": LoraAlpha, "lora_dropout": LoraDropout,
    "lora_targets": LoraTargets, "seq_len": SeqLen, "quantize": Quantize, "double_quant": DoubleQuant,
    **HYPERPARAMETER_OPTIONS, "eval_batches": EvalBatches, "samples_per_eval": SamplesPerEval,
    "log_every": LogEvery, "shuffle": Shuffle, "report_to": ReportTo, "report_dir": ReportDir,
    "run_name": RunName, "experiment": Experiment, "data_split": DataSplit, "data_files": DataFiles,
    "loss": PrefLoss, "beta": Beta, "gamma": Gamma,
    "orpo_lambda": OrpoLambda, "precompute_ref": PrecomputeRef,
}
PRETRAIN = ("model", "data", "out", "micro_bs", "accum", "global_bs", "max_steps", "epochs", "lr",
            "max_seq_len", "precision", "grad_ckpt", "grad_ckpt_every", "seed", "resume", "recipe",
            "eval_every", "save_every", "log_format", "optimizer", "schedule", "warmup", "min_lr_ratio",
            "max_grad_norm", "weight_decay", "device", "val_frac", "patience", "keep_last", "compile", "tf32",
            "dropout", "devices", "shard", *HYPERPARAMETER_OPTIONS, "eval_batches", "log_every", "shuffle",
            "report_to", "report_dir", "run_name", "experiment")
LORA = ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quantize", "double_quant")
FINETUNE = (*PRETRAIN, "data_split", "data_files", "val_data", "test_frac", "template", "mask_prompt",
            "skip_bad", "columns", "group_by_length", "packing", "predict", "samples_per_eval", *LORA)
# `dpo`: finetune's options but those of SFT samples (packing, prompt masking, predictions, generated
# samples), the column mapping, dataset-repo file selection and the multi-device/compiled runs it does not
# support yet; then the loss and its constants
DPO = (*(n for n in FINETUNE if n not in ("packing", "mask_prompt", "predict", "test_frac",
                                         "samples_per_eval", "columns", "data_split", "data_files",
                                         "devices", "shard", "compile")),
       "loss", "beta", "gamma", "orpo_lambda", "precompute_ref")
# dpo's own words where finetune's help speaks of the demo, or of samples where dpo's unit is a pair
DPO_HELP = {
    "model": "The model to tune, usually finetune's output (a microft checkpoint, or merged LoRA), an HF "
             "model directory or cached repo id, or a preset (default: gpt2-tiny).",
    "data": "Preference pairs, a file or a directory of JSON/JSONL, CSV/TSV or Parquet records (required).",
    "out": out_help("runs/microft"),
    "micro_bs": micro_bs_help("pairs") + " A micro-batch of N pairs is one forward of 2N sequences.",
    "global_bs": global_bs_help("pairs"),
    "max_seq_len": "Tokens per side of a pair, prompt and response (≤ the model's context) (default: the "
                   "model's context).",
    "group_by_length": "Batch pairs of similar length (less padding).",
}
# only what changes the estimate (--data: its real lengths); a recipe's other values are read and ignored
ESTIMATE = ("model", "data", "data_split", "data_files", "template", "skip_bad", "columns", "recipe",
            "micro_bs", "accum", "global_bs", "seq_len", "max_seq_len", "precision", "grad_ckpt",
            "grad_ckpt_every", "optimizer", "weight_decay", "max_grad_norm", "momentum", "dropout", *LORA,
            "devices", "shard", "compile", "packing", "loss", "precompute_ref")
# pretrain's own words where finetune's help speaks of the demo
PRETRAIN_HELP = {
    "model": "Preset to train from scratch (gpt2-tiny, gpt2, llama-3.2-1b, …), or an HF model directory, "
             "cached repo id or microft checkpoint to continue from (default: gpt2-tiny).",
    "data": "Training text: a .txt file or a directory of .txt files (required).",
    "out": out_help("runs/microft"),
    "max_seq_len": "Tokens per block the text is packed into (≤ the model's context) (default: the model's "
                   "context).",
}
# estimate-mem's own words: it trains nothing, and with --method dpo counts pairs
ESTIMATE_HELP = {
    "model": "The model whose run to estimate: a preset, microft checkpoint, HF model directory, its "
             "config.json, or hub repo id (only its config.json is fetched) (required, unless a recipe "
             "names one).",
    "data": "The run's training data (finetune's records; with --method dpo, preference pairs), tokenised as "
            "the run would: its longest sample (pair: longer side) sets the length (default: every sample "
            "fills the model's context or --seq-len).",
    "micro_bs": micro_bs_help("samples (--method dpo: pairs)"),
    "global_bs": global_bs_help("samples (--method dpo: pairs)"),
    "loss": "With --method dpo: dpo | ipo | simpo | orpo; dpo and ipo compare the policy to a reference (the "
            "starting model: a frozen copy, or with LoRA the base), simpo and orpo need none.",
    "precompute_ref": "With --method dpo, --loss dpo or ipo: the reference log-probs computed before "
                      "training (full fine-tuning then keeps no reference copy in memory).",
}


def shown_default(value: Any) -> str:
    """A default as --help writes it: on/off for a switch, 3e-4 as 0.0003 and 1e-08 as 1e-8, 16.0 as 16."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-")
    return str(value)


def with_default(help_text: str, shown: str) -> str:
    """`help_text` with "(default: shown)" before its final period: every command writes defaults so."""
    body = help_text.removesuffix(".")
    return f"{body} (default: {shown})."


def _with_default(name: str, help_text: str | None = None) -> Any:
    """The option `name` (with `help_text` instead of its shared help), its help ending with RunConfig's
    default (the flags default to None: 'not given') unless the help says its default itself."""
    from microft.config import RunConfig  # pydantic only: no torch

    alias = RUN_OPTIONS[name]
    field = RunConfig.model_fields.get(name)
    info = copy.copy(alias.__metadata__[0])
    info.help = help_text or info.help
    if not (field is None or field.default is None or "(default" in (info.help or "")):
        info.help = with_default(info.help or "", shown_default(field.default))
    return Annotated[alias.__origin__, info]  # type: ignore[name-defined]


def run_options(names: tuple[str, ...], own_help: dict[str, str] | None = None
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the run options `names` (before its own parameters); it receives them as `**flags`.
    `own_help` replaces the shared help of some options with the command's own words."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=_with_default(n, (own_help or {}).get(n))) for n in names]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        required = [p for p in params if p.default is inspect.Parameter.empty]
        params = required + shared + [p for p in params if p.default is not inspect.Parameter.empty]

        def run(**kw: Any) -> Any:
            return command(**kw)

        run.__name__, run.__qualname__, run.__doc__ = command.__name__, command.__qualname__, command.__doc__
        run.__module__ = command.__module__
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate
