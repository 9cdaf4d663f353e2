"""Model directories: which model a spec names, and loading or saving one.

A spec is a preset name (random init), a microft model directory or an HF GPT-2 directory.
A microft model directory holds `model.safetensors` (microft key names, unpadded vocabulary)
and `config.json` (`{"format": "microft", "model": {...}}`); a training checkpoint adds
`train_state.pt` (see train/checkpoint.py). Directories are written atomically (weights.py).
This module dispatches between the formats: it imports hf.py, never the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from microft.config import PRESETS, ModelConfig
from microft.errors import CheckpointError
from microft.hf import load_hf_state
from microft.model import GPT
from microft.weights import CONFIG, WEIGHTS, atomic_dir, load_state_into, model_state_dict, read_safetensors


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
    p = Path(spec).expanduser()
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
    p = Path(spec).expanduser()
    d = p if p.is_dir() else p.parent
    raw = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    if raw.get("format") == "microft":
        state = read_safetensors(d / WEIGHTS)
    else:
        state = load_hf_state(d)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    load_state_into(model, state, source=str(d))  # zeroes the padded vocabulary rows too
    return model
