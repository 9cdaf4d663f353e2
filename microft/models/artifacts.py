"""A model from what is on disk, as a run or an export finds it: the directory a `--model` spec names, an
NF4 base quantized while it loads, and any saved artifact (a checkpoint, an HF directory, a LoRA or QLoRA
run) ready for inference."""

from __future__ import annotations

from pathlib import Path


def model_dir(spec: str | None) -> Path | None:
    """The directory a --model spec names (a hub repo id: its cached snapshot); None for a preset."""
    from microft.models.config import PRESETS
    from microft.models.source import resolve_model_dir

    if spec is None or spec in PRESETS:
        return None
    p = resolve_model_dir(spec) or Path(spec).expanduser()
    if p.is_dir():
        return p
    return p.parent if p.exists() else None


def load_quantized(spec: str, scheme: str, double_quant: bool, dropout: float | None = None, dtype=None,
                   seed: int | None = None):
    """The base `spec` with its block linears in NF4, quantized layer by layer while loading.

    `quantization` on the model is the record a checkpoint keeps instead of base weights; a preset's random
    init is drawn after seeding with `seed` (so the record rebuilds the same base).
    """
    import torch

    from microft.models.load import load_model
    from microft.models.quant import nf4_meta_blocks_, quant_record

    if seed is not None:  # a preset's random init follows the seed
        torch.manual_seed(seed)
    model = load_model(spec, dropout=dropout, dtype=dtype or torch.float32,
                       prepare=lambda m: nf4_meta_blocks_(m, double_quant=double_quant))
    model.quantization = quant_record(scheme, double_quant, str(spec)) | {"seed": seed}
    return model


def load_any(spec: str, device: str = "cpu"):
    """A model for inference: preset, microft checkpoint, HF directory, or a LoRA adapter directory.

    A directory with adapter files loads its base (the weights beside it, or the adapter's
    `base_model_name_or_path`) and applies the adapter.
    """
    from microft.errors import CheckpointError
    from microft.models.load import load_model
    from microft.models.lora import is_adapter_dir, load_adapter, read_adapter_config
    from microft.weights import CONFIG

    if not is_adapter_dir(spec):
        return load_model(spec, device)
    from microft.models.quant import read_quant_record

    rec = read_quant_record(spec)
    if rec is not None:  # a QLoRA checkpoint: rebuild the NF4 base it records, then add the adapters
        model = load_quantized(rec["base_model"], rec["scheme"], bool(rec.get("double_quant")),
                               seed=rec.get("seed"))
        return load_adapter(model, spec).to(device)
    if (Path(spec) / CONFIG).exists():
        base = spec
    else:
        base = read_adapter_config(spec).get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{spec}: adapter_config.json names no base model; pass the base with "
                                  "--model")
    return load_adapter(load_model(base, device), spec)

