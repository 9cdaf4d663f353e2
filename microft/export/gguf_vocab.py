"""The tokenizer as GGUF writes it: what llama.cpp's `gpt2` (byte-level BPE) and `llama`
(SentencePiece-style) tokenizers read, with every stop id placed where llama.cpp looks for it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microft.errors import ConfigError
from microft.export import require_gguf
from microft.models.config import ModelConfig

if TYPE_CHECKING:
    from microft.data.tokenizer import Tokenizer

# split regexes of the pre-tokenizers llama.cpp knows by name (as tokenizer.json writes them)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_REGEX = (  # tiktoken's o200k split: Phi-4-mini's
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT4O_REGEX: "gpt-4o"}


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
    llama.cpp knows (GPT-2's byte level, SmolLM's single digits + byte level, Llama 3's, Qwen2's and
    GPT-4o's split)."""
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


def vocab_of(tok: Tokenizer, cfg: ModelConfig, fallback_pre: str) -> Vocab:
    """The tokenizer as GGUF writes it, padded with unused tokens up to the model's vocabulary.

    `fallback_pre`: the family's pre-tokenizer name, for a byte-level BPE whose own is not one llama.cpp
    knows by its structure (a note says so)."""
    from microft.data.tokenizer import HFTokenizer, TiktokenTokenizer

    gg = require_gguf()
    notes: list[str] = []
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
            fields["pre"] = fallback_pre
            notes.append(
                f"the tokenizer's pre-tokenizer is not one llama.cpp knows by name; wrote {fallback_pre!r} "
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
