"""The model families microft drives: one `Family` entry each, with everything about it side by side.

An entry holds the HF `model_type` and architecture name, how its `config.json` maps to `ModelConfig`
fields and back (refusing what the family's config cannot express), how microft's parameter names map to
the family's HF tensor names (and which are stored transposed), its LoRA target names (and PEFT's names
for them), its presets (the hub checkpoints' shapes, random init; one tiny CPU model for tests), and how
llama.cpp runs it (`Gguf`: architecture, pre-tokenizer, tensor names, the q/k row order, fused tensors, its own
hyper-parameters and checks, a tensor transform).
Adding a family is one entry in `FAMILIES` (plus the switches the transformer needs, in `ModelConfig`);
the tests that parametrise over `FAMILIES` pick it up.

No torch, and no import of `models.config` (which reads this registry): entries turn dicts into dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from microft.errors import ConfigError

GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>

LoraTable = dict[str, tuple[str, str]]  # target name -> (block submodule, linear)
LoraGroups = dict[str, tuple[str, ...]]  # group name -> targets


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp runs the family: what `export --format gguf` (export/gguf.py) writes for it."""

    arch: str  # llama.cpp's architecture name
    pre: str  # pre-tokenizer when the tokenizer's own is not one llama.cpp knows by structure
    rope_pairs: bool  # llama.cpp rotates adjacent pairs (not halves): q/k rows are permuted to match
    block: dict[str, str]  # microft block module (after `h.{i}.`) -> llama.cpp tensor (after `blk.{i}.`)
    rotary: bool = True  # RoPE hyper-parameters (GQA, head size, RMSNorm eps, base, window); else LayerNorm's eps
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


GGUF_GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                   "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GGUF_LLAMA_BLOCK = {"ln_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
                    "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
                    "ln_2": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}

GGUF_PHI3_BLOCK = {k: v for k, v in GGUF_LLAMA_BLOCK.items() if k not in (
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
GGUF_PHI3_FUSED = {"attn_qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                   "ffn_up": ("mlp.gate_proj", "mlp.up_proj")}
GGUF_OLMO2_BLOCK = {**GGUF_LLAMA_BLOCK, "ln_1": "post_attention_norm", "ln_2": "post_ffw_norm"}
GGUF_GEMMA_BLOCK = {**GGUF_LLAMA_BLOCK, "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm"}


def _gguf_granite(c: Any) -> dict[str, Any]:
    """Granite's multipliers under llama.cpp's keys (its logits are divided by `logit_scale`)."""
    return {"add_embedding_scale": c.embedding_multiplier, "add_residual_scale": c.residual_multiplier,
            "add_attention_scale": c.attention_multiplier or c.head_dim ** -0.5, "add_logit_scale": c.logits_scaling}


def _gguf_no_bias(c: Any) -> dict[str, Any]:
    """llama.cpp's olmo2 and gemma graphs add no attention or MLP biases."""
    if c.qkv_bias or c.attn_out_bias or c.mlp_bias:
        raise ConfigError(f"llama.cpp's {_gguf_arch(c)} adds no attention or MLP biases; this model has them, "
                          "so GGUF export is refused")
    return {}


def _gguf_arch(c: Any) -> str:
    return "gemma3" if c.model_type == "gemma3_text" else c.model_type


def _gguf_smollm3(c: Any) -> dict[str, Any]:
    """llama.cpp's smollm3 leaves RoPE out of every 4th layer, a constant no GGUF key changes."""
    want = [(i + 1) % 4 != 0 for i in range(c.n_layer)]
    have = list(c.rope_layers) if c.rope_layers is not None else [True] * c.n_layer
    if have != want:
        nope = [i for i, r in enumerate(have) if not r]
        raise ConfigError(f"llama.cpp's smollm3 leaves RoPE out of every 4th layer only; this model's no-RoPE "
                          f"layers are {nope}, so GGUF export is refused")
    return {}


_GEMMA_NORMS = ("ln_1", "ln_2", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm", "ln_f")
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}  # llama.cpp's "27B" by layer count: its own q scale


def _gguf_gemma_q_factor(c: Any) -> float:
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (1/sqrt(n_embd / n_head) for what it takes for the
    27B), not by `query_pre_attn_scalar`^-1/2: the difference is folded into the q weights (Gemma 2) or the q
    norm's gain (Gemma 3), which RoPE and the norm carry through linearly."""
    theirs = c.n_embd / c.n_head if c.n_layer == _GEMMA_27B_LAYERS[c.model_type] else c.head_dim
    return math.sqrt(theirs / (c.query_pre_attn_scalar or c.head_dim))


def _gguf_gemma_tensor(c: Any, name: str, t: Any) -> Any:
    """Gemma's RMSNorm gains with the 1 of (1 + w) added, as llama.cpp's converter writes them; the q scale."""
    if name.split(".")[-2] in _GEMMA_NORMS and name.endswith(".weight"):
        t = t + 1.0
    if name.endswith(".attn.q_norm.weight" if c.qk_norm else ".attn.q_proj.weight"):
        t = t * _gguf_gemma_q_factor(c)
    return t


def _gguf_gemma(c: Any) -> dict[str, Any]:
    """What llama.cpp's gemma2 / gemma3 graphs apply unconditionally, checked against the model."""
    _gguf_no_bias(c)
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


# --- GPT-2 -------------------------------------------------------------------------------------
# GPT-2 config.json switches microft's GPT-2 does not implement: (key, transformers' default, values it runs)
_GPT2_FIXED = (("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # both tanh-GELU
               ("scale_attn_weights", True, (True,)), ("scale_attn_by_inverse_layer_idx", False, (False,)))


def _gpt2_read(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ConfigError(f"GPT-2 configs with n_inner={hf['n_inner']} are not supported (only 4 × n_embd)")
    for key, default, runs in _GPT2_FIXED:  # refused, not ignored: the logits would differ from transformers'
        if hf.get(key, default) not in runs:
            raise ConfigError(f"GPT-2 configs with {key}={hf[key]!r} are not supported (only {runs[0]!r})")
    return dict(vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE), n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
                n_embd=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def _gpt2_special(c: dict[str, Any], token_id: int | list[int] | None) -> int | list[int] | None:
    """A GPT-2 special id as exported: its own, else GPT-2's <|endoftext|> where the vocabulary has it."""
    if token_id is None:
        return EOT_TOKEN if c["vocab_size"] > EOT_TOKEN else None
    return token_id


def _gpt2_write(c: dict[str, Any]) -> dict[str, Any]:
    C = c["n_embd"]
    _refuse_off(c, "gpt2", dict(norm="layernorm", positions="learned", mlp="gelu", qkv_bias=True, attn_out_bias=True,
                                mlp_bias=True, tie_embeddings=True, sliding_window=None, intermediate_size=4 * C,
                                head_dim=C // c["n_head"], n_kv_head=c["n_head"]))
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c["vocab_size"],
        "n_positions": c["n_positions"], "n_ctx": c["n_positions"], "n_embd": C, "n_layer": c["n_layer"],
        "n_head": c["n_head"], "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": c["dropout"],
        "embd_pdrop": c["dropout"], "attn_pdrop": c["dropout"], "layer_norm_epsilon": c["layer_norm_eps"],
        "initializer_range": 0.02, "bos_token_id": _gpt2_special(c, c["bos_token_id"]),
        "eos_token_id": _gpt2_special(c, c["eos_token_id"]), "tie_word_embeddings": True,
    }


def _gpt2_key(name: str) -> str:
    return name if name.startswith("lm_head") else "transformer." + name


GPT2_LORA: LoraTable = {"qkv": ("attn", "c_attn"), "proj": ("attn", "c_proj"), "fc": ("mlp", "c_fc"),
                        "mlp_proj": ("mlp", "c_proj")}
GPT2_LORA_GROUPS: LoraGroups = {"attn": ("qkv", "proj"), "mlp": ("fc", "mlp_proj"), "all": tuple(GPT2_LORA)}


# --- the Llama layout (Llama 3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3) ----------------------------------
def _rope_source(hf: dict[str, Any]) -> tuple[float, dict[str, Any], str]:
    """(theta, the scaling dict, its type) from either layout (`rope_parameters`, or the older top-level keys)."""
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
            raise ConfigError(f"{model_type} with use_sliding_window=true (per-layer windows) is not supported")
        return dict(
            model_type=model_type, vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("max_position_embeddings", 4096)), n_embd=C, n_layer=int(hf["num_hidden_layers"]),
            n_head=heads, n_kv_head=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or C // heads), layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
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


def _refuse_off(c: dict[str, Any], model_type: str, want: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    off = [k for k, v in want.items() if c[k] != v] + list(extra)
    if off:
        raise ConfigError(f"a {model_type} config.json cannot express this model's {', '.join(off)}")


def _llama_write(model_type: str, architecture: str, fixed: Callable[[dict[str, Any]], dict[str, Any]],
                 extra: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """config.json of a Llama-layout family: `fixed(c)` are the switches its config cannot change,
    `extra(c)` its own keys."""
    def write(c: dict[str, Any]) -> dict[str, Any]:
        window = ("sliding_window",) if c["sliding_window"] and model_type not in ("mistral", "phi3") else ()
        want = dict(norm="rmsnorm", positions="rope", mlp="swiglu", **{**_LLAMA_PLAIN, **fixed(c)})
        _refuse_off(c, model_type, want, window)
        scaling = c["rope_scaling"]
        return {
            "architectures": [architecture], "model_type": model_type, "vocab_size": c["vocab_size"],
            "hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": c["n_head"],
            "num_key_value_heads": c["n_kv_head"], "head_dim": c["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": c["n_positions"], "rms_norm_eps": c["layer_norm_eps"],
            "rope_theta": c["rope_theta"], "rope_scaling": {"rope_type": "llama3", **scaling} if scaling else None,
            "attention_dropout": c["dropout"], "tie_word_embeddings": c["tie_embeddings"],
            "bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "initializer_range": 0.02,
            **extra(c),
        }
    return write


# the switches of phi3, smollm3, olmo2 and granite at their Llama values: a family's config.json that has no
# key for one refuses a model with it set (its `fixed` lets its own through)
_LLAMA_PLAIN: dict[str, Any] = dict(partial_rotary_factor=1.0, longrope=None, rope_layers=None, norm_after=False,
                                    rms_gain_first=False, qk_norm_full=False, embedding_multiplier=1.0,
                                    attention_multiplier=None, residual_multiplier=1.0, logits_scaling=1.0)

_LLAMA_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}
_LLAMA_TOP = {"wte": "model.embed_tokens", "ln_f": "model.norm", "lm_head": "lm_head"}


def _llama_key(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in _LLAMA_TOP:
        return ".".join(filter(None, (_LLAMA_TOP[head], rest)))
    m = re.fullmatch(r"h\.(\d+)(?:\.([^.]+)(.*))?", name)
    if m is None:
        raise KeyError(name)
    i, child, tail = m.groups()
    return f"model.layers.{i}" + (f".{_LLAMA_BLOCK.get(child, child)}{tail}" if child else "")


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


def _preset(model_type: str, **kw: Any) -> dict[str, Any]:
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
    return dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=original)


_LLAMA3 = dict(vocab_size=128256, n_positions=131072, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
_SMOL = dict(vocab_size=49152, n_positions=8192, bos_token_id=0, eos_token_id=0)
_TINY = dict(vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
             bos_token_id=1, eos_token_id=2)


def _llama_family(model_type: str, architecture: str, fixed: Callable[[dict[str, Any]], dict[str, Any]],
                  extra: Callable[[dict[str, Any]], dict[str, Any]], tiny: str,
                  presets: dict[str, dict[str, Any]], gguf: Gguf) -> Family:
    return Family(model_type, architecture, _llama_read(model_type), _llama_write(model_type, architecture, fixed, extra),
                  _llama_key, LLAMA_LORA, LLAMA_LORA_GROUPS, tiny, presets, gguf=gguf)


# --- Phi-3 / Phi-4-mini, SmolLM3, OLMo 2, Granite 3: the Llama layout plus their own switches ------------------
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


# transformers' defaults of the keys a family's config.json may leave out, where they are not Llama's
_DEFAULTS: dict[str, dict[str, Any]] = {
    "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000),
    "smollm3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=2e6, tie_word_embeddings=True,
                    bos_token_id=128000, eos_token_id=128001),
    "olmo2": dict(max_position_embeddings=2048, rms_norm_eps=1e-5, eos_token_id=50279),
    "granite": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2),
}


def _switches_read(model_type: str, own: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The Llama reader (biases as Llama reads them) with the family's defaults for absent keys, then the
    family's `own(hf)` fields on top; RoPE: the default or llama3, longrope for phi3, `partial_rotary_factor`
    from either layout."""
    def read(hf: dict[str, Any]) -> dict[str, Any]:
        hf = {**_DEFAULTS[model_type], **hf}
        theta, scaling, kind = _rope_source(hf)
        longrope = None
        if model_type == "phi3" and kind in ("longrope", "su", "yarn"):  # Phi3Config reads all three as longrope
            longrope, kind = _longrope(hf, scaling), "default"
        if kind not in ("default", "llama3"):
            raise ConfigError(f"RoPE scaling {kind!r} is not supported for {model_type}")
        plain = {**hf, "rope_scaling": None, "use_sliding_window": False,
                 "rope_parameters": {**(scaling if kind == "llama3" else {}), "rope_type": kind, "rope_theta": theta}}
        out = _llama_read("llama")(plain)
        partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        return {**out, "model_type": model_type, "partial_rotary_factor": float(partial), "longrope": longrope,
                **own(hf)}
    return read


def _smollm3_own(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ConfigError("smollm3 with use_sliding_window=true (windows on its NoPE layers) is not supported")
    n = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")  # 1: the layer uses RoPE (transformers' default: every interval-th not)
    if flags is None:
        every = int(hf.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % every != 0) for i in range(n)]
    return dict(rope_layers=[bool(f) for f in flags])


def _granite_own(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                logits_scaling=float(hf.get("logits_scaling", 1.0)))


def _phi3_extra(c: dict[str, Any]) -> dict[str, Any]:
    lr = c["longrope"]
    scaling = None if lr is None else {
        "rope_type": "longrope", "short_factor": lr["short_factor"], "long_factor": lr["long_factor"],
        "attention_factor": lr["attention_factor"]}
    return {"rope_scaling": scaling, "partial_rotary_factor": c["partial_rotary_factor"],
            "original_max_position_embeddings": lr["original_max_position_embeddings"] if lr else c["n_positions"],
            "sliding_window": c["sliding_window"], "resid_pdrop": c["dropout"], "embd_pdrop": 0.0,
            "pad_token_id": None}


def _smollm3_extra(c: dict[str, Any]) -> dict[str, Any]:
    flags = c["rope_layers"] or [True] * c["n_layer"]
    return {"no_rope_layers": [int(f) for f in flags], "use_sliding_window": False, "sliding_window": None,
            "attention_bias": c["attn_out_bias"], "mlp_bias": c["mlp_bias"], "pad_token_id": None}


def _granite_extra(c: dict[str, Any]) -> dict[str, Any]:
    scale = c["attention_multiplier"] or c["head_dim"] ** -0.5
    return {"attention_bias": c["attn_out_bias"], "mlp_bias": c["mlp_bias"], "pad_token_id": None,
            "embedding_multiplier": c["embedding_multiplier"], "attention_multiplier": scale,
            "residual_multiplier": c["residual_multiplier"], "logits_scaling": c["logits_scaling"]}


_OLMO2_BLOCK = {**_LLAMA_BLOCK, "ln_1": "post_attention_layernorm", "ln_2": "post_feedforward_layernorm"}


def _olmo2_key(name: str) -> str:
    """Llama's names, but OLMo 2's two block norms follow the attention and the MLP."""
    m = re.fullmatch(r"h\.(\d+)\.(ln_[12])(.*)", name)
    return f"model.layers.{m[1]}.{_OLMO2_BLOCK[m[2]]}{m[3]}" if m else _llama_key(name)


PHI3_FUSED = {"attn.qkv_proj": (("attn.q_proj", "q_dim"), ("attn.k_proj", "kv_dim"), ("attn.v_proj", "kv_dim")),
              "mlp.gate_up_proj": (("mlp.gate_proj", "intermediate_size"), ("mlp.up_proj", "intermediate_size"))}
PHI3_LORA_GROUPS: LoraGroups = {**LLAMA_LORA_GROUPS, "qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                "gate_up_proj": ("gate_proj", "up_proj")}


def _ones_longrope(rotary_dim: int, n_positions: int, original: int = 4096) -> dict[str, Any]:
    """A preset's LongRoPE: the hub models' context and attention factor, every frequency factor 1 (presets are
    random-init shapes; a checkpoint's config.json brings its own factors)."""
    return dict(short_factor=[1.0] * (rotary_dim // 2), long_factor=[1.0] * (rotary_dim // 2),
                original_max_position_embeddings=original,
                attention_factor=math.sqrt(1 + math.log(n_positions / original) / math.log(original)))


_NEW_TINY = dict(_TINY, vocab_size=384)


# --- Gemma 2 and Gemma 3 text ---------------------------------------------------------------------
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
        _refuse_off(c, model_type, fixed)
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
        return _llama_key(name)
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


# --- the registry ------------------------------------------------------------------------------
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "GPT2LMHeadModel", _gpt2_read, _gpt2_write, _gpt2_key, GPT2_LORA, GPT2_LORA_GROUPS, "gpt2-tiny",
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
           bare_keys=True, gguf=Gguf("gpt2", "gpt-2", False, GGUF_GPT2_BLOCK, rotary=False)),
    _llama_family(
        "llama", "LlamaForCausalLM", lambda c: dict(qkv_bias=c["attn_out_bias"], qk_norm=False),
        lambda c: {"attention_bias": c["attn_out_bias"], "mlp_bias": c["mlp_bias"]}, "llama-tiny", {
            "llama-3.2-1b": _preset("llama", **_LLAMA3, n_embd=2048, intermediate_size=8192, n_layer=16, n_head=32,
                                    n_kv_head=8, tie_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
            "llama-3.2-3b": _preset("llama", **_LLAMA3, n_embd=3072, intermediate_size=8192, n_layer=28, n_head=24,
                                    n_kv_head=8, tie_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
            "llama-3.1-8b": _preset("llama", **_LLAMA3, n_embd=4096, intermediate_size=14336, n_layer=32, n_head=32,
                                    n_kv_head=8, tie_embeddings=False, rope_scaling=_llama3_scaling(8.0)),
            "smollm2-135m": _preset("llama", **_SMOL, n_embd=576, intermediate_size=1536, n_layer=30, n_head=9,
                                    n_kv_head=3, rope_theta=100000.0, tie_embeddings=True),
            "smollm2-360m": _preset("llama", **_SMOL, n_embd=960, intermediate_size=2560, n_layer=32, n_head=15,
                                    n_kv_head=5, rope_theta=100000.0, tie_embeddings=True),
            "smollm2-1.7b": _preset("llama", **_SMOL, n_embd=2048, intermediate_size=8192, n_layer=24, n_head=32,
                                    n_kv_head=32, rope_theta=130000.0, tie_embeddings=True),
            "llama-tiny": _preset("llama", **_TINY, rope_theta=500000.0, tie_embeddings=False,
                                  rope_scaling=_llama3_scaling(8.0, original=64)),
        }, Gguf("llama", "llama-bpe", True, GGUF_LLAMA_BLOCK)),  # SmolLM2 too ("smollm" pre, by structure)
    _llama_family(
        "mistral", "MistralForCausalLM", lambda c: dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                                                        qk_norm=False),
        lambda c: {"sliding_window": c["sliding_window"]}, "mistral-tiny", {
            "mistral-7b": _preset("mistral", vocab_size=32000, n_positions=32768, n_embd=4096, intermediate_size=14336,
                                  n_layer=32, n_head=32, n_kv_head=8, sliding_window=4096, tie_embeddings=False,
                                  bos_token_id=1, eos_token_id=2),
            "mistral-tiny": _preset("mistral", **_TINY, sliding_window=16, tie_embeddings=False),
        }, Gguf("llama", "llama-bpe", True, GGUF_LLAMA_BLOCK)),  # llama.cpp runs Mistral as llama
    _llama_family(
        "qwen2", "Qwen2ForCausalLM", lambda c: dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False, qk_norm=False),
        lambda c: {"use_sliding_window": False, "sliding_window": None}, "qwen2-tiny", {
            "qwen2.5-0.5b": _preset("qwen2", n_embd=896, intermediate_size=4864, n_layer=24, n_head=14, n_kv_head=2,
                                    n_positions=32768, tie_embeddings=True),
            "qwen2.5-1.5b": _preset("qwen2", n_embd=1536, intermediate_size=8960, n_layer=28, n_head=12, n_kv_head=2,
                                    n_positions=131072, tie_embeddings=True),
            "qwen2.5-7b": _preset("qwen2", n_embd=3584, intermediate_size=18944, n_layer=28, n_head=28, n_kv_head=4,
                                  n_positions=131072, vocab_size=152064, tie_embeddings=False),
            "qwen2-tiny": _preset("qwen2", **_TINY, tie_embeddings=True),
        }, Gguf("qwen2", "qwen2", False, GGUF_LLAMA_BLOCK)),
    _llama_family(
        "qwen3", "Qwen3ForCausalLM", lambda c: dict(qkv_bias=c["attn_out_bias"], mlp_bias=False, qk_norm=True),
        lambda c: {"attention_bias": c["attn_out_bias"], "use_sliding_window": False, "sliding_window": None},
        "qwen3-tiny", {
            "qwen3-0.6b": _preset("qwen3", n_embd=1024, intermediate_size=3072, n_layer=28, n_head=16, n_kv_head=8,
                                  tie_embeddings=True),
            "qwen3-1.7b": _preset("qwen3", n_embd=2048, intermediate_size=6144, n_layer=28, n_head=16, n_kv_head=8,
                                  tie_embeddings=True),
            "qwen3-4b": _preset("qwen3", n_embd=2560, intermediate_size=9728, n_layer=36, n_head=32, n_kv_head=8,
                                tie_embeddings=True),
            "qwen3-8b": _preset("qwen3", n_embd=4096, intermediate_size=12288, n_layer=36, n_head=32, n_kv_head=8,
                                tie_embeddings=False),
            "qwen3-tiny": _preset("qwen3", **_TINY, head_dim=32, tie_embeddings=True),
        }, Gguf("qwen3", "qwen2", False, GGUF_LLAMA_BLOCK)),
    # Phi-3 / Phi-4-mini, SmolLM3, OLMo 2, Granite 3
    Family("phi3", "Phi3ForCausalLM", _switches_read("phi3", lambda hf: dict(
               qkv_bias=False, attn_out_bias=False, mlp_bias=False, sliding_window=hf.get("sliding_window"))),
           _llama_write("phi3", "Phi3ForCausalLM", lambda c: dict(
               qkv_bias=False, attn_out_bias=False, mlp_bias=False, qk_norm=False,
               partial_rotary_factor=c["partial_rotary_factor"], longrope=c["longrope"]), _phi3_extra),
           _llama_key, LLAMA_LORA, PHI3_LORA_GROUPS, "phi3-tiny", presets={
               "phi-4-mini": _preset("phi3", vocab_size=200064, n_positions=131072, n_embd=3072,
                                     intermediate_size=8192, n_layer=32, n_head=24, n_kv_head=8,
                                     partial_rotary_factor=0.75, longrope=_ones_longrope(96, 131072),
                                     sliding_window=262144, tie_embeddings=True, layer_norm_eps=1e-5,
                                     bos_token_id=199999, eos_token_id=199999),
               "phi-3.5-mini": _preset("phi3", vocab_size=32064, n_positions=131072, n_embd=3072,
                                       intermediate_size=8192, n_layer=32, n_head=32, n_kv_head=32,
                                       longrope=_ones_longrope(96, 131072), sliding_window=262144,
                                       tie_embeddings=False, layer_norm_eps=1e-5, bos_token_id=1,
                                       eos_token_id=32000),
               "phi3-tiny": _preset("phi3", **_NEW_TINY, partial_rotary_factor=0.5, tie_embeddings=True,
                                    sliding_window=24,
                                    longrope=_ones_longrope(8, 256, original=32) | dict(
                                        short_factor=[1.0, 1.5, 2.0, 4.0], long_factor=[2.0, 3.0, 5.0, 9.0])),
           },
           peft_names={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                       "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
           fused=PHI3_FUSED, gguf=Gguf("phi3", "gpt-4o", False, GGUF_PHI3_BLOCK, fused=GGUF_PHI3_FUSED,
                                            rstrip_name="phi3")),
    Family("smollm3", "SmolLM3ForCausalLM", _switches_read("smollm3", _smollm3_own),
           _llama_write("smollm3", "SmolLM3ForCausalLM", lambda c: dict(
               qkv_bias=c["attn_out_bias"], qk_norm=False, rope_layers=c["rope_layers"]), _smollm3_extra),
           _llama_key, LLAMA_LORA, LLAMA_LORA_GROUPS, "smollm3-tiny", presets={
               "smollm3-3b": _preset("smollm3", vocab_size=128256, n_positions=65536, n_embd=2048,
                                     intermediate_size=11008, n_layer=36, n_head=16, n_kv_head=4,
                                     rope_theta=5e6, layer_norm_eps=1e-6, tie_embeddings=True,
                                     rope_layers=[(i + 1) % 4 != 0 for i in range(36)],
                                     bos_token_id=128000, eos_token_id=128012),
               "smollm3-tiny": _preset("smollm3", **_NEW_TINY, tie_embeddings=True, rope_theta=5e6,
                                       rope_layers=[True, False]),
           }, gguf=Gguf("smollm3", "llama-bpe", True, GGUF_LLAMA_BLOCK, hparams=_gguf_smollm3)),
    Family("olmo2", "Olmo2ForCausalLM", _switches_read("olmo2", lambda hf: dict(
               qk_norm=True, qk_norm_full=True, norm_after=True, rms_gain_first=True, mlp_bias=False)),
           _llama_write("olmo2", "Olmo2ForCausalLM", lambda c: dict(
               qkv_bias=c["attn_out_bias"], mlp_bias=False, qk_norm=True, qk_norm_full=True, norm_after=True,
               rms_gain_first=True), lambda c: {"attention_bias": c["attn_out_bias"], "pad_token_id": None}),
           _olmo2_key, LLAMA_LORA, LLAMA_LORA_GROUPS, "olmo2-tiny", presets={
               "olmo-2-1b": _preset("olmo2", vocab_size=100352, n_positions=4096, n_embd=2048,
                                    intermediate_size=8192, n_layer=16, n_head=16, n_kv_head=16, rope_theta=500000.0,
                                    layer_norm_eps=1e-6, tie_embeddings=False, qk_norm=True, qk_norm_full=True,
                                    norm_after=True, rms_gain_first=True, bos_token_id=None,
                                    eos_token_id=100257),
               "olmo2-tiny": _preset("olmo2", **_NEW_TINY, tie_embeddings=False, qk_norm=True, qk_norm_full=True,
                                     norm_after=True, rms_gain_first=True),
           }, gguf=Gguf("olmo2", "dbrx", False, GGUF_OLMO2_BLOCK, hparams=_gguf_no_bias)),
    Family("granite", "GraniteForCausalLM", _switches_read("granite", _granite_own),
           _llama_write("granite", "GraniteForCausalLM", lambda c: dict(
               qkv_bias=c["attn_out_bias"], qk_norm=False, **{k: c[k] for k in (
                   "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")}),
               _granite_extra),
           _llama_key, LLAMA_LORA, LLAMA_LORA_GROUPS, "granite-tiny", presets={
               "granite-3.3-2b": _preset("granite", vocab_size=49159, n_positions=131072, n_embd=2048,
                                         intermediate_size=8192, n_layer=40, n_head=32, n_kv_head=8,
                                         rope_theta=10000000.0, layer_norm_eps=1e-5, tie_embeddings=True,
                                         embedding_multiplier=12.0, attention_multiplier=0.015625,
                                         residual_multiplier=0.22, logits_scaling=8.0, bos_token_id=0,
                                         eos_token_id=0),
               "granite-tiny": _preset("granite", **_NEW_TINY, tie_embeddings=True, embedding_multiplier=6.0,
                                       attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=4.0),
           }, gguf=Gguf("granite", "gpt-2", True, GGUF_LLAMA_BLOCK, hparams=_gguf_granite)),
    # Gemma 2 and Gemma 3 text (their switches: ModelConfig's Gemma block)
    Family("gemma2", "Gemma2ForCausalLM", _gemma_read("gemma2"),
           _gemma_write("gemma2", "Gemma2ForCausalLM"), _gemma_key, LLAMA_LORA, LLAMA_LORA_GROUPS,
           "gemma2-tiny", presets={
               "gemma-2-2b": _gemma_preset("gemma2", n_embd=2304, intermediate_size=9216, n_layer=26,
                                           n_head=8, n_kv_head=4),
               "gemma2-tiny": _gemma_preset("gemma2", **_GEMMA_TINY, n_layer=2, attn_softcap=20.0,
                                            final_softcap=10.0),
           }, gguf=_gemma_gguf("gemma2")),
    Family("gemma3_text", "Gemma3ForCausalLM", _gemma_read("gemma3_text"),
           _gemma_write("gemma3_text", "Gemma3ForCausalLM"), _gemma_key, LLAMA_LORA, LLAMA_LORA_GROUPS,
           "gemma3-tiny", presets={
               "gemma-3-1b": _gemma_preset("gemma3_text", n_embd=1152, intermediate_size=6912, n_layer=26,
                                           n_head=4, n_kv_head=1, n_positions=32768, sliding_window=512),
               "gemma-3-4b": _gemma_preset("gemma3_text", vocab_size=262208, n_embd=2560,
                                           intermediate_size=10240, n_layer=34, n_head=8, n_kv_head=4,
                                           n_positions=131072, sliding_window=1024, rope_linear_factor=8.0),
               "gemma3-tiny": _gemma_preset("gemma3_text", **_GEMMA_TINY, n_layer=3, rope_linear_factor=2.0,
                                            layer_types=[_SLIDING, _SLIDING, _FULL]),
           }, gguf=_gemma_gguf("gemma3")),
)}


def family(model_type: str) -> Family:
    """The registry entry of `model_type` (a ConfigError naming the supported ones if there is none)."""
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
