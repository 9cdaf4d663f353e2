"""The Llama layout: Llama 3.x (and SmolLM2), Mistral, Qwen2/2.5 and Qwen3, which one reader, writer and
tensor-name map serve; the families built on it (Phi-3, SmolLM3, OLMo 2, Granite) take its pieces too."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from microft.errors import ConfigError
from microft.models.families.base import Family, Gguf, LoraGroups, LoraTable, refuse_off

GGUF_LLAMA_BLOCK = {"ln_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
                    "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
                    "attn.k_norm": "attn_k_norm", "ln_2": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _rope_source(hf: dict[str, Any]) -> tuple[float, dict[str, Any], str]:
    """(theta, the scaling dict, its type) from either layout (`rope_parameters`, or the older top-level
    keys)."""
    params = hf.get("rope_parameters") or {}  # transformers 5 writes this; it wins where both are present
    scaling = params or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return theta, scaling, scaling.get("rope_type", scaling.get("type", "default"))


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, llama3 scaling) from either layout: `rope_parameters`, or `rope_theta` + `rope_scaling`."""
    theta, scaling, kind = _rope_source(hf)
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (only the default and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: scaling[k] for k in keys}


def _llama_read(model_type: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def read(hf: dict[str, Any]) -> dict[str, Any]:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported for {model_type} (only silu)")
        C, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        theta, scaling = _rope(hf)
        bias = bool(hf.get("attention_bias", False))
        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window")
        elif hf.get("use_sliding_window"):
            raise ConfigError(f"{model_type} with use_sliding_window=true (per-layer windows) is not "
                              "supported")
        return dict(
            model_type=model_type, vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("max_position_embeddings", 4096)), n_embd=C,
            n_layer=int(hf["num_hidden_layers"]), n_head=heads,
            n_kv_head=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or C // heads),
            layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm="rmsnorm", positions="rope", rope_theta=theta, rope_scaling=scaling,
            qkv_bias=True if model_type == "qwen2" else (bias and model_type != "mistral"),
            attn_out_bias=bias and model_type in ("llama", "qwen3"), qk_norm=model_type == "qwen3",
            sliding_window=window, mlp="swiglu", intermediate_size=int(hf["intermediate_size"]),
            mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dropout=float(hf.get("attention_dropout") or 0.0),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        )
    return read


def llama_write(model_type: str, architecture: str, fixed: Callable[[dict[str, Any]], dict[str, Any]],
                extra: Callable[[dict[str, Any]], dict[str, Any]]
                ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """config.json of a Llama-layout family: `fixed(c)` are the switches its config cannot change,
    `extra(c)` its own keys."""
    def write(c: dict[str, Any]) -> dict[str, Any]:
        window = ("sliding_window",) if c["sliding_window"] and model_type not in ("mistral", "phi3") else ()
        want = dict(norm="rmsnorm", positions="rope", mlp="swiglu", **{**_LLAMA_PLAIN, **fixed(c)})
        refuse_off(c, model_type, want, window)
        scaling = c["rope_scaling"]
        return {
            "architectures": [architecture], "model_type": model_type, "vocab_size": c["vocab_size"],
            "hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": c["n_head"],
            "num_key_value_heads": c["n_kv_head"], "head_dim": c["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": c["n_positions"], "rms_norm_eps": c["layer_norm_eps"],
            "rope_theta": c["rope_theta"],
            "rope_scaling": {"rope_type": "llama3", **scaling} if scaling else None,
            "attention_dropout": c["dropout"], "tie_word_embeddings": c["tie_embeddings"],
            "bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "initializer_range": 0.02,
            **extra(c),
        }
    return write


# the switches of phi3, smollm3, olmo2 and granite at their Llama values: a family's config.json that has no
# key for one refuses a model with it set (its `fixed` lets its own through)
_LLAMA_PLAIN: dict[str, Any] = dict(partial_rotary_factor=1.0, longrope=None, rope_layers=None,
                                    norm_after=False, rms_gain_first=False, qk_norm_full=False,
                                    embedding_multiplier=1.0, attention_multiplier=None,
                                    residual_multiplier=1.0, logits_scaling=1.0)

LLAMA_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn": "self_attn",
               "mlp": "mlp"}
_LLAMA_TOP = {"wte": "model.embed_tokens", "ln_f": "model.norm", "lm_head": "lm_head"}


def llama_key(name: str) -> str:
    """HF's name of a microft parameter or module in the Llama layout (`h.3.ln_1` ->
    `model.layers.3.input_layernorm`)."""
    head, _, rest = name.partition(".")
    if head in _LLAMA_TOP:
        return ".".join(filter(None, (_LLAMA_TOP[head], rest)))
    m = re.fullmatch(r"h\.(\d+)(?:\.([^.]+)(.*))?", name)
    if m is None:
        raise KeyError(name)
    i, child, tail = m.groups()
    return f"model.layers.{i}" + (f".{LLAMA_BLOCK.get(child, child)}{tail}" if child else "")


# PEFT's names, and GPT-2's names as aliases of the same roles
LLAMA_LORA: LoraTable = {
    "q_proj": ("attn", "q_proj"), "k_proj": ("attn", "k_proj"), "v_proj": ("attn", "v_proj"),
    "o_proj": ("attn", "o_proj"), "gate_proj": ("mlp", "gate_proj"), "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
LLAMA_LORA_GROUPS: LoraGroups = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "proj": ("o_proj",), "fc": ("gate_proj", "up_proj"),
    "mlp_proj": ("down_proj",), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"), "all": tuple(LLAMA_LORA),
}


def llama_preset(model_type: str, **kw: Any) -> dict[str, Any]:
    """A Llama-layout preset: the family's switches and defaults, then the model's own values."""
    base = dict(model_type=model_type, norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False,
                attn_out_bias=False, mlp_bias=False)
    if model_type == "qwen2":
        base.update(qkv_bias=True, layer_norm_eps=1e-6, vocab_size=151936, rope_theta=1e6,
                    bos_token_id=151643, eos_token_id=151643)
    if model_type == "qwen3":
        base.update(qk_norm=True, layer_norm_eps=1e-6, vocab_size=151936, rope_theta=1e6, n_positions=40960,
                    head_dim=128, bos_token_id=151643, eos_token_id=151645)
    return {**base, **kw}


def _llama3_scaling(factor: float, original: int = 8192) -> dict[str, Any]:
    return dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=original)


_LLAMA3 = dict(vocab_size=128256, n_positions=131072, rope_theta=500000.0, bos_token_id=128000,
               eos_token_id=128001)
_SMOL = dict(vocab_size=49152, n_positions=8192, bos_token_id=0, eos_token_id=0)
_TINY = dict(vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_layer=2, n_head=4,
             n_kv_head=2, bos_token_id=1, eos_token_id=2)


def _llama_family(model_type: str, architecture: str, fixed: Callable[[dict[str, Any]], dict[str, Any]],
                  extra: Callable[[dict[str, Any]], dict[str, Any]], tiny: str,
                  presets: dict[str, dict[str, Any]], gguf: Gguf) -> Family:
    return Family(model_type, architecture, _llama_read(model_type),
                  llama_write(model_type, architecture, fixed, extra), llama_key, LLAMA_LORA,
                  LLAMA_LORA_GROUPS, tiny, presets, gguf=gguf)


NEW_TINY = dict(_TINY, vocab_size=384)  # the tiny model of the families built on this layout


def switches_read(model_type: str, defaults: dict[str, Any], own: Callable[[dict[str, Any]], dict[str, Any]],
                  longrope: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
                  ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The Llama reader (biases as Llama reads them) with the family's `defaults` (transformers' values of the
    keys its config.json may leave out, where they are not Llama's) for absent keys, then the family's
    `own(hf)` fields on top; RoPE: the default or llama3, `longrope(hf, scaling)` for a family that reads
    LongRoPE (Phi-3), `partial_rotary_factor` from either layout."""
    def read(hf: dict[str, Any]) -> dict[str, Any]:
        hf = {**defaults, **hf}
        theta, scaling, kind = _rope_source(hf)
        lr = None
        if longrope is not None and kind in ("longrope", "su", "yarn"):  # Phi3Config: all three are longrope
            lr, kind = longrope(hf, scaling), "default"
        if kind not in ("default", "llama3"):
            raise ConfigError(f"RoPE scaling {kind!r} is not supported for {model_type}")
        params = {**(scaling if kind == "llama3" else {}), "rope_type": kind, "rope_theta": theta}
        plain = {**hf, "rope_scaling": None, "use_sliding_window": False, "rope_parameters": params}
        out = _llama_read("llama")(plain)
        partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        return {**out, "model_type": model_type, "partial_rotary_factor": float(partial), "longrope": lr,
                **own(hf)}
    return read


LLAMA = _llama_family(
    "llama", "LlamaForCausalLM", lambda c: dict(qkv_bias=c["attn_out_bias"], qk_norm=False),
    lambda c: {"attention_bias": c["attn_out_bias"], "mlp_bias": c["mlp_bias"]}, "llama-tiny", {
        "llama-3.2-1b": llama_preset(
            "llama", **_LLAMA3, n_embd=2048, intermediate_size=8192, n_layer=16, n_head=32, n_kv_head=8,
            tie_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
        "llama-3.2-3b": llama_preset(
            "llama", **_LLAMA3, n_embd=3072, intermediate_size=8192, n_layer=28, n_head=24, n_kv_head=8,
            tie_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
        "llama-3.1-8b": llama_preset(
            "llama", **_LLAMA3, n_embd=4096, intermediate_size=14336, n_layer=32, n_head=32, n_kv_head=8,
            tie_embeddings=False, rope_scaling=_llama3_scaling(8.0)),
        "smollm2-135m": llama_preset(
            "llama", **_SMOL, n_embd=576, intermediate_size=1536, n_layer=30, n_head=9, n_kv_head=3,
            rope_theta=100000.0, tie_embeddings=True),
        "smollm2-360m": llama_preset(
            "llama", **_SMOL, n_embd=960, intermediate_size=2560, n_layer=32, n_head=15, n_kv_head=5,
            rope_theta=100000.0, tie_embeddings=True),
        "smollm2-1.7b": llama_preset(
            "llama", **_SMOL, n_embd=2048, intermediate_size=8192, n_layer=24, n_head=32, n_kv_head=32,
            rope_theta=130000.0, tie_embeddings=True),
        "llama-tiny": llama_preset("llama", **_TINY, rope_theta=500000.0, tie_embeddings=False,
                                   rope_scaling=_llama3_scaling(8.0, original=64)),
    }, Gguf("llama", "llama-bpe", True, GGUF_LLAMA_BLOCK))  # SmolLM2 too ("smollm" pre, by structure)
MISTRAL = _llama_family(
    "mistral", "MistralForCausalLM", lambda c: dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                                                    qk_norm=False),
    lambda c: {"sliding_window": c["sliding_window"]}, "mistral-tiny", {
        "mistral-7b": llama_preset(
            "mistral", vocab_size=32000, n_positions=32768, n_embd=4096, intermediate_size=14336, n_layer=32,
            n_head=32, n_kv_head=8, sliding_window=4096, tie_embeddings=False, bos_token_id=1,
            eos_token_id=2),
        "mistral-tiny": llama_preset("mistral", **_TINY, sliding_window=16, tie_embeddings=False),
    }, Gguf("llama", "llama-bpe", True, GGUF_LLAMA_BLOCK))  # llama.cpp runs Mistral as llama
QWEN2 = _llama_family(
    "qwen2", "Qwen2ForCausalLM",
    lambda c: dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False, qk_norm=False),
    lambda c: {"use_sliding_window": False, "sliding_window": None}, "qwen2-tiny", {
        "qwen2.5-0.5b": llama_preset("qwen2", n_embd=896, intermediate_size=4864, n_layer=24, n_head=14,
                                     n_kv_head=2, n_positions=32768, tie_embeddings=True),
        "qwen2.5-1.5b": llama_preset("qwen2", n_embd=1536, intermediate_size=8960, n_layer=28, n_head=12,
                                     n_kv_head=2, n_positions=131072, tie_embeddings=True),
        "qwen2.5-7b": llama_preset("qwen2", n_embd=3584, intermediate_size=18944, n_layer=28, n_head=28,
                                   n_kv_head=4, n_positions=131072, vocab_size=152064, tie_embeddings=False),
        "qwen2-tiny": llama_preset("qwen2", **_TINY, tie_embeddings=True),
    }, Gguf("qwen2", "qwen2", False, GGUF_LLAMA_BLOCK))
QWEN3 = _llama_family(
    "qwen3", "Qwen3ForCausalLM", lambda c: dict(qkv_bias=c["attn_out_bias"], mlp_bias=False, qk_norm=True),
    lambda c: {"attention_bias": c["attn_out_bias"], "use_sliding_window": False, "sliding_window": None},
    "qwen3-tiny", {
        "qwen3-0.6b": llama_preset("qwen3", n_embd=1024, intermediate_size=3072, n_layer=28, n_head=16,
                                   n_kv_head=8, tie_embeddings=True),
        "qwen3-1.7b": llama_preset("qwen3", n_embd=2048, intermediate_size=6144, n_layer=28, n_head=16,
                                   n_kv_head=8, tie_embeddings=True),
        "qwen3-4b": llama_preset("qwen3", n_embd=2560, intermediate_size=9728, n_layer=36, n_head=32,
                                 n_kv_head=8, tie_embeddings=True),
        "qwen3-8b": llama_preset("qwen3", n_embd=4096, intermediate_size=12288, n_layer=36, n_head=32,
                                 n_kv_head=8, tie_embeddings=False),
        "qwen3-tiny": llama_preset("qwen3", **_TINY, head_dim=32, tie_embeddings=True),
    }, Gguf("qwen3", "qwen2", False, GGUF_LLAMA_BLOCK))

ENTRIES = (LLAMA, MISTRAL, QWEN2, QWEN3)
