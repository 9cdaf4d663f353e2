"""One `ModelConfig` for every family: the switches the transformer reads, presets, HF config.json in/out.

GPT-2, Llama (SmolLM2 too), Mistral, Qwen2 and Qwen3 are configurations of one implementation
(`models/transformer.py`). `model_type` only chooses names (module and HF keys) and what
`to_hf()` writes; everything the forward pass does is a switch here. No torch import: the
memory estimator reads these shapes without building a model.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from microft.errors import ConfigError

GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256
IGNORE_INDEX = -100
CE_CHUNK_BYTES = 64 * 2**20  # fp32 logits the fused loss holds at once (models/loss.py)

ModelType = Literal["gpt2", "llama", "mistral", "qwen2", "qwen3"]
HF_TYPES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def ce_chunks(n_rows: int, padded_vocab: int) -> list[tuple[int, int]]:
    """(start, rows) of the fused loss's chunks of a flattened batch of `n_rows` positions.

    Chunks hold at most CE_CHUNK_BYTES of fp32 logits, in parts of a multiple of 128
    rows (333-row chunks and a ragged tail run the LM-head matmuls ~20 % slower on CPU).
    """
    size = ce_chunk_rows(n_rows, padded_vocab)
    return [(s, min(size, n_rows - s)) for s in range(0, n_rows, size)]


def ce_chunk_rows(n_rows: int, padded_vocab: int) -> int:
    """Rows in each of `ce_chunks`' chunks but the last (the memory estimator's, without listing them)."""
    cap = max(128, CE_CHUNK_BYTES // (4 * padded_vocab) // 128 * 128)
    if n_rows <= cap:
        return max(n_rows, 1)
    size = -(-n_rows // -(-n_rows // cap))  # the fewest chunks under the cap, split equally
    return -(-size // 128) * 128


class RopeScaling(BaseModel):
    """Llama 3's frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    model_config = ConfigDict(extra="forbid")

    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)


class ModelConfig(BaseModel):
    """Shape and switches of a decoder-only transformer. Defaults are GPT-2's.

    `n_kv_head`, `head_dim` and `intermediate_size` may be left out: they are filled in
    (n_head, n_embd / n_head, 4 × n_embd). `layer_norm_eps` is the eps of either norm.
    `padded_vocab_size` is internal: checkpoints keep `vocab_size` rows.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = "custom"
    model_type: ModelType = "gpt2"
    vocab_size: int = Field(GPT2_VOCAB_SIZE, gt=0)
    n_positions: int = Field(1024, gt=0)
    n_embd: int = Field(768, gt=0)
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    layer_norm_eps: float = 1e-5
    # normalisation and positions
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    # attention
    n_kv_head: int | None = Field(None, gt=0)  # < n_head: grouped-query attention
    head_dim: int | None = Field(None, gt=0)
    qkv_bias: bool = True
    attn_out_bias: bool = True
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = Field(None, gt=0)  # keys further back than this are masked (Mistral)
    # MLP and head
    mlp: Literal["gelu", "swiglu"] = "gelu"
    intermediate_size: int | None = Field(None, gt=0)
    mlp_bias: bool = True
    tie_embeddings: bool = True
    # special tokens the checkpoint declares (None: GPT-2's <|endoftext|> for gpt2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @model_validator(mode="after")
    def _derive(self) -> ModelConfig:
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError("rope_scaling needs positions='rope'")
        if self.qk_norm and self.model_type == "gpt2":
            raise ValueError("qk_norm needs a model_type with separate q/k/v projections (not gpt2)")
        return self

    # --- derived shapes ---------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of 64 so the LM-head matmul is aligned."""
        return 64 * math.ceil(self.vocab_size / 64)

    @property
    def fused_qkv(self) -> bool:
        """GPT-2 keeps one `c_attn` (q, k, v stacked); the other families have q/k/v_proj."""
        return self.model_type == "gpt2"

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end generation (GPT-2: <|endoftext|>)."""
        if self.eos_token_id is None:
            return [EOT_TOKEN] if self.model_type == "gpt2" else []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def matmul_params(self) -> int:
        """Weights of the block matmuls and the LM head: what FLOPs scale with."""
        C, hidden = self.n_embd, self.intermediate_size
        attn = C * (self.q_dim + 2 * self.kv_dim) + self.q_dim * C
        mlp = (3 if self.mlp == "swiglu" else 2) * C * hidden
        return self.n_layer * (attn + mlp) + self.vocab_size * C

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once, unpadded vocab): one formula for every family."""
        C, hidden, L = self.n_embd, self.intermediate_size, self.n_layer
        norm = C * (2 if self.norm == "layernorm" else 1)
        attn_bias = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + C * self.attn_out_bias
        mlp_bias = ((2 * hidden if self.mlp == "swiglu" else hidden) + C) * self.mlp_bias
        per_block = 2 * norm + attn_bias + 2 * self.head_dim * self.qk_norm + mlp_bias
        embed = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        pos = self.n_positions * C if self.positions == "learned" else 0
        return self.matmul_params() - self.vocab_size * C + embed + pos + L * per_block + norm

    def flops_per_token(self, seq_len: int, trainable_fraction: float = 1.0) -> float:
        """Training FLOPs per token: 6 × matmul weights (head included) + attention scores and values.

        Frozen weights (LoRA) need no weight gradient: 4 instead of 6 each. A sliding window caps
        the keys each query sees.
        """
        keys = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        attn = 12 * self.n_layer * self.q_dim * keys  # QK^T and AV, forward + backward
        return (4 + 2 * trainable_fraction) * self.matmul_params() + attn

    # --- constructors ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom", where: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (gpt2, llama, mistral, qwen2, qwen3).

        Reads RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
        """
        model_type = hf.get("model_type", "gpt2")
        if model_type not in HF_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported; supported: {', '.join(HF_TYPES)}")
        try:
            fields = _gpt2_fields(hf) if model_type == "gpt2" else _llama_fields(hf, model_type)
            return cls(name=name, **fields)
        except KeyError as e:
            raise ConfigError(f"{where} is not a valid {model_type} config: it has no {e.args[0]!r}") from None
        except ValidationError as e:
            why = "; ".join(f"{'.'.join(map(str, err['loc']))} {err['msg'].lower()}" for err in e.errors())
            raise ConfigError(f"{where} is not a valid {model_type} config: {_one_line(ValueError(why))}") from None
        except TypeError as e:
            raise ConfigError(f"{where} is not a valid {model_type} config: {_one_line(e)}") from None

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` for this model (transformers loads it as the same model)."""
        if self.model_type == "gpt2":
            return self._gpt2_hf()
        want = dict(norm="rmsnorm", positions="rope", mlp="swiglu")
        if self.model_type == "qwen2":
            want.update(qkv_bias=True, attn_out_bias=False, mlp_bias=False, qk_norm=False)
        elif self.model_type == "mistral":
            want.update(qkv_bias=False, attn_out_bias=False, mlp_bias=False, qk_norm=False)
        elif self.model_type == "llama":
            want.update(qkv_bias=self.attn_out_bias, qk_norm=False)
        else:
            want.update(qkv_bias=self.attn_out_bias, mlp_bias=False, qk_norm=True)
        off = [k for k, v in want.items() if getattr(self, k) != v]
        if self.sliding_window and self.model_type != "mistral":
            off.append("sliding_window")
        if off:
            raise ConfigError(f"a {self.model_type} config.json cannot express this model's {', '.join(off)}")
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **self.rope_scaling.model_dump()}
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.n_positions,
            "rms_norm_eps": self.layer_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "attention_dropout": self.dropout,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": 0.02,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attn_out_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None)
        return out

    def _gpt2_special(self, token_id: int | list[int] | None) -> int | list[int] | None:
        """A GPT-2 special id as exported: its own, else GPT-2's <|endoftext|> where the vocabulary has it."""
        if token_id is None:
            return EOT_TOKEN if self.vocab_size > EOT_TOKEN else None
        return token_id

    def _gpt2_hf(self) -> dict[str, Any]:
        want = dict(norm="layernorm", positions="learned", mlp="gelu", qkv_bias=True, attn_out_bias=True,
                    mlp_bias=True, tie_embeddings=True, sliding_window=None, intermediate_size=4 * self.n_embd,
                    head_dim=self.n_embd // self.n_head, n_kv_head=self.n_head)
        off = [k for k, v in want.items() if getattr(self, k) != v]
        if off:
            raise ConfigError(f"a gpt2 config.json cannot express this model's {', '.join(off)}")
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": 0.02,
            "bos_token_id": self._gpt2_special(self.bos_token_id),
            "eos_token_id": self._gpt2_special(self.eos_token_id),
            "tie_word_embeddings": True,
        }


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# GPT-2 config.json switches microft's GPT-2 does not implement: (key, transformers' default, values it runs)
_GPT2_FIXED = (("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # both tanh-GELU
               ("scale_attn_weights", True, (True,)), ("scale_attn_by_inverse_layer_idx", False, (False,)))


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ConfigError(f"GPT-2 configs with n_inner={hf['n_inner']} are not supported (only 4 × n_embd)")
    for key, default, runs in _GPT2_FIXED:  # refused, not ignored: the logits would differ from transformers'
        if hf.get(key, default) not in runs:
            raise ConfigError(f"GPT-2 configs with {key}={hf[key]!r} are not supported (only {runs[0]!r})")
    return dict(vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE), n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
                n_embd=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, llama3 scaling) from either layout: `rope_parameters`, or `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}  # transformers 5 writes this; it wins where both are present
    scaling = params or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (only the default and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, RopeScaling(**{k: scaling[k] for k in keys})


def _llama_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
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
        model_type=model_type, vocab_size=int(hf["vocab_size"]), n_positions=int(hf.get("max_position_embeddings", 4096)),
        n_embd=C, n_layer=int(hf["num_hidden_layers"]), n_head=heads,
        n_kv_head=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or C // heads),
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm="rmsnorm", positions="rope",
        rope_theta=theta, rope_scaling=scaling,
        qkv_bias=True if model_type == "qwen2" else (bias and model_type != "mistral"),
        attn_out_bias=bias and model_type in ("llama", "qwen3"), qk_norm=model_type == "qwen3",
        sliding_window=window, mlp="swiglu", intermediate_size=int(hf["intermediate_size"]),
        mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=float(hf.get("attention_dropout") or 0.0),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
    )


# --- presets (random init; the shapes of the hub checkpoints) -----------------------------------
def _family(model_type: str, **kw: Any) -> dict[str, Any]:
    base = dict(model_type=model_type, norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False,
                attn_out_bias=False, mlp_bias=False)
    if model_type == "qwen2":
        base.update(qkv_bias=True, layer_norm_eps=1e-6, vocab_size=151936, rope_theta=1e6,
                    bos_token_id=151643, eos_token_id=151643)
    if model_type == "qwen3":
        base.update(qk_norm=True, layer_norm_eps=1e-6, vocab_size=151936, rope_theta=1e6, n_positions=40960,
                    head_dim=128, bos_token_id=151643, eos_token_id=151645)
    return {**base, **kw}


_LLAMA3 = dict(vocab_size=128256, n_positions=131072, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
_SMOL = dict(vocab_size=49152, n_positions=8192, bos_token_id=0, eos_token_id=0)


def _llama3_scaling(factor: float) -> dict[str, Any]:
    return dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=256, n_positions=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),
    "llama-3.2-1b": _family("llama", **_LLAMA3, n_embd=2048, intermediate_size=8192, n_layer=16, n_head=32,
                            n_kv_head=8, tie_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
    "llama-3.2-3b": _family("llama", **_LLAMA3, n_embd=3072, intermediate_size=8192, n_layer=28, n_head=24,
                            n_kv_head=8, tie_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
    "llama-3.1-8b": _family("llama", **_LLAMA3, n_embd=4096, intermediate_size=14336, n_layer=32, n_head=32,
                            n_kv_head=8, tie_embeddings=False, rope_scaling=_llama3_scaling(8.0)),
    "qwen3-0.6b": _family("qwen3", n_embd=1024, intermediate_size=3072, n_layer=28, n_head=16, n_kv_head=8,
                          tie_embeddings=True),
    "qwen3-1.7b": _family("qwen3", n_embd=2048, intermediate_size=6144, n_layer=28, n_head=16, n_kv_head=8,
                          tie_embeddings=True),
    "qwen3-4b": _family("qwen3", n_embd=2560, intermediate_size=9728, n_layer=36, n_head=32, n_kv_head=8,
                        tie_embeddings=True),
    "qwen3-8b": _family("qwen3", n_embd=4096, intermediate_size=12288, n_layer=36, n_head=32, n_kv_head=8,
                        tie_embeddings=False),
    "qwen2.5-0.5b": _family("qwen2", n_embd=896, intermediate_size=4864, n_layer=24, n_head=14, n_kv_head=2,
                            n_positions=32768, tie_embeddings=True),
    "qwen2.5-1.5b": _family("qwen2", n_embd=1536, intermediate_size=8960, n_layer=28, n_head=12, n_kv_head=2,
                            n_positions=131072, tie_embeddings=True),
    "qwen2.5-7b": _family("qwen2", n_embd=3584, intermediate_size=18944, n_layer=28, n_head=28, n_kv_head=4,
                          n_positions=131072, vocab_size=152064, tie_embeddings=False),
    "smollm2-135m": _family("llama", **_SMOL, n_embd=576, intermediate_size=1536, n_layer=30, n_head=9,
                            n_kv_head=3, rope_theta=100000.0, tie_embeddings=True),
    "smollm2-360m": _family("llama", **_SMOL, n_embd=960, intermediate_size=2560, n_layer=32, n_head=15,
                            n_kv_head=5, rope_theta=100000.0, tie_embeddings=True),
    "smollm2-1.7b": _family("llama", **_SMOL, n_embd=2048, intermediate_size=8192, n_layer=24, n_head=32,
                            n_kv_head=32, rope_theta=130000.0, tie_embeddings=True),
    "mistral-7b": _family("mistral", vocab_size=32000, n_positions=32768, n_embd=4096, intermediate_size=14336,
                          n_layer=32, n_head=32, n_kv_head=8, sliding_window=4096, tie_embeddings=False,
                          bos_token_id=1, eos_token_id=2),
    # tiny CPU models of each family (tests, smoke runs)
    "llama-tiny": _family("llama", vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_layer=2,
                          n_head=4, n_kv_head=2, rope_theta=500000.0, tie_embeddings=False,
                          rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=64), bos_token_id=1, eos_token_id=2),
    "qwen2-tiny": _family("qwen2", vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_layer=2,
                          n_head=4, n_kv_head=2, tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "qwen3-tiny": _family("qwen3", vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_layer=2,
                          n_head=4, n_kv_head=2, head_dim=32, tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "mistral-tiny": _family("mistral", vocab_size=512, n_positions=256, n_embd=64, intermediate_size=128, n_layer=2,
                            n_head=4, n_kv_head=2, sliding_window=16, tie_embeddings=False, bos_token_id=1,
                            eos_token_id=2),
}


def preset_for_repo(repo_id: str) -> str | None:
    """The preset with a hub repo's shapes, from its name (`meta-llama/Llama-3.1-8B-Instruct` ->
    `llama-3.1-8b`, `Qwen/Qwen3-0.6B-Base` -> `qwen3-0.6b`, `mistralai/Mistral-7B-v0.1` -> `mistral-7b`);
    None when no preset matches. Instruct/base/chat variants share their base model's shapes."""
    name = repo_id.rsplit("/", 1)[-1].lower()
    name = re.sub(r"^meta-", "", name)  # Meta-Llama-3.1-8B, the older repo name
    for suffix in ("-instruct", "-base", "-chat", "-hf", "-v0.1", "-v0.2"):  # Mistral v0.3 has another vocabulary
        name = name.replace(suffix, "")
    return name if name in PRESETS and not name.endswith("-tiny") else None


# --- LoRA targets ------------------------------------------------------------------------------
# target name -> (block submodule, linear); GPT-2's paths are HF GPT-2's module names too
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "qkv": ("attn", "c_attn"),
    "proj": ("attn", "c_proj"),
    "fc": ("mlp", "c_fc"),
    "mlp_proj": ("mlp", "c_proj"),
}
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("qkv", "proj"),
    "mlp": ("fc", "mlp_proj"),
    "all": tuple(LORA_TARGETS),
}
# the other families: PEFT's names, and GPT-2's names as aliases of the same roles
LLAMA_LORA_TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("attn", "q_proj"), "k_proj": ("attn", "k_proj"), "v_proj": ("attn", "v_proj"),
    "o_proj": ("attn", "o_proj"), "gate_proj": ("mlp", "gate_proj"), "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
LLAMA_LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "proj": ("o_proj",), "fc": ("gate_proj", "up_proj"),
    "mlp_proj": ("down_proj",), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"), "all": tuple(LLAMA_LORA_TARGETS),
}


def lora_target_table(model_type: str = "gpt2") -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, ...]]]:
    """(targets, groups) for a family: target name -> (block submodule, linear), group -> targets."""
    return (LORA_TARGETS, LORA_GROUPS) if model_type == "gpt2" else (LLAMA_LORA_TARGETS, LLAMA_LORA_GROUPS)


def parse_lora_targets(spec: str | list[str] | tuple[str, ...], model_type: str = "gpt2") -> list[str]:
    """`"qkv,proj"`, `"attn"`, `"q_proj,v_proj"`, `"all"`... -> the family's target names in a fixed order."""
    targets, groups = lora_target_table(model_type)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    valid = ", ".join([*targets, *groups])
    chosen: set[str] = set()
    for raw in names:
        name = raw.strip().lower()
        if name in targets:
            chosen.add(name)
        elif name in groups:
            chosen.update(groups[name])
        elif name:
            raise ConfigError(f"unknown LoRA target {raw.strip()!r} for {model_type}; valid targets: {valid}")
    if not chosen:
        raise ConfigError(f"no LoRA targets given; valid targets: {valid}")
    return [t for t in targets if t in chosen]
