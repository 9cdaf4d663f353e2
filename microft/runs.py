"""Run assembly: turn a resolved RunConfig into a model, datasets and a batch plan, then train.

The CLI calls these; tests call them too, with `list.append` as the event sink.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from microft.config import BatchPlan, RunConfig, resolve_batch_plan
from microft.errors import ConfigError

Event = dict[str, Any]


def owns_out(run: Callable[[RunConfig, Callable[[Event], None]], dict[str, Any]]):
    """Run under `train.outdir.owned_out`: the lock on --out, no earlier run clobbered, no half-made --out."""
    import functools

    @functools.wraps(run)
    def owned(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
        from microft.train.outdir import owned_out

        with owned_out(cfg, on_event) as emit:
            return run(cfg, emit)

    return owned


def batch_plan(cfg: RunConfig, world_size: int = 1, model_cfg=None, on_event=None) -> BatchPlan:
    """The run's batch plan; `--micro-bs auto` asks the memory planner for the largest micro-batch."""
    micro = cfg.micro_bs if isinstance(cfg.micro_bs, int) else None
    if cfg.micro_bs != "auto" or model_cfg is None:
        return resolve_batch_plan(micro, cfg.accum, cfg.global_bs, world_size)
    from microft.memory.plan import plan_micro_batch

    budget, where = memory_budget(cfg)
    micro = plan_micro_batch(cfg, model_cfg, budget)  # divides the per-device share of --global-bs
    plan = resolve_batch_plan(micro, None if cfg.global_bs else cfg.accum, cfg.global_bs, world_size)
    if on_event:
        on_event({"kind": "note", "text": f"--micro-bs auto: {plan.describe()} fits {where}"})
    return plan


def memory_budget(cfg: RunConfig) -> tuple[int, str]:
    """Bytes a run may use: the GPU's total memory, or the memory available on this machine."""
    import torch

    from microft.train.step import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    import os

    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail, f"this machine's free memory ({avail / 2**30:.1f} GiB)"


def memory_hooks(cfg: RunConfig, model_cfg: Any):
    """The estimator's answers for the loop (banner peak, CPU traced peak, OOM advice), as callbacks."""
    from microft.errors import MicroftError
    from microft.memory.plan import estimate_for_run, plan_advice
    from microft.train.loop import MemoryHooks

    def quietly(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except MicroftError:  # a run the estimator cannot model
                return None
        return call

    return MemoryHooks(
        banner_peak=quietly(lambda precision, plan: estimate_for_run(cfg, model_cfg, plan, precision)["summary"]),
        traced_peak=quietly(lambda precision, plan: estimate_for_run(cfg, model_cfg, plan, precision,
                                                                     engine="trace")["peak_bytes"]),
        oom_advice=quietly(lambda device_bytes: plan_advice(cfg, model_cfg, device_bytes)),
    )


def seed_init(seed: int) -> None:
    """Seed before the model is built, so a preset's random init follows --seed."""
    import torch

    torch.manual_seed(seed)


def seq_len_for(cfg: RunConfig, n_positions: int) -> int:
    if cfg.max_seq_len is None:
        return n_positions
    if cfg.max_seq_len > n_positions:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's context of {n_positions}")
    return cfg.max_seq_len


@owns_out
def run_pretrain(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Language-model training on raw text packed into blocks."""
    from microft.data import Subset, pack_documents, read_text_corpus, split_indices
    from microft.models.load import load_model
    from microft.tokenizer import encode
    from microft.train.distributed import distributed, main_only
    from microft.train.loop import train

    seed_init(cfg.seed)  # the same init on every rank
    model = load_model(cfg.model or "gpt2-tiny", dropout=cfg.dropout)
    block = seq_len_for(cfg, model.config.n_positions)
    blocks = pack_documents(read_text_corpus(cfg.data), encode, block)
    train_idx, val_idx = split_indices(len(blocks), cfg.val_frac, cfg.seed)
    with distributed(cfg, model) as dist:  # under torchrun: process group, DDP/FSDP wrap; else a no-op
        plan = batch_plan(cfg, dist.world_size, model.config, on_event)
        return train(model, Subset(blocks, train_idx), Subset(blocks, val_idx) if val_idx else None, cfg, plan,
                     main_only(on_event, dist), dist=dist, memory=memory_hooks(cfg, model.config))


def _respond(model, template, prompt: str, max_new_tokens: int) -> str:
    from microft.generate import generate_text

    return template.clean(generate_text(model, prompt, max_new_tokens, temperature=0.0))


def respond_all(model, template, samples: list[dict], max_new_tokens: int = 64) -> list[str]:
    """Greedy responses for each sample's prompt (what --predict and the demo score use)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return [_respond(model, template, s["prompt"], max_new_tokens) for s in samples]


@owns_out
def run_finetune(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Instruction fine-tuning: data validated up front, prompt masking, optional LoRA, samples at eval."""
    from microft.instruct import load_instruct_data, write_predictions
    from microft.models.load import load_model
    from microft.tokenizer import encode
    from microft.train.loop import train
    from microft.train.step import resolve_device

    demo = cfg.data is None
    seed_init(cfg.seed)
    model = load_model(cfg.model or "gpt2-tiny", dropout=cfg.dropout)
    max_len = seq_len_for(cfg, model.config.n_positions)
    demo_sets = None
    if demo:
        from microft.demo import DEMO_HELDOUT_SIZE, DEMO_TRAIN_SIZE, demo_heldout, demo_records

        demo_sets = (demo_records(DEMO_TRAIN_SIZE, cfg.seed), demo_heldout(DEMO_HELDOUT_SIZE, cfg.seed))
    data = load_instruct_data(cfg, max_len, encode, demo_sets)
    for problem in data.problems:
        on_event({"kind": "note", "text": f"skipped bad record: {problem}"})
    st = data.stats["train"]
    stats_line = (f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples; "
                  f"{st.n_truncated} truncated, {st.n_dropped} dropped (response cut away), "
                  f"{data.n_skipped} bad records skipped")
    save_extra = None
    if cfg.lora:
        from microft.lora import apply_lora, write_adapter_files

        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)

        def save_extra(d):  # adapters beside the (unchanged) base weights
            write_adapter_files(d, model, cfg.model or "gpt2-tiny")

    from microft.train.distributed import distributed, main_only

    with distributed(cfg, model) as dist:
        device = dist.device or resolve_device(cfg.device)
        # under FSDP every forward must run on all ranks alike: no per-eval generation there
        talk = dist.is_main and not dist.fsdp
        sample_prompts = data.val[: cfg.samples_per_eval] if talk else []
        emit = main_only(on_event, dist)

        def on_eval(m, step: int) -> list[Event]:
            outs = respond_all(m, data.template, sample_prompts, 32)
            m.train()
            return [{"kind": "sample", "step": step, "prompt": s["prompt"][-60:], "output": o}
                    for s, o in zip(sample_prompts, outs, strict=True)]

        def accuracy(tag: str) -> float:
            from microft.demo import exact_match

            model.to(device)
            preds = respond_all(model, data.template, data.eval_samples, 32)
            acc = exact_match(preds, [s["response"] for s in data.eval_samples])
            emit({"kind": "note", "text": f"demo held-out exact match {tag}: {100 * acc:.1f}% "
                                          f"({len(data.eval_samples)} items)"})
            return acc

        banner = {"data_stats": stats_line}
        if demo:
            banner["demo"] = ("built-in demo: a randomly initialised gpt2-tiny learns small instruction tasks "
                              "with checkable answers (passive voice, upper-casing, arithmetic, reversal, sorting). "
                              "For real runs: --model DIR --data FILE, or a recipe (recipes/*.toml).")
        acc_before = accuracy("before training") if demo and talk and not cfg.resume else None
        plan = batch_plan(cfg, dist.world_size, model.config, emit)
        summary = train(model, data.train, data.val or None, cfg, plan, emit, dist=dist, save_extra=save_extra,
                        on_eval=on_eval if sample_prompts else None, banner_extra=banner,
                        memory=memory_hooks(cfg, model.config))
        if demo and talk:
            summary["demo_accuracy_before"] = acc_before
            summary["demo_accuracy_after"] = accuracy("after training")
        if cfg.predict and data.eval_samples and talk:
            preds = respond_all(model, data.template, data.eval_samples, 128)
            path = f"{cfg.out}/predictions.jsonl"
            write_predictions(path, [{"prompt": s["prompt"], "reference": s["response"], "prediction": p}
                                     for s, p in zip(data.eval_samples, preds, strict=True)])
            emit({"kind": "note", "text": f"wrote {len(preds)} predictions to {path}"})
            summary["predictions"] = path
    return summary


def load_any(spec: str, device: str = "cpu"):
    """A model for inference: preset, microft checkpoint, HF directory, or a LoRA adapter directory.

    A directory with adapter files loads its base (the weights beside it, or the adapter's
    `base_model_name_or_path`) and applies the adapter.
    """
    from pathlib import Path

    from microft.errors import CheckpointError
    from microft.lora import is_adapter_dir, load_adapter, read_adapter_config
    from microft.models.load import load_model
    from microft.weights import CONFIG

    if not is_adapter_dir(spec):
        return load_model(spec, device)
    if (Path(spec) / CONFIG).exists():
        base = spec
    else:
        base = read_adapter_config(spec).get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{spec}: adapter_config.json names no base model; pass the base with --model")
    return load_adapter(load_model(base, device), spec)
