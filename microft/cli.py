"""The `microft` command line: each command resolves a config, calls the library, renders with ui.

Heavy modules (torch and everything that imports it) are imported inside the commands, so
`microft --help` answers at once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from microft.config import RunConfig, config_to_json, resolve_batch_plan, resolve_config
from microft.errors import MicroftError

app = typer.Typer(
    name="microft",
    help="Fine-tune GPT-2-class models on the memory you have: exact gradient accumulation, mixed precision, "
    "gradient checkpointing, LoRA, and a memory planner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Fine-tune GPT-2-class models on the memory you have."""


# --- options shared by the commands (stable names: scripts depend on them) -------------------
Model = Annotated[Optional[str], typer.Option("--model", help="Preset (gpt2, gpt2-medium, …, gpt2-tiny, gpt2-mini), HF GPT-2 directory, or microft checkpoint.")]
Data = Annotated[Optional[str], typer.Option("--data", help="Training data: a file or a directory.")]
Out = Annotated[Optional[str], typer.Option("--out", help="Output directory (created with its parents).")]
MicroBS = Annotated[Optional[str], typer.Option("--micro-bs", help="Samples per forward/backward, or 'auto'.")]
Accum = Annotated[Optional[int], typer.Option("--accum", help="Micro-steps accumulated per optimizer step.")]
GlobalBS = Annotated[Optional[int], typer.Option("--global-bs", help="Samples per optimizer step (micro × accum × devices).")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps to run (overrides --epochs).")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training data (default 1).")]
LR = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")]
MaxSeqLen = Annotated[Optional[int], typer.Option("--max-seq-len", help="Tokens per sample (≤ the model's context).")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="auto | fp32 | bf16-mixed | fp16-mixed | bf16-true.")]
GradCkpt = Annotated[Optional[bool], typer.Option("--grad-ckpt/--no-grad-ckpt", help="Recompute block activations in backward.")]
GradCkptEvery = Annotated[Optional[int], typer.Option("--grad-ckpt-every", help="Checkpoint every N-th block (with --grad-ckpt).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for init, data order and sampling.")]
Resume = Annotated[Optional[str], typer.Option("--resume", help="Checkpoint directory, or 'auto' for the latest under --out.")]
Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="A recipes/*.toml file; flags override its values.")]
EvalEvery = Annotated[Optional[int], typer.Option("--eval-every", help="Validate every N steps (0: never).")]
SaveEvery = Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps (0: only at the end).")]
LogFormat = Annotated[Optional[str], typer.Option("--log-format", help="auto | rich | plain | json.")]
Optim = Annotated[Optional[str], typer.Option("--optimizer", help="adamw | sgd | adafactor | adamw-8bit.")]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="cosine | linear | constant.")]
Warmup = Annotated[Optional[float], typer.Option("--warmup", help="Warmup steps (≥ 1) or fraction of the run (< 1).")]
MinLR = Annotated[Optional[float], typer.Option("--min-lr-ratio", help="Final lr as a fraction of the peak.")]
MaxGradNorm = Annotated[Optional[float], typer.Option("--max-grad-norm", help="Clip the global grad norm (0: off).")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay (matrices only).")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
ValFrac = Annotated[Optional[float], typer.Option("--val-frac", help="Fraction held out for validation.")]
Patience = Annotated[Optional[int], typer.Option("--patience", help="Stop after N evaluations without improvement.")]
KeepLast = Annotated[Optional[int], typer.Option("--keep-last", help="Step checkpoints to keep.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.")]
Dropout = Annotated[Optional[float], typer.Option("--dropout", help="Dropout probability (default 0).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and batch plan, then exit.")]
Devices = Annotated[Optional[int], typer.Option("--devices", help="Processes to launch with torchrun (one per device).")]
Shard = Annotated[Optional[str], typer.Option("--shard", help="none | ddp | fsdp (with --devices > 1).")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn microft's user-facing errors into one line on stderr and their exit code."""
    from microft import ui

    try:
        yield
    except MicroftError as e:
        ui.error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        ui.error("interrupted")
        raise typer.Exit(130) from None


def parse_micro_bs(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        from microft.errors import ConfigError

        raise ConfigError(f"--micro-bs must be a positive integer or 'auto', got {value!r}") from None


def common_flags(**kw: Any) -> dict[str, Any]:
    """Map CLI keyword names onto RunConfig fields (None = not given)."""
    if "micro_bs" in kw:
        kw["micro_bs"] = parse_micro_bs(kw["micro_bs"])
    if "recipe" in kw:
        kw.pop("recipe")
    return kw


def dry_run_output(cfg: RunConfig, world: int = 1) -> None:
    mb = cfg.micro_bs if isinstance(cfg.micro_bs, int) else None
    plan = resolve_batch_plan(mb, cfg.accum, cfg.global_bs, world)
    print(config_to_json(cfg))
    print(f"Effective batch: {plan.describe()}")


def maybe_relaunch(cfg: RunConfig) -> bool:
    """`--devices N` outside torchrun: relaunch this command under torchrun; True when done."""
    import os

    if cfg.devices <= 1 or "LOCAL_RANK" in os.environ:
        return False
    from microft.distributed import launch

    raise typer.Exit(launch(cfg.devices, sys.argv[1:]))


@app.command()
def pretrain(
    model: Model = None, data: Data = None, out: Out = None, micro_bs: MicroBS = None, accum: Accum = None,
    global_bs: GlobalBS = None, max_steps: MaxSteps = None, epochs: Epochs = None, lr: LR = None,
    max_seq_len: MaxSeqLen = None, precision: Precision = None, grad_ckpt: GradCkpt = None,
    grad_ckpt_every: GradCkptEvery = None, seed: Seed = None, resume: Resume = None, recipe: Recipe = None,
    eval_every: EvalEvery = None, save_every: SaveEvery = None, log_format: LogFormat = None,
    optimizer: Optim = None, schedule: Schedule = None, warmup: Warmup = None, min_lr_ratio: MinLR = None,
    max_grad_norm: MaxGradNorm = None, weight_decay: WeightDecay = None, device: Device = None,
    val_frac: ValFrac = None, patience: Patience = None, keep_last: KeepLast = None, compile: Compile = None,
    dropout: Dropout = None, devices: Devices = None, shard: Shard = None, dry_run: DryRun = False,
) -> None:
    """Train on raw text: a .txt file or a directory of them, packed into context-length blocks.

    From scratch with a preset (--model gpt2-tiny), or continuing from a checkpoint or HF directory.
    """
    with user_errors():
        flags = common_flags(**{k: v for k, v in locals().items() if k not in ("dry_run",)})
        cfg = resolve_config(str(recipe) if recipe else None, **flags)
        cfg = cfg.model_copy(update={"model": cfg.model or "gpt2-tiny", "group_by_length": False})
        if dry_run:
            dry_run_output(cfg)
            return
        if maybe_relaunch(cfg):
            return
        if not cfg.data:
            from microft.errors import ConfigError

            raise ConfigError("pretrain needs --data (a .txt file or a directory of .txt files)")
        from microft.runs import run_pretrain
        from microft.ui import TrainReporter

        reporter = TrainReporter(cfg.log_format)
        try:
            run_pretrain(cfg, reporter)
        finally:
            reporter.close()


def main() -> None:
    app(prog_name="microft")


if __name__ == "__main__":
    main()
