"""`estimate-mem`'s orchestration: the run resolved as `finetune` resolves it, the data measured, the estimate
and the plan; the CLI only renders the `MemoryAnswer` this returns.

The run goes through the trainer's own resolver (`resolved.resolve_run`, `resolved.plan_batch` with
`runs.planner_for`'s planner), on the GPU that `--gpu-mem` describes, so the batch it estimates is the batch a
run of the same flags trains with. No torch import without `--trace` (tests/test_memory.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from microft.config import RunConfig, resolve_config
from microft.errors import ConfigError
from microft.resolved import ResolvedRun, plan_batch, resolve_run


@dataclass
class MemoryAnswer:
    """What `estimate-mem` answers: the estimate at the run's batch plan, the budget's plan (with --gpu-mem),
    the exit code, and the resolved run it estimated."""

    estimate: Any  # memory.estimate.Estimate
    fit: Any  # memory.plan.BudgetFit, or None without a budget
    accum: int
    code: int
    resolved: ResolvedRun

    @property
    def what(self) -> str:
        return describe_estimate(self.estimate, self.accum)

    def to_dict(self) -> dict[str, Any]:
        """estimate-mem --json's object."""
        from microft.memory.plan import VERDICTS

        est = self.estimate
        return {"estimated": self.what, **est.to_dict(), "accum": self.accum,
                "plan": self.fit.to_dict() if self.fit else None, "exit_code": self.code,
                "verdict": VERDICTS[self.code] if est.budget is not None else None,
                "resolved": self.resolved.to_dict()}


def describe_estimate(est: Any, accum: int) -> str:
    """One line naming what was estimated (every output format carries it)."""
    s, a = est.setup, est.arch
    step = f"microft dpo --loss {s.pref_loss}, " if s.method == "dpo" else ""  # micro-batches of pairs
    return (f"{a.name}: {step}micro-bs {s.micro_bs} × seq {s.seq_len}, accum {accum}, {s.precision}, "
            f"{s.optimizer}"
            f"{', grad ckpt' if s.grad_ckpt else ''}{f', LoRA r={s.lora_r}' if s.lora else ''}"
            f"{f', {s.quantize} base' + (' (double-quant)' if s.double_quant else '') if s.quantize else ''}"
            f"{f', {est.world} devices ({est.shard})' if est.world > 1 else ''}")


def estimate_config(recipe: str | None, seq_len: int | None, flags: dict[str, Any]) -> RunConfig:
    """The run config of estimate-mem's flags (`--seq-len` is `--max-seq-len`; errors name the flag as
    typed)."""
    if seq_len is not None:
        flags = {**flags, "max_seq_len": seq_len}
    try:
        return resolve_config(recipe, **flags)
    except ConfigError as e:  # name the flag as typed
        typed = str(e).replace("--max-seq-len", "--seq-len") if seq_len is not None else str(e)
        raise ConfigError(typed) from None


def estimate_shape(cfg: RunConfig, recipe: str | None) -> Any:
    """The model shapes to estimate: --model's, or for a recipe without model or data (recipes/demo.toml)
    the demo's model."""
    if cfg.model:
        return planning_shape(cfg.model, cfg.dropout)
    if recipe is not None and not cfg.data:
        from microft.data.demo import demo_model_config, demo_tokenizer
        from microft.memory.estimate import with_dropout

        return with_dropout(demo_model_config(demo_tokenizer().vocab_size), cfg.dropout)
    raise ConfigError("estimate-mem needs --model (a preset, checkpoint, HF directory or config.json) or a "
                      "recipe")


def estimate_run(flags: dict[str, Any], gpu_mem: str | None = None, trace: bool = False, method: str = "sft",
                 recipe: str | None = None, seq_len: int | None = None) -> MemoryAnswer:
    """estimate-mem: resolve the run of `flags` (RunConfig fields) on the `gpu_mem` budget's GPU, measure
    `--data`, plan its batch as a training run would, estimate its peak and, with a budget, plan it."""
    from microft.memory import estimate as memory
    from microft.memory.plan import check_method, fit_budget, verdict, with_method

    check_method(method)  # before the model's shape is read (perhaps from the hub)
    cfg = estimate_config(recipe, seq_len, flags)
    arch = estimate_shape(cfg, recipe)
    budget = memory.parse_budget(gpu_mem) if gpu_mem is not None else None  # "" too: an unset $VAR
    world, world_shard = memory.scale_out(cfg)
    run = resolve_run(cfg, arch, memory.budget_device(budget), method,
                      seq_flag="--seq-len" if seq_len is not None else "--max-seq-len")
    lengths, seq_note = data_lengths(cfg, arch, run)
    asked = cfg.max_seq_len
    planner = answering(method)
    run = plan_batch(run, cfg, arch, None if lengths is None else len(lengths), planner, world,
                     max(lengths) if lengths else None)
    cfg = cfg.model_copy(update={"max_seq_len": run.plan_seq_len})
    base = memory.setup_for(cfg, arch, 1, precision=run.precision.name)
    base = with_method(base, cfg, method)
    mb, acc = run.plan.micro_bs, run.plan.accum
    fit = None
    if budget is not None:
        # the global batch to keep: the one asked for (a global batch, or a micro-batch with its accumulation)
        # or the default; --accum alone or --micro-bs auto without --global-bs keep only the accumulation
        kept = cfg.global_bs or isinstance(cfg.micro_bs, int) or run.default_batch
        gbs = run.plan.global_bs if kept else None
        fit = fit_budget(arch, base, budget, gbs, world, world_shard, cfg.accum or 1, asked=(mb, acc),
                         n_train=len(lengths) if lengths else None)
    setup = replace(base, micro_bs=mb, accum=min(acc, 2))
    engine = memory.trace if trace else memory.estimate
    kw = {"max_grad_norm": cfg.max_grad_norm} if trace else {}
    est = engine(arch, setup, budget, world, world_shard, **kw)
    if run.default_batch and budget is not None:  # one note on the default batch: the split, then the rest
        head = "no batch flags: "
        said = [n.removeprefix(head) for n in run.notes if n.startswith(head)]
        split = (f"a training run's default global batch, split as --micro-bs auto splits it for "
                 f"{budget.label}: {run.plan.describe()}")
        notes = [n for n in run.notes if not n.startswith(head)]
        run = replace(run, notes=(*notes, head + "; ".join([split, *said])))
    est.notes[:0] = [*sequence_notes(asked, seq_note, setup.seq_len), *run.notes]
    if cfg.compile:
        est.notes.append("--compile is not modelled: this is the eager step (compiled steps usually save "
                         "less)")
    return MemoryAnswer(est, fit, acc, verdict(est.fits, fit), run)


def sequence_notes(asked: int | None, seq_note: str | None, seq_len: int) -> list[str]:
    """What the estimate says of its sequence length: measured from --data, or (none `asked`) the model's full
    context."""
    if seq_note:
        return [f"sequence length {seq_len} {seq_note}"]
    if not asked:
        return [f"sequence length {seq_len}: the model's full context; --data measures your data's real "
                "lengths, --seq-len sets one"]
    return []


def data_lengths(cfg: RunConfig, arch: Any, run: ResolvedRun) -> tuple[list[int] | None, str | None]:
    """With --data: each training sample's tokens (a pair: its longer side; samples cut at the run's sequence
    length, as the run cuts them) and the note that says what was measured; else (None, None)."""
    if not cfg.data:
        return None, None
    from microft.runs import finetune_lengths, pair_lengths

    context = run.seq_len
    if run.method == "dpo":  # each pair: two sequences padded to the micro-batch's longest side
        lengths = pair_lengths(cfg, context, arch)
        return lengths, (f"from --data: {len(lengths)} training pairs, longest side {max(lengths)} tokens "
                         f"(cut at {context}), mean of the longer sides {sum(lengths) / len(lengths):.0f}")
    lengths = finetune_lengths(cfg, context)
    # packed rows fill up to the context with whole samples; unpacked ones are as long as the longest
    return lengths, (f"from --data: {len(lengths)} training samples, longest {max(lengths)} tokens "
                     f"(cut at {context}), mean {sum(lengths) / len(lengths):.0f}"
                     + (f"; --packing fills rows of {context}" if cfg.packing else ""))


def answering(method: str):
    """The run's planner (`runs.planner_for`), answering "nothing fits" with micro-batch 1 rather than an
    error: for estimate-mem, "does not fit" is an answer, not bad input."""
    from microft.runs import planner_for

    planner = planner_for(method)

    def plan(cfg: RunConfig, shape: Any, device: Any, world: int, n_train: int | None):
        from microft.config import resolve_batch_plan
        from microft.memory.plan import NothingFits

        try:
            return planner(cfg, shape, device, world, n_train)
        except NothingFits:
            return resolve_batch_plan(1, None if cfg.global_bs else cfg.accum, cfg.global_bs, world)

    return plan


def planning_shape(spec: str, dropout: float | None) -> Any:
    """The shapes estimate-mem plans with. A hub repo id not in the local cache costs only its config.json
    (fetched through huggingface_hub, not `microft download`'s weights); where that fails (offline, gated,
    no network) the one-line error names the preset with the same shapes, when there is one."""
    from microft.errors import DownloadError
    from microft.memory import estimate as memory
    from microft.models.source import config_of, is_repo_id, resolve_model_dir
    from microft.weights import read_json

    try:
        resolve_model_dir(spec)
    except ConfigError:  # a repo id that is not in the local cache
        from microft.download import ALIASES, fetch_config
        from microft.models.config import preset_for_repo

        try:
            path = fetch_config(spec)
        except DownloadError as e:
            preset = preset_for_repo(spec)
            hint = (f"plan with the preset of its shapes: --model {preset}" if preset else
                    f"run `microft download {spec}`, or pass a copy of its config.json to --model")
            raise ConfigError(f"{spec}: no such directory, not in the local Hugging Face cache, and its "
                              f"config.json could not be fetched ({e}); {hint}") from None
        name = ALIASES.get(spec, spec) if is_repo_id(spec) else spec
        return memory.with_dropout(config_of(path.parent, read_json(path, "config.json"), name=name), dropout)
    return memory.load_shape(spec, dropout)
