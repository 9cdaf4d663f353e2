"""Tokenizers: one interface over GPT-2's vendored BPE, `tokenizer.json` files and Llama 3's tiktoken file.

`load_tokenizer(spec)` picks the source for a model: a directory's `tokenizer.json` (the `tokenizers`
package), else its `tokenizer.model` when that is a tiktoken ranks file (Llama 3: base64 token and
rank per line), else GPT-2's encoding (built offline from the vendored ranks file, see README:
attribution) for no model, a preset, or a GPT-2 directory without tokenizer files. BOS/EOS/pad come
from `tokenizer_config.json` (plain strings or AddedToken dicts), `special_tokens_map.json`,
`generation_config.json` and `config.json` (an int or a list of ids). Nothing is downloaded.

`encode(text)` treats special-token strings in `text` as plain text, so data can't inject control
tokens; `encode(text, special=True)` parses them (what rendered chat-template text needs). Neither
adds BOS: callers prepend `tok.prefix` (`[bos_id]` when the tokenizer adds one, else `[]`).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import tiktoken

from microft.errors import ConfigError
from microft.models.config import EOT_TOKEN, GPT2_VOCAB_SIZE

RANKS_PATH = Path(__file__).parent.parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's gpt2 / r50k_base split pattern
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
# Llama 3's split pattern (the cl100k one) and its 256 special tokens, numbered from the base vocabulary size
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
# Llama 3.0's named specials by offset; 3.1+ renamed offsets 4, 8 and 10 (see _llama3_specials)
_LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 9: "<|eot_id|>"}
_LLAMA31_NAMED = {4: "<|finetune_right_pad_id|>", 8: "<|eom_id|>", 10: "<|python_tag|>"}


def _load_ranks(path: Path) -> dict[bytes, int]:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"vendored tokenizer file {path} is corrupt (sha256 {digest})")
    return _parse_ranks(raw, path)


def _parse_ranks(raw: bytes, path: Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(raw.splitlines(), start=1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ConfigError(f"{path}: line {n} is not '<base64 token> <rank>'") from None
    return ranks


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding; never touches the network."""
    return tiktoken.Encoding(
        name="gpt2-microft",
        pat_str=PAT_STR,
        mergeable_ranks=_load_ranks(RANKS_PATH),
        special_tokens={EOT: EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Encode ordinary text; a literal '<|endoftext|>' in it is treated as text, not the special token."""
    return get_encoding().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)


# --------------------------------------------------------------------------- the interface


class Tokenizer:
    """What every tokenizer offers; the two implementations below fill it in.

    `eos_ids` lists every id that ends generation (the tokenizer's own EOS first); `special_ids` are
    the control tokens (BOS/EOS/chat markers) that `encode` only produces with `special=True`.
    `bos_token` / `eos_token` are the strings chat templates see.
    """

    name: str
    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    add_bos: bool
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    special_ids: frozenset[int]

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def prefix(self) -> list[int]:
        """The ids put before a document: [bos_id] when this tokenizer adds BOS, else []."""
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

    def encode(self, text: str, special: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text, special=True)` with each token's (start, end) character offsets in `text`."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} vocab={self.vocab_size} bos={self.bos_id} "
                f"eos={self.eos_ids} pad={self.pad_id}>")


class TiktokenTokenizer(Tokenizer):
    """GPT-2's vendored encoding or a Llama 3 `tokenizer.model`, through tiktoken."""

    def __init__(self, enc: tiktoken.Encoding, name: str, *, bos: str | None, eos: Sequence[str],
                 pad: str | None = None, add_bos: bool = False, chat_template: str | None = None):
        self.enc = enc
        self.name = name
        self.vocab_size = enc.n_vocab
        self.bos_token = bos
        self.eos_token = eos[0] if eos else None
        self.bos_id = self.token_to_id(bos) if bos else None
        self.eos_ids = [i for i in (self.token_to_id(t) for t in eos) if i is not None]
        self.pad_id = self.token_to_id(pad) if pad else None
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_ids = frozenset(enc._special_tokens.values())

    def encode(self, text: str, special: bool = False) -> list[int]:
        if special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text, special=True)
        char_at = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]  # byte -> char
        offsets, b = [], 0
        for t in ids:  # a token may start or end inside a character: it then covers that whole character
            n = len(self.enc.decode_single_token_bytes(t))
            offsets.append((char_at[b], char_at[b + n - 1] + 1))
            b += n
        return ids, offsets

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [i for i in ids if not (skip_special and i in self.special_ids)]
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (what exact streaming decode needs); U+FFFD for an unknown id."""
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:  # ids beyond the vocabulary (a model with padded or extra embeddings)
            return "\ufffd".encode()

    def token_to_id(self, token: str) -> int | None:
        special = self.enc._special_tokens
        if token in special:
            return special[token]
        ids = self.enc.encode_ordinary(token)
        return ids[0] if len(ids) == 1 else None


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` through the `tokenizers` package (what transformers' fast tokenizers run)."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        from tokenizers import Tokenizer as RawTokenizer

        try:
            self.raw = RawTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise ConfigError(f"{path}: can't be read as a tokenizer.json ({e})") from None
        self.name = str(path.parent)
        # offsets come from a copy without the post-processor: ids are the same when no special tokens
        # are added, and ByteLevel's offset trimming would otherwise give whitespace tokens no width
        self._tok = RawTokenizer.from_str(self.raw.to_str())
        self._tok.post_processor = None
        self._plain = RawTokenizer.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True  # special-token strings become ordinary text
        added = self.raw.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = self.raw.get_vocab_size(with_added_tokens=True)
        _fill_specials(self, meta)
        if self.bos_id is not None:
            with_specials = self.raw.encode("a", add_special_tokens=True).ids
            self.add_bos = bool(with_specials) and with_specials[0] == self.bos_id
        else:
            self.add_bos = False
        self.chat_template = meta.get("chat_template")

    def encode(self, text: str, special: bool = False) -> list[int]:
        tok = self._tok if special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.raw.token_to_id(token)


# --------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_str(v: object) -> str | None:
    """A special token as written in a config: a string, an AddedToken dict, or null."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _ids(v: object) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [i for i in v if isinstance(i, int) and not isinstance(i, bool)]
    return []


def read_chat_template(model_dir: str | Path) -> str | None:
    """The model's jinja chat template: `chat_template.jinja` if present (as transformers prefers it), else
    `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: the "default" one)."""
    d = Path(model_dir)
    f = d / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    t = _read_json(d / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


def _read_meta(d: Path) -> dict[str, Any]:
    """Special tokens and the chat template from a model directory's JSON files (missing files are fine)."""
    tc = _read_json(d / "tokenizer_config.json")
    stm = _read_json(d / "special_tokens_map.json")
    gen = _read_json(d / "generation_config.json")
    cfg = _read_json(d / "config.json")
    meta: dict[str, Any] = {"chat_template": read_chat_template(d)}
    for key in ("bos", "eos", "pad"):
        meta[f"{key}_token"] = _token_str(tc.get(f"{key}_token")) or _token_str(stm.get(f"{key}_token"))
        meta[f"{key}_ids"] = _ids(gen.get(f"{key}_token_id")) + _ids(cfg.get(f"{key}_token_id"))
    if isinstance(tc.get("add_bos_token"), bool):  # tiktoken files only: for tokenizer.json, as in
        meta["add_bos"] = tc["add_bos_token"]  # transformers, the post-processor decides
    return meta


def _fill_specials(tok: Tokenizer, meta: dict[str, Any]) -> None:
    """bos/eos/pad ids and strings: the tokenizer config's token first, then generation_config/config ids."""

    def resolve(key: str) -> tuple[str | None, list[int]]:
        name = meta.get(f"{key}_token")
        ids = [tok.token_to_id(name)] if name else []
        ids = [i for i in ids if i is not None]
        for i in meta.get(f"{key}_ids", []):
            if i not in ids and 0 <= i < tok.vocab_size:
                ids.append(i)
        if name is None and ids:
            name = tok.decode([ids[0]])
        return name, ids

    tok.bos_token, bos = resolve("bos")
    tok.eos_token, tok.eos_ids = resolve("eos")
    _, pad = resolve("pad")
    tok.bos_id = bos[0] if bos else None
    tok.pad_id = pad[0] if pad else None


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` looks like a tiktoken ranks file (first line '<base64> <int>'), not SentencePiece."""
    try:
        with path.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except binascii.Error:
        return False
    return True


def _llama3_specials(n_base: int, d: Path, file_dir: Path) -> dict[str, int]:
    """Llama 3's 256 special tokens from id `n_base` on; 3.1+ names (eom_id, python_tag, ...) when the
    directory's config says it is 3.1 or later (rope scaling), else Llama 3.0's reserved names."""
    cfg = _read_json(d / "config.json") or _read_json(file_dir / "params.json")
    v31 = bool(cfg.get("rope_scaling") or cfg.get("use_scaled_rope"))
    named = {**_LLAMA3_NAMED, **(_LLAMA31_NAMED if v31 else {})}
    out, reserved = {}, 0
    for k in range(LLAMA3_NUM_SPECIAL):
        if k in named:
            out[named[k]] = n_base + k
        else:
            out[f"<|reserved_special_token_{reserved}|>"] = n_base + k
            reserved += 1
    # a tokenizer_config.json beside the file names the specials exactly; it wins where present
    added = _read_json(d / "tokenizer_config.json").get("added_tokens_decoder", {})
    for k, v in added.items():
        if str(k).isdigit() and _token_str(v) and int(k) >= n_base:
            out = {t: i for t, i in out.items() if i != int(k)}
            out[_token_str(v)] = int(k)
    return out


def load_llama3_tiktoken(path: str | Path) -> TiktokenTokenizer:
    """A Llama 3 `tokenizer.model` (tiktoken ranks) with its split pattern and special tokens."""
    path = Path(path)
    d = path.parent.parent if path.parent.name == "original" else path.parent
    ranks = _parse_ranks(path.read_bytes(), path)
    specials = _llama3_specials(len(ranks), d, path.parent)
    enc = tiktoken.Encoding(name=f"llama3:{path}", pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
                            special_tokens=specials)
    meta = _read_meta(d)
    eos = [meta["eos_token"] or "<|end_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    tok = TiktokenTokenizer(enc, str(d), bos=meta["bos_token"] or "<|begin_of_text|>",
                            eos=list(dict.fromkeys(t for t in eos if t in specials)),
                            pad=meta["pad_token"], add_bos=meta.get("add_bos", True),
                            chat_template=meta["chat_template"])
    for i in meta["eos_ids"]:  # generation_config's extra stop ids
        if i not in tok.eos_ids and i in tok.special_ids:
            tok.eos_ids.append(i)
    return tok


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> TiktokenTokenizer:
    """GPT-2's tokenizer: EOS (and BOS) is <|endoftext|>, 50256; no BOS is added; no chat template."""
    return TiktokenTokenizer(get_encoding(), "gpt2", bos=EOT, eos=[EOT])


def load_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """The tokenizer for a model: None or a preset -> GPT-2; a directory (or a file in it) -> its
    `tokenizer.json`, else its tiktoken `tokenizer.model`, else GPT-2 if it is a GPT-2 checkpoint."""
    if spec is None:
        return gpt2_tokenizer()
    p = Path(spec).expanduser()
    if not p.exists():
        from microft.models.config import PRESETS

        if str(spec) in PRESETS:
            return gpt2_tokenizer()
        raise ConfigError(f"no tokenizer for {str(spec)!r}: not a model directory or a preset")
    d = p if p.is_dir() else p.parent
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d / "tokenizer.json", _read_meta(d))
    for model_file in (d / "tokenizer.model", d / "original" / "tokenizer.model"):
        if model_file.is_file():
            if is_tiktoken_file(model_file):
                return load_llama3_tiktoken(model_file)
            raise ConfigError(f"{model_file} is a SentencePiece model; microft reads tokenizer.json for it "
                              "(download the model's tokenizer.json too)")
    model_type = _read_json(d / "config.json").get("model_type", "gpt2")
    if model_type == "gpt2":
        if (d / "vocab.json").is_file() and _read_json(d / "vocab.json") != gpt2_vocab():
            raise ConfigError(f"{d}: vocab.json is not GPT-2's vocabulary, and microft reads any other "
                              "byte-level BPE only from tokenizer.json (transformers' save_pretrained "
                              "writes it)")
        return gpt2_tokenizer()
    raise ConfigError(f"{d}: no tokenizer.json or tokenizer.model for this {model_type} model")


# --------------------------------------------------------------------------- GPT-2's files for other tools

GPT2_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE files write for each byte (GPT-2's convention): printable
    Latin-1 bytes stand for themselves, the other 68 bytes for the code points from 256 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def _first_split(token: bytes, ranks: dict[bytes, int], rank: int) -> tuple[bytes, bytes]:
    """The last merge that builds `token`: byte-pair encoding of its bytes with the merges ranked below
    its own stops at two parts, and they are the pair a merges file lists for it."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = min(((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
        if best[0] >= rank:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"GPT-2 token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


_BYTE_SYMBOLS = _byte_symbols()


def _symbols(b: bytes) -> str:
    """A token's bytes as vocab.json and merges.txt spell them."""
    return "".join(_BYTE_SYMBOLS[x] for x in b)


@lru_cache(maxsize=1)
def gpt2_vocab() -> dict[str, int]:
    """GPT-2's vocabulary as `vocab.json` spells it (byte-level symbols -> id), from the vendored ranks."""
    vocab = {_symbols(t): r for t, r in sorted(get_encoding()._mergeable_ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT] = EOT_TOKEN
    return vocab


@lru_cache(maxsize=1)
def gpt2_vocab_files() -> tuple[str, str]:
    """GPT-2's `vocab.json` and `merges.txt` texts, derived from the vendored ranks (what transformers'
    GPT2Tokenizer reads; the ids and merge order are the ranks, so both encode text alike)."""
    ranks = get_encoding()._mergeable_ranks
    merges = [" ".join(map(_symbols, _first_split(t, ranks, r)))
              for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    return json.dumps(gpt2_vocab(), ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def write_gpt2_tokenizer(directory: str | Path, model_max_length: int | None = None) -> list[str]:
    """Write GPT-2's tokenizer as transformers reads it (`vocab.json`, `merges.txt` and a
    `tokenizer_config.json` naming GPT2Tokenizer and <|endoftext|> as bos/eos/unk) into `directory`,
    so `AutoTokenizer.from_pretrained(directory)` encodes as microft does. Files already there are kept.
    Returns the names written."""
    d = Path(directory)
    vocab, merges = gpt2_vocab_files()
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "add_prefix_space": False, "add_bos_token": False, "model_max_length": model_max_length or 1024}
    texts = dict(zip(GPT2_FILES, (vocab, merges, json.dumps(config, indent=2) + "\n"), strict=True))
    written = []
    for name, body in texts.items():
        if not (d / name).exists():
            (d / name).write_text(body, encoding="utf-8")
            written.append(name)
    return written


# --------------------------------------------------------------------------- streaming decode


def decode_stream(tok: Tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Decode ids as they arrive, yielding only complete characters.

    A token can end inside a multi-byte UTF-8 character (byte-level BPE) or a piece may only decode
    right in context (SentencePiece's leading space); such text waits for the next token. Invalid
    bytes left at the end become U+FFFD, as `decode` does. Special tokens are yielded as their text.
    """
    if isinstance(tok, TiktokenTokenizer):  # exact: feed each token's bytes to an incremental decoder
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in token_ids:
            if text := decoder.decode(tok.token_bytes(t)):
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail
        return
    # any other tokenizer: decode a small window of context plus the new ids and yield what it adds
    ids: list[int] = []
    start = done = 0  # ids[start:done] were already yielded and serve as context
    for t in token_ids:
        ids.append(t)
        before = tok.decode(ids[start:done])
        text = tok.decode(ids[start:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            yield text[len(before):]
            start, done = done, len(ids)
    if done < len(ids):
        before, text = tok.decode(ids[start:done]), tok.decode(ids[start:])
        if len(text) > len(before):
            yield text[len(before):]
