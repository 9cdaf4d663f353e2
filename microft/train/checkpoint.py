"""Training checkpoints: a model directory plus `train_state.pt`, written atomically.

`OUT/checkpoints/step-NNNNNNN/` holds the weights and config (load.py's format) and
`train_state.pt`: optimizer, scheduler, scaler, RNG states, counters, batch plan and config, so
a resumed run continues bit-exactly. `OUT/best/` and `OUT/final/` are plain model directories.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from microft.errors import CheckpointError, ConfigError, TrainingError, one_line
from microft.models.load import write_model_files
from microft.models.lora import ADAPTER_WEIGHTS, write_adapter_files
from microft.models.quant import QUANT_RECORD, read_quant_record, write_quant_record
from microft.resolved import POLICIES
from microft.train.distributed import full_model_state, full_optim_state, load_optim_state, load_weights
from microft.train.optim import schedule_multiplier
from microft.weights import CONFIG, WEIGHTS, atomic_dir, read_safetensors

TRAIN_STATE = "train_state.pt"


def save_train_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, directory / TRAIN_STATE)


def load_train_state(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / TRAIN_STATE
    if not p.exists():
        raise CheckpointError(f"{directory} is not a training checkpoint (no {TRAIN_STATE})")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a truncated file
        raise CheckpointError(f"corrupt train state {p}: {e}") from None


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


def complete(step_dir: Path) -> bool:
    """Whether a step directory holds a whole checkpoint (a killed prune can leave one without its files)."""
    has = lambda *names: all((step_dir / f).is_file() for f in names)  # noqa: E731
    # QLoRA checkpoints hold the adapters and the quantization record instead of the base weights
    return has(TRAIN_STATE) and (has(WEIGHTS, CONFIG) or has(QUANT_RECORD, ADAPTER_WEIGHTS))


def list_checkpoints(out: Path) -> list[Path]:
    """The complete step checkpoints under `out`, oldest first."""
    return [p for p in sorted((out / "checkpoints").glob("step-*")) if p.is_dir() and complete(p)]


def find_latest_checkpoint(out: Path) -> Path | None:
    steps = list_checkpoints(out)
    return steps[-1] if steps else None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; each is renamed out of the way first, then deleted,
    so a kill mid-way leaves a `.trash-*` directory (removed at the next start), never a torn checkpoint."""
    for old in list_checkpoints(out)[:-keep]:
        trash = old.parent / f".trash-{old.name}-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _write_failure(e: BaseException) -> bool:
    """An error from writing files: OSError, torch.save's RuntimeError from its stream writer, or
    safetensors' own error type wrapping an I/O error."""
    return isinstance(e, OSError) or any(
        s in str(e) for s in ("inline_container", "PytorchStreamWriter", "file write failed", "I/O error"))


def save_failed(e: BaseException, what: str, out: Path) -> TrainingError:
    """The one-line error for a save that failed: disk full (or another write error), and what survives."""
    last = find_latest_checkpoint(out)
    last_good = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "os error 28" in str(e)
    if not full and not isinstance(e, OSError):  # torch hides the errno: judge by the space left
        with contextlib.suppress(OSError):
            need = sum(f.stat().st_size for f in last.iterdir()) if last else 1 << 20
            full = shutil.disk_usage(out).free < need
    if full:
        return TrainingError(f"disk full while saving {what}; {last_good}. Free space on {out}'s disk and "
                             f"continue with --resume auto")
    return TrainingError(f"could not save {what}: {getattr(e, 'strerror', None) or one_line(e)}; {last_good}")


def resume_dir_for(resume: str | None, out: Path) -> Path | None:
    """The checkpoint `--resume` names (None: a fresh run); refuses to start over an existing run."""
    if resume:
        found = find_latest_checkpoint(out) if resume == "auto" else Path(resume)
        if found is None and resume != "auto":
            raise CheckpointError(f"no checkpoint at {resume}")
        kept = [n for n in ("final", "best") if (out / n).exists()]
        if found is None and kept:  # starting over would replace them
            raise ConfigError(f"{out} holds a run's {' and '.join(kept)} weights but no complete "
                              "checkpoint to resume from; choose a new --out, or move them away to "
                              "start over")
        return found
    if (out / "final").exists() or find_latest_checkpoint(out):  # on every rank, or the others would wait
        raise ConfigError(f"{out} already holds a run; continue it with --resume auto, or choose a new --out")
    return None


def save_checkpoint(run: Any, kind: str, rng: dict[str, Any] | None = None) -> Path:
    """Save `run` (a loop.Run) as a step checkpoint (`kind` "step"), or as `best` or `final` weights.

    Under FSDP every rank takes part in gathering the full state; only rank 0 writes.
    """
    model, dist, state, out = run.model, run.dist, run.state, run.out
    target = out / ("final" if kind == "final" else "best" if kind == "best"
                    else f"checkpoints/step-{state.step:07d}")
    weights = full_model_state(model, dist)
    optim_state = full_optim_state(model, run.optimizer, dist) if kind == "step" else None
    if not dist.is_main:
        return target
    quantized = getattr(model, "quantization", None) is not None
    try:
        with atomic_dir(target) as tmp:
            # QLoRA: the frozen NF4 base is rebuilt from its record, never saved: the adapters are all
            # there is to keep
            if quantized:
                write_quant_record(tmp, model, {"step": state.step})
                if not run.save_extra:
                    write_adapter_files(tmp, model, model.quantization["base_model"])
            else:
                write_model_files(tmp, model, {"step": state.step}, state=weights)
            if run.save_extra:
                run.save_extra(tmp)
            if kind == "step":
                adapter = {k: v for k, v in weights.items() if "lora_" in k}
                save_train_state(tmp, {
                    "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
                    "schedule": run.schedule,
                    "scaler": run.scaler.state_dict(), "rng": rng or capture_rng(), "state": state.__dict__,
                    "model_config": model.config.model_dump(), "global_bs": run.plan.global_bs,
                    "plan": run.plan.model_dump(), "config": run.cfg.model_dump(mode="json"),
                    "precision": run.precision,
                    "adapter": adapter or None,
                })
        if kind == "step":
            prune_checkpoints(out, run.cfg.keep_last)
    except Exception as e:
        if not _write_failure(e):
            raise
        what = f"step {state.step}" if kind == "step" else f"the {kind} weights at step {state.step}"
        raise save_failed(e, what, out) from None
    run.on_event({"kind": "save", "what": kind, "path": str(target), "step": state.step})
    return target


def _own_precision_state(name: str | None) -> bool:
    """Whether the policy named `name` keeps optimizer state of its own: bf16-true's fp32 master bits,
    fp16-mixed's loss scale (None or a word no policy has: a checkpoint that doesn't say)."""
    policy = POLICIES.get(str(name))
    return policy is not None and (policy.master_weights or policy.grad_scaler)


def restore(run: Any, resume_dir: Path) -> dict[str, Any]:
    """Load `resume_dir` into `run`'s model, optimizer, scheduler, scaler and RNG; return its counters."""
    ts = load_train_state(resume_dir)
    model, plan = run.model, run.plan
    if ts["model_config"] != model.config.model_dump():
        raise CheckpointError(f"cannot resume from {resume_dir}: it was trained with another model shape")
    if ts["global_bs"] != plan.global_bs:
        raise CheckpointError(f"cannot resume from {resume_dir}: global batch was {ts['global_bs']}, now "
                              f"{plan.global_bs}; pass --global-bs {ts['global_bs']} to continue it")
    # state that would not fit: another optimizer's, or bf16-true's master bits / fp16-mixed's loss scale
    # (fp32 and bf16-mixed share theirs; checkpoints older than the "precision" entry: not checked)
    then = {"optimizer": ts.get("config", {}).get("optimizer"), "precision": ts.get("precision")}
    for flag, now in (("optimizer", run.cfg.optimizer), ("precision", run.precision)):
        was = then[flag]
        own_state = flag == "optimizer" or _own_precision_state(was) or _own_precision_state(now)
        if was is not None and was != now and own_state:
            raise CheckpointError(f"cannot resume from {resume_dir}: it was trained with --{flag} {was}, "
                                  f"now {now}")
    if getattr(model, "quantization", None) is None:
        load_weights(model, read_safetensors(resume_dir / WEIGHTS), run.dist, str(resume_dir))
    else:
        rec = read_quant_record(resume_dir) or {}
        if any(rec.get(k) != v for k, v in model.quantization.items()):
            raise CheckpointError(f"cannot resume from {resume_dir}: it was trained on another "
                                  f"quantized base ({ {k: rec.get(k) for k in model.quantization} })")
    if ts.get("adapter") is not None:
        model.load_state_dict(ts["adapter"], strict=False)
    load_optim_state(model, run.optimizer, ts["optimizer"], run.dist)
    run.scheduler.load_state_dict(ts["scheduler"])
    if ts.get("schedule"):  # the lr follows the schedule the run started with, whatever --max-steps says now
        run.schedule = ts["schedule"]
        run.scheduler.lr_lambdas = [schedule_multiplier(run.schedule) for _ in run.optimizer.param_groups]
    else:  # an older microft's checkpoint: its schedule is not known, so say which one the lr follows now
        run.on_event({"kind": "note", "text": f"{resume_dir} does not record its lr schedule (an older "
                      f"microft wrote it): from step {ts['state']['step']} the lr follows "
                      f"{run.schedule['schedule']} over {run.schedule['total_steps']} steps, as for a run of "
                      "this length"})
    run.scaler.load_state_dict(ts["scaler"])
    restore_rng(ts["rng"])
    return ts["state"]
