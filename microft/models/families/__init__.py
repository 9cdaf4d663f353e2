"""The model families microft drives: one `Family` entry each, with everything about it side by side.

An entry holds the HF `model_type` and architecture name, how its `config.json` maps to `ModelConfig`
fields and back (refusing what the family's config cannot express), how microft's parameter names map to
the family's HF tensor names (and which are stored transposed), its LoRA target names (and PEFT's names
for them), its presets (the hub checkpoints' shapes, random init; one tiny CPU model for tests), and how
llama.cpp runs it (`Gguf`: architecture, pre-tokenizer, tensor names, the q/k row order, fused tensors, its
own hyper-parameters and checks, a tensor transform).

The types are in `base.py`; each family (or group sharing one reader and writer) is a module here: `gpt2`,
`llama` (Llama, Mistral, Qwen2, Qwen3, and the layout the next four build on), `phi3`, `smollm3`, `olmo2`,
`granite`, `gemma` (Gemma 2 and Gemma 3 text). Adding a family is one module with its entry, named in
`MODULES` below (plus the switches the transformer needs, in `ModelConfig`); the tests that parametrise over
`FAMILIES` pick it up.

No torch, and no import of `models.config` (which reads this registry): entries turn dicts into dicts.
"""

from __future__ import annotations

from microft.errors import ConfigError
from microft.models.families import gemma, gpt2, granite, llama, olmo2, phi3, smollm3
from microft.models.families.base import Family, Gguf
from microft.models.families.gpt2 import EOT_TOKEN, GPT2_LORA, GPT2_VOCAB_SIZE

__all__ = ["EOT_TOKEN", "FAMILIES", "GPT2_LORA", "GPT2_VOCAB_SIZE", "Family", "Gguf", "family"]

MODULES = (gpt2, llama, phi3, smollm3, olmo2, granite, gemma)  # in the order the supported list names them

FAMILIES: dict[str, Family] = {f.model_type: f for m in MODULES for f in m.ENTRIES}


def family(model_type: str) -> Family:
    """The registry entry of `model_type` (a ConfigError naming the supported ones if there is none)."""
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
