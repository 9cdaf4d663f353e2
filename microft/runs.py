"""Run assembly: turn a resolved RunConfig into a model, datasets and a batch plan, then train.

The CLI calls these; tests call them too, with `list.append` as the event sink.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from microft.config import NEEDS_REFERENCE, BatchPlan, RunConfig
from microft.data.tokenizer_files import tokenizer_for, write_tokenizer_files
from microft.errors import ConfigError
from microft.models.artifacts import load_quantized, model_dir
from microft.resolved import Device, ResolvedRun, plan_batch, resolve_run

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


def local_device(cfg: RunConfig) -> Device:
    """The device `--device` names on this machine (auto: Apple silicon's GPU, else CUDA, else the CPU), what
    it supports, and the memory a run may use there: the GPU's total memory, Apple silicon's share of unified
    memory, or the memory available on this machine."""
    import os

    import torch

    from microft.train.step import resolve_device, supports_bf16

    device = resolve_device(cfg.device)
    bf16 = supports_bf16(device)
    if device.type == "mps":
        from microft.perf import mps_memory_budget

        n, how = mps_memory_budget()
        where = f"the Apple GPU's share of unified memory ({how}, {n / 2**30:.1f} GiB)"
        return Device("mps", str(device), bf16, n, where)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
        return Device("cuda", str(device), bf16, props.total_memory, where, props.major >= 9)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES, Windows no sysconf
        return Device(device.type, str(device), bf16)  # memory not known: the default batch at micro-batch 1
    where = f"this machine's free memory ({avail / 2**30:.1f} GiB)"
    return Device(device.type, str(device), bf16, avail, where)


def model_shape(cfg: RunConfig) -> Any:
    """The ModelConfig of the run's model (`--dropout` applied), read from its config.json or preset before
    any weight is (no torch); a LoRA adapter directory is refused first, in the words of what to do
    instead."""
    from microft.memory.estimate import load_shape
    from microft.models.lora import is_adapter_dir

    if cfg.model and is_adapter_dir(cfg.model):  # load_model would read the base beside them and drop them
        raise ConfigError(f"{cfg.model} holds LoRA adapters: fold them into a model first (microft merge "
                          f"--model {cfg.model} --out DIR) and train from DIR, or continue that run with "
                          "--resume")
    return load_shape(cfg.model or "gpt2-tiny", cfg.dropout)


def resolve_here(cfg: RunConfig, method: str = "sft") -> tuple[ResolvedRun, Any]:
    """The run `cfg` asks for on this machine's device, and its model's shape: what a training run resolves
    before it loads anything (`resolved.resolve_run`)."""
    shape = model_shape(cfg)
    return resolve_run(cfg, shape, local_device(cfg), method), shape


def model_files(run: ResolvedRun) -> str | None:
    """The directory the run's model comes from (a hub repo id: its cached snapshot), looked up once for what
    reads its files (the tokenizer, every save's tokenizer files, the LoRA note); None: a preset (random
    init) or the demo's own model."""
    d = None if run.model == "demo" else model_dir(run.model)
    return None if d is None else str(d)


def memory_planner(cfg: RunConfig, shape: Any, device: Device, world_size: int, n_train: int | None,
                   method: str = "sft") -> BatchPlan:
    """`--micro-bs auto`'s planner (memory.plan.auto_batch_plan) on the device's memory, for the step of
    `method` (sft, or dpo: a micro-batch of pairs)."""
    from microft.memory.estimate import Budget, with_dropout
    from microft.memory.plan import auto_batch_plan

    budget = Budget(device.memory_bytes or 0, device.memory_label, device.bf16, device.hopper)
    return auto_batch_plan(cfg, with_dropout(shape, cfg.dropout), budget, world_size, n_train, method)


def planner_for(method: str):
    """The memory planner of a method's steps (`--micro-bs auto` and the default batch's split): the
    estimator models both steps (sft and dpo)."""
    from functools import partial

    return partial(memory_planner, method=method)


def plan_run(run: ResolvedRun, cfg: RunConfig, shape: Any, lengths: list[int], world_size: int = 1,
             on_event: Callable[[Event], None] | None = None) -> ResolvedRun:
    """`run` with its batch plan (`resolved.plan_batch`, with the method's planner) for training samples of
    `lengths` tokens (a preference pair: its longer side); its notes emitted."""
    planned = plan_batch(run, cfg, shape, len(lengths), planner_for(run.method), world_size,
                         max(lengths, default=None))
    for note in planned.notes[len(run.notes):] if on_event else ():
        on_event({"kind": "note", "text": note})
    return planned


DEFAULT_BATCH_BANNER = " (default, given no batch flag; --global-bs, --micro-bs, --accum set it)"


def memory_hooks(cfg: RunConfig, model_cfg: Any, method: str = "sft"):
    """The estimator's answers for the loop (banner peak, CPU traced peak, OOM advice), as callbacks, for the
    step of `method` (sft, or dpo: the preference step)."""
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

    def run_estimate(precision: str, plan: Any, engine: str = "analytical") -> dict:
        return estimate_for_run(cfg, model_cfg, plan, precision, engine=engine, method=method)

    return MemoryHooks(
        banner_peak=quietly(lambda precision, plan: run_estimate(precision, plan)["summary"]),
        traced_peak=quietly(lambda precision, plan: run_estimate(precision, plan, "trace")["peak_bytes"]),
        oom_advice=quietly(lambda device_bytes: plan_advice(cfg, model_cfg, device_bytes, method)),
    )


def seed_init(seed: int) -> None:
    """Seed before the model is built, so a preset's random init follows --seed."""
    import torch

    torch.manual_seed(seed)


@owns_out
def run_pretrain(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Language-model training on raw text packed into blocks."""
    from microft.data.batches import Subset, pack_documents, read_text_corpus, split_indices
    from microft.train.distributed import distributed, main_only
    from microft.train.loop import train

    refuse_records(cfg.data)
    docs = read_text_corpus(cfg.data)  # data errors come before the model is loaded
    run, shape = resolve_here(cfg)
    seed_init(cfg.seed)  # the same init on every rank
    model = load_base(cfg, run)
    source = model_files(run) or run.tokenizer
    tok = tokenizer_for(source, model.config)
    if tok.eos_id is None:
        raise ConfigError(f"{tok.name}: the tokenizer has no EOS token to separate documents with")
    blocks = pack_documents(docs, lambda doc: tok.prefix + tok.encode(doc), run.seq_len, eos_id=tok.eos_id)
    train_idx, val_idx = split_indices(len(blocks), cfg.val_frac, cfg.seed)
    with distributed(cfg, model) as dist:  # under torchrun: process group, DDP/FSDP wrap; else a no-op
        emit = main_only(on_event, dist)
        run = plan_run(run, cfg, shape, [run.seq_len] * len(train_idx), dist.world_size, emit)
        val = Subset(blocks, val_idx) if val_idx else None
        return train(model, Subset(blocks, train_idx), val, cfg, run.plan, emit, dist=dist,
                     memory=memory_hooks(cfg, model.config), resolved=run,
                     save_extra=lambda d: write_tokenizer_files(source, d, model.config),
                     banner_extra=batch_banner(run))


def refuse_records(path: str | None) -> None:
    """Pretraining on a file of instruction or chat records would train on their JSON (or CSV) syntax,
    prompts and all: refused in one line that names `finetune`, which reads them."""
    from microft.data.instruct import record_kind

    found = record_kind(path) if path else None
    if found:
        n, kind = found
        raise ConfigError(f"{path} holds {n} {kind} records, and pretrain would train on their raw text "
                          f"(keys, quotes and all); fine-tune on them with `microft finetune --data {path}` "
                          "(--no-mask-prompt trains on the prompts too)")


def batch_banner(run: ResolvedRun) -> dict[str, Any]:
    """The banner's batch line says when the batch is microft's default rather than the user's."""
    return {"effective_batch": run.plan.describe() + DEFAULT_BATCH_BANNER} if run.default_batch else {}


def _respond(model, template, tok, prompt: str, max_new_tokens: int) -> str:
    from microft.data.instruct import encode_prompt
    from microft.generate import generate, stream_text

    ids = generate(model, encode_prompt(template, tok, prompt), max_new_tokens, temperature=0.0,
                   stop_ids=tok.eos_ids)
    return template.clean("".join(stream_text(ids, tok)))


def respond_all(model, template, samples: list[dict], max_new_tokens: int = 64, tok=None) -> list[str]:
    """Greedy responses for each sample's prompt (what --predict and the demo score use), encoded as
    training encoded them and stopped at any of the tokenizer's EOS ids (`tok` None: GPT-2's)."""
    import torch

    from microft.data.tokenizer import gpt2_tokenizer

    tok = tok or gpt2_tokenizer()
    model.eval()
    with torch.inference_mode():
        return [_respond(model, template, tok, s["prompt"], max_new_tokens) for s in samples]


def finetune_lengths(cfg: RunConfig, max_len: int) -> list[int]:
    """Tokens per training sample of `cfg.data`, built as `run_finetune` builds them (template, cut at
    `max_len`, split): what `estimate-mem --data` measures. Micro-batches are padded to their longest
    sample."""
    from microft.data.batches import sample_length
    from microft.data.instruct import load_instruct_data
    from microft.data.tokenizer import encode

    return [sample_length(s) for s in load_instruct_data(cfg, max_len, encode).train]


def pair_lengths(cfg: RunConfig, max_len: int, model_cfg: Any) -> list[int]:
    """Each training pair's longer side in tokens (`pair_sides`), the pairs of `cfg.data` built as `run_dpo`
    builds them (template, cut at `max_len`), with the model's tokenizer where it has one (else GPT-2's):
    what `estimate-mem --method dpo --data` measures."""
    from microft.data.preference import load_pairs, read_pairs

    try:
        tok = tokenizer_for(cfg.model or "gpt2-tiny", model_cfg)
    except ConfigError:  # a preset of another family has no tokenizer: GPT-2's, as finetune_lengths counts
        from microft.data.tokenizer import gpt2_tokenizer

        tok = gpt2_tokenizer()
    data = load_pairs(cfg, max_len, tok, (read_pairs(cfg.data, cfg.skip_bad), None))
    return pair_sides(data.train)


def pair_sides(pairs: list) -> list[int]:
    """Each training pair's longer side in tokens: the row a micro-batch of pairs is padded to."""
    return [max(len(s["chosen_ids"]), len(s["rejected_ids"])) for s in pairs]


def finetune_records(cfg: RunConfig, on_event: Callable[[Event], None]):
    """The run's records, validated and split (the demo's own with no --data); notes where other column
    names were read as ours."""
    from microft.data.instruct import read_instruct_records

    demo_sets = None
    if cfg.data is None:
        from microft.data.demo import DEMO_HELDOUT_SIZE, DEMO_TRAIN_SIZE, demo_heldout, demo_records

        demo_sets = (demo_records(DEMO_TRAIN_SIZE, cfg.seed), demo_heldout(DEMO_HELDOUT_SIZE, cfg.seed))
    records = read_instruct_records(cfg, demo_sets)
    for note in records.notes:
        on_event({"kind": "note", "text": note})
    return records


def add_lora(cfg: RunConfig, model, on_event: Callable[[Event], None], pretrained: bool) -> None:
    """LoRA adapters on `model`, with a note when its base is a random init (a preset or the demo's model).
    `pretrained`: whether the base was read from files (the run's `model_files`)."""
    from microft.models.lora import apply_lora

    if not pretrained:
        what = cfg.model or model.config.name
        on_event({"kind": "note", "text": f"LoRA on {what}, a randomly initialised model: the frozen base "
                  "knows nothing, so the adapters learn little; LoRA adapts a pretrained model (microft "
                  "download gpt2, then --model openai-community/gpt2)"})
    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


@owns_out
def run_finetune(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Instruction fine-tuning: data validated up front, prompt masking, optional LoRA, samples at eval."""
    import torch

    from microft.data.batches import sample_length
    from microft.data.instruct import load_instruct_data
    from microft.train.loop import train

    demo = cfg.data is None
    records = finetune_records(cfg, on_event)  # data errors come before the model is loaded
    demo_own_model = demo and cfg.model is None
    if demo_own_model:  # the demo's own small model and tokenizer (demo.DEMO_MODEL)
        device = local_device(cfg)
        seed_init(cfg.seed)
        model, tok = demo_model(cfg, device)
        shape = model.config
        run = resolve_run(cfg, shape, device, model="demo")
        files = None
    else:  # with --data but no --model: gpt2-tiny (the demo's tokenizer only knows the demo's words)
        run, shape = resolve_here(cfg)
        seed_init(cfg.seed)
        model = load_base(cfg, run)
        files = model_files(run)
        tok = tokenizer_for(files or run.tokenizer, model.config)
    if note := longrope_note(model.config, run.seq_len):
        on_event({"kind": "note", "text": note})
    data = load_instruct_data(cfg, run.seq_len, tok, records=records)
    for problem in data.problems:
        on_event({"kind": "note", "text": f"skipped bad record: {problem}"})
    if cfg.lora:
        add_lora(cfg, model, on_event, files is not None)
    save_extra = saved_files(cfg, model, demo_own_model, files)

    from microft.train.distributed import distributed, main_only

    with distributed(cfg, model) as dist:
        device = dist.device or torch.device(run.device.name)
        # under FSDP every forward must run on all ranks alike: no per-eval generation there
        talk = dist.is_main and not dist.fsdp
        sample_prompts = data.val[: cfg.samples_per_eval] if talk else []
        emit = main_only(on_event, dist)

        def on_eval(m, step: int) -> list[Event]:
            outs = respond_all(m, data.template, sample_prompts, 32, tok)
            m.train()
            return [{"kind": "sample", "step": step, "prompt": s["prompt"], "output": o}
                    for s, o in zip(sample_prompts, outs, strict=True)]

        def accuracy(tag: str) -> tuple[float, list[str]]:
            from microft.data.demo import exact_match

            model.to(device)
            preds = respond_all(model, data.template, data.eval_samples, 32, tok)
            acc = exact_match(preds, [s["response"] for s in data.eval_samples])
            emit({"kind": "note", "text": f"demo held-out exact match {tag}: {100 * acc:.1f}% "
                                          f"({len(data.eval_samples)} items)"})
            return acc, preds

        banner = {"data_stats": data_stats_line(data)}
        if demo:
            banner["demo"] = demo_banner(cfg, model, tok, demo_own_model, device)
        acc_before = accuracy("before training")[0] if demo and talk and not cfg.resume else None
        run = plan_run(run, cfg, shape, [sample_length(s) for s in data.train], dist.world_size, emit)
        banner.update(batch_banner(run))
        summary = train(model, data.train, data.val or None, cfg, run.plan, emit, dist=dist,
                        save_extra=save_extra, on_eval=on_eval if sample_prompts else None,
                        banner_extra=banner,
                        memory=memory_hooks(cfg, model.config), resolved=run)
        if demo and talk:
            summary["demo_accuracy_before"] = acc_before
            summary["demo_accuracy_after"], demo_preds = accuracy("after training")
        if cfg.predict and data.eval_samples and talk:
            summary["predictions"] = predict(cfg, model, data, tok, emit)
        if demo and talk:  # what to do next comes last
            summary["next_steps"] = demo_next_steps(cfg, data, records.parts.val, demo_preds,
                                                    summary["final_dir"])
            for line in summary["next_steps"]:
                emit({"kind": "note", "text": line})
    return summary


def refuse_for_dpo(cfg: RunConfig) -> None:
    """What `dpo` does not do (yet), each refused in one line before anything is read."""
    if cfg.data is None:
        raise ConfigError("dpo needs --data: preference pairs ({prompt|instruction, chosen, rejected} "
                          "records)")
    refused = {"packing": "--packing (a pair's two sides are scored row by row)",
               "compile": "--compile", "predict": "--predict", "columns": "--columns"}
    for name, what in refused.items():
        if getattr(cfg, name):
            raise ConfigError(f"dpo does not support {what}; leave it out (or out of the recipe)")
    if cfg.devices > 1 or cfg.shard != "none":
        raise ConfigError("dpo runs on one device: --devices/--shard are not supported for preference tuning "
                          "yet")
    if cfg.precompute_ref and cfg.loss not in NEEDS_REFERENCE:
        raise ConfigError(f"--precompute-ref: --loss {cfg.loss} has no reference policy to precompute")


def pair_data(cfg: RunConfig, max_len: int, tok: Any, read: tuple, on_event: Callable[[Event], None]):
    """The run's pair samples (`preference.load_pairs`), each skipped bad pair noted."""
    from microft.data.preference import load_pairs

    data = load_pairs(cfg, max_len, tok, read)
    for problem in data.problems:
        on_event({"kind": "note", "text": f"skipped bad pair: {problem}"})
    return data


@owns_out
def run_dpo(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Preference tuning on chosen/rejected pairs (DPO, IPO, SimPO, ORPO): finetune's model, LoRA/QLoRA,
    batch plan, precision and checkpoints, with `train.preference`'s objective in place of the LM loss."""
    from microft.data.preference import read_pairs
    from microft.train.loop import train
    from microft.train.preference import PreferenceLoss, PreferenceObjective

    refuse_for_dpo(cfg)
    read = (read_pairs(cfg.data, cfg.skip_bad),  # data errors come before the model is loaded
            read_pairs(cfg.val_data, cfg.skip_bad) if cfg.val_data else None)
    run, shape = resolve_here(cfg, "dpo")
    seed_init(cfg.seed)
    model = load_base(cfg, run)
    files = model_files(run)
    tok = tokenizer_for(files or run.tokenizer, model.config)
    data = pair_data(cfg, run.seq_len, tok, read, on_event)
    if cfg.lora:
        add_lora(cfg, model, on_event, files is not None)
    loss = PreferenceLoss(cfg.loss, cfg.beta, cfg.gamma, cfg.orpo_lambda)
    objective = PreferenceObjective(loss, cfg.lora, cfg.precompute_ref)
    run = plan_run(run, cfg, shape, pair_sides(data.train), 1, on_event)
    reference = ("none" if not loss.needs_reference else "precomputed log-probs" if cfg.precompute_ref
                 else "the base (LoRA adapters off)" if cfg.lora else "a frozen copy of the starting model")
    banner = {"data_stats": f"{len(data.train)} train / {len(data.val)} val pairs; {data.n_skipped} bad "
                            "pairs skipped", "preference": f"{describe_loss(loss)}; reference: {reference}",
              **batch_banner(run)}
    return train(model, data.train, data.val or None, cfg, run.plan, on_event,
                 save_extra=saved_files(cfg, model, False, files), banner_extra=banner,
                 memory=memory_hooks(cfg, model.config, "dpo"), objective=objective, resolved=run)


def describe_loss(loss: Any) -> str:
    """The banner's words for the loss and its constants."""
    consts = {"dpo": f"beta {loss.beta}", "ipo": f"beta {loss.beta}",
              "simpo": f"beta {loss.beta}, gamma {loss.gamma}", "orpo": f"lambda {loss.lam}"}
    return f"{loss.kind} ({consts[loss.kind]})"


def longrope_note(model_cfg: Any, max_len: int) -> str | None:
    """LongRoPE (Phi-3.5, Phi-4-mini) picks its long factors per forward, so past the original context the
    split of a global batch changes the result: say so when the run's length reaches there."""
    longrope = model_cfg.longrope
    if longrope is None or max_len <= longrope.original_max_position_embeddings:
        return None
    orig = longrope.original_max_position_embeddings
    return (f"LongRoPE: a micro-batch padded past {orig} positions takes the long RoPE factors for all its "
            f"samples (as transformers does), so there the split of the global batch changes the result; "
            f"--max-seq-len {orig} keeps it exact")


def data_stats_line(data: Any) -> str:
    """The banner's line on the data: samples per split, truncated and dropped, bad records skipped."""
    truncated, dropped = (sum(getattr(st, k) for st in data.stats.values())
                          for k in ("n_truncated", "n_dropped"))
    return (f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples; "
            f"{truncated} truncated, {dropped} dropped (response cut away; all splits), "
            f"{data.n_skipped} bad records skipped")


def demo_banner(cfg: RunConfig, model: Any, tok: Any, own_model: bool, device: Any) -> str:
    """The banner's line on the demo: which model learns what, and how it is scored."""
    what = (f"a randomly initialised {model.num_params() / 1e6:.2f}M-parameter GPT with its own "
            f"{tok.vocab_size}-token tokenizer" if own_model else cfg.model)
    if own_model and device.type == "cpu":
        import torch

        what += f" ({torch.get_num_threads()} torch thread(s); OMP_NUM_THREADS=N sets them)"
    return (f"built-in demo: {what} learns six small instruction tasks with checkable answers "
            "(count words, largest number, reverse words, sort numbers, passive voice, "
            "upper-casing); held-out exact match is scored before and after training")


def saved_files(cfg: RunConfig, model: Any, demo_own_model: bool, files: str | None = None
                ) -> Callable[[Path], None]:
    """What every saved model directory gets beside the weights: the tokenizer files (from `files`, the base's
    directory as the run looked it up, else its preset), and the LoRA adapters beside the (unchanged) base
    weights."""
    def save_extra(d: Path) -> None:
        if demo_own_model:
            from microft.data.demo import write_demo_tokenizer

            write_demo_tokenizer(d)
        else:
            write_tokenizer_files(files or cfg.model or "gpt2-tiny", d, model.config)
        if cfg.lora:
            from microft.models.lora import write_adapter_files

            write_adapter_files(d, model, None if demo_own_model else cfg.model or "gpt2-tiny")
    return save_extra


def predict(cfg: RunConfig, model: Any, data: Any, tok: Any, emit: Callable[[Event], None]) -> str:
    """`--predict`: responses to the held-out samples in OUT/predictions.jsonl; returns its path."""
    from microft.data.instruct import write_predictions

    preds = respond_all(model, data.template, data.eval_samples, 128, tok)
    path = f"{cfg.out}/predictions.jsonl"
    write_predictions(path, [{"prompt": s["prompt"], "reference": s["response"], "prediction": p}
                             for s, p in zip(data.eval_samples, preds, strict=True)])
    emit({"kind": "note", "text": f"wrote {len(preds)} predictions to {path}"})
    return path


def demo_next_steps(cfg: RunConfig, data: Any, heldout: list, predictions: list[str], final_dir: str
                    ) -> list[str]:
    """The demo's closing lines: a `generate` command for a held-out item the model answered right (in the
    template it trained with), how many it got right, and where to go next."""
    from microft.data.demo import next_steps, pick_example
    from microft.data.templates import Template

    used = (cfg.template if cfg.template not in (None, "auto")  # as given (a file's path too)
            else data.template.name if isinstance(data.template, Template) else "chat")
    by_source = {r.source: r for r in heldout}
    example, n_right = pick_example([by_source[s["source"]] for s in data.eval_samples], predictions)
    return next_steps(final_dir, used, example, n_right, len(predictions))


def one_thread_demo(device: Device) -> None:
    """The demo's model trains on one torch thread on a CPU unless OMP_NUM_THREADS says otherwise: its
    matrices are too small to gain from a second thread, and on a shared 2-core machine two spinning
    OpenMP threads ran it several times slower (bench/demo_sweep.py, README: the demo)."""
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ and device.kind == "cpu":
        torch.set_num_threads(1)


def demo_model(cfg: RunConfig, device: Device):
    """The demo's model (random init from the current seed) and its tokenizer: what finetune trains
    when given no --model. `--quantize` needs a pretrained base to quantize, so it is refused here."""
    from microft.data.demo import demo_model_config, demo_tokenizer
    from microft.models.transformer import Transformer

    if cfg.quantize:
        raise ConfigError("--quantize needs --model (a pretrained base to quantize); the demo's model is "
                          "trained from random init")
    one_thread_demo(device)
    tok = demo_tokenizer()
    mcfg = demo_model_config(tok.vocab_size)
    if cfg.dropout is not None:
        mcfg = mcfg.model_copy(update={"dropout": cfg.dropout})
    return Transformer(mcfg), tok


def load_base(cfg: RunConfig, run: ResolvedRun):
    """A run's model, read in its precision policy's weight dtype (bf16 for bf16-true: never an fp32 copy of a
    bf16 model on the way): with `--quantize` its NF4 base, else the plain model. `run`: `cfg` as resolved."""
    import torch

    from microft.models.load import load_model

    dtype = getattr(torch, run.precision.param_dtype)
    if not cfg.quantize:
        return load_model(run.model, dropout=cfg.dropout, dtype=dtype)
    return load_quantized(run.model, cfg.quantize, cfg.double_quant, cfg.dropout, dtype, cfg.seed)


