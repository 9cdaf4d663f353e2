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

from microft.errors import CheckpointError
from microft.models.load import (  # noqa: F401  (loading lives in microft.models.load; re-exported)
    CONFIG,
    WEIGHTS,
    load_model,
    load_state_into,
    model_state_dict,
    read_model_config,
)
from microft.models.transformer import GPT

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
