"""`export --format hf`: a transformers directory (config.json, safetensors shards, the tokenizer's files)."""

from __future__ import annotations

from microft.export import Exported, ExportJob


def write(job: ExportJob) -> Exported:
    """Load (LoRA merged), write the weights and config with `models.hf.export_hf`, copy the tokenizer
    files."""
    from microft.lora import lora_modules, merge_lora
    from microft.models.hf import export_hf

    net = job.load()
    if lora_modules(net):
        merge_lora(net)
    with job.writing():
        path = export_hf(net, job.out, overwrite=job.force)
        missing = job.tokenizer_files(path, net.config)
    return Exported(path, f"(transformers, model_type {net.config.model_type})", no_tokenizer=missing)
