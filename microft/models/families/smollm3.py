"""SmolLM3: the Llama layout with RoPE left out of some layers (`no_rope_layers`)."""

from __future__ import annotations

from typing import Any

import microft.models.families.llama as llama
from microft.errors import ConfigError
from microft.models.families.base import Family, Gguf
from microft.models.families.llama import NEW_TINY, llama_preset, llama_write, switches_read


def _gguf_smollm3(c: Any) -> dict[str, Any]:
    """llama.cpp's smollm3 leaves RoPE out of every 4th layer, a constant no GGUF key changes."""
    want = [(i + 1) % 4 != 0 for i in range(c.n_layer)]
    have = list(c.rope_layers) if c.rope_layers is not None else [True] * c.n_layer
    if have != want:
        nope = [i for i, r in enumerate(have) if not r]
        raise ConfigError(f"llama.cpp's smollm3 leaves RoPE out of every 4th layer only; this model's "
                          f"no-RoPE layers are {nope}, so GGUF export is refused")
    return {}


def _smollm3_own(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ConfigError("smollm3 with use_sliding_window=true (windows on its NoPE layers) is not "
                          "supported")
    n = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")  # 1: the layer uses RoPE (transformers' default: every interval-th not)
    if flags is None:
        every = int(hf.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % every != 0) for i in range(n)]
    return dict(rope_layers=[bool(f) for f in flags])


def _smollm3_extra(c: dict[str, Any]) -> dict[str, Any]:
    flags = c["rope_layers"] or [True] * c["n_layer"]
    return {"no_rope_layers": [int(f) for f in flags], "use_sliding_window": False, "sliding_window": None,
            "attention_bias": c["attn_out_bias"], "mlp_bias": c["mlp_bias"], "pad_token_id": None}


# transformers' defaults of the keys its config.json may leave out, where they are not Llama's
_SMOLLM3_DEFAULTS = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=2e6,
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)


SMOLLM3 = Family(
    "smollm3", "SmolLM3ForCausalLM", switches_read("smollm3", _SMOLLM3_DEFAULTS, _smollm3_own),
    llama_write("smollm3", "SmolLM3ForCausalLM", lambda c: dict(
        qkv_bias=c["attn_out_bias"], qk_norm=False, rope_layers=c["rope_layers"]), _smollm3_extra),
    llama.llama_key, llama.LLAMA_LORA, llama.LLAMA_LORA_GROUPS, "smollm3-tiny", presets={
        "smollm3-3b": llama_preset("smollm3", vocab_size=128256, n_positions=65536, n_embd=2048,
                                   intermediate_size=11008, n_layer=36, n_head=16, n_kv_head=4,
                                   rope_theta=5e6, layer_norm_eps=1e-6, tie_embeddings=True,
                                   rope_layers=[(i + 1) % 4 != 0 for i in range(36)],
                                   bos_token_id=128000, eos_token_id=128012),
        "smollm3-tiny": llama_preset("smollm3", **NEW_TINY, tie_embeddings=True, rope_theta=5e6,
                                     rope_layers=[True, False]),
    }, gguf=Gguf("smollm3", "llama-bpe", True, llama.GGUF_LLAMA_BLOCK, hparams=_gguf_smollm3))

ENTRIES = (SMOLLM3,)
