"""The types of the family registry: `Family` (one HF model_type) and `Gguf` (how llama.cpp runs it),
and the checks several families share. No torch, and no import of `models.config`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from microft.errors import ConfigError

LoraTable = dict[str, tuple[str, str]]  # target name -> (block submodule, linear)
LoraGroups = dict[str, tuple[str, ...]]  # group name -> targets


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp runs the family: what `export --format gguf` (export/gguf.py) writes for it."""

    arch: str  # llama.cpp's architecture name
    pre: str  # pre-tokenizer when the tokenizer's own is not one llama.cpp knows by structure
    rope_pairs: bool  # llama.cpp rotates adjacent pairs (not halves): q/k rows are permuted to match
    block: dict[str, str]  # microft block module (after `h.{i}.`) -> llama.cpp tensor (after `blk.{i}.`)
    # RoPE hyper-parameters (GQA, head size, RMSNorm eps, base, window); else LayerNorm's eps
    rotary: bool = True
    # llama.cpp block tensors holding several microft linears stacked by rows, in order (Phi-3's attn_qkv, and
    # its ffn_up = gate then up, which llama.cpp splits in halves)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the family's own hyper-parameters: ModelConfig -> {gguf.GGUFWriter method: value}; raises ConfigError
    # (one line) for a model llama.cpp's graph of the family cannot run as microft does
    hparams: Callable[[Any], dict[str, Any]] | None = None
    # (ModelConfig, microft parameter name, fp32 tensor) -> the tensor as llama.cpp's graph wants it
    transform: Callable[[Any, str, Any], Any] | None = None
    # llama.cpp strips the whitespace after special tokens (as a tokenizer whose added tokens rstrip does)
    # only when the file's general.name contains this (Phi-3's): written into the name where needed
    rstrip_name: str | None = None


@dataclass(frozen=True)
class Family:
    """One HF model_type: config.json in and out, tensor names, LoRA targets, presets."""

    model_type: str
    architecture: str  # HF config.json `architectures[0]`
    read_hf: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> ModelConfig fields
    write_hf: Callable[[dict[str, Any]], dict[str, Any]]  # ModelConfig fields -> config.json
    hf_key: Callable[[str], str]  # microft parameter/module path -> HF name
    lora_targets: LoraTable
    lora_groups: LoraGroups
    tiny: str  # the preset of a tiny CPU model of this family (tests, smoke runs)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    transposed: tuple[str, ...] = ()  # weights HF stores (in, out) (GPT-2's Conv1D), by name suffix
    peft_names: dict[str, str] | None = None  # LoRA target -> PEFT target_modules name, where they differ
    bare_keys: bool = False  # old uploads may lack the HF prefix (GPT-2's `h.0...`)
    gguf: Gguf | None = None  # None: no GGUF export for this family yet
    # HF tensors holding several microft linears stacked by rows (Phi-3's qkv_proj, gate_up_proj): fused block
    # module -> its parts in order, each (block module, the ModelConfig field giving its rows); split on load,
    # fused on export, LoRA adapters on the parts exported as one PEFT adapter on the fused module (lora.py)
    fused: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


def refuse_off(c: dict[str, Any], model_type: str, want: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """A one-line ConfigError naming the ModelConfig fields (`c`) off the values `want` that the family's
    config.json cannot express, and the `extra` ones already found off."""
    off = [k for k, v in want.items() if c[k] != v] + list(extra)
    if off:
        raise ConfigError(f"a {model_type} config.json cannot express this model's {', '.join(off)}")


def gguf_no_bias(c: Any) -> dict[str, Any]:
    """llama.cpp's olmo2 and gemma graphs add no attention or MLP biases."""
    if c.qkv_bias or c.attn_out_bias or c.mlp_bias:
        raise ConfigError(f"llama.cpp's {_gguf_arch(c)} adds no attention or MLP biases; this model has "
                          "them, so GGUF export is refused")
    return {}


def _gguf_arch(c: Any) -> str:
    return "gemma3" if c.model_type == "gemma3_text" else c.model_type
