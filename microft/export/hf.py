"""`export --format hf`: a transformers directory (config.json, safetensors shards, the tokenizer's files)."""

from __future__ import annotations

from microft.export import Exported, ExportJob


def write(job: ExportJob) -> Exported:
    """Load (LoRA merged), write the weights and config with `models.hf.export_hf`, copy the tokenizer
    files."""
    from microft.data.tokenizer_files import write_tokenizer_files
    from microft.models.artifacts import load_any
    from microft.models.hf import export_hf
    from microft.models.lora import merge_lora

    net = merge_lora(load_any(job.model))  # adapters folded in, an NF4 base dequantized
    with job.writing():
        path = export_hf(net, job.out, overwrite=job.force)
        missing = write_tokenizer_files(job.model, path, net.config)
    return Exported(path, f"(transformers, model_type {net.config.model_type})", no_tokenizer=missing)
