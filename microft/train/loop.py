"""train(): the one training loop behind `pretrain` and `finetune`.

Vocabulary: a *step* is one optimizer step over the global batch; a *micro-step* is one
forward/backward over a micro-batch. Every micro-step's loss is the fp32 sum of its token
losses divided by the target count (or weight) of the whole global batch, so the gradient of a
step is the exact token mean over the global batch, whatever the micro-batch size.

The parts: `set_up` (device, precision, optimizer, schedule) and `checkpoint.restore`;
`optimizer_step_of` (one step: micro-steps, clip, optimizer step); `evaluate_now` (validation,
best weights, early-stopping count); `checkpoint.save_checkpoint`; `summarize`. The estimator's
answers (banner peak, traced peak, out-of-memory advice) come in as `MemoryHooks` from runs.py.
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microft.config import EVALS_PER_RUN, BatchPlan, RunConfig
from microft.data.batches import (
    Batch,
    StepFeed,
    collate,
    collate_packed,
    epoch_batches,
    micro_batches,
    packed_micro_batches,
    sample_length,
    target_weight,
)
from microft.errors import ConfigError, Interrupted, TrainingError
from microft.models.transformer import Transformer, set_grad_checkpointing
from microft.perf import device_peak_flops, flops_per_token, memory_stats
from microft.resolved import Device, PrecisionPolicy, ResolvedRun, resolve_run
from microft.train.checkpoint import (
    capture_rng,
    find_latest_checkpoint,
    restore,
    resume_dir_for,
    save_checkpoint,
    save_failed,
)
from microft.train.distributed import Dist, grad_sync, rank0_float, reduce_step
from microft.train.optim import (
    build_optimizer,
    describe_schedule,
    schedule_multiplier,
    schedule_note,
    warmup_steps,
)
from microft.train.sinks import SINKS, Fanout, SinkContext
from microft.train.step import (
    autocast_context,
    cpu_supports_bf16,
    finish_step,
    make_scaler,
    micro_step,
    place_model,
    resolve_device,
    supports_bf16,
)
from microft.train.trackers import open_trackers
from microft.train.verdict import verdict

Event = dict[str, Any]
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt() parameters
SKIP_STREAK = 3  # fp16: consecutive steps the scaler may skip on a non-finite loss before the run stops
SKIP_STREAK_FINITE = 16  # ... on overflowing gradients alone (by then the scale has fallen 2^16-fold)
OOM_ADVICE = ("try a smaller --micro-bs with a larger --accum, --grad-ckpt, --precision bf16-mixed, or "
              "--lora (see `microft estimate-mem`)")


@dataclass
class TrainState:
    """The counters a checkpoint saves and a resumed run continues from."""

    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    skipped_steps: int = 0
    elapsed: float = 0.0
    train_time: float = 0.0  # seconds inside optimizer steps (no evaluations, samples or saves)
    history: list[Event] = field(default_factory=list)  # eval records, for the verdict


@dataclass
class MemoryHooks:
    """The estimator's answers a run shows, handed in by runs.py so that the loop never imports it.

    Each returns None where the estimator cannot model the run.
    """

    # one line, for the banner
    banner_peak: Callable[[str, BatchPlan], str | None] = lambda precision, plan: None
    # bytes, CPU runs' summary
    traced_peak: Callable[[str, BatchPlan], int | None] = lambda precision, plan: None
    oom_advice: Callable[[int], str | None] = lambda device_bytes: None  # what fits a GPU of that size


@dataclass
class Run:
    """What the parts of one training run share; built by `set_up`."""

    model: Transformer
    runner: torch.nn.Module  # what forward/backward go through: the model, wrapped (DDP/FSDP) or compiled
    train_set: Sequence
    val_set: Sequence | None
    cfg: RunConfig
    plan: BatchPlan  # changes only when an out-of-memory retry halves an auto micro-batch
    dist: Dist
    device: torch.device
    resolved: ResolvedRun  # the run as resolved once (runs.py), or here for a direct call
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable
    lengths: list[int]  # tokens per training sample
    steps_per_epoch: int
    total_steps: int
    warmup: int
    n_ckpt: int  # checkpointed blocks
    on_event: Callable[[Event], None]
    schedule: dict[str, Any]  # the lr schedule the scheduler follows: this run's, or a resumed run's own
    save_extra: Callable[[Path], None] | None = None
    on_eval: Callable[[torch.nn.Module, int], list[Event]] | None = None
    state: TrainState = field(default_factory=TrainState)
    objective: Any = None  # preference tuning's (train.preference.PreferenceObjective); None: the LM loss

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def policy(self) -> PrecisionPolicy:
        return self.resolved.precision

    @property
    def precision(self) -> str:
        """The --precision word the run trains under (banner, run.json, checkpoints)."""
        return self.resolved.precision.name

    @property
    def eval_every(self) -> int:
        """Steps between evaluations: --eval-every, else about EVALS_PER_RUN a run (0: never)."""
        return eval_cadence(self.cfg.eval_every, self.total_steps)


def keep_freed_memory() -> bool:
    """Linux/glibc: serve large CPU tensors from the heap and keep freed memory for reuse.

    By default glibc maps every allocation over 32 MiB afresh and unmaps it on free, so each
    micro-step pays the kernel's page faults and zeroing again for its logits, gradients and
    casts (~10-15 % of a 124M CPU step). Process-wide; returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False


def eval_cadence(eval_every: int | None, total_steps: int) -> int:
    """`--eval-every` as given (0: never), or by default every total/EVALS_PER_RUN steps (at least 1)."""
    if eval_every is not None:
        return eval_every
    return max(1, math.ceil(total_steps / EVALS_PER_RUN))


def schedule_length(n_train: int, plan: BatchPlan, cfg: RunConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) from the data size, the global batch and max-steps/epochs."""
    spe = n_train // plan.global_bs
    if spe == 0:
        raise ConfigError(
            f"{n_train} training samples are fewer than one global batch of {plan.global_bs}; "
            f"lower --global-bs/--accum or add data"
        )
    if cfg.max_steps is not None:
        return spe, cfg.max_steps
    return spe, max(1, int(round((cfg.epochs if cfg.epochs is not None else 1.0) * spe)))


def step_batches(step: int, n: int, lengths: list[int], plan: BatchPlan, seed: int, grouped: bool,
              rank: int = 0, cache: dict[int, list[list[int]]] | None = None, pack_len: int | None = None,
              shuffle: bool = True) -> tuple[list, list[int]]:
    """(this rank's micro-batches, all indices of the step) for optimizer step `step`.

    `cache` keeps the current epoch's batches, so the epoch is shuffled once, not every step.
    With `pack_len` (--packing) a micro-batch is a list of rows, each row whole samples of
    at most `pack_len` tokens: the step's samples are the same, only arranged into rows.
    Without `shuffle` the steps take the samples in order (data.epoch_batches).
    """
    spe = n // plan.global_bs
    epoch = step // spe
    cache = {} if cache is None else cache
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(n, plan.global_bs, seed, epoch, lengths if grouped else None, shuffle)
    batches = cache[epoch]
    indices = batches[step % spe]
    if pack_len is not None:
        mbs = packed_micro_batches(indices, lengths, plan.micro_bs, pack_len, plan.world_size)
        return [m for m in mbs[rank :: plan.world_size] if m], indices
    mbs = micro_batches(indices, lengths, plan.micro_bs)
    return mbs[rank :: plan.world_size], indices


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: Sequence, micro_bs: int, max_batches: int, device: torch.device,
             autocast: Callable) -> float:
    """Token-mean loss over a fixed val subset: the first `max_batches` micro-batches, in order."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0.0
    n = min(len(val), micro_bs * max_batches)
    for s in range(0, n, micro_bs):
        samples = [val[i] for i in range(s, min(n, s + micro_bs))]
        b = collate(samples).to(device)
        with autocast():
            total += model(b.input_ids, b.labels, b.weights, target_pos=b.target_pos).double()
        count += target_weight(samples)
    model.train(was_training)
    return float(total) / max(count, 1.0)


def _signal_flag() -> tuple[dict[str, int], Callable[[], None]]:
    """Install SIGINT/SIGTERM handlers that only record the signal; return (flag, restore)."""
    flag: dict[str, int] = {}
    try:
        prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in prev:
            signal.signal(s, lambda num, _frame: flag.setdefault("sig", num))
    except ValueError:  # not the main thread: no handlers
        return flag, lambda: None
    return flag, lambda: [signal.signal(s, h) for s, h in prev.items()]


def train(
    model: Transformer,
    train_set: Sequence,
    val_set: Sequence | None,
    cfg: RunConfig,
    plan: BatchPlan,
    on_event: Callable[[Event], None] = lambda e: None,
    *,
    dist: Dist | None = None,
    save_extra: Callable[[Path], None] | None = None,
    on_eval: Callable[[torch.nn.Module, int], list[Event]] | None = None,
    banner_extra: dict[str, Any] | None = None,
    memory: MemoryHooks | None = None,
    objective: Any = None,
    resolved: ResolvedRun | None = None,
) -> dict[str, Any]:
    """Train `model` on `train_set` with `plan`; write checkpoints under `cfg.out`; return the summary.

    `on_event` receives plain dicts (`kind`: banner, step, eval, sample, save, summary, note).
    `save_extra(dir)` adds files to every saved model directory (LoRA adapters);
    `on_eval(model, step)` returns extra events at each evaluation (generated samples);
    `memory`: the estimator's answers for the banner, the summary and out-of-memory errors;
    `objective`: what the steps minimise when it is not the token-mean LM loss (preference pairs);
    `resolved`: the run as `runs.py` resolved it (device, precision policy, sequence length); a direct call
    resolves `cfg` here, on this process's device.
    """
    memory = memory or MemoryHooks()
    dist = dist or Dist()
    resolved = resolved or resolve_for_loop(cfg, model, dist)
    run = set_up(model, train_set, val_set, cfg, plan, dist, on_event, save_extra, on_eval, objective,
                 resolved)
    resume_dir = resume_dir_for(cfg.resume, run.out)
    if resume_dir is not None:
        asked = dict(run.schedule)
        run.state = TrainState(**restore(run, resume_dir))
        if note := schedule_note(asked, run.schedule, run.state.step, run.total_steps, run.out):
            on_event({"kind": "note", "text": note})
    start_outputs(run)
    resume_step = (run.state.step if resume_dir is not None else -1) if cfg.resume else None
    run.on_event = on_event = open_stream(run, on_event, resume_step)
    try:
        return _train(run, resume_dir, memory, banner_extra)
    finally:
        on_event.close()


def _train(run: Run, resume_dir: Path | None, memory: MemoryHooks, banner_extra: dict[str, Any] | None
           ) -> dict[str, Any]:
    """`train` once the run is set up and its event stream open."""
    cfg, model, on_event = run.cfg, run.model, run.on_event
    on_event(banner(run, resume_dir, memory.banner_peak(run.precision, run.plan), banner_extra))
    if note := emulated_precision_note(run.policy, run.device):
        on_event({"kind": "note", "text": note})
    flag, restore_signals = _signal_flag()
    model.train()
    state = run.state
    if state.step == 0 and resume_dir is None:
        evaluate_now(run)
    t_start = time.perf_counter() - state.elapsed
    start_step = state.step
    feed = StepFeed(batch_builder(run))  # the next step's batches are collated while this one computes
    last_loss = None
    streak: list[Event] = []  # the steps the fp16 scaler skipped in a row
    try:
        while state.step < run.total_steps:
            rec = optimizer_step_of(run, feed, flag, retry_oom=state.step == start_step, memory=memory)
            if rec is None:  # out of memory with --micro-bs auto: retry the step with half the micro-batch
                continue
            last_loss = rec["loss"]
            streak = [*streak, rec] if rec["skipped"] else []
            check_skips(run, streak)
            rec["elapsed"] = state.elapsed = time.perf_counter() - t_start
            on_event(rec)
            if _due(run.eval_every, state.step, run.total_steps):
                evaluate_now(run)
                if cfg.patience is not None and state.evals_since_best > cfg.patience:
                    on_event({"kind": "note", "text": f"early stop at step {state.step}: no val improvement "
                                                      f"in {cfg.patience} evaluations"})
                    break
            if _due(cfg.save_every, state.step, run.total_steps):
                save_checkpoint(run, "step")
    finally:
        feed.close()
        restore_signals()

    if run.eval_every and (not state.history or state.history[-1]["step"] != state.step):
        evaluate_now(run)
    save_checkpoint(run, "step")
    final = save_checkpoint(run, "final")
    elapsed = time.perf_counter() - t_start
    traced = memory.traced_peak(run.precision, run.plan) if run.device.type == "cpu" else None
    summary = summarize(run, elapsed, last_loss, final, traced)
    on_event(summary)
    return summary


def _due(every: int, step: int, total_steps: int) -> bool:
    """Whether a cadence of `every` steps (0: never) falls on `step`; the last step has its own."""
    return bool(every) and step % every == 0 and step < total_steps


def resolve_for_loop(cfg: RunConfig, model: Transformer, dist: Dist) -> ResolvedRun:
    """`cfg` resolved on this process's device, for a `train` call that brings no resolved run."""
    device = dist.device or resolve_device(cfg.device)
    return resolve_run(cfg, model.config, Device(device.type, str(device), supports_bf16(device)),
                       world_size=dist.world_size)


def set_up(model: Transformer, train_set: Sequence, val_set: Sequence | None, cfg: RunConfig, plan: BatchPlan,
           dist: Dist, on_event: Callable[[Event], None], save_extra: Callable[[Path], None] | None,
           on_eval: Callable[[torch.nn.Module, int], list[Event]] | None, objective: Any,
           resolved: ResolvedRun) -> Run:
    """Seed, place and wrap the model; build the optimizer, the schedule and the precision policy. An
    `objective` binds its runner here, before a resume loads trained weights (its reference is the start)."""
    device = dist.device or torch.device(resolved.device.name or resolved.device.kind)
    precision = resolved.precision
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    place_model(model, precision, device)
    n_ckpt = set_grad_checkpointing(model, cfg.grad_ckpt, cfg.grad_ckpt_every) if cfg.grad_ckpt else 0
    runner = dist.wrapped or model
    if cfg.compile:
        runner = torch.compile(runner)
    optimizer = build_optimizer(model, cfg, device, precision)
    lengths = [sample_length(train_set[i]) for i in range(len(train_set))]
    spe, total_steps = schedule_length(len(train_set), plan, cfg)
    warm = warmup_steps(cfg.warmup, total_steps)
    schedule = {"schedule": cfg.schedule, "total_steps": total_steps, "warmup": warm,
                "min_ratio": cfg.min_lr_ratio, "lr": cfg.lr}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_multiplier(schedule))
    autocast = autocast_context(precision, device)
    if objective is not None:
        runner = objective.bind(model, train_set, val_set, plan.micro_bs, device, autocast)
    return Run(model=model, runner=runner, train_set=train_set, val_set=val_set, cfg=cfg, plan=plan,
               dist=dist, device=device, resolved=resolved, optimizer=optimizer, scheduler=scheduler,
               schedule=schedule,
               scaler=make_scaler(precision, device), autocast=autocast, lengths=lengths,
               steps_per_epoch=spe, total_steps=total_steps, warmup=warm, n_ckpt=n_ckpt, on_event=on_event,
               save_extra=save_extra, on_eval=on_eval, objective=objective)


def emulated_precision_note(policy: PrecisionPolicy, device: torch.device) -> str | None:
    """One line when a half-precision run was asked for on a CPU that emulates it (no AVX-512 BF16 / AMX):
    what microft does about it (bf16: fp32 products, models.linear) and what `auto` would pick."""
    if device.type != "cpu" or not policy.low_precision or cpu_supports_bf16():
        return None
    precision = policy.name
    if policy.compute_dtype == "bfloat16":
        return (f"--precision {precision} on a CPU without native bf16 matmuls (no AVX-512 BF16 or AMX): "
                "torch's emulated bf16 kernels are 5-85x slower than fp32, so microft multiplies the bf16 "
                "values in fp32 and rounds to bf16 (bf16's memory, about fp32's speed); --precision auto "
                "picks fp32 here")
    return (f"--precision {precision} on a CPU without native fp16 matmuls (no AVX-512 FP16 or AMX): they "
            "are emulated, often 20-100x slower than fp32; --precision auto picks fp32 here")


def banner(run: Run, resume_dir: Path | None, estimated_peak: str | None, extra: dict[str, Any] | None
           ) -> Event:
    """The opening event: model, device, precision, batch plan, schedule, and the estimated peak."""
    model, cfg, plan = run.model, run.cfg, run.plan
    return {
        "kind": "banner", "model": model.config.name, "params_total": model.num_params(),
        "params_trainable": model.num_params(trainable_only=True), "device": str(run.device),
        "precision": run.precision,
        "grad_ckpt": f"{run.n_ckpt}/{model.config.n_layer} blocks" if run.n_ckpt else "off",
        "optimizer": cfg.optimizer,
        "lr": run.schedule["lr"], "schedule": describe_schedule(run.schedule),
        "effective_batch": plan.describe(), "tokens_per_step": plan.global_bs * max(run.lengths),
        "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
        "train_samples": len(run.train_set),
        "val_samples": len(run.val_set or []), "resumed_from": str(resume_dir) if resume_dir else None,
        "start_step": run.state.step, "out": str(run.out), "estimated_peak": estimated_peak,
        **(extra or {}),
    }


def open_stream(run: Run, on_event: Callable[[Event], None], resume_step: int | None) -> Fanout:
    """The run's event stream: `SINKS` and the `--report-to` trackers (on the main process), then `on_event`
    (the console)."""
    if not run.dist.is_main:
        return Fanout([], on_event)
    ctx = SinkContext(out=run.out, log_every=run.cfg.log_every,
                      title=f"{run.out.name}: {run.model.config.name}, {run.plan.describe()}",
                      resume_step=resume_step, note=lambda text: on_event({"kind": "note", "text": text}),
                      failed=lambda e, what: save_failed(e, what, run.out),
                      config={"config": run.cfg.model_dump(mode="json"), "plan": run.plan.model_dump(),
                              "precision": run.precision})
    # the trackers after the files: metrics.jsonl is written first, and the summary carries the plot's path
    return Fanout([make(ctx) for make in SINKS.values()] + open_trackers(ctx, run.cfg.report_to), on_event)


def start_outputs(run: Run) -> None:
    """Create the output directory and record the resolved config (rank 0)."""
    if run.dist.is_main:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
            record = {"config": run.cfg.model_dump(mode="json"), "plan": run.plan.model_dump(),
                      "precision": run.precision}
            (run.out / "run.json").write_text(json.dumps(record, indent=2))
        except OSError as e:
            raise save_failed(e, "run.json", run.out) from None


def batch_builder(run: Run) -> Callable[[int, BatchPlan], tuple[list[Batch], list[int]]]:
    """`build(step, plan)`: this rank's collated micro-batches of `step` (pinned for CUDA) and all its
    samples."""
    epoch_cache: dict[int, list[list[int]]] = {}
    cfg, train_set = run.cfg, run.train_set
    pack_len = run.resolved.seq_len if cfg.packing else None
    make_batch = run.objective.collate if run.objective is not None else collate

    def build(step: int, plan: BatchPlan) -> tuple[list[Batch], list[int]]:
        mbs, step_idx = step_batches(step, len(train_set), run.lengths, plan, cfg.seed, cfg.group_by_length,
                                  run.dist.rank, epoch_cache, pack_len, cfg.shuffle)
        if pack_len is not None:
            batches = [collate_packed([[train_set[i] for i in row] for row in mb]) for mb in mbs]
        else:
            batches = [make_batch([train_set[i] for i in mb]) for mb in mbs]
        return [b.pin() for b in batches] if run.device.type == "cuda" else batches, step_idx

    return build


def optimizer_step_of(run: Run, feed: StepFeed, flag: dict[str, int], retry_oom: bool,
                      memory: MemoryHooks) -> Event | None:
    """One optimizer step: the micro-steps of the global batch, clip, step, schedule. Returns the step record.

    A signal saves a checkpoint of the step's start and raises Interrupted; a non-finite loss raises
    TrainingError. Out of memory on the first step with `--micro-bs auto` halves the micro-batch and
    returns None (the caller retries the step); otherwise it raises TrainingError with advice.
    """
    state, dist, cfg = run.state, run.dist, run.cfg
    t0 = time.perf_counter()
    rng_at_step_start = capture_rng()  # an interrupted step is redone from here on resume
    batches, step_idx = feed.get(state.step, run.plan, last=state.step + 1 == run.total_steps)
    weigh = run.objective.weight if run.objective is not None else target_weight
    denom = weigh([run.train_set[i] for i in step_idx]) / dist.world_size  # DDP averages over ranks
    step_tokens = sum(run.lengths[i] for i in step_idx)
    loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)
    phase = "forward"
    try:
        for m, b in enumerate(batches):
            b = b.to(run.device)
            with grad_sync(dist, m == len(batches) - 1):
                phase = "forward/backward"
                loss_sum += micro_step(run.runner, b.input_ids, b.labels, b.weights, denom, run.autocast,
                                       run.scaler, b.target_pos, b.position_ids)
            if flag and dist.world_size == 1:  # ranks finish the step together
                break
        loss_sum, stop = reduce_step(loss_sum, bool(flag), dist)
        if stop:
            flag.setdefault("sig", signal.SIGTERM)
        if flag and state.step == 0:  # nothing trained yet: nothing worth saving
            raise Interrupted("interrupted before step 1; nothing was saved",
                              130 if flag["sig"] == signal.SIGINT else 143)
        if flag:
            run.optimizer.zero_grad(set_to_none=True)
            path = save_checkpoint(run, "step", rng=rng_at_step_start)
            raise Interrupted(f"interrupted at step {state.step}; saved {path}. Resume with: "
                              f"{resume_command(run.out)}", 130 if flag["sig"] == signal.SIGINT else 143)
        phase = "optimizer step"
        losses: list[float] = []  # read once the clip is queued: the one host sync of the step
        grad_norm, skipped = finish_step(
            run.model, run.optimizer, run.scaler, cfg.max_grad_norm,
            before_step=lambda: losses.append(checked_loss(run, loss_sum, denom * dist.world_size)))
        loss = losses[0]
    except torch.OutOfMemoryError:
        run.optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.micro_bs == "auto" and run.plan.micro_bs > 1 and retry_oom:
            run.plan = halve_micro_batch(run.plan)  # same samples per step, so the retry is exact
            run.on_event({"kind": "note", "text": f"out of memory: retrying with {run.plan.describe()}"})
            return None
        raise TrainingError(f"out of memory in the {phase} of step {state.step + 1} with "
                            f"{run.plan.describe()}; {oom_advice(run, memory)}") from None
    state.skipped_steps += skipped
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    state.step += 1
    state.tokens += step_tokens
    dt = time.perf_counter() - t0
    state.train_time += dt
    return {"kind": "step", "step": state.step, "total_steps": run.total_steps, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": state.tokens, "tokens_per_sec": step_tokens / dt,
            "step_time": dt, "skipped": bool(skipped), "elapsed": 0.0, **memory_stats(run.device),
            **(run.objective.step_metrics() if run.objective is not None else {})}


def checked_loss(run: Run, loss_sum: torch.Tensor, denom: float) -> float:
    """The step's mean loss; a non-finite one stops the run before its update (the fp16 scaler skips
    those)."""
    loss = float(loss_sum) / denom
    if not math.isfinite(loss) and not run.scaler.is_enabled():
        raise TrainingError(
            f"loss became {loss} at step {run.state.step + 1}; stopped. Last good checkpoint: "
            f"{find_latest_checkpoint(run.out) or 'none'}. Try a lower --lr or --precision fp32")
    return loss


def oom_advice(run: Run, memory: MemoryHooks) -> str:
    """What to change after an out-of-memory error: the planner's pick for this GPU, else the generic list."""
    if run.device.type != "cuda":
        return OOM_ADVICE
    return memory.oom_advice(torch.cuda.get_device_properties(run.device).total_memory) or OOM_ADVICE


def evaluate_now(run: Run) -> None:
    """Validate, keep the best weights, count evaluations without improvement, emit the samples."""
    cfg, state = run.cfg, run.state
    if not run.val_set or run.eval_every <= 0:
        return
    extra: dict[str, float] = {}
    if run.objective is not None:  # preference pairs: the mean pair loss and the rewards on held-out pairs
        val_loss, extra = run.objective.evaluate(run.val_set, run.plan.micro_bs, cfg.eval_batches, run.device,
                                                 run.autocast)
    else:
        val_loss = rank0_float(evaluate(run.runner, run.val_set, run.plan.micro_bs, cfg.eval_batches,
                                        run.device, run.autocast), run.dist)
    rec = {"kind": "eval", "step": state.step, "val_loss": val_loss, **extra}
    state.history.append({"step": state.step, "val_loss": val_loss})
    if val_loss < state.best_val:
        state.best_val, state.best_step, state.evals_since_best = val_loss, state.step, 0
        save_checkpoint(run, "best")
    else:
        state.evals_since_best += 1
    run.on_event(rec)
    if run.on_eval:
        for e in run.on_eval(run.model, state.step):
            run.on_event(e)


def check_skips(run: Run, streak: list[Event]) -> None:
    """Stop a run whose fp16 loss scaler keeps skipping steps: it would only write a broken model."""
    if not streak:
        return
    finite = all(math.isfinite(r["loss"]) for r in streak)
    if len(streak) < (SKIP_STREAK_FINITE if finite else SKIP_STREAK):
        return
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else float("nan")
    raise TrainingError(
        f"the fp16 loss scaler skipped {len(streak)} steps in a row (steps "
        f"{streak[0]['step']}-{streak[-1]['step']}; loss {streak[-1]['loss']:.4g}, scale {scale:.3g}); "
        f"stopped at step {streak[-1]['step']}. Last good checkpoint: "
        f"{find_latest_checkpoint(run.out) or 'none'}. Try a lower --lr or --precision bf16-mixed/fp32")


def summarize(run: Run, elapsed: float, last_loss: float | None, final: Path, traced_peak: int | None
              ) -> Event:
    """The closing event: time, throughput, MFU, losses, the verdict; written to OUT/summary.json."""
    state, model = run.state, run.model
    n_trainable = model.num_params(trainable_only=True)
    fpt = flops_per_token(model.config, max(run.lengths), n_trainable / max(1, model.num_params()))
    tps = state.tokens / max(elapsed, 1e-9)
    train_tps = state.tokens / max(state.train_time, 1e-9)
    # the run's own rate while training bounds the device's peak from below: a cached probe under it is
    # re-probed
    observed = train_tps * fpt / run.dist.world_size if state.train_time > 0 else 0.0
    peak_flops, peak_src = device_peak_flops(run.device, run.precision, observed)
    summary = {
        "traced_peak": traced_peak,
        "kind": "summary", "steps": state.step, "time_s": elapsed, "tokens": state.tokens,
        "tokens_per_sec": tps,
        "train_tokens_per_sec": train_tps,
        "final_loss": last_loss, "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "best_step": state.best_step if state.best_step >= 0 else None, "skipped_steps": state.skipped_steps,
        "mfu": tps * fpt / (peak_flops * run.dist.world_size), "peak_flops": peak_flops,
        "peak_flops_source": peak_src,
        "verdict": verdict(state.history, model.config.vocab_size if run.objective is None
                           else run.objective.chance_vocab), "final_dir": str(final),
        **memory_stats(run.device),
    }
    return summary  # summary.json and the plot: sinks.SummaryFiles


def resume_command(out: Path) -> str:
    """The command line that continues this run (this process's own arguments plus --resume auto)."""
    import shlex

    argv = sys.argv[1:] if sys.argv and "microft" in sys.argv[0] else None
    if not argv:
        return f"microft <command> ... --out {out} --resume auto"
    if not any(a == "--out" or a.startswith("--out=") for a in argv):  # a default --out (the demo's is dated)
        argv = [*argv, "--out", str(out)]
    if "--resume" in argv:
        return shlex.join(["microft", *argv])
    return shlex.join(["microft", *argv, "--resume", "auto"])


def halve_micro_batch(plan: BatchPlan) -> BatchPlan:
    micro = plan.micro_bs // 2
    while plan.micro_bs * plan.accum % micro:
        micro -= 1
    return BatchPlan(micro_bs=micro, accum=plan.micro_bs * plan.accum // micro, world_size=plan.world_size)


