"""Granite 3: the Llama layout with its embedding, attention, residual and logits multipliers."""

from __future__ import annotations

from typing import Any

import microft.models.families.llama as llama
from microft.models.families.base import Family, Gguf
from microft.models.families.llama import NEW_TINY, llama_preset, llama_write, switches_read


def _gguf_granite(c: Any) -> dict[str, Any]:
    """Granite's multipliers under llama.cpp's keys (its logits are divided by `logit_scale`)."""
    return {"add_embedding_scale": c.embedding_multiplier, "add_residual_scale": c.residual_multiplier,
            "add_attention_scale": c.attention_multiplier or c.head_dim ** -0.5,
            "add_logit_scale": c.logits_scaling}


def _granite_own(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                logits_scaling=float(hf.get("logits_scaling", 1.0)))


def _granite_extra(c: dict[str, Any]) -> dict[str, Any]:
    scale = c["attention_multiplier"] or c["head_dim"] ** -0.5
    return {"attention_bias": c["attn_out_bias"], "mlp_bias": c["mlp_bias"], "pad_token_id": None,
            "embedding_multiplier": c["embedding_multiplier"], "attention_multiplier": scale,
            "residual_multiplier": c["residual_multiplier"], "logits_scaling": c["logits_scaling"]}


# transformers' defaults of the keys its config.json may leave out, where they are not Llama's
_GRANITE_DEFAULTS = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


GRANITE = Family(
    "granite", "GraniteForCausalLM", switches_read("granite", _GRANITE_DEFAULTS, _granite_own),
    llama_write("granite", "GraniteForCausalLM", lambda c: dict(
        qkv_bias=c["attn_out_bias"], qk_norm=False, **{k: c[k] for k in (
            "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")}),
        _granite_extra),
    llama.llama_key, llama.LLAMA_LORA, llama.LLAMA_LORA_GROUPS, "granite-tiny", presets={
        "granite-3.3-2b": llama_preset("granite", vocab_size=49159, n_positions=131072, n_embd=2048,
                                       intermediate_size=8192, n_layer=40, n_head=32, n_kv_head=8,
                                       rope_theta=10000000.0, layer_norm_eps=1e-5, tie_embeddings=True,
                                       embedding_multiplier=12.0, attention_multiplier=0.015625,
                                       residual_multiplier=0.22, logits_scaling=8.0, bos_token_id=0,
                                       eos_token_id=0),
        "granite-tiny": llama_preset("granite", **NEW_TINY, tie_embeddings=True, embedding_multiplier=6.0,
                                     attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=4.0),
    }, gguf=Gguf("granite", "gpt-2", True, llama.GGUF_LLAMA_BLOCK, hparams=_gguf_granite))

ENTRIES = (GRANITE,)
