"""Export to Hugging Face transformers (atomic directory); reading lives in `microft.models.hf`."""

from __future__ import annotations

from pathlib import Path

from microft.checkpoint import atomic_dir
from microft.errors import CheckpointError
from microft.models.hf import (  # noqa: F401  (re-exported)
    MAX_SHARD_BYTES,
    SAFETENSORS,
    hf_state_dict,
    load_hf_state,
    write_hf,
)
from microft.models.transformer import Transformer


def export_hf(model: Transformer, out_dir: str | Path, overwrite: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `config.json` + weights that transformers' `from_pretrained` loads as the same model.

    Shards with an index above `max_shard_bytes`. LoRA adapters must be merged first. Refuses to
    replace a non-empty `out_dir` unless `overwrite` (the CLI's `--force`); written atomically.
    """
    out_dir = Path(out_dir)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise CheckpointError("the model has unmerged LoRA adapters; merge them before exporting")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} is not empty; pass --force to overwrite it")
    model.config.to_hf()  # a ConfigError before anything is written
    with atomic_dir(out_dir) as tmp:
        write_hf(tmp, model, max_shard_bytes)
    return out_dir
