"""Gemma 2 and Gemma 3 text: one reader and writer for both (their switches: ModelConfig's Gemma block),
unit-offset norms around both sublayers, sliding layers, soft-caps, and what llama.cpp's gemma graphs need."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from microft.errors import ConfigError
from microft.models.families.base import Family, Gguf, gguf_no_bias, refuse_off
from microft.models.families.llama import GGUF_LLAMA_BLOCK, LLAMA_LORA, LLAMA_LORA_GROUPS, llama_key

GGUF_GEMMA_BLOCK = {**GGUF_LLAMA_BLOCK, "post_attn_norm": "post_attention_norm",
                    "post_mlp_norm": "post_ffw_norm"}
_GEMMA_NORMS = ("ln_1", "ln_2", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm", "ln_f")
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}  # llama.cpp's "27B" by layer count: its own q scale


def _gguf_gemma_q_factor(c: Any) -> float:
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (1/sqrt(n_embd / n_head) for what it takes for the
    27B), not by `query_pre_attn_scalar`^-1/2: the difference is folded into the q weights (Gemma 2) or the q
    norm's gain (Gemma 3), which RoPE and the norm carry through linearly."""
    theirs = c.n_embd / c.n_head if c.n_layer == _GEMMA_27B_LAYERS[c.model_type] else c.head_dim
    return math.sqrt(theirs / (c.query_pre_attn_scalar or c.head_dim))


def _gguf_gemma_tensor(c: Any, name: str, t: Any) -> Any:
    """Gemma's RMSNorm gains with the 1 of (1 + w) added, as llama.cpp's converter writes them; the q
    scale."""
    if name.split(".")[-2] in _GEMMA_NORMS and name.endswith(".weight"):
        t = t + 1.0
    if name.endswith(".attn.q_norm.weight" if c.qk_norm else ".attn.q_proj.weight"):
        t = t * _gguf_gemma_q_factor(c)
    return t


def _gguf_gemma(c: Any) -> dict[str, Any]:
    """What llama.cpp's gemma2 / gemma3 graphs apply unconditionally, checked against the model."""
    gguf_no_bias(c)
    if c.model_type == "gemma2":
        if c.attn_softcap is None or c.final_softcap is None:
            raise ConfigError("llama.cpp's gemma2 always soft-caps attention and logits; this model leaves "
                              "one uncapped, so GGUF export is refused")
        if not c.tie_embeddings:
            raise ConfigError("llama.cpp's gemma2 ties the LM head to the embeddings; this model's head is "
                              "its own, so GGUF export is refused")
    elif c.attn_softcap is not None or c.final_softcap is not None:
        raise ConfigError("llama.cpp's gemma3 applies no soft-capping with sliding layers; this model "
                          "soft-caps, so GGUF export is refused")
    elif all(c.layer_window(i) is None for i in range(c.n_layer)):
        raise ConfigError("llama.cpp's gemma3 without sliding layers soft-caps its logits; this model has "
                          "none, so GGUF export is refused")
    return {}


_GEMMA_DEFAULTS = {  # transformers' defaults for keys a Gemma config.json may leave out
    "gemma2": dict(max_position_embeddings=8192, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   sliding_window=4096, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma3_text": dict(max_position_embeddings=131072, final_logit_softcapping=None, sliding_window=4096,
                        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
}
_SLIDING, _FULL = "sliding_attention", "full_attention"


def _gemma_layer_types(hf: dict[str, Any], model_type: str) -> list[str]:
    """`layer_types`, or the older rule: Gemma 2 alternates (sliding first), Gemma 3 has every
    `sliding_window_pattern`-th layer (default 6) global."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
    return [_SLIDING if (i + 1) % pattern else _FULL for i in range(int(hf["num_hidden_layers"]))]


def _gemma_rope_kind(params: dict[str, Any], where: str, linear_ok: bool) -> float | None:
    """The linear factor of one RoPE parameter set (None: default RoPE); other kinds are refused."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear" and linear_ok:
        return float(params["factor"])
    if kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} on {where} is not supported (only the default"
                          f"{' and linear' if linear_ok else ''})")
    return None


def _gemma_rope(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """RoPE of either layout: transformers 5's `rope_parameters` (per layer type for Gemma 3), or the
    top-level `rope_theta` / `rope_local_base_freq` / `rope_scaling` of Hub checkpoints."""
    params = hf.get("rope_parameters") or {}
    if model_type == "gemma2":
        scaling = params or hf.get("rope_scaling") or {}
        _gemma_rope_kind(scaling, "gemma2", linear_ok=False)
        return dict(rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    full = params.get(_FULL) or {}
    local = params.get(_SLIDING) or {}
    _gemma_rope_kind(local, "the sliding layers", linear_ok=False)
    factor = _gemma_rope_kind(full or hf.get("rope_scaling") or {}, "the global layers", linear_ok=True)
    return dict(rope_theta=float(full.get("rope_theta", hf.get("rope_theta", 1e6))),
                rope_local_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))),
                rope_linear_factor=factor)


def _gemma_read(model_type: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def read(hf: dict[str, Any]) -> dict[str, Any]:
        given = {k: v for k, v in hf.items() if v is not None or k.endswith("capping")}  # null caps: off
        hf = {**_GEMMA_DEFAULTS[model_type], **given}
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {act!r} is not supported for {model_type} "
                              "(only gelu_pytorch_tanh)")
        if hf.get("use_bidirectional_attention"):
            raise ConfigError(f"{model_type} with use_bidirectional_attention=true is not supported "
                              "(causal only)")
        C, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        bias, types = bool(hf.get("attention_bias")), _gemma_layer_types(hf, model_type)
        return dict(
            model_type=model_type, vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf["max_position_embeddings"]), n_embd=C, n_layer=int(hf["num_hidden_layers"]),
            n_head=heads, n_kv_head=int(hf["num_key_value_heads"]), head_dim=int(hf["head_dim"]),
            layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm="rmsnorm", positions="rope",
            **_gemma_rope(hf, model_type), qkv_bias=bias, attn_out_bias=bias,
            qk_norm=model_type == "gemma3_text", mlp="swiglu", glu_act="gelu_tanh",
            intermediate_size=int(hf["intermediate_size"]), mlp_bias=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            dropout=float(hf.get("attention_dropout") or 0.0), norm_unit_offset=True, scale_embeddings=True,
            post_norms=True, query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
            # transformers' Gemma 3 attention never passes attn_logit_softcapping on: read for Gemma 2 only
            attn_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_softcap=hf.get("final_logit_softcapping"),
            sliding_window=hf.get("sliding_window") if _SLIDING in types else None,
            layer_types=types if _SLIDING in types else None,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        )
    return read


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x  # transformers' Gemma configs type this key as an int


def _gemma_write(model_type: str, architecture: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def write(c: dict[str, Any]) -> dict[str, Any]:
        g3 = model_type == "gemma3_text"
        fixed = dict(norm="rmsnorm", positions="rope", mlp="swiglu", glu_act="gelu_tanh", mlp_bias=False,
                     qkv_bias=c["attn_out_bias"], norm_unit_offset=True, scale_embeddings=True,
                     post_norms=True, qk_norm=g3, rope_scaling=None)
        if g3:
            fixed["attn_softcap"] = None
        else:
            fixed.update(rope_local_theta=None, rope_linear_factor=None)
        refuse_off(c, model_type, fixed)
        types = c["layer_types"] or [_SLIDING if c["sliding_window"] else _FULL] * c["n_layer"]
        out = {
            "architectures": [architecture], "model_type": model_type, "vocab_size": c["vocab_size"],
            "hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": c["n_head"],
            "num_key_value_heads": c["n_kv_head"], "head_dim": c["head_dim"],
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": c["n_positions"],
            "rms_norm_eps": c["layer_norm_eps"], "rope_theta": c["rope_theta"],
            "attention_bias": c["attn_out_bias"], "attention_dropout": c["dropout"],
            "query_pre_attn_scalar": _int_if_whole(c["query_pre_attn_scalar"] or c["head_dim"]),
            "final_logit_softcapping": c["final_softcap"], "sliding_window": c["sliding_window"],
            "layer_types": types, "tie_word_embeddings": c["tie_embeddings"],
            "bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "initializer_range": 0.02,
        }
        if g3:
            factor = c["rope_linear_factor"]
            out.update(rope_local_base_freq=c["rope_local_theta"] or c["rope_theta"],
                       rope_scaling={"rope_type": "linear", "factor": factor} if factor else None)
        else:
            out["attn_logit_softcapping"] = c["attn_softcap"]
        return out
    return write


_GEMMA_BLOCK = {"ln_1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "ln_2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm",
                "attn": "self_attn", "mlp": "mlp"}


def _gemma_key(name: str) -> str:
    m = re.fullmatch(r"h\.(\d+)\.([^.]+)(.*)", name)
    if m is None:
        return llama_key(name)
    i, child, tail = m.groups()
    return f"model.layers.{i}.{_GEMMA_BLOCK.get(child, child)}{tail}"


def _gemma_preset(model_type: str, **kw: Any) -> dict[str, Any]:
    """A Gemma preset: the family's switches and defaults, then the model's own values."""
    base = dict(model_type=model_type, norm="rmsnorm", positions="rope", mlp="swiglu", glu_act="gelu_tanh",
                qkv_bias=False, attn_out_bias=False, mlp_bias=False, norm_unit_offset=True,
                scale_embeddings=True, post_norms=True, layer_norm_eps=1e-6, head_dim=256,
                query_pre_attn_scalar=256, tie_embeddings=True, bos_token_id=2, eos_token_id=1,
                qk_norm=model_type == "gemma3_text")
    if model_type == "gemma2":
        base.update(vocab_size=256000, n_positions=8192, rope_theta=10000.0, attn_softcap=50.0,
                    final_softcap=30.0, sliding_window=4096)
    else:
        base.update(vocab_size=262144, rope_theta=1e6, rope_local_theta=10000.0)
    kw = {**base, **kw}
    if kw.get("sliding_window") and "layer_types" not in kw:
        pattern = 2 if model_type == "gemma2" else 6
        kw["layer_types"] = [_SLIDING if (i + 1) % pattern else _FULL for i in range(kw["n_layer"])]
    return kw


_GEMMA_TINY = dict(vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_head=4, n_kv_head=2,
                   head_dim=32, query_pre_attn_scalar=24, sliding_window=16)


def _gemma_gguf(arch: str) -> Gguf:
    """Gemma 2 / Gemma 3 in llama.cpp: SentencePiece vocabularies, rotate-halves RoPE, four norms a block."""
    return Gguf(arch, "default", False, GGUF_GEMMA_BLOCK, hparams=_gguf_gemma, transform=_gguf_gemma_tensor)


GEMMA2 = Family(
    "gemma2", "Gemma2ForCausalLM", _gemma_read("gemma2"),
    _gemma_write("gemma2", "Gemma2ForCausalLM"), _gemma_key, LLAMA_LORA, LLAMA_LORA_GROUPS,
    "gemma2-tiny", presets={
        "gemma-2-2b": _gemma_preset("gemma2", n_embd=2304, intermediate_size=9216, n_layer=26,
                                    n_head=8, n_kv_head=4),
        "gemma2-tiny": _gemma_preset("gemma2", **_GEMMA_TINY, n_layer=2, attn_softcap=20.0,
                                     final_softcap=10.0),
    }, gguf=_gemma_gguf("gemma2"))
GEMMA3 = Family(
    "gemma3_text", "Gemma3ForCausalLM", _gemma_read("gemma3_text"),
    _gemma_write("gemma3_text", "Gemma3ForCausalLM"), _gemma_key, LLAMA_LORA, LLAMA_LORA_GROUPS,
    "gemma3-tiny", presets={
        "gemma-3-1b": _gemma_preset("gemma3_text", n_embd=1152, intermediate_size=6912, n_layer=26,
                                    n_head=4, n_kv_head=1, n_positions=32768, sliding_window=512),
        "gemma-3-4b": _gemma_preset("gemma3_text", vocab_size=262208, n_embd=2560,
                                    intermediate_size=10240, n_layer=34, n_head=8, n_kv_head=4,
                                    n_positions=131072, sliding_window=1024, rope_linear_factor=8.0),
        "gemma3-tiny": _gemma_preset("gemma3_text", **_GEMMA_TINY, n_layer=3, rope_linear_factor=2.0,
                                     layer_types=[_SLIDING, _SLIDING, _FULL]),
    }, gguf=_gemma_gguf("gemma3"))

ENTRIES = (GEMMA2, GEMMA3)
