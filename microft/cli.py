"""The `microft` command line: each command resolves a config, calls the library, renders with ui.

Heavy modules (torch and everything that imports it) are imported inside the commands, so
`microft --help` answers at once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from microft import export as exports
from microft import options
from microft.errors import MicroftError
from microft.options import run_options

if TYPE_CHECKING:
    from microft.config import RunConfig

app = typer.Typer(
    name="microft",
    help="Fine-tune language models (GPT-2, Llama, Qwen, Mistral, Gemma, Phi, …) on the memory you have: "
    "exact gradient accumulation, mixed precision, gradient checkpointing, LoRA and QLoRA, preference "
    "tuning, and a memory planner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _switches_take_no_value() -> None:
    """Newer typer versions show a switch's type in --help (`--dry-run <bool>`), which reads as if it took a
    value: show none for switches (is_flag), as click and older typer do."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "switches_plain", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.switches_plain = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_switches_take_no_value()


@app.callback()
def _root() -> None:
    """`microft`: the commands below (the help is the app's)."""


DryRun = Annotated[bool, typer.Option("--dry-run",
                                      help="Print the resolved config and batch plan, then exit.")]


_SAID_INTERRUPTED: list[str] = []  # what user_errors said of an interrupt (main says it where it did not)


def _stopped(message: str, code: int = 130) -> typer.Exit:
    """Say that the run was stopped (not an error); the exit to raise."""
    from microft import ui

    ui.stopped(message)
    _SAID_INTERRUPTED.append(message)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn microft's user-facing errors into one line on stderr and their exit code; an interrupt into
    `interrupted …` (not an error) and exit 130."""
    import signal

    from microft import ui
    from microft.errors import Interrupted, record_signal, signal_received

    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.default_int_handler):
            signal.signal(signal.SIGINT, record_signal)  # also where a script started us with SIGINT ignored
    try:
        yield
    except Interrupted as e:
        raise _stopped(str(e), e.exit_code) from None
    except MicroftError as e:
        if signal_received():  # what failed after a Ctrl-C is the interrupt's doing
            raise _stopped("interrupted") from None
        ui.error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        raise _stopped("interrupted") from None
    except Exception:
        if not signal_received():  # a bug: its traceback is what a report needs
            raise
        # a module half-imported when Ctrl-C landed, its KeyboardInterrupt swallowed by C code
        raise _stopped("interrupted") from None
    if signal_received():
        raise _stopped("interrupted")


def parse_micro_bs(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        from microft.errors import ConfigError

        raise ConfigError(f"--micro-bs must be a positive integer or 'auto', got {value!r}") from None


def run_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The run options as RunConfig fields (None = not given); `--micro-bs` parsed."""
    return {**flags, "micro_bs": parse_micro_bs(flags.get("micro_bs"))}


def _run_reporting(cfg: RunConfig, run: Any) -> None:
    """`run(cfg, reporter)` with the progress display, closed however the run ends."""
    from microft.ui import TrainReporter

    reporter = TrainReporter(cfg.log_format)
    try:
        run(cfg, reporter)
    finally:
        reporter.close()


def dry_run_output(cfg: RunConfig, names: tuple[str, ...], world: int = 1, method: str = "sft") -> None:
    """The resolved values of the command's options `names` (each one a flag of the command, as the JSON
    key with - for _) and the batch plan; `method`: the estimate-mem --method that plans it."""
    import json

    from microft.config import DEFAULT_GLOBAL_BS, default_batch, resolve_batch_plan

    values = cfg.model_dump(mode="json")
    print(json.dumps({k: values[k] for k in sorted(names) if k in values}, indent=2))
    if default_batch(cfg):
        print(f"Effective batch: {DEFAULT_GLOBAL_BS} (default: no batch flag given; at most the training "
              "set), split at the start into the largest micro-batch that fits (as --micro-bs auto) × "
              "accumulation; --global-bs, --micro-bs, --accum set it")
        return
    if cfg.micro_bs == "auto":  # the planner needs the model, the data and the memory free at the start
        keep = f"global batch {cfg.global_bs} kept" if cfg.global_bs else f"--accum {cfg.accum or 1} kept"
        planner = "estimate-mem" + (f" --method {method}" if method != "sft" else "")
        print(f"Effective batch: --micro-bs auto, chosen at the start: the largest micro-batch whose "
              f"estimated peak fits the memory then free ({keep}); {planner} --micro-bs auto --gpu-mem X "
              f"shows the plan for a budget")
        return
    plan = resolve_batch_plan(cfg.micro_bs, cfg.accum, cfg.global_bs, world)
    print(f"Effective batch: {plan.describe()}")


def check_trackers(cfg: RunConfig) -> None:
    """Each `--report-to` tracker known and its package installed, before torchrun or the model starts."""
    if cfg.report_to:
        from microft.train.trackers import check_trackers as check

        check(cfg.report_to)


def relaunch_under_torchrun(cfg: RunConfig) -> None:
    """`--devices N` outside torchrun: run this command again under torchrun and exit with its code."""
    import os

    if cfg.devices <= 1 or "LOCAL_RANK" in os.environ:
        return
    from microft.train.distributed import launch

    raise typer.Exit(launch(cfg.devices, sys.argv[1:]))


@app.command()
@run_options(options.PRETRAIN, options.PRETRAIN_HELP)
def pretrain(dry_run: DryRun = False, **flags: Any) -> None:
    """Train on raw text: a .txt file or a directory of them, packed into context-length blocks.

    From scratch with a preset (--model gpt2-tiny), or continuing from a checkpoint or HF directory.
    """
    with user_errors():
        from microft.config import resolve_config

        recipe = flags.pop("recipe")
        cfg = resolve_config(str(recipe) if recipe else None, **run_flags(flags))
        cfg = cfg.model_copy(update={"model": cfg.model or "gpt2-tiny", "group_by_length": False})
        if dry_run:
            dry_run_output(cfg, options.PRETRAIN)
            return
        check_trackers(cfg)
        relaunch_under_torchrun(cfg)
        if not cfg.data:
            from microft.errors import ConfigError

            raise ConfigError("pretrain needs --data (a .txt file or a directory of .txt files)")
        from microft.runs import run_pretrain

        _run_reporting(cfg, run_pretrain)


# help strings (typer keeps a docstring's line breaks in --help): each paragraph one line of output
FINETUNE_HELP = (
    "Instruction fine-tuning (the main job). With no --model, --data or --recipe: the built-in demo "
    "(recipes/demo.toml's settings; flags override them).\n\n"
    "Data: Alpaca (instruction, input, output) or chat (messages) records in JSON/JSONL, CSV/TSV or Parquet. "
    f"A record without messages takes each field it lacks from {options.aliases_help()}; --columns names "
    "any others.")


@app.command(help=FINETUNE_HELP)
@run_options(options.FINETUNE)
def finetune(dry_run: DryRun = False, **flags: Any) -> None:
    """`microft finetune`: FINETUNE_HELP."""
    with user_errors():
        recipe = flags.pop("recipe")
        flags = run_flags(flags)
        base = None
        if recipe is None and flags["model"] is None and flags["data"] is None:
            import time

            from microft.data.demo import DEMO_RUN

            base = {**DEMO_RUN, "out": time.strftime("runs/demo-%Y%m%d-%H%M%S")}  # never an earlier run's dir
        from microft.config import resolve_config

        # the demo's settings are read like a recipe: flags win, and two batch flags replace its batch plan
        cfg = resolve_config(str(recipe) if recipe else None, defaults=base, **flags)
        if dry_run:
            dry_run_output(cfg, options.FINETUNE)
            return
        check_trackers(cfg)
        relaunch_under_torchrun(cfg)
        from microft.runs import run_finetune

        _run_reporting(cfg, run_finetune)


DPO_HELP = (
    "Preference tuning on chosen/rejected pairs: DPO, IPO, SimPO or ORPO (--loss, default: dpo).\n\n"
    "Data: {instruction, input, chosen, rejected}, {prompt, chosen, rejected} or chosen/rejected message "
    "lists after a shared prompt, in JSON/JSONL, CSV/TSV or Parquet. Usually after `finetune` (--model its "
    "output).")


@app.command(help=DPO_HELP)
@run_options(options.DPO, options.DPO_HELP)
def dpo(dry_run: DryRun = False, **flags: Any) -> None:
    """`microft dpo`: DPO_HELP."""
    with user_errors():
        recipe = flags.pop("recipe")
        from microft.config import resolve_config

        cfg = resolve_config(str(recipe) if recipe else None, **run_flags(flags))
        if dry_run:
            dry_run_output(cfg, options.DPO, method="dpo")
            return
        from microft.runs import run_dpo

        _run_reporting(cfg, run_dpo)


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
    """`generate`'s prompt: --prompt-file's text, else --prompt's, else stdin's (--prompt - or none given)."""
    from microft.errors import ConfigError

    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read prompt file {prompt_file}: {e}") from None
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise ConfigError("give --prompt TEXT, --prompt-file FILE, or pipe the prompt on stdin")
        return sys.stdin.read()
    return prompt


GENERATE_HELP = ("Generate text from a model, streaming it through the model's tokenizer (KV cache; stops at "
                 "any EOS id).")


@app.command(help=GENERATE_HELP)
def generate(
    model: Annotated[str, typer.Option(
        "--model", help="HF model directory, cached hub repo id, microft checkpoint, LoRA adapter directory, "
        "or a preset (random weights).")],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="Prompt text ('-' or omitted: read stdin).")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", help="Read the prompt from a file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Tokens to generate at most (default: 100).", show_default=False)] = 100,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="Sampling temperature, 0: greedy (default: 0.8).", show_default=False)] = 0.8,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="Sample from the k most likely tokens (default: all).")] = None,
    top_p: Annotated[float | None, typer.Option(
        "--top-p", help="Sample from the most likely tokens whose probabilities add up to p (default: all)."
    )] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed for sampling (with --temperature > 0) (default: a fresh draw each time)."
    )] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Wrap the prompt as a user turn in the model's chat template.")] = False,
    template: Annotated[str | None, typer.Option(
        "--template", help="Wrap the prompt as an instruction, as a run renders its records: "
        + options.with_default(options.TEMPLATE_HELP, "none, the prompt as given"))] = None,
    input_text: Annotated[str | None, typer.Option(
        "--input", help="The instruction's input field (Alpaca's `input`; with --template or "
        "--chat).")] = None,
    device: Annotated[str | None, typer.Option("--device", help=options.with_default(options.DEVICE_HELP,
                                                                                   "auto"))] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object instead of streaming text.")] = False,
) -> None:
    """`microft generate`: GENERATE_HELP."""
    with user_errors():
        from microft.errors import ConfigError

        if chat and template:
            raise ConfigError("give --chat or --template, not both (--chat is --template chat)")
        text = _prompt_text(prompt, prompt_file)
        from microft.data.instruct import is_unicode_text

        if not is_unicode_text(text) or not is_unicode_text(input_text or ""):
            raise ConfigError("the prompt (or --input) is not valid UTF-8 text")
        from microft.data.tokenizer_files import tokenizer_for
        from microft.generate import generate as gen_tokens
        from microft.generate import stream_text
        from microft.models.artifacts import load_any
        from microft.train.step import resolve_device

        if input_text is not None and not (template or chat):
            raise ConfigError("--input is the instruction's input field: give it with --template (e.g. "
                              "alpaca) or --chat")
        net = load_any(model, str(resolve_device(device or "auto")))
        tok = tokenizer_for(model, net.config)
        tmpl = None
        if chat or template:
            from microft.data.chat import resolve_template
            from microft.data.instruct import encode_prompt

            tmpl = resolve_template("chat" if chat else template, tok)
            text = tmpl.render_prompt(text.strip(), (input_text or "").strip())
            ids = encode_prompt(tmpl, tok, text)
        else:
            ids = tok.prefix + tok.encode(text)
        pieces = stream_text(gen_tokens(net, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop_ids=tok.eos_ids), tok)
        if json_out:
            import json

            completion = "".join(pieces)
            print(json.dumps({"prompt": text, "completion": tmpl.clean(completion) if tmpl else completion}))
            return
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


Force = Annotated[bool, typer.Option("--force", help="Replace an existing directory.")]


ExportModel = Annotated[str, typer.Option(
    "--model", help="Run output (final/, best/, a checkpoint), LoRA or QLoRA run, HF directory or cached "
    "repo id.")]
ExportFormat = Annotated[str, typer.Option("--format", help=options.with_default(exports.format_help(), "hf"),
                                           show_default=False)]
ExportQuant = Annotated[str | None, typer.Option("--quant", help=exports.option_help("quant"))]
ExportTemplate = Annotated[str | None, typer.Option("--template", help=exports.option_help("template"))]


@app.command()
def export(
    model: ExportModel,
    out: Annotated[str, typer.Option("--out", help="Directory to write.")],
    format: ExportFormat = "hf",
    quant: ExportQuant = None,
    template: ExportTemplate = None,
    force: Force = False,
) -> None:
    """Export weights and tokenizer files for other tools (LoRA merged first, NF4 bases dequantized)."""
    with user_errors():
        from microft import ui
        from microft.train.outdir import check_written_dir, writing

        given = {"quant": quant, "template": template}
        fmt = exports.export_format(format, given)  # the registry's entry: its options, package and writer
        check_written_dir(out, force)
        chosen = exports.resolved_options(fmt, given)
        exports.require(fmt)  # before the model is read
        job = exports.ExportJob(model, out, force, chosen, writing=lambda: writing(out))
        res = exports.writer(fmt)(job)
        for note in res.notes:
            ui.err.print(f"note: {note}", markup=False)
        print(f"exported {model} -> {res.path} {res.summary}")
        _no_tokenizer_note(res.path, res.no_tokenizer)


MERGE_HELP = ("Fold LoRA adapters into the base weights and save a plain microft checkpoint (with the "
              "tokenizer files).")


@app.command(help=MERGE_HELP)
def merge(
    model: Annotated[str, typer.Option(
        "--model", help="LoRA adapter directory (or run dir with adapter files).")],
    out: Annotated[str, typer.Option("--out", help="Directory for the merged microft checkpoint.")],
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model, when the adapter doesn't name it.")] = None,
    force: Force = False,
) -> None:
    """`microft merge`: MERGE_HELP."""
    with user_errors():
        from microft.data.tokenizer_files import copy_tokenizer_files, write_tokenizer_files
        from microft.errors import ConfigError
        from microft.models.artifacts import load_any
        from microft.models.load import load_model, save_model
        from microft.models.lora import is_adapter_dir, load_adapter, merge_lora
        from microft.train.outdir import check_written_dir, writing

        if not is_adapter_dir(model):
            raise ConfigError(f"{model} holds no adapter_config.json: nothing to merge")
        check_written_dir(out, force)
        net = load_adapter(load_model(base), model) if base else load_any(model)
        merge_lora(net)
        with writing(out):
            save_model(out, net)
            if not copy_tokenizer_files(model, out) and base:
                copy_tokenizer_files(base, out)
            missing = write_tokenizer_files(base or model, out, net.config)
        print(f"merged {model} -> {out}")
        _no_tokenizer_note(out, missing)


def _no_tokenizer_note(path: Any, why: str | None) -> None:
    """The one line saying a written model directory has no tokenizer (the weights are still usable)."""
    if why:
        sys.stderr.write(f"note: {path} has no tokenizer files ({why}); copy the base model's tokenizer "
                         "files into it before loading it with transformers\n")


DOWNLOAD_HELP = (
    "Fetch a model's config, tokenizer and weights into the Hugging Face cache (resumable, hash-checked).\n\n"
    "The cache is $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub, shared with transformers; "
    "safetensors are preferred (no .bin, .pth, .gguf or ONNX when they exist). Gated repos read HF_TOKEN. "
    "Prints the snapshot directory, so `$(microft download X)` works; afterwards --model also takes the "
    "repo id.")


@app.command(help=DOWNLOAD_HELP)
def download(
    repo: Annotated[str, typer.Argument(
        help="Hub repo id (Qwen/Qwen3-0.6B) or gpt2 | gpt2-medium | gpt2-large | gpt2-xl.", metavar="REPO")],
    revision: Annotated[str, typer.Option(
        "--revision", help="Branch, tag or commit (default: main).", show_default=False)] = "main",
    endpoint: Annotated[str | None, typer.Option(
        "--endpoint", help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print repo, commit, path and files as JSON.")] = False,
) -> None:
    """`microft download`: DOWNLOAD_HELP."""
    with user_errors():
        import json

        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        from microft import ui
        from microft.download import download as fetch

        bars: dict[str, Any] = {}
        # progress on stderr (shown on a terminal only), so stdout stays the one path line
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=ui.err, transient=True) as live:
            def progress(name: str, done: int, total: int) -> None:
                if name not in bars:
                    bars[name] = live.add_task(name, total=total)
                live.update(bars[name], completed=done)

            snap = fetch(repo, revision=revision, endpoint=endpoint, progress=progress)
        print(json.dumps(snap.to_json(), indent=2) if json_out else snap.path)


Trace = Annotated[bool, typer.Option(
    "--trace", help="Run microft's real step on fake tensors for the exact peak (any family; seconds).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the estimate (and plan) as JSON.")]
Method = Annotated[str, typer.Option(
    "--method", help="sft (finetune's and pretrain's step) or dpo (`microft dpo`'s: micro-batches of pairs, "
    "two sequences each, with the reference's forward or none, as --loss and --precompute-ref say) "
    "(default: sft).", show_default=False)]
GpuMem = Annotated[str | None, typer.Option(
    "--gpu-mem", help="Budget: 18GiB, 24GB, a device (rtx3090, a100-40gb, h100, t4, …) or auto; adds a "
    "verdict and a plan (default: none, the estimate alone).")]


ESTIMATE_HELP = (
    "Predict the peak training memory of a run, and plan micro-batch and accumulation for a GPU.\n\n"
    "Takes the run options that change memory, and the recipes: `estimate-mem --recipe X` estimates "
    "`finetune --recipe X` (with --method dpo: `dpo --recipe X`; the recipe's other values, --lr, …, are "
    "read and ignored). With --data (and --template, --max-seq-len) the data is tokenised as the run would "
    "and the estimate uses its longest sample (or pair) instead of the full context. --micro-bs and --accum "
    "without --global-bs keep their product as the global batch; with no batch flag it estimates a run's "
    "default batch (global batch 16, split for --gpu-mem as --micro-bs auto splits it; without --gpu-mem at "
    "micro-batch 1). --model takes a preset, checkpoint, HF directory, config.json or hub repo id of any "
    "family (not downloaded: only its config.json is fetched).\n\n"
    "The analytical engine replays microft's training step from shapes (instant, any size); --trace runs the "
    "real step twice on fake tensors (exact; any family). Both report the tensor peak that CUDA's "
    "max_memory_allocated would show; runtime overhead (CUDA context, cuBLAS workspace, a fragmentation "
    "margin) is listed apart and added for the verdict. With --gpu-mem: for each strategy the largest "
    "micro-batch that fits with the accumulation that keeps --global-bs, and a recommendation.\n\n"
    "Exit codes: 0 the run fits as asked (or no budget given), 4 it does not but the recommended plan does, "
    "3 nothing fits, 2 bad input.")


@app.command("estimate-mem", help=ESTIMATE_HELP)
@run_options(options.ESTIMATE, options.ESTIMATE_HELP)
def estimate_mem(gpu_mem: GpuMem = None, trace: Trace = False, json_out: JsonOut = False,
                 method: Method = "sft", **flags: Any) -> None:
    """`microft estimate-mem`: ESTIMATE_HELP; `estimating.estimate_run` answers, this renders."""
    with user_errors():
        from microft.estimating import estimate_run

        recipe, seq_len = flags.pop("recipe"), flags.pop("seq_len")
        answer = estimate_run(run_flags(flags), gpu_mem, trace, method, str(recipe) if recipe else None,
                              seq_len)
        if json_out:
            import json

            print(json.dumps(answer.to_dict(), indent=2))
        else:
            _render_estimate(answer)
        if answer.code:
            raise typer.Exit(answer.code)


def _render_estimate(answer: Any) -> None:
    from microft.ui import fmt_bytes, out, print_kv, print_table

    est, fit, code, what = answer.estimate, answer.fit, answer.code, answer.what
    if not out.is_terminal:  # piped: the table's title is not printed, so say what was estimated first
        print(f"estimated: {what}")
    rows = [[k, fmt_bytes(v), f"{100 * v / est.peak_bytes:.1f}%"] for k, v in est.components.items()]
    rows.append(["peak (tensors)", fmt_bytes(est.peak_bytes), "100%"])
    print_table(f"Peak training memory ({est.engine}) — {what}", ["component", "bytes", "share of peak"],
                rows)
    info = [("peak phase", f"{est.peak_phase} ({est.peak_where})")]
    if len(est.step_peaks) > 1:
        per_step = ", ".join(f"step {i + 1}: {fmt_bytes(p)}" for i, p in enumerate(est.step_peaks))
        info.append(("per step", per_step + " (step 1 creates the optimizer state)"))
    info.append(("runtime overhead", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in est.overhead.items())
                 + " (not in the peak)"))
    info.append(("total", fmt_bytes(est.total_bytes)))
    if est.budget is not None:
        spare = est.budget.bytes - est.total_bytes
        verdict = (f"fits in {est.budget.label} ({fmt_bytes(est.budget.bytes)}): {fmt_bytes(spare)} to spare"
                   if est.fits else f"does NOT fit in {est.budget.label} ({fmt_bytes(est.budget.bytes)}): "
                   f"{fmt_bytes(-spare)} over")
        info.append(("verdict", verdict))
    info += [("details", ", ".join(f"{k} {v:,}" if "parameters" in k else f"{k} {fmt_bytes(v)}"
                                   for k, v in est.details.items()))] if est.details else []
    info += [("note", n) for n in est.notes]
    print_kv("Where and why", info)
    if fit is not None:
        _render_plan(fit, code)


PLAN_LEGEND = ("micro-bs, accum: the largest micro-batch that fits, with the accumulation that keeps the "
               "global batch; total: peak tensors plus runtime overhead at that micro-batch; step cost: "
               "estimated training time per token relative to the cheapest plan that fits (1.00×), from the "
               "training FLOPs (checkpointing's recompute included, fp32 at half the speed of bf16/fp16) "
               "plus a fixed cost per micro-step; changes: the flags that turn your run into that plan "
               "(none: it is your run)")


def _render_plan(fit: Any, code: int) -> None:
    from microft.memory.plan import VERDICTS
    from microft.ui import fmt_bytes, print_kv, print_table

    gbs = f"global batch {fit.global_bs}" if fit.global_bs else "no --global-bs: largest micro-batch"
    prow = [[r.strategy, str(r.micro_bs) if r.fits else "-", str(r.accum) if r.fits else "-",
             fmt_bytes(r.total_bytes), f"{r.rel_cost:.2f}×" if r.fits else "-", "yes" if r.fits else "no",
             (", ".join(fit.changes(r)) or "none") if r.fits else "-"]
            for r in fit.strategies]
    print_table(f"Plan for {fit.budget.label} ({fmt_bytes(fit.budget.bytes)}, {gbs})",
                ["strategy", "micro-bs", "accum", "total at that size", "step cost", "fits", "changes"], prow,
                text=("changes",))
    tree = " → ".join(f"{r.strategy}: " + (f"micro-bs {r.micro_bs} × accum {r.accum}" if r.fits else "no")
                      for r in fit.tree)
    rec = fit.recommended
    if rec is None:
        said = "nothing fits this budget, not even LoRA at micro-batch 1"
    else:
        changes, kept = fit.changes(rec), fit.kept(rec)
        resplit = fit.asked and fit.asked != (rec.micro_bs, rec.accum)
        said = (f"{rec.strategy}: " + (f"change {', '.join(changes)}" if changes else "your run as asked")
                + (f" (you asked --micro-bs {fit.asked[0]} --accum {fit.asked[1]})" if resplit else "")
                + (f"; keeps your {', '.join(kept)}" if kept else ""))
    print_kv("Recommendation", [
        ("columns", PLAN_LEGEND),
        ("decision tree", tree + "   (\"your settings\": your precision, optimizer, checkpointing and LoRA, "
                                 "at the largest micro-batch that fits; then one memory saver added at a "
                                 "time)"),
        ("recommended", said),
        ("answer", f"{VERDICTS[code]} (exit code {code})")])


def quiet_signals() -> None:
    """Going down after an interrupt: a further SIGINT/SIGTERM (a second Ctrl-C, a deferred one sent
    again) must not cut the last words short with a traceback."""
    import signal

    with contextlib.suppress(ValueError):  # not the main thread
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


def exit_interrupted(code: int = 130) -> None:
    """Exit with `code` (130, 143) now that the run has cleaned up. Not through Python's own exit: CPython
    marks a KeyboardInterrupt that passed through exec'd source (dataclasses builds its methods so, while
    modules load) as unhandled even once caught, and at exit would kill the process with SIGINT (-2, not
    130)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def usage_error(e: Any) -> int:
    """A flag typed wrong (click's usage errors: an unknown option, a value of the wrong type) as one line on
    stderr, like every user error, instead of typer's boxed panel; returns the exit code (2)."""
    import re

    if type(e).__name__ == "NoArgsIsHelpError":  # bare `microft`: the help is already printed
        return e.exit_code
    text = " ".join(e.format_message().split()).rstrip(".")
    if m := re.match(r"Invalid value for '([^']+)': (.*)", text):
        text = f"{m[1].split('/')[0]}: {m[2].replace('Input should be', 'must be')}"
    ctx = getattr(e, "ctx", None)
    sys.stderr.write(f"error: {text}" + (f" (see {ctx.command_path} --help)" if ctx else "") + "\n")
    return e.exit_code


def main() -> None:
    """Run the CLI (the `microft` command: microft.__main__ installs the SIGINT handler before it imports
    this module)."""
    import signal

    from microft.errors import record_signal, signal_received

    try:
        with contextlib.suppress(ValueError):  # not the main thread
            if signal.getsignal(signal.SIGINT) is not record_signal:
                signal.signal(signal.SIGINT, record_signal)
        if signal_received():  # Ctrl-C while this module loaded, its KeyboardInterrupt swallowed
            raise KeyboardInterrupt
        code = app(prog_name="microft", standalone_mode=False)  # typer.Exit(n) comes back as n
    except KeyboardInterrupt:  # outside a command's user_errors (parsing, imports)
        code = 130
    except Exception as e:  # click's usage errors (typer >= 0.25 bundles its own click: matched by name)
        if not any(c.__name__ == "ClickException" for c in type(e).__mro__):
            raise
        code = usage_error(e)
    code = code if isinstance(code, int) else 0
    if code in (130, 143):  # typer turns a Ctrl-C while it parses the flags into a silent 130
        quiet_signals()
        if not _SAID_INTERRUPTED:
            sys.stderr.write("interrupted\n")
        exit_interrupted(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
