"""Small tokenizer directories built in a second: a BPE trained with `tokenizers`, its config files, and
chat templates written for these tests (ChatML as Qwen uses it, Llama 3's headers, a reasoning template)."""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

CORPUS = [
    "Hello world, how are you? I am fine, thank you. The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? 日本語のテキスト 😀 emoji and 12345 numbers, user assistant system",
    "What is two plus two? It is four. Translate to French: the cat. Le chat. Reverse abc: cba.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML with a default system prompt when the conversation has none (as Qwen2.5's template does)
QWEN_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# the same, with the assistant's text marked for transformers' return_assistant_tokens_mask
QWEN_TEMPLATE_GEN = (
    "{%- if messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- "
    "'\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE_GEN = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}{{- m.content | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- m.content | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# a reasoning template: assistant turns after the last user message open with a <think> block (an empty
# one is written when the content has none); earlier assistant turns lose theirs
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set answer = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{%- if '</think>' in m.content %}{%- set answer = m.content %}"
    "{%- else %}{%- set answer = '<think>\\n\\n</think>\\n\\n' + answer %}{%- endif %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@lru_cache(maxsize=1)
def trained_tokenizer_json() -> str:
    """A byte-level BPE (GPT-2 style pre-tokenizer and decoder) trained on CORPUS, with SPECIALS and two
    non-special added tokens (<think>, </think>), as a tokenizer.json string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens(["<think>", "</think>"])
    return tok.to_str()


def write_qwen_dir(d: Path, template: str = QWEN_TEMPLATE) -> Path:
    """ChatML model: no BOS, EOS <|im_end|> (an AddedToken dict), pad <|endoftext|>, two stop ids."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(trained_tokenizer_json(), encoding="utf-8")
    eos = {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "normalized": False, "special": True,
           "__type": "AddedToken"}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": eos,
        "pad_token": "<|endoftext|>", "chat_template": template}), encoding="utf-8")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
    return d


def write_llama_dir(d: Path, template: str = LLAMA3_TEMPLATE) -> Path:
    """Llama-3-like model: the post-processor adds <|begin_of_text|>; EOS <|eot_id|> plus <|end_of_text|>."""
    from tokenizers import Tokenizer, processors

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(trained_tokenizer_json())
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
        "chat_template": template}), encoding="utf-8")
    end_of_text = tok.token_to_id("<|end_of_text|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text,
                                                                           tok.token_to_id("<|eot_id|>")]}),
                                              encoding="utf-8")
    return d


# tiktoken ranks: the 256 single bytes, then a few merges (including "34", which Llama 3's split pattern
# keeps apart in "1234" because digits are split in groups of three)
MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"34", b"\xc3\xa9"]


def write_llama3_tiktoken(d: Path, config: dict | None = None) -> Path:
    """A Llama 3 style `tokenizer.model` (base64 token, rank) in `d`; returns the file."""
    d.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + MERGES
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]
    (d / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return d / "tokenizer.model"


N_BASE = 256 + len(MERGES)
