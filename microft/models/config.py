"""One `ModelConfig` for every family: the switches the transformer reads, presets, HF config.json in/out.

GPT-2, Llama (SmolLM2 too), Mistral, Qwen2 and Qwen3 are configurations of one implementation
(`models/transformer.py`), as are Phi-3 / Phi-4-mini, SmolLM3, OLMo 2 and Granite 3. `model_type` names the
family's entry in `models/families/` (its HF config keys, tensor names, LoRA targets and presets); everything
the forward pass does is a switch here. No torch import: the memory estimator reads these shapes without
building a model.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from microft.errors import ConfigError
from microft.models.families import EOT_TOKEN, FAMILIES, GPT2_VOCAB_SIZE, family

IGNORE_INDEX = -100
CE_CHUNK_BYTES = 64 * 2**20  # fp32 logits the fused loss holds at once (models/loss.py)

PRESETS: dict[str, dict[str, Any]] = {name: {"model_type": f.model_type, **kw}
                                      for f in FAMILIES.values() for name, kw in f.presets.items()}


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


class LongRope(BaseModel):
    """Phi-3's LongRoPE (`rope_type: longrope`, older `su`): each RoPE frequency divided by its own factor,
    the short factors up to `original_max_position_embeddings` positions and the long ones past them (chosen
    per forward by its furthest position, as transformers does), cos and sin × `attention_factor`."""

    model_config = ConfigDict(extra="forbid")

    short_factor: list[float]
    long_factor: list[float]
    original_max_position_embeddings: int = Field(gt=0)
    attention_factor: float = Field(gt=0)


class ModelConfig(BaseModel):
    """Shape and switches of a decoder-only transformer. Defaults are GPT-2's.

    `n_kv_head`, `head_dim` and `intermediate_size` may be left out: they are filled in
    (n_head, n_embd / n_head, 4 × n_embd). `layer_norm_eps` is the eps of either norm.
    `padded_vocab_size` is internal: checkpoints keep `vocab_size` rows.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = "custom"
    model_type: str = "gpt2"  # a key of models.families.FAMILIES
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
    # Phi-3 / Phi-4-mini, SmolLM3, OLMo 2, Granite 3 (families `phi3`, `smollm3`, `olmo2`, `granite`)
    partial_rotary_factor: float = Field(1.0, gt=0, le=1)  # RoPE on the first head_dim × this dims of q, k
    longrope: LongRope | None = None  # Phi-3's LongRoPE scaling
    # per layer: whether it applies RoPE (SmolLM3's NoPE layers); None: all
    rope_layers: list[bool] | None = None
    # OLMo 2: the block norms act on the attention's / MLP's outputs, not their inputs
    norm_after: bool = False
    rms_gain_first: bool = False  # OLMo 2: RMSNorm multiplies its gain in fp32, before the cast back
    qk_norm_full: bool = False  # OLMo 2: the q/k RMSNorm spans the whole projection (all heads), not one head
    embedding_multiplier: float = Field(1.0, gt=0)  # Granite: token embeddings × this
    # Granite: the attention scale (else head_dim^-1/2)
    attention_multiplier: float | None = Field(None, gt=0)
    # Granite: attention and MLP outputs × this before the residual
    residual_multiplier: float = Field(1.0, gt=0)
    logits_scaling: float = Field(1.0, gt=0)  # Granite: logits divided by this
    # Gemma 2 / Gemma 3 text (families `gemma2`, `gemma3_text`)
    norm_unit_offset: bool = False  # RMSNorm gains are (1 + weight), applied in fp32 before the cast back
    scale_embeddings: bool = False  # token embeddings × sqrt(n_embd), rounded to the weights' dtype first
    post_norms: bool = False  # RMSNorm on the attention's and the MLP's outputs too (four norms a block)
    glu_act: Literal["silu", "gelu_tanh"] = "silu"  # the gated MLP's activation: SwiGLU, or GeGLU (tanh-GELU)
    query_pre_attn_scalar: float | None = Field(None, gt=0)  # scores × this^-1/2 (else head_dim^-1/2)
    attn_softcap: float | None = Field(None, gt=0)  # attention scores -> cap × tanh(scores / cap)
    final_softcap: float | None = Field(None, gt=0)  # logits -> cap × tanh(logits / cap)
    # per layer; None: every layer takes sliding_window (Mistral)
    layer_types: list[Literal["sliding_attention", "full_attention"]] | None = None
    rope_local_theta: float | None = Field(None, gt=0)  # RoPE base of the sliding layers (else rope_theta)
    rope_linear_factor: float | None = Field(None, gt=0)  # full-attention layers' positions / factor
    # special tokens the checkpoint declares (None: GPT-2's <|endoftext|> for gpt2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @model_validator(mode="after")
    def _derive(self) -> ModelConfig:
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {', '.join(FAMILIES)}")
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
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise ValueError(f"layer_types lists {len(self.layer_types)} layers, "
                                 f"the model has {self.n_layer}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("sliding_attention layers need a sliding_window")
        if (self.rope_local_theta or self.rope_linear_factor) and self.rope_scaling is not None:
            raise ValueError("rope_scaling (llama3) does not combine with rope_local_theta or "
                             "rope_linear_factor")
        self._check_rope_switches()
        return self

    def _check_rope_switches(self) -> None:
        """Partial rotary, LongRoPE and per-layer RoPE (phi3, smollm3) fit the shapes."""
        if self.positions == "rope" and self.rotary_dim % 2:
            raise ValueError(f"RoPE needs an even rotary dimension, got {self.rotary_dim} "
                             f"(head_dim {self.head_dim} × partial_rotary_factor "
                             f"{self.partial_rotary_factor})")
        if self.longrope is not None:
            if self.positions != "rope" or self.rope_scaling is not None:
                raise ValueError("longrope needs positions='rope' and no llama3 rope_scaling")
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.longrope, name)) != self.rotary_dim // 2:
                    raise ValueError(f"longrope {name} has {len(getattr(self.longrope, name))} values, the "
                                     f"rotary dimension {self.rotary_dim} needs {self.rotary_dim // 2}")
        if self.rope_layers is not None and len(self.rope_layers) != self.n_layer:
            raise ValueError(f"rope_layers lists {len(self.rope_layers)} layers, the model has "
                             f"{self.n_layer}")

    def layer_rope(self, i: int) -> bool:
        """Whether layer `i` rotates q and k (RoPE models; SmolLM3 leaves some layers without positions)."""
        return self.rotary and (self.rope_layers is None or self.rope_layers[i])

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer `i` (None: it attends to every earlier position)."""
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    def local_rope(self, i: int) -> bool:
        """Whether layer `i` takes the sliding layers' own RoPE table (Gemma 3's local base, no scaling)."""
        return bool(self.rope_local_theta or self.rope_linear_factor) and self.layer_window(i) is not None

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
    def qkv_dim(self) -> int:  # q, k and v stacked
        return self.q_dim + 2 * self.kv_dim

    @property
    def rotary(self) -> bool:  # RoPE (else learned positions)
        return self.positions == "rope"

    @property
    def rotary_dim(self) -> int:  # the leading dims of each head RoPE turns (Phi-4-mini: 3/4 of them)
        return int(self.head_dim * self.partial_rotary_factor)

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
        qk_norm = (self.q_dim + self.kv_dim) if self.qk_norm_full else 2 * self.head_dim
        norms = (4 if self.post_norms else 2) * norm
        per_block = norms + attn_bias + qk_norm * self.qk_norm + mlp_bias
        embed = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        pos = self.n_positions * C if self.positions == "learned" else 0
        return self.matmul_params() - self.vocab_size * C + embed + pos + L * per_block + norm

    def flops_per_token(self, seq_len: int, trainable_fraction: float = 1.0) -> float:
        """Training FLOPs per token: 6 × matmul weights (head included) + attention scores and values.

        Frozen weights (LoRA) need no weight gradient: 4 instead of 6 each. A sliding window caps
        the keys each query sees.
        """
        keys = sum(min(seq_len, w) if (w := self.layer_window(i)) else seq_len for i in range(self.n_layer))
        attn = 12 * self.q_dim * keys  # QK^T and AV, forward + backward
        return (4 + 2 * trainable_fraction) * self.matmul_params() + attn

    # --- constructors ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom", where: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict of any family in `models.families.FAMILIES`.

        Reads RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
        """
        model_type = hf.get("model_type", "gpt2")
        fam = family(model_type)
        try:
            return cls(name=name, **{"model_type": model_type, **fam.read_hf(hf)})
        except KeyError as e:
            why = f"it has no {e.args[0]!r}"
        except ValidationError as e:
            why = _one_line(ValueError("; ".join(f"{'.'.join(map(str, err['loc']))} {err['msg'].lower()}"
                                                 for err in e.errors())))
        except (ValueError, TypeError, AttributeError, ArithmeticError) as e:  # a value of the wrong kind
            why = _one_line(e)
        raise ConfigError(f"{where} is not a valid {model_type} config: {why}") from None

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` for this model (transformers loads it as the same model); a
        ConfigError names the switches the family's config.json cannot express."""
        return family(self.model_type).write_hf(self.model_dump())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def preset_for_repo(repo_id: str) -> str | None:
    """The preset with a hub repo's shapes, from its name (`meta-llama/Llama-3.1-8B-Instruct` ->
    `llama-3.1-8b`, `Qwen/Qwen3-0.6B-Base` -> `qwen3-0.6b`, `mistralai/Mistral-7B-v0.1` -> `mistral-7b`);
    None when no preset matches. Instruct/base/chat variants share their base model's shapes."""
    name = repo_id.rsplit("/", 1)[-1].lower()
    name = re.sub(r"^meta-", "", name)  # Meta-Llama-3.1-8B, the older repo name
    # Mistral v0.3 has another vocabulary: no "-v0.3"
    for suffix in ("-instruct", "-base", "-chat", "-hf", "-v0.1", "-v0.2"):
        name = name.replace(suffix, "")
    return name if name in PRESETS and not name.endswith("-tiny") else None


# --- LoRA targets ------------------------------------------------------------------------------
def lora_target_table(model_type: str = "gpt2"
                      ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, ...]]]:
    """(targets, groups) for a family: target name -> (block submodule, linear), group -> targets."""
    fam = family(model_type)
    return fam.lora_targets, fam.lora_groups


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
