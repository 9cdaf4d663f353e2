"""Phi-3 / Phi-4-mini: the Llama layout with partial rotary, LongRoPE and a sliding window, q/k/v and
gate/up fused in HF's tensors (and in llama.cpp's)."""

from __future__ import annotations

import math
from typing import Any

import microft.models.families.llama as llama
from microft.models.families.base import Family, Gguf, LoraGroups
from microft.models.families.llama import NEW_TINY, llama_preset, llama_write, switches_read

GGUF_PHI3_BLOCK = {k: v for k, v in llama.GGUF_LLAMA_BLOCK.items() if k not in (
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
GGUF_PHI3_FUSED = {"attn_qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                   "ffn_up": ("mlp.gate_proj", "mlp.up_proj")}


def _longrope(hf: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE as transformers reads it: the original context from the top-level key (Phi3Config's
    default 4096), `factor` from the context ratio where absent, the attention factor from `factor`."""
    orig = int(hf.get("original_max_position_embeddings", 4096))
    factor = scaling.get("factor")
    if factor is None:
        factor = int(hf.get("max_position_embeddings", 4096)) / orig
    attn = scaling.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return dict(short_factor=[float(x) for x in scaling["short_factor"]],
                long_factor=[float(x) for x in scaling["long_factor"]],
                original_max_position_embeddings=orig, attention_factor=float(attn))


def _phi3_extra(c: dict[str, Any]) -> dict[str, Any]:
    lr = c["longrope"]
    scaling = None if lr is None else {
        "rope_type": "longrope", "short_factor": lr["short_factor"], "long_factor": lr["long_factor"],
        "attention_factor": lr["attention_factor"]}
    return {"rope_scaling": scaling, "partial_rotary_factor": c["partial_rotary_factor"],
            "original_max_position_embeddings": (lr["original_max_position_embeddings"] if lr
                                                 else c["n_positions"]),
            "sliding_window": c["sliding_window"], "resid_pdrop": c["dropout"], "embd_pdrop": 0.0,
            "pad_token_id": None}


PHI3_FUSED = {"attn.qkv_proj": (("attn.q_proj", "q_dim"), ("attn.k_proj", "kv_dim"),
                                ("attn.v_proj", "kv_dim")),
              "mlp.gate_up_proj": (("mlp.gate_proj", "intermediate_size"),
                                   ("mlp.up_proj", "intermediate_size"))}
PHI3_LORA_GROUPS: LoraGroups = {**llama.LLAMA_LORA_GROUPS, "qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                "gate_up_proj": ("gate_proj", "up_proj")}


def _ones_longrope(rotary_dim: int, n_positions: int, original: int = 4096) -> dict[str, Any]:
    """A preset's LongRoPE: the hub models' context and attention factor, every frequency factor 1 (presets
    are random-init shapes; a checkpoint's config.json brings its own factors)."""
    return dict(short_factor=[1.0] * (rotary_dim // 2), long_factor=[1.0] * (rotary_dim // 2),
                original_max_position_embeddings=original,
                attention_factor=math.sqrt(1 + math.log(n_positions / original) / math.log(original)))


# transformers' defaults of the keys its config.json may leave out, where they are not Llama's
_PHI3_DEFAULTS = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000)


PHI3 = Family(
    "phi3", "Phi3ForCausalLM", switches_read("phi3", _PHI3_DEFAULTS, lambda hf: dict(
        qkv_bias=False, attn_out_bias=False, mlp_bias=False, sliding_window=hf.get("sliding_window")),
        longrope=_longrope),
    llama_write("phi3", "Phi3ForCausalLM", lambda c: dict(
        qkv_bias=False, attn_out_bias=False, mlp_bias=False, qk_norm=False,
        partial_rotary_factor=c["partial_rotary_factor"], longrope=c["longrope"]), _phi3_extra),
    llama.llama_key, llama.LLAMA_LORA, PHI3_LORA_GROUPS, "phi3-tiny", presets={
        "phi-4-mini": llama_preset("phi3", vocab_size=200064, n_positions=131072, n_embd=3072,
                                   intermediate_size=8192, n_layer=32, n_head=24, n_kv_head=8,
                                   partial_rotary_factor=0.75, longrope=_ones_longrope(96, 131072),
                                   sliding_window=262144, tie_embeddings=True, layer_norm_eps=1e-5,
                                   bos_token_id=199999, eos_token_id=199999),
        "phi-3.5-mini": llama_preset("phi3", vocab_size=32064, n_positions=131072, n_embd=3072,
                                     intermediate_size=8192, n_layer=32, n_head=32, n_kv_head=32,
                                     longrope=_ones_longrope(96, 131072), sliding_window=262144,
                                     tie_embeddings=False, layer_norm_eps=1e-5, bos_token_id=1,
                                     eos_token_id=32000),
        "phi3-tiny": llama_preset("phi3", **NEW_TINY, partial_rotary_factor=0.5, tie_embeddings=True,
                                  sliding_window=24,
                                  longrope=_ones_longrope(8, 256, original=32) | dict(
                                      short_factor=[1.0, 1.5, 2.0, 4.0], long_factor=[2.0, 3.0, 5.0, 9.0])),
    },
    peft_names={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
    fused=PHI3_FUSED, gguf=Gguf("phi3", "gpt-4o", False, GGUF_PHI3_BLOCK, fused=GGUF_PHI3_FUSED,
                                rstrip_name="phi3"))

ENTRIES = (PHI3,)
