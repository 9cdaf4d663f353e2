"""Training checkpoints: a model directory plus `train_state.pt`, written atomically.

`OUT/checkpoints/step-NNNNNNN/` holds the weights and config (load.py's format) and
`train_state.pt`: optimizer, scheduler, scaler, RNG states, counters, batch plan and config, so
a resumed run continues bit-exactly. `OUT/best/` and `OUT/final/` are plain model directories.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from microft.errors import CheckpointError, ConfigError
from microft.lora import write_adapter_files
from microft.models.load import write_model_files
from microft.quant import read_quant_record, write_quant_record
from microft.train.distributed import full_model_state, full_optim_state, load_optim_state, load_weights
from microft.weights import WEIGHTS, atomic_dir, read_safetensors

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


def find_latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_dir_for(resume: str | None, out: Path) -> Path | None:
    """The checkpoint `--resume` names (None: a fresh run); refuses to start over an existing run."""
    if resume:
        found = find_latest_checkpoint(out) if resume == "auto" else Path(resume)
        if found is None and resume != "auto":
            raise CheckpointError(f"no checkpoint at {resume}")
        return found
    if (out / "final").exists() or find_latest_checkpoint(out):  # on every rank, or the others would wait
        raise ConfigError(f"{out} already holds a run; continue it with --resume auto, or choose a new --out")
    return None


def save_checkpoint(run: Any, kind: str, rng: dict[str, Any] | None = None) -> Path:
    """Save `run` (a loop.Run) as a step checkpoint (`kind` "step"), or as `best` or `final` weights.

    Under FSDP every rank takes part in gathering the full state; only rank 0 writes.
    """
    model, dist, state, out = run.model, run.dist, run.state, run.out
    target = out / ("final" if kind == "final" else "best" if kind == "best" else f"checkpoints/step-{state.step:07d}")
    weights = full_model_state(model, dist)
    optim_state = full_optim_state(model, run.optimizer, dist) if kind == "step" else None
    if not dist.is_main:
        return target
    quantized = getattr(model, "quantization", None) is not None
    with atomic_dir(target) as tmp:
        if quantized:  # QLoRA: the frozen NF4 base is rebuilt from its record, never saved; the adapters are all
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
                "scaler": run.scaler.state_dict(), "rng": rng or capture_rng(), "state": state.__dict__,
                "model_config": model.config.model_dump(), "global_bs": run.plan.global_bs,
                "plan": run.plan.model_dump(), "config": run.cfg.model_dump(mode="json"),
                "adapter": adapter or None,
            })
    if kind == "step":
        prune_checkpoints(out, run.cfg.keep_last)
    run.on_event({"kind": "save", "what": kind, "path": str(target), "step": state.step})
    return target


def restore(run: Any, resume_dir: Path) -> dict[str, Any]:
    """Load `resume_dir` into `run`'s model, optimizer, scheduler, scaler and RNG; return its counters."""
    ts = load_train_state(resume_dir)
    model, plan = run.model, run.plan
    if ts["model_config"] != model.config.model_dump():
        raise CheckpointError(f"cannot resume from {resume_dir}: it was trained with another model shape")
    if ts["global_bs"] != plan.global_bs:
        raise CheckpointError(f"cannot resume from {resume_dir}: global batch was {ts['global_bs']}, now {plan.global_bs}")
    if getattr(model, "quantization", None) is None:
        load_weights(model, read_safetensors(resume_dir / WEIGHTS), run.dist, str(resume_dir))
    else:
        rec = read_quant_record(resume_dir) or {}
        if any(rec.get(k) != v for k, v in model.quantization.items()):
            raise CheckpointError(f"cannot resume from {resume_dir}: it was trained on another quantized base "
                                  f"({ {k: rec.get(k) for k in model.quantization} })")
    if ts.get("adapter") is not None:
        model.load_state_dict(ts["adapter"], strict=False)
    load_optim_state(model, run.optimizer, ts["optimizer"], run.dist)
    run.scheduler.load_state_dict(ts["scheduler"])
    run.scaler.load_state_dict(ts["scaler"])
    restore_rng(ts["rng"])
    return ts["state"]
