"""Weight files: atomic directories, safetensors reads, and microft's state-dict naming.

The leaf under every format: `load.py` (microft and HF model directories), `hf.py` (HF key
layouts), `lora.py` (adapters) and `train/checkpoint.py` (training state) write through
`atomic_dir` and read through `read_safetensors`. Imports no other microft module but errors, and torch
only when reading tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microft.errors import CheckpointError, one_line

if TYPE_CHECKING:
    import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        mode = 0o666 & ~_umask()  # safetensors writes 0600: give the files the user's usual permissions
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, mode)
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


def read_safetensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or corrupt file is a one-line CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"{what} file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt {what} file {path}: {one_line(e)}") from None


def read_json(path: Path, what: str | None = None) -> dict[str, Any]:
    """A JSON object from `path`; unreadable, malformed or not an object is a one-line CheckpointError."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: {what or path.name} must be a JSON object, "
                              f"not a {type(raw).__name__}")
    return raw
