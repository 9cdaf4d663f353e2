"""OLMo 2: the Llama layout with its norms after the attention and the MLP, and full-width q/k norms."""

from __future__ import annotations

import re

import microft.models.families.llama as llama
from microft.models.families.base import Family, Gguf, gguf_no_bias
from microft.models.families.llama import NEW_TINY, llama_preset, llama_write, switches_read

GGUF_OLMO2_BLOCK = {**llama.GGUF_LLAMA_BLOCK, "ln_1": "post_attention_norm", "ln_2": "post_ffw_norm"}
_OLMO2_BLOCK = {**llama.LLAMA_BLOCK, "ln_1": "post_attention_layernorm", "ln_2": "post_feedforward_layernorm"}


def _olmo2_key(name: str) -> str:
    """Llama's names, but OLMo 2's two block norms follow the attention and the MLP."""
    m = re.fullmatch(r"h\.(\d+)\.(ln_[12])(.*)", name)
    return f"model.layers.{m[1]}.{_OLMO2_BLOCK[m[2]]}{m[3]}" if m else llama.llama_key(name)


# transformers' defaults of the keys its config.json may leave out, where they are not Llama's
_OLMO2_DEFAULTS = dict(max_position_embeddings=2048, rms_norm_eps=1e-5, eos_token_id=50279)


OLMO2 = Family(
    "olmo2", "Olmo2ForCausalLM", switches_read("olmo2", _OLMO2_DEFAULTS, lambda hf: dict(
        qk_norm=True, qk_norm_full=True, norm_after=True, rms_gain_first=True, mlp_bias=False)),
    llama_write("olmo2", "Olmo2ForCausalLM", lambda c: dict(
        qkv_bias=c["attn_out_bias"], mlp_bias=False, qk_norm=True, qk_norm_full=True, norm_after=True,
        rms_gain_first=True), lambda c: {"attention_bias": c["attn_out_bias"], "pad_token_id": None}),
    _olmo2_key, llama.LLAMA_LORA, llama.LLAMA_LORA_GROUPS, "olmo2-tiny", presets={
        "olmo-2-1b": llama_preset("olmo2", vocab_size=100352, n_positions=4096, n_embd=2048,
                                  intermediate_size=8192, n_layer=16, n_head=16, n_kv_head=16,
                                  rope_theta=500000.0,
                                  layer_norm_eps=1e-6, tie_embeddings=False, qk_norm=True, qk_norm_full=True,
                                  norm_after=True, rms_gain_first=True, bos_token_id=None,
                                  eos_token_id=100257),
        "olmo2-tiny": llama_preset("olmo2", **NEW_TINY, tie_embeddings=False, qk_norm=True, qk_norm_full=True,
                                   norm_after=True, rms_gain_first=True),
    }, gguf=Gguf("olmo2", "dbrx", False, GGUF_OLMO2_BLOCK, hparams=gguf_no_bias))

ENTRIES = (OLMO2,)
