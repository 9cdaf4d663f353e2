"""The GPT-2 BPE tokenizer, built offline from the vendored ranks file (see README: attribution)."""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from pathlib import Path

import tiktoken

from microft.config import EOT_TOKEN, GPT2_VOCAB_SIZE

RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's gpt2 / r50k_base split pattern
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


def _load_ranks(path: Path) -> dict[bytes, int]:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"vendored tokenizer file {path} is corrupt (sha256 {digest})")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
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
    """Encode ordinary text; a literal '<|endoftext|>' in the text is treated as text, not the special token."""
    return get_encoding().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)
