"""Checkpoints: atomic directories of safetensors weights, a JSON config and the train state.

A microft model directory holds `model.safetensors` (microft key names, unpadded vocabulary)
and `config.json` (`{"format": "microft", "model": {...}}`). A training checkpoint adds
`train_state.pt` (optimizer, scheduler, scaler, RNG states, counters, batch plan, config).
Every directory is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint where a loader would look.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from microft.config import PRESETS, ModelConfig
from microft.download import resolve_model_dir
from microft.errors import CheckpointError
from microft.model import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename.

    An existing `final` is moved aside first and deleted only after the new one is in place.
    On error the temporary directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_state_dict(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights in microft naming with the vocabulary unpadded, contiguous, on CPU.

    `state`: the model's full state dict when gathered elsewhere (FSDP shards, see distributed.py).
    """
    vocab = model.config.vocab_size
    out = {}
    for k, v in (model.state_dict() if state is None else state).items():
        if "lora_" in k:
            continue
        k = k.replace(".base.", ".")  # LoRA-wrapped linears keep their base weights under .base
        if k == "wte.weight":
            v = v[:vocab]
        out[k] = v.detach().to("cpu").contiguous()
    return out


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy unpadded microft-named weights into `model`, checking names and shapes."""
    params = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"{source} does not match the model: {what.strip()}")
    with torch.no_grad():
        for k, dst in params.items():
            src = state[k]
            if k == "wte.weight":
                if src.shape[1] != dst.shape[1] or src.shape[0] > dst.shape[0]:
                    raise CheckpointError(f"{source}: {k} has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
                dst[: src.shape[0]].copy_(src)
                dst[src.shape[0] :].zero_()
            elif src.shape != dst.shape:
                raise CheckpointError(f"{source}: {k} has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
            else:
                dst.copy_(src)


def save_model(directory: str | Path, model: GPT, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` atomically into `directory`."""
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model, extra)
    return Path(directory)


def write_model_files(directory: Path, model: GPT, extra: dict[str, Any] | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the weights (`state`: a gathered full state dict) and config into an existing directory."""
    save_file(model_state_dict(model, state), str(directory / WEIGHTS), metadata={"format": "microft"})
    cfg = {"format": "microft", "model": model.config.model_dump(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(cfg, indent=2))


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a preset name, a microft checkpoint or an HF GPT-2 directory/config.json."""
    spec = str(path)
    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    p = resolve_model_dir(spec) or Path(spec).expanduser()  # a hub repo id: its cached snapshot
    if p.is_dir():
        p = p / CONFIG
    if not p.exists():
        raise CheckpointError(f"model not found: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None
    if raw.get("format") == "microft":
        try:
            return ModelConfig(**raw["model"])
        except Exception as e:
            raise CheckpointError(f"{p}: invalid microft config: {e}") from None
    return ModelConfig.from_hf(raw, name=Path(spec).name)


def load_model(spec: str | Path, device: str | torch.device = "cpu", dropout: float | None = None) -> GPT:
    """Build a model from a preset (random init), a microft checkpoint, or an HF GPT-2 directory."""
    cfg = read_model_config(spec)
    if dropout is not None:
        cfg = cfg.model_copy(update={"dropout": dropout})
    if str(spec) in PRESETS:
        return GPT(cfg).to(device)
    p = resolve_model_dir(str(spec)) or Path(spec).expanduser()
    d = p if p.is_dir() else p.parent
    raw = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    if raw.get("format") == "microft":
        state = read_safetensors(d / WEIGHTS)
    else:
        from microft.hf import load_hf_state  # HF layouts, Conv1D transposes

        state = load_hf_state(d)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    load_state_into(model, state, source=str(d))
    if model.config.padded_vocab_size > model.config.vocab_size:
        with torch.no_grad():
            model.wte.weight[model.config.vocab_size :].zero_()
    return model


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"weights file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {path}: {e}") from None


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
