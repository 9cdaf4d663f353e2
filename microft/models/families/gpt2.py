"""GPT-2: its config.json both ways, `transformer.`-prefixed tensor names stored as Conv1D (in, out),
its LoRA targets and PEFT names, presets from 124M to 1.5B, and llama.cpp's gpt2."""

from __future__ import annotations

from typing import Any

from microft.errors import ConfigError
from microft.models.families.base import Family, Gguf, LoraGroups, LoraTable, refuse_off

GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>

GGUF_GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                   "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}

# GPT-2 config.json switches microft's GPT-2 does not implement: (key, transformers' default, values it runs)
_GPT2_FIXED = (("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # both tanh-GELU
               ("scale_attn_weights", True, (True,)), ("scale_attn_by_inverse_layer_idx", False, (False,)))


def _gpt2_read(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ConfigError(f"GPT-2 configs with n_inner={hf['n_inner']} are not supported (only 4 × n_embd)")
    for key, default, runs in _GPT2_FIXED:  # refused, not ignored: the logits would differ from transformers'
        if hf.get(key, default) not in runs:
            raise ConfigError(f"GPT-2 configs with {key}={hf[key]!r} are not supported (only {runs[0]!r})")
    return dict(vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE),
                n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)), n_embd=hf["n_embd"],
                n_layer=hf["n_layer"], n_head=hf["n_head"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def _gpt2_special(c: dict[str, Any], token_id: int | list[int] | None) -> int | list[int] | None:
    """A GPT-2 special id as exported: its own, else GPT-2's <|endoftext|> where the vocabulary has it."""
    if token_id is None:
        return EOT_TOKEN if c["vocab_size"] > EOT_TOKEN else None
    return token_id


def _gpt2_write(c: dict[str, Any]) -> dict[str, Any]:
    C = c["n_embd"]
    refuse_off(c, "gpt2", dict(norm="layernorm", positions="learned", mlp="gelu", qkv_bias=True,
                               attn_out_bias=True, mlp_bias=True, tie_embeddings=True, sliding_window=None,
                               intermediate_size=4 * C, head_dim=C // c["n_head"], n_kv_head=c["n_head"]))
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c["vocab_size"],
        "n_positions": c["n_positions"], "n_ctx": c["n_positions"], "n_embd": C, "n_layer": c["n_layer"],
        "n_head": c["n_head"], "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": c["dropout"], "embd_pdrop": c["dropout"], "attn_pdrop": c["dropout"],
        "layer_norm_epsilon": c["layer_norm_eps"],
        "initializer_range": 0.02, "bos_token_id": _gpt2_special(c, c["bos_token_id"]),
        "eos_token_id": _gpt2_special(c, c["eos_token_id"]), "tie_word_embeddings": True,
    }


def _gpt2_key(name: str) -> str:
    """HF's name of a microft parameter: GPT-2's, under `transformer.` but for the head."""
    return name if name.startswith("lm_head") else "transformer." + name


GPT2_LORA: LoraTable = {"qkv": ("attn", "c_attn"), "proj": ("attn", "c_proj"), "fc": ("mlp", "c_fc"),
                        "mlp_proj": ("mlp", "c_proj")}
GPT2_LORA_GROUPS: LoraGroups = {"attn": ("qkv", "proj"), "mlp": ("fc", "mlp_proj"), "all": tuple(GPT2_LORA)}

GPT2 = Family(
    "gpt2", "GPT2LMHeadModel", _gpt2_read, _gpt2_write, _gpt2_key, GPT2_LORA, GPT2_LORA_GROUPS, "gpt2-tiny",
    presets={
        "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
        "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=256, n_positions=512),
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),
    },
    transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    peft_names={"qkv": "c_attn", "proj": "attn.c_proj", "fc": "c_fc", "mlp_proj": "mlp.c_proj"},
    bare_keys=True, gguf=Gguf("gpt2", "gpt-2", False, GGUF_GPT2_BLOCK, rotary=False))

ENTRIES = (GPT2,)
