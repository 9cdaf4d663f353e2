"""train(): the one training loop behind `pretrain` and `finetune`.

Vocabulary: a *step* is one optimizer step over the global batch; a *micro-step* is one
forward/backward over a micro-batch. Every micro-step's loss is the fp32 sum of its token
losses divided by the target count (or weight) of the whole global batch, so the gradient of a
step is the exact token mean over the global batch, whatever the micro-batch size.
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microft import checkpoint as ckpt
from microft.config import BatchPlan, RunConfig
from microft.data import Batch, StepFeed, collate, epoch_batches, micro_batches, sample_length, target_weight
from microft.distributed import (
    Dist,
    full_model_state,
    full_optim_state,
    grad_sync,
    load_optim_state,
    load_weights,
    rank0_float,
    reduce_step,
)
from microft.errors import CheckpointError, ConfigError, MicroftError, TrainingError
from microft.models.transformer import GPT, set_grad_checkpointing
from microft.optim import (
    autocast_context,
    build_optimizer,
    lr_lambda,
    make_scaler,
    resolve_precision,
    warmup_steps,
)
from microft.perf import device_peak_flops, flops_per_token, memory_stats

Event = dict[str, Any]
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt() parameters


class Interrupted(MicroftError):
    """SIGINT/SIGTERM: the run saved a checkpoint and stopped; exit 130 or 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    skipped_steps: int = 0
    elapsed: float = 0.0
    history: list[Event] = field(default_factory=list)  # eval records, for the verdict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda given but no CUDA GPU is available")
    return dev


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


def step_plan(step: int, n: int, lengths: list[int], plan: BatchPlan, seed: int, grouped: bool,
              rank: int = 0, cache: dict[int, list[list[int]]] | None = None) -> tuple[list[list[int]], list[int]]:
    """(this rank's micro-batches, all indices of the step) for optimizer step `step`.

    `cache` keeps the current epoch's batches, so the epoch is shuffled once, not every step.
    """
    spe = n // plan.global_bs
    epoch = step // spe
    cache = {} if cache is None else cache
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(n, plan.global_bs, seed, epoch, lengths if grouped else None)
    batches = cache[epoch]
    indices = batches[step % spe]
    mbs = micro_batches(indices, lengths, plan.micro_bs)
    return mbs[rank :: plan.world_size], indices


def micro_step(runner: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, denom: float,
               autocast: Callable, scaler: torch.amp.GradScaler, target_pos: torch.Tensor | None = None
               ) -> torch.Tensor:
    """One forward/backward; the loss is scaled by the global batch's target count. Returns the loss sum."""
    with autocast():
        loss_sum = runner(x, y, w, target_pos=target_pos)
    scaler.scale(loss_sum / max(denom, 1e-12)).backward()
    return loss_sum.detach()


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global grad norm of the trainable parameters, clipped to `max_norm` when given."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Step (skipped by the fp16 scaler on overflow), then free the gradients. Returns True if skipped."""
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale_before is not None and scaler.get_scale() < scale_before


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def find_latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verdict(history: list[Event], final_train_loss: float | None) -> str:
    """One line read from the learning curves."""
    evals = [h for h in history if "val_loss" in h]
    if len(evals) < 2:
        return "not enough evaluations for a verdict (set --eval-every)"
    best = min(evals, key=lambda h: h["val_loss"])
    last = evals[-1]
    if last["val_loss"] > best["val_loss"] * 1.02 and best is not last:
        return f"overfitting from step {best['step']} (val loss {best['val_loss']:.3f} → {last['val_loss']:.3f}; best weights kept)"
    first = evals[0]["val_loss"]
    tail = evals[-max(2, len(evals) // 4):]
    still_falling = tail[0]["val_loss"] - tail[-1]["val_loss"] > 0.02 * max(first - last["val_loss"], 1e-8) + 0.01
    if still_falling:
        return f"underfitting: val loss still falling at the end ({last['val_loss']:.3f}); train longer or raise lr"
    return f"well fit: val loss {first:.3f} → {last['val_loss']:.3f}, flat at the end"


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
    model: GPT,
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
) -> dict[str, Any]:
    """Train `model` on `train_set` with `plan`; write checkpoints under `cfg.out`; return the summary.

    `on_event` receives plain dicts (`kind`: banner, step, eval, sample, save, summary, note).
    `save_extra(dir)` adds files to every saved model directory (LoRA adapters);
    `on_eval(model, step)` returns extra events at each evaluation (generated samples).
    """
    dist = dist or Dist()
    out = Path(cfg.out)
    device = dist.device or resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # --- model, memory switches, optimizer, schedule ---------------------------------------
    if precision == "bf16-true":
        model.to(dtype=torch.bfloat16)
    model.to(device)
    n_ckpt = set_grad_checkpointing(model, cfg.grad_ckpt, cfg.grad_ckpt_every) if cfg.grad_ckpt else 0
    runner = dist.ddp or model  # what forward/backward go through
    if cfg.compile:
        runner = torch.compile(runner)
    optimizer = build_optimizer(model, cfg, device)
    lengths = [sample_length(train_set[i]) for i in range(len(train_set))]
    spe, total_steps = schedule_length(len(train_set), plan, cfg)
    warm = warmup_steps(cfg.warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, total_steps, warm, cfg.min_lr_ratio))
    scaler = make_scaler(precision, device)
    autocast = autocast_context(precision, device)
    state = TrainState()

    # --- resume ---------------------------------------------------------------------------
    resume_dir = None
    if cfg.resume:
        resume_dir = find_latest_checkpoint(out) if cfg.resume == "auto" else Path(cfg.resume)
        if resume_dir is None and cfg.resume != "auto":
            raise CheckpointError(f"no checkpoint at {cfg.resume}")
    elif (out / "final").exists() or find_latest_checkpoint(out):  # on every rank, or the others would wait
        raise ConfigError(f"{out} already holds a run; continue it with --resume auto, or choose a new --out")
    if resume_dir is not None:
        ts = ckpt.load_train_state(resume_dir)
        if ts["model_config"] != model.config.model_dump():
            raise CheckpointError(f"cannot resume from {resume_dir}: it was trained with another model shape")
        if ts["global_bs"] != plan.global_bs:
            raise CheckpointError(f"cannot resume from {resume_dir}: global batch was {ts['global_bs']}, now {plan.global_bs}")
        load_weights(model, ckpt.read_safetensors(resume_dir / ckpt.WEIGHTS), dist, str(resume_dir))
        if ts.get("adapter") is not None:
            model.load_state_dict(ts["adapter"], strict=False)
        load_optim_state(model, optimizer, ts["optimizer"], dist)
        scheduler.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        restore_rng(ts["rng"])
        state = TrainState(**ts["state"])

    estimate = memory_estimate(cfg, model, plan, precision)
    n_trainable = model.num_params(trainable_only=True)
    fpt = flops_per_token(model.config, max(lengths), n_trainable / max(1, model.num_params()))
    tokens_per_step = plan.global_bs * max(lengths)
    on_event({
        "kind": "banner", "model": model.config.name, "params_total": model.num_params(),
        "params_trainable": n_trainable, "device": str(device), "precision": precision,
        "grad_ckpt": f"{n_ckpt}/{model.config.n_layer} blocks" if n_ckpt else "off", "optimizer": cfg.optimizer,
        "lr": cfg.lr, "schedule": f"{cfg.schedule}, warmup {warm} steps, min lr ×{cfg.min_lr_ratio}",
        "effective_batch": plan.describe(), "tokens_per_step": tokens_per_step, "steps_per_epoch": spe,
        "total_steps": total_steps, "train_samples": len(train_set), "val_samples": len(val_set or []),
        "resumed_from": str(resume_dir) if resume_dir else None, "start_step": state.step, "out": str(out),
        "estimated_peak": estimate,
        **(banner_extra or {}),
    })

    # --- the loop -------------------------------------------------------------------------
    def save(kind: str, rng: dict[str, Any] | None = None) -> Path:
        target = out / ("final" if kind == "final" else "best" if kind == "best" else f"checkpoints/step-{state.step:07d}")
        weights = full_model_state(model, dist)  # collectives under FSDP: every rank takes part
        optim_state = full_optim_state(model, optimizer, dist) if kind == "step" else None
        if not dist.is_main:
            return target
        with ckpt.atomic_dir(target) as tmp:
            ckpt.write_model_files(tmp, model, {"step": state.step}, state=weights)
            if save_extra:
                save_extra(tmp)
            if kind == "step":
                adapter = {k: v for k, v in weights.items() if "lora_" in k}
                ckpt.save_train_state(tmp, {
                    "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng or capture_rng(), "state": state.__dict__,
                    "model_config": model.config.model_dump(), "global_bs": plan.global_bs,
                    "plan": plan.model_dump(), "config": cfg.model_dump(mode="json"),
                    "adapter": adapter or None,
                })
        if kind == "step":
            prune_checkpoints(out, cfg.keep_last)
        on_event({"kind": "save", "what": kind, "path": str(target), "step": state.step})
        return target

    def do_eval() -> None:
        if not val_set or cfg.eval_every <= 0:
            return
        val_loss = rank0_float(evaluate(runner, val_set, plan.micro_bs, cfg.eval_batches, device, autocast), dist)
        rec = {"kind": "eval", "step": state.step, "val_loss": val_loss}
        state.history.append({"step": state.step, "val_loss": val_loss})
        if val_loss < state.best_val:
            state.best_val, state.best_step, state.evals_since_best = val_loss, state.step, 0
            save("best")
        else:
            state.evals_since_best += 1
        write_metric(rec)
        on_event(rec)
        if on_eval:
            for e in on_eval(model, state.step):
                on_event(e)

    metrics_path = out / "metrics.jsonl"

    def write_metric(rec: Event) -> None:
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({k: v for k, v in rec.items() if k != "kind"}) + "\n")

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "plan": plan.model_dump(),
                                                  "precision": precision}, indent=2))
    flag, restore_signals = _signal_flag()
    if resume_dir is not None and dist.is_main and metrics_path.exists():  # drop records past the checkpoint
        kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= state.step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    model.train()
    if state.step == 0 and resume_dir is None:
        do_eval()
    t_start = time.perf_counter() - state.elapsed
    start_step = state.step
    epoch_cache: dict[int, list[list[int]]] = {}

    def build_step(step: int, plan: BatchPlan) -> tuple[list[Batch], list[int]]:
        """This rank's collated micro-batches of `step` (pinned for CUDA) and all the step's samples."""
        mbs, step_idx = step_plan(step, len(train_set), lengths, plan, cfg.seed, cfg.group_by_length,
                                  dist.rank, epoch_cache)
        batches = [collate([train_set[i] for i in mb]) for mb in mbs]
        return [b.pin() for b in batches] if device.type == "cuda" else batches, step_idx

    feed = StepFeed(build_step)  # the next step's batches are collated while this one computes
    last_loss = None
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            rng_at_step_start = capture_rng()  # an interrupted step is redone from here on resume
            batches, step_idx = feed.get(state.step, plan, last=state.step + 1 == total_steps)
            step_samples = [train_set[i] for i in step_idx]
            denom = target_weight(step_samples) / dist.world_size  # DDP averages over ranks
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            step_tokens = sum(lengths[i] for i in step_idx)
            phase = "forward"
            try:
                for m, b in enumerate(batches):
                    b = b.to(device)
                    with grad_sync(dist, m == len(batches) - 1):
                        phase = "forward/backward"
                        loss_sum += micro_step(runner, b.input_ids, b.labels, b.weights, denom, autocast, scaler,
                                               b.target_pos)
                    if flag and dist.world_size == 1:  # ranks finish the step together
                        break
                loss_sum, stop = reduce_step(loss_sum, bool(flag), dist)
                if stop:
                    flag.setdefault("sig", signal.SIGTERM)
                if flag:
                    optimizer.zero_grad(set_to_none=True)
                    path = save("step", rng=rng_at_step_start)
                    code = 130 if flag["sig"] == signal.SIGINT else 143
                    raise Interrupted(f"interrupted at step {state.step}; saved {path}. Resume with: "
                                      f"{resume_command(out)}", code)
                phase = "optimizer step"
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(model, cfg.max_grad_norm)
                loss = float(loss_sum) / (denom * dist.world_size)  # the one host sync of the step
                if not math.isfinite(loss) and not scaler.is_enabled():
                    raise TrainingError(
                        f"loss became {loss} at step {state.step + 1}; stopped. Last good checkpoint: "
                        f"{find_latest_checkpoint(out) or 'none'}. Try a lower --lr or --precision fp32")
                skipped = optimizer_step(optimizer, scaler)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if cfg.micro_bs == "auto" and plan.micro_bs > 1 and state.step == start_step:
                    plan = halve_micro_batch(plan)  # same samples per step, so the retry is exact
                    on_event({"kind": "note", "text": f"out of memory: retrying with {plan.describe()}"})
                    continue
                raise TrainingError(
                    f"out of memory in the {phase} of step {state.step + 1} with {plan.describe()}; "
                    f"{oom_advice(cfg, model, device)}") from None
            state.skipped_steps += skipped
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
            state.tokens += step_tokens
            dt = time.perf_counter() - t0
            last_loss = loss
            rec = {"kind": "step", "step": state.step, "total_steps": total_steps, "loss": loss, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens": state.tokens, "tokens_per_sec": step_tokens / dt,
                   "step_time": dt, "skipped": bool(skipped), "elapsed": time.perf_counter() - t_start,
                   **memory_stats(device)}
            state.elapsed = rec["elapsed"]
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                write_metric(rec)
            on_event(rec)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                do_eval()
                if cfg.patience is not None and state.evals_since_best > cfg.patience:
                    on_event({"kind": "note", "text": f"early stop at step {state.step}: no val improvement in "
                                                      f"{cfg.patience} evaluations"})
                    break
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                save("step")
    finally:
        feed.close()
        restore_signals()

    if cfg.eval_every and (not state.history or state.history[-1]["step"] != state.step):
        do_eval()
    save("step")
    final = save("final")
    elapsed = time.perf_counter() - t_start
    peak_flops, peak_src = device_peak_flops(device, precision)
    tps = state.tokens / max(elapsed, 1e-9)
    summary = {
        "traced_peak": traced_peak(cfg, model, plan, precision) if device.type == "cpu" else None,
        "kind": "summary", "steps": state.step, "time_s": elapsed, "tokens": state.tokens, "tokens_per_sec": tps,
        "final_loss": last_loss, "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "best_step": state.best_step if state.best_step >= 0 else None, "skipped_steps": state.skipped_steps,
        "mfu": tps * fpt / (peak_flops * dist.world_size), "peak_flops": peak_flops, "peak_flops_source": peak_src,
        "verdict": verdict(state.history, last_loss), "final_dir": str(final), **memory_stats(device),
    }
    if dist.is_main:
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "kind"}, indent=2))
        plot = plot_curves(metrics_path, out / "learning_curve.png")
        if plot:
            summary["plot"] = str(plot)
    on_event(summary)
    return summary


def resume_command(out: Path) -> str:
    """The command line that continues this run (this process's own arguments plus --resume auto)."""
    import shlex
    import sys

    argv = sys.argv[1:] if sys.argv and "microft" in sys.argv[0] else None
    if not argv:
        return f"microft <command> ... --out {out} --resume auto"
    if "--resume" in argv:
        return shlex.join(["microft", *argv])
    return shlex.join(["microft", *argv, "--resume", "auto"])


def memory_estimate(cfg: RunConfig, model: GPT, plan: BatchPlan, precision: str) -> str | None:
    """The estimator's one-line peak for the banner (None where it can't model the run)."""
    try:
        from microft.memory_plan import estimate_for_run

        return estimate_for_run(cfg, model.config, plan, precision)["summary"]
    except MicroftError:
        return None


def traced_peak(cfg: RunConfig, model: GPT, plan: BatchPlan, precision: str) -> int | None:
    """On CPU there is no allocator peak to read: trace the step on fake tensors instead."""
    try:
        from microft.memory_plan import estimate_for_run

        return estimate_for_run(cfg, model.config, plan, precision, engine="trace")["peak_bytes"]
    except MicroftError:
        return None


def halve_micro_batch(plan: BatchPlan) -> BatchPlan:
    micro = plan.micro_bs // 2
    while plan.micro_bs * plan.accum % micro:
        micro -= 1
    return BatchPlan(micro_bs=micro, accum=plan.micro_bs * plan.accum // micro, world_size=plan.world_size)


def oom_advice(cfg: RunConfig, model: GPT, device: torch.device) -> str:
    generic = ("try a smaller --micro-bs with a larger --accum, --grad-ckpt, --precision bf16-mixed, or --lora "
               "(see `microft estimate-mem`)")
    if device.type != "cuda":
        return generic
    try:
        from microft.memory_plan import plan_advice

        return plan_advice(cfg, model.config, torch.cuda.get_device_properties(device).total_memory)
    except MicroftError:
        return generic


def plot_curves(metrics_path: Path, png: Path) -> Path | None:
    """Train and val loss against step, when matplotlib (the `plot` extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (step loss)", alpha=0.8)
    if va:
        ax.plot(*zip(*va), "o-", label="val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
