"""GGUF export: one file that llama.cpp, Ollama and LM Studio run, written with ggml's own `gguf` package.

What goes in: the architecture and its hyper-parameters, every weight under llama.cpp's tensor names and
in its layout, the tokenizer (a byte-level BPE's vocabulary, merges, token types and the pre-tokenizer name
that picks llama.cpp's split regex, or a SentencePiece-style BPE's pieces and scores; bos/eos/pad and every
stop id) and the chat template the model was tuned with. Beside it, an Ollama `Modelfile`.

Each family is one entry of `FAMILIES`: llama.cpp's architecture name, the pre-tokenizer it falls back
to, whether q/k rows are permuted for llama.cpp's pairwise RoPE, the tensor-name map and the
architecture's own hyper-parameter keys. Tensors are
streamed: the file's header is written from shapes alone, then each tensor is converted and written on
its own, so the export holds the model plus one converted tensor, never a second copy of the model.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from microft.errors import ConfigError
from microft.models.config import ModelConfig

if TYPE_CHECKING:
    from microft.chat import ChatTemplate
    from microft.templates import Template
    from microft.tokenizer import Tokenizer

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_QUANT = "f16"
MODELFILE = "Modelfile"
HINT = "GGUF export needs the gguf package: pip install 'microft[gguf]'"
QK = 32  # ggml's block size for q8_0 / q4_0: rows must be a multiple of it
# split regexes of the pre-tokenizers llama.cpp knows by name (as tokenizer.json writes them)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def require_gguf():
    """The `gguf` package, or a one-line ConfigError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(HINT) from None
    return gguf


# --------------------------------------------------------------------------- the families


def _block_names(model_type: str) -> dict[str, str]:
    """microft block parameter (after `h.{i}.`) -> llama.cpp tensor (after `blk.{i}.`)."""
    if model_type == "gpt2":
        names = {
            "ln_1": "attn_norm",
            "attn.c_attn": "attn_qkv",
            "attn.c_proj": "attn_output",
            "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up",
            "mlp.c_proj": "ffn_down",
        }
    else:
        names = {
            "ln_1": "attn_norm",
            "attn.q_proj": "attn_q",
            "attn.k_proj": "attn_k",
            "attn.v_proj": "attn_v",
            "attn.o_proj": "attn_output",
            "attn.q_norm": "attn_q_norm",
            "attn.k_norm": "attn_k_norm",
            "ln_2": "ffn_norm",
            "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        }
    return {f"{k}.{p}": f"{v}.{p}" for k, v in names.items() for p in ("weight", "bias")}


TOP_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}


def _layer_norm_hparams(w: Any, cfg: ModelConfig) -> None:
    """GPT-2: LayerNorm's eps (learned positions, no RoPE)."""
    w.add_layer_norm_eps(cfg.layer_norm_eps)


def _rope_hparams(w: Any, cfg: ModelConfig) -> None:
    """Llama-style: grouped KV heads, head size, RMSNorm's eps, RoPE's base and width."""
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.layer_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.sliding_window:  # recorded; llama.cpp's llama graph attends to the whole context (see README)
        w.add_sliding_window(cfg.sliding_window)


@dataclass(frozen=True)
class Family:
    """How one microft family is written for llama.cpp.

    microft keeps every projection in nn.Linear's (out, in) layout (GPT-2's Conv1D weights are transposed
    when read from HF files, and its q/k/v stay fused in `c_attn`), which is the layout GGUF stores: the
    only transform left is the q/k row order for llama.cpp's pairwise RoPE.
    """

    arch: str  # llama.cpp's architecture name
    pre: str  # pre-tokenizer when the tokenizer's own is not one llama.cpp knows by structure
    rope_pairs: bool  # llama.cpp rotates adjacent pairs (not halves): q/k rows are permuted to match
    block: dict[str, str] = field(repr=False)  # microft block parameter -> llama.cpp tensor
    hparams: Callable[[Any, ModelConfig], None] = field(default=_rope_hparams, repr=False)  # arch-only keys


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "gpt-2", False, _block_names("gpt2"), _layer_norm_hparams),
    "llama": Family("llama", "llama-bpe", True, _block_names("llama")),  # SmolLM2 too ("smollm" pre)
    "mistral": Family("llama", "llama-bpe", True, _block_names("mistral")),  # llama.cpp runs Mistral as llama
    "qwen2": Family("qwen2", "qwen2", False, _block_names("qwen2")),
    "qwen3": Family("qwen3", "qwen2", False, _block_names("qwen3")),
}


def family(cfg: ModelConfig) -> Family:
    if cfg.model_type not in FAMILIES:
        raise ConfigError(
            f"GGUF export does not know model_type {cfg.model_type!r}; known: {', '.join(FAMILIES)}"
        )
    return FAMILIES[cfg.model_type]


def gguf_name(cfg: ModelConfig, name: str) -> str:
    """llama.cpp's name for a microft parameter (`h.3.attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    head, i, rest = name.split(".", 2)
    if head != "h" or rest not in family(cfg).block:
        raise ConfigError(f"GGUF export has no llama.cpp name for {name}")
    return f"blk.{i}.{family(cfg).block[rest]}"


def write_hparams(w: Any, cfg: ModelConfig) -> None:
    """The architecture's hyper-parameters under llama.cpp's keys: the shared ones, then the family's."""
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    family(cfg).hparams(w, cfg)


# --------------------------------------------------------------------------- tensors


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from the rotate-halves order (HF, microft) to llama.cpp's rotate-adjacent-pairs order.

    Within each head, row j of the first half and row j of the second half become rows 2j and 2j + 1.
    """
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_freqs(cfg: ModelConfig) -> torch.Tensor | None:
    """Llama 3's RoPE scaling as llama.cpp reads it: a `rope_freqs` tensor that divides each frequency."""
    if cfg.rope_scaling is None:
        return None
    from microft.models.transformer import rope_inv_freq

    plain = rope_inv_freq(cfg.model_copy(update={"rope_scaling": None}))
    return (plain / rope_inv_freq(cfg)).float()


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 CPU tensor in llama.cpp's layout) of each weight, one at a time.

    Vocabulary rows are unpadded; a tied head is left out (llama.cpp reuses token_embd).
    """
    cfg: ModelConfig = model.config
    fam = family(cfg)
    freqs = rope_freqs(cfg)
    if freqs is not None:
        yield "rope_freqs.weight", freqs
    for name, p in model.named_parameters(remove_duplicate=True):
        if "lora_" in name:
            raise ConfigError("the model has unmerged LoRA adapters; merge them before exporting")
        t = p.detach()
        if name in ("wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        if fam.rope_pairs and (".attn.q_proj." in name or ".attn.k_proj." in name):
            t = permute_rows(t, cfg.n_head if ".q_proj." in name else cfg.n_kv_head)
        yield gguf_name(cfg, name), t.to("cpu", torch.float32).contiguous()


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """The storage type of one tensor: vectors (norms, biases, rope_freqs) stay f32, as llama.cpp's own
    converter keeps them; q8_0/q4_0 rows that are not a multiple of 32 fall back to f16."""
    if len(shape) < 2 or quant == "f32":
        return "f32"
    if quant in ("q8_0", "q4_0") and shape[-1] % QK:
        return "f16"
    return quant


def _qtype(kind: str):
    g = require_gguf().GGMLQuantizationType
    return {"f32": g.F32, "f16": g.F16, "bf16": g.BF16, "q8_0": g.Q8_0, "q4_0": g.Q4_0}[kind]


def encode_tensor(t: torch.Tensor, kind: str) -> np.ndarray:
    """A fp32 tensor as the bytes (or f32/f16 array) GGUF stores for `kind`."""
    a = t.numpy()
    if kind == "f32":
        return a
    if kind == "f16":
        return a.astype(np.float16)
    return require_gguf().quants.quantize(a, _qtype(kind))


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    n = 1
    for d in quant_shape_to_byte_shape(shape, _qtype(kind)) if kind not in ("f32", "f16") else shape:
        n *= d
    return n * {"f32": 4, "f16": 2}.get(kind, 1)


# --------------------------------------------------------------------------- the tokenizer


@dataclass
class Vocab:
    """What GGUF's tokenizer keys hold."""

    tokens: list[str]
    types: list[int]
    merges: list[
        str
    ]  # byte-level BPE ("gpt2"); empty for SentencePiece-style ("llama"), which merges by score
    pre: str | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    pad_id: int | None
    add_bos: bool
    stops: list[str]  # text of every stop token (Ollama's PARAMETER stop)
    notes: list[str] = field(default_factory=list)
    model: str = "gpt2"  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    scores: list[float] | None = None
    unk_id: int | None = None
    space_prefix: bool = False


def _byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """`token` split by byte-level BPE using only merges ranked below `max_rank` (tiktoken's rule)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_vocab(ranks: dict[bytes, int]) -> tuple[list[str], list[str]]:
    """(tokens in rank order, merges) of a tiktoken ranks table, in byte-level BPE's written form.

    tiktoken keeps ranks only; the merge that made each multi-byte token is the last step of encoding
    it with the merges ranked below it.
    """
    enc = _byte_encoder()
    text = {tok: "".join(enc[b] for b in tok) for tok in ranks}
    tokens = [text[t] for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _bpe_parts(ranks, tok, rank)
            if len(parts) != 2:
                raise ConfigError(f"tokenizer: token {tok!r} is not the merge of two earlier tokens")
            merges.append(f"{text[parts[0]]} {text[parts[1]]}")
    return tokens, merges


def _pre_of(tj: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json's pre_tokenizer, when its structure is one
    llama.cpp knows (GPT-2's byte level, SmolLM's single digits + byte level, Llama 3's and Qwen2's split)."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLIT_PRE.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def _token_table(tj: dict[str, Any], n: int, byte_tokens: bool) -> tuple[list[str], list[int]]:
    """Token texts and types of a tokenizer.json: added special tokens are control tokens, other added ones
    user-defined, `<0xNN>` byte-fallback pieces bytes, the unknown token unknown, ids without a token
    unused."""
    gg = require_gguf()
    model = tj["model"]
    tokens: list[str | None] = [None] * n
    types = [int(gg.TokenType.NORMAL)] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
        if byte_tokens and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = int(gg.TokenType.BYTE)
    if model.get("unk_token") in model["vocab"]:
        types[model["vocab"][model["unk_token"]]] = int(gg.TokenType.UNKNOWN)
    for added in tj.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = int(gg.TokenType.CONTROL if added.get("special") else gg.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", int(gg.TokenType.UNUSED)
    return tokens, types  # type: ignore[return-value]


def _space_prefix(tj: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (a Prepend normalizer, or a
    Metaspace pre-tokenizer that prepends)."""

    def steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        node = node or {}
        return node.get(key, []) if node.get("type") == "Sequence" else [node]

    if any(n.get("type") == "Prepend" for n in steps(tj.get("normalizer"), "normalizers")):
        return True
    return any(
        n.get("type") == "Metaspace"
        and n.get("prepend_scheme", "always") != "never"
        and n.get("add_prefix_space", True)
        for n in steps(tj.get("pre_tokenizer"), "pretokenizers")
    )


def _hf_vocab(tok: Tokenizer) -> dict[str, Any]:
    """A tokenizer.json's BPE as GGUF fields: byte-level ("gpt2", with merges and a pre-tokenizer name) or
    SentencePiece-style with byte fallback ("llama", Mistral 7B's and Llama 2's kind).

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores highest; scoring
    each piece by minus the rank of the merge that makes it reproduces the BPE's merge order.
    """
    tj = json.loads(tok.raw.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(
            f"{tok.name}: GGUF export writes BPE tokenizers; this tokenizer.json has a "
            f"{model.get('type')} model"
        )
    spm = bool(model.get("byte_fallback"))
    tokens, types = _token_table(tj, tok.vocab_size, spm)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not spm:
        return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_of(tj)}
    rank = {"".join(m.split(" ")): r for r, m in reversed(list(enumerate(merges)))}
    scores = [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -1e9) for t in tokens]
    return {
        "tokens": tokens,
        "types": types,
        "merges": [],
        "pre": None,
        "model": "llama",
        "scores": scores,
        "unk_id": model["vocab"].get(model.get("unk_token")),
        "space_prefix": _space_prefix(tj),
    }


def vocab_of(tok: Tokenizer, cfg: ModelConfig) -> Vocab:
    """The tokenizer as GGUF writes it, padded with unused tokens up to the model's vocabulary."""
    from microft.tokenizer import HFTokenizer, TiktokenTokenizer

    gg = require_gguf()
    fam, notes = family(cfg), []
    if isinstance(tok, TiktokenTokenizer):
        tokens, merges = tiktoken_vocab(tok.enc._mergeable_ranks)
        types = [int(gg.TokenType.NORMAL)] * len(tokens)
        for text, i in sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1]):
            tokens += [f"[PAD{j}]" for j in range(len(tokens), i)]
            types += [int(gg.TokenType.UNUSED)] * (i - len(types))
            tokens.append(text)
            types.append(int(gg.TokenType.CONTROL))
        fields = {
            "tokens": tokens,
            "types": types,
            "merges": merges,
            "pre": "gpt-2" if cfg.model_type == "gpt2" else "llama-bpe",
        }
    elif isinstance(tok, HFTokenizer):
        fields = _hf_vocab(tok)
        if fields.get("model", "gpt2") == "gpt2" and fields["pre"] is None:
            fields["pre"] = fam.pre
            notes.append(
                f"the tokenizer's pre-tokenizer is not one llama.cpp knows by name; wrote {fam.pre!r} "
                f"(the {cfg.model_type} default)"
            )
    else:
        raise ConfigError(f"{tok.name}: GGUF export cannot write this kind of tokenizer")
    tokens, types = fields.pop("tokens"), fields.pop("types")
    if len(tokens) > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokens)} tokens but the model only {cfg.vocab_size} embeddings"
        )
    pad = cfg.vocab_size - len(tokens)
    types += [int(gg.TokenType.UNUSED)] * pad
    if fields.get("scores") is not None:
        fields["scores"] += [-1e9] * pad
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    eot, eom = _stop_roles(tok)
    for i in tok.eos_ids:  # llama.cpp ends generation at eos/eot/eom and control tokens with these names
        types[i] = int(gg.TokenType.CONTROL)
    return Vocab(
        tokens=tokens,
        types=types,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        eot_id=eot,
        eom_id=eom,
        pad_id=tok.pad_id,
        add_bos=tok.add_bos,
        stops=[tok.decode([i]) for i in tok.eos_ids],
        notes=notes,
        **fields,
    )


# the stop tokens llama.cpp treats as end of generation by their text alone (llama-vocab.cpp)
EOG_NAMES = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
)


def _stop_roles(tok: Tokenizer) -> tuple[int | None, int | None]:
    """(eot, eom) ids among the stop ids after eos: `<|eom_id|>` is eom; the first other is eot.

    More stop ids than eos/eot/eom can name are refused unless llama.cpp knows them by their text.
    """
    eot = eom = None
    for i in tok.eos_ids[1:]:
        text = tok.decode([i])
        if text == "<|eom_id|>" and eom is None:
            eom = i
        elif eot is None:
            eot = i
        elif text not in EOG_NAMES:
            raise ConfigError(
                f"the tokenizer has more stop ids than GGUF can name ({tok.eos_ids}); {text!r} "
                "would not stop llama.cpp"
            )
    return eot, eom


def write_vocab(w: Any, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    if v.merges:
        w.add_token_merges(v.merges)
    if v.model == "llama":
        w.add_add_space_prefix(v.space_prefix)
    for key, value in (
        ("bos", v.bos_id),
        ("eos", v.eos_id),
        ("eot", v.eot_id),
        ("eom", v.eom_id),
        ("pad", v.pad_id),
        ("unk", v.unk_id),
    ):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(bool(v.add_bos and v.bos_id is not None))
    w.add_add_eos_token(False)


# --------------------------------------------------------------------------- chat templates


def _jinja_str(text: str) -> str:
    """`text` as a jinja string literal (quotes, backslashes and line breaks escaped)."""
    esc = (
        text.replace("\\", "\\\\")
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return "'" + esc + "'"


def _jinja_lit(text: str) -> str:
    return "{{ " + _jinja_str(text) + " }}"


def _jinja_format(fmt: str, fields: dict[str, str]) -> str:
    """A microft format string as jinja: literal text as strings, each {field} as the expression given."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            out.append(_jinja_lit(literal))
        if name is not None:
            out.append("{{ " + fields[name] + " }}")
    return "".join(out)


def _single_instruction(t: Template) -> str:
    return (
        "{%- if messages|length <= 2 and messages[0]['role'] == 'user' and "
        "(messages|length == 1 or messages[1]['role'] == 'assistant') -%}"
        + _jinja_format(t.prompt_no_input, {"instruction": "messages[0]['content']", "input": "''"})
        + "{%- if messages|length == 2 -%}{{ messages[1]['content'] }}"
        + _jinja_lit(t.response_end)
        + "{{ eos_token }}{%- endif -%}"
    )


def template_jinja(t: Template) -> str:
    """A microft template (alpaca, chatml, plain or a TOML/JSON file) as a jinja chat template that renders
    conversations to the text microft trains on.

    One user message (and its answer) is an instruction record: `prompt_no_input`, the answer,
    `response_end`, EOS, as `microft generate --template` prompts. Longer conversations are chat records:
    each message in `turn`, EOS after a final assistant turn.
    """
    roles = "{" + ", ".join(f"{_jinja_str(k)}: {_jinja_str(v)}" for k, v in t.roles.items()) + "}"
    out = _single_instruction(t)
    if t.turn is None:
        return (
            out
            + "{%- else -%}{{ raise_exception('this template renders one user message only') }}{%- endif -%}"
        )
    head, tail = t.turn.split("{content}")
    role = {"role": "(roles[m['role']] if m['role'] in roles else m['role'])"}
    assistant = {"role": "roles['assistant']"}
    return (
        out
        + "{%- else -%}{%- set roles = "
        + roles
        + " -%}{%- for m in messages -%}"
        + _jinja_format(head, role)
        + "{{ m['content'] }}"
        + _jinja_format(tail, role)
        + "{%- if loop.last and m['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + _jinja_format(head, assistant)
        + "{%- endif -%}{%- endif -%}"
    )


def _go_lit(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _go_format(fmt: str, fields: dict[str, str]) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        out.append(_go_lit(literal))
        if name is not None:
            out.append(fields[name])
    return "".join(out)


def template_go(t: Template) -> str:
    """The same rendering as `template_jinja` in Ollama's Go template syntax (`.Messages`, `.Role`,
    `.Content`)."""
    one = "(index .Messages 0)"
    out = (
        "{{- if and (eq (len .Messages) 1) (eq "
        + one
        + '.Role "user") }}'
        + _go_format(t.prompt_no_input, {"instruction": "{{ " + one + ".Content }}", "input": ""})
    )
    if t.turn is None:
        return out + "{{- else }}{{ range .Messages }}{{ .Content }}{{ end }}{{- end }}"
    head, tail = t.turn.split("{content}")
    shown = "".join(
        f"{{{{ if eq .Role {json.dumps(k)} }}}}{_go_lit(v)}{{{{ else }}}}" for k, v in t.roles.items()
    )
    shown += "{{ .Role }}" + "{{ end }}" * len(t.roles)
    out += (
        "{{- else }}{{ range .Messages }}"
        + _go_format(head, {"role": shown})
        + "{{ .Content }}"
        + _go_format(tail, {"role": shown})
        + "{{ end }}"
        + _go_format(head, {"role": _go_lit(t.roles["assistant"])})
        + "{{- end }}"
    )
    return out


def _plain_text_specials(tok: Tokenizer, tmpl: Template | ChatTemplate | None) -> list[str]:
    """Special-token strings in a microft template's text: microft encodes that text as plain text, while
    llama.cpp and Ollama read the string in a chat prompt as the control token."""
    from microft.templates import Template

    if not isinstance(tmpl, Template):
        return []
    text = tmpl.prompt + tmpl.prompt_no_input + (tmpl.turn or "") + tmpl.response_end
    found = sorted({s for s in (tok.decode([i]) for i in tok.special_ids) if s and s in text})
    return [
        f"template {tmpl.name!r} writes {s!r}, which microft trained on as plain text but llama.cpp and "
        "Ollama read as a control token"
        for s in found
    ]


def chat_template_of(tmpl: Template | ChatTemplate | None) -> str | None:
    """The jinja chat template GGUF carries for the template a model was tuned with (None: none)."""
    from microft.templates import Template

    if tmpl is None:
        return None
    return template_jinja(tmpl) if isinstance(tmpl, Template) else tmpl.source


def trained_template_spec(model_dir: Path | None) -> str | None:
    """The `--template` a run's weights were tuned with, from the run's record (run.json beside `final/` or
    `best/`, or above `checkpoints/step-N/`); None without a record or for a pretraining run (text data)."""
    if model_dir is None:
        return None
    for d in (model_dir, model_dir.parent, model_dir.parent.parent):
        rec = d / "run.json"
        if rec.is_file():
            try:
                cfg = json.loads(rec.read_text(encoding="utf-8")).get("config") or {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                return None
            data = str(cfg.get("data") or "")
            if data and (data.endswith(".txt") or Path(data).is_dir()):
                return None
            return cfg.get("template") or "auto"
    return None


# --------------------------------------------------------------------------- writing


def file_stem(spec: str, model_dir: Path | None) -> str:
    """The file's name: the run's for its `final/`, `best/` or a step checkpoint, else the model directory's
    (or the preset's)."""
    if model_dir is None:
        return Path(spec).name or "model"
    d = model_dir.resolve()
    while d.name in ("final", "best", "checkpoints") or d.name.startswith("step-"):
        d = d.parent
    return d.name or "model"


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    modelfile: Path
    quant: str
    n_tensors: int
    template: str | None
    notes: list[str]


def _modelfile(gguf_file: str, v: Vocab, tmpl: Template | ChatTemplate | None) -> str:
    from microft.templates import Template

    lines = [f"FROM ./{gguf_file}"]
    if isinstance(tmpl, Template):
        lines.append('TEMPLATE """' + template_go(tmpl) + '"""')
    elif tmpl is not None:
        lines.append(
            "# no TEMPLATE: Ollama matches the GGUF's jinja chat template (tokenizer.chat_template) to one "
            "of its own; add a TEMPLATE in Go template syntax where it has none that fits"
        )
    stops = list(dict.fromkeys(v.stops + ([tmpl.stop] if isinstance(tmpl, Template) and tmpl.stop else [])))
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_gguf(
    path: Path, model: torch.nn.Module, v: Vocab, quant: str, chat_template: str | None, name: str
) -> int:
    """Write the GGUF file: header and metadata from the shapes, then each tensor converted on its own."""
    gg = require_gguf()
    cfg: ModelConfig = model.config
    w = gg.GGUFWriter(str(path), family(cfg).arch)
    w.add_name(name)
    w.add_file_type(_file_type(quant))
    w.add_quantization_version(gg.GGML_QUANT_VERSION)
    write_hparams(w, cfg)
    write_vocab(w, v)
    if chat_template:
        w.add_chat_template(chat_template)
    kinds = []
    for tname, t in gguf_tensors(model):  # shapes only: nothing is converted yet
        kind = tensor_type(tname, tuple(t.shape), quant)
        kinds.append(kind)
        w.add_tensor_info(
            tname, tuple(t.shape), np.dtype(np.float32), _nbytes(tuple(t.shape), kind), raw_dtype=_qtype(kind)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for (_, t), kind in zip(gguf_tensors(model), kinds):
        w.write_tensor_data(encode_tensor(t, kind))
    w.close()
    return len(kinds)


def _file_type(quant: str) -> int:
    ft = require_gguf().LlamaFileType
    return {
        "f32": ft.ALL_F32,
        "f16": ft.MOSTLY_F16,
        "bf16": ft.MOSTLY_BF16,
        "q8_0": ft.MOSTLY_Q8_0,
        "q4_0": ft.MOSTLY_Q4_0,
    }[quant]


def export_gguf(
    model: torch.nn.Module,
    tok: Tokenizer,
    out_dir: str | Path,
    quant: str = DEFAULT_QUANT,
    template: Template | ChatTemplate | None = None,
    overwrite: bool = False,
    name: str = "model",
) -> GGUFExport:
    """Write `out_dir/<name>-<quant>.gguf` and an Ollama `Modelfile`, atomically.

    `template`: the template the model was tuned with (its jinja form goes into the file). Refuses a
    non-empty `out_dir` unless `overwrite`.
    """
    from microft.weights import atomic_dir

    if quant not in QUANTS:
        raise ConfigError(f"unknown --quant {quant!r}; choose one of: {', '.join(QUANTS)}")
    require_gguf()
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; pass --force to overwrite it")
    v = vocab_of(tok, model.config)
    v.notes += _plain_text_specials(tok, template)
    jinja = chat_template_of(template)
    fname = f"{name}-{quant}.gguf"
    with atomic_dir(out_dir) as tmp:
        n = write_gguf(tmp / fname, model, v, quant, jinja, name)
        (tmp / MODELFILE).write_text(_modelfile(fname, v, template), encoding="utf-8")
    return GGUFExport(
        out_dir / fname, out_dir / MODELFILE, quant, n, getattr(template, "name", None), v.notes
    )
