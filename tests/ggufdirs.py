"""Tiny random models of each family, saved by transformers with a BPE tokenizer in the family's format.

Each tokenizer is trained here with `tokenizers` (byte-level BPE) and its family's pre-tokenizer: GPT-2's
byte-level regex, Llama 3's and Qwen2's split regexes, SmolLM's single digits. Weights are drawn larger
than transformers' default and the final norm is scaled, so the logits are far apart and a greedy
continuation is decided by clear margins rather than rounding.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from microft.export.gguf_vocab import GPT4O_REGEX, LLAMA3_REGEX, QWEN2_REGEX

CORPUS = [
    "Hello world, how are you? I am fine, thank you. The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? 日本語のテキスト 😀 emoji and 12345 numbers 3.14159, user assistant system",
    "What is two plus two? It is four. Translate to French: the cat. Le chat. Reverse abc: cba.",
    "  indented  text\n\nnew lines\tand tabs; it's they're we'll I'd (brackets) [x] {y} <z> a+b=c 100%",
]
CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '[INST] ' + m.content + ' [/INST]' }}"
    "{%- else %}{{- ' ' + m.content + eos_token }}{%- endif %}{%- endfor %}"
)
PHI3 = (
    "{%- for m in messages %}{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
GEMMA = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content | trim"
    " + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
GRANITE = (
    "{%- for m in messages %}{{- '<|start_of_role|>' + m.role + '<|end_of_role|>' + m.content"
    " + '<|end_of_text|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|end|>"]
PHI3_RSTRIP = ("</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
GEMMA_SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# family -> (pre-tokenizer, special tokens, bos, eos, extra stop tokens, chat template, BOS added)
FAMILY_TOKENIZERS = {
    "gpt2": ("gpt-2", ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", [], None, False),
    "llama": (
        "llama-bpe",
        LLAMA_SPECIALS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|end_of_text|>", "<|eom_id|>"],
        LLAMA3,
        True,
    ),
    "qwen2": ("qwen2", CHATML_SPECIALS, None, "<|im_end|>", ["<|endoftext|>"], CHATML, False),
    "qwen3": ("qwen2", CHATML_SPECIALS, None, "<|im_end|>", ["<|endoftext|>"], CHATML, False),
    "smollm2": ("smollm", CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", [], CHATML, False),
    "mistral": ("spm", ["<unk>", "<s>", "</s>"], "<s>", "</s>", [], MISTRAL, True),  # Mistral 7B's kind
    # the newer families: Phi-3.5's SentencePiece vocabulary, Gemma's (no space put before the text)
    "phi3": ("spm", PHI3_SPECIALS, "<s>", "<|endoftext|>", ["<|end|>"], PHI3, False),
    "phi3.5": ("spm", PHI3_SPECIALS, "<s>", "<|endoftext|>", ["<|end|>"], PHI3, False),
    "phi4": ("gpt-4o", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             "<|endoftext|>", "<|endoftext|>", ["<|end|>"], PHI3, False),  # Phi-4-mini's byte-level BPE
    "smollm3": ("llama-bpe", CHATML_SPECIALS, None, "<|im_end|>", ["<|endoftext|>"], CHATML, False),
    "olmo2": ("llama-bpe", CHATML_SPECIALS, None, "<|im_end|>", ["<|endoftext|>"], CHATML, False),
    "granite": ("gpt-2", ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"], "<|end_of_text|>",
                "<|end_of_text|>", [], GRANITE, False),
    "gemma2": ("spm-bare", GEMMA_SPECIALS, "<bos>", "<eos>", ["<end_of_turn>"], GEMMA, True),
    "gemma3": ("spm-bare", GEMMA_SPECIALS, "<bos>", "<eos>", ["<end_of_turn>"], GEMMA, True),
}


def spm_tokenizer(specials: tuple[str, ...], prefix: bool = True):
    """A SentencePiece-style BPE as Mistral 7B's and Llama 2's tokenizer.json have it: "▁" for spaces put
    before the text by a normalizer (not with `prefix=False`, as Gemma's), no pre-tokenizer, the 256
    `<0xNN>` byte-fallback pieces after the specials, then the learned pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always"
    )  # pieces within words
    tok.train_from_iterator(
        CORPUS * 10, trainers.BpeTrainer(vocab_size=420, special_tokens=list(specials), show_progress=False)
    )
    learned = json.loads(tok.to_str())["model"]
    order = [*specials, *(f"<0x{b:02X}>" for b in range(256))]
    order += [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    out = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(order)},
            merges,
            unk_token=specials[0],
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    space = [normalizers.Prepend("▁")] if prefix else []
    out.normalizer = normalizers.Sequence([*space, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *strip])
    from tokenizers import AddedToken

    # Phi-3's turn markers swallow the whitespace after them (rstrip), as in its tokenizer.json
    out.add_special_tokens([AddedToken(t, special=True, rstrip=t in PHI3_RSTRIP) for t in specials])
    return out


@cache
def tokenizer_json(pre: str, specials: tuple[str, ...], bos: str | None) -> str:
    """A BPE trained on CORPUS: byte-level with `pre`'s pre-tokenizer, or SentencePiece-style for "spm"; BOS
    put first when `bos` is given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if pre in ("spm", "spm-bare"):
        tok = spm_tokenizer(specials, prefix=pre == "spm")
        if bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        return tok.to_str()

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    if pre == "gpt-2":
        tok.pre_tokenizer = byte_level
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        regex = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "gpt-4o": GPT4O_REGEX}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), "isolated"), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        )
    tok.post_processor = processors.Sequence(steps)
    return tok.to_str()


def write_tokenizer(d: Path, name: str) -> dict:
    """The family's tokenizer files in `d`; returns their ids (vocab, bos, eos list)."""
    from tokenizers import Tokenizer

    pre, specials, bos, eos, stops, template, adds_bos = FAMILY_TOKENIZERS[name]
    text = tokenizer_json(pre, tuple(specials), bos if adds_bos else None)
    (d / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.from_str(text)
    meta = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if template:
        meta["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(meta), encoding="utf-8")
    eos_ids = [tok.token_to_id(t) for t in [eos, *stops]]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}), encoding="utf-8")
    return {"vocab": tok.get_vocab_size(), "bos": tok.token_to_id(bos) if bos else None, "eos": eos_ids}


def hf_config(name: str, ids: dict):
    """A transformers config of a tiny model of the family (llama: Llama 3.1's rope scaling; mistral: a
    sliding window)."""
    import transformers as tf

    V, bos, eos = ids["vocab"] + 3, ids["bos"], ids["eos"][0]  # 3 unused rows, as real checkpoints have
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=bos,
        eos_token_id=eos,
        initializer_range=0.15,
    )
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=V,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=bos,
            eos_token_id=eos,
            initializer_range=0.15,
        )
    if name == "llama":
        return tf.LlamaConfig(
            **common,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        )
    if name == "smollm2":
        return tf.LlamaConfig(**common, rope_theta=100000.0, tie_word_embeddings=True)
    if name == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)  # Qwen2.5-7B; smaller ones tie
    if name == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)  # Qwen3 0.6B-4B tie
    if name == "mistral":
        # the window: see test_gguf
        return tf.MistralConfig(**common, sliding_window=64, tie_word_embeddings=False)
    return newer_family_config(name, common)


def newer_family_config(name: str, common: dict):
    """Tiny Phi-3, SmolLM3, OLMo 2, Granite, Gemma 2 and Gemma 3 configs with each switch llama.cpp reads set
    away from its default: Phi-4-mini's partial rotary and tied head with LongRoPE, Phi-3.5's LongRoPE over
    the whole head with its own LM head (the short factors: the prompt stays within the original context,
    as llama.cpp's context of 128, rounded up to 256, does), SmolLM3's NoPE every 4th layer, Granite's
    multipliers and biases, Gemma 2's soft-caps and window, Gemma 3's local RoPE base, linear scaling and 2:1
    pattern; both with `query_pre_attn_scalar` != head_dim."""
    import transformers as tf

    if name in ("phi3", "phi4"):
        return tf.Phi3Config(**{**common, "max_position_embeddings": 1024},
                             original_max_position_embeddings=256, partial_rotary_factor=0.5,
                             tie_word_embeddings=True, pad_token_id=None, rope_parameters={
                                 "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [2.0, 3.0, 5.0, 9.0]})
    if name == "phi3.5":  # Phi-3.5-mini: LongRoPE over the whole head, its own LM head
        return tf.Phi3Config(**{**common, "max_position_embeddings": 1024},
                             original_max_position_embeddings=256, tie_word_embeddings=False,
                             pad_token_id=None, rope_parameters={
                                 "rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                 "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]})
    if name == "smollm3":
        return tf.SmolLM3Config(**{**common, "num_hidden_layers": 4}, no_rope_layer_interval=4,
                                pad_token_id=None, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 5e6})
    if name == "olmo2":
        return tf.Olmo2Config(**common, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=None,
                              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if name == "granite":
        return tf.GraniteConfig(**common, embedding_multiplier=6.0, attention_multiplier=0.09,
                                residual_multiplier=0.4, logits_scaling=3.0, attention_bias=True,
                                mlp_bias=True, tie_word_embeddings=True, pad_token_id=None)
    gemma = dict(common, head_dim=32, query_pre_attn_scalar=24, sliding_window=8, pad_token_id=None,
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    if name == "gemma2":
        return tf.Gemma2Config(**gemma, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    return tf.Gemma3TextConfig(**{**gemma, "num_hidden_layers": 3}, layer_types=[
        "sliding_attention", "sliding_attention", "full_attention"], rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}})


def write_family_dir(d: Path, name: str, seed: int = 0) -> Path:
    """A transformers checkpoint of family `name` with its tokenizer files, in `d`."""
    import transformers as tf

    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(d, name)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(name, ids))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "ln_f.weight")) and "layers" not in n and ".h." not in n:
                p.mul_(6.0).add_(5.0 if not p.any() else 0.0)  # the final norm: wide logits (Gemma's: 1 + w)
            elif "norm" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)  # norm weights that are not all ones test their mapping
    model.save_pretrained(d)
    write_tokenizer(d, name)  # again: save_pretrained wrote a generation_config.json with one eos id
    return d


def rounded_model(d: Path, gguf_path: Path):
    """The checkpoint in `d` (microft) with each weight the GGUF file rounds (bf16, q8_0, q4_0) replaced by
    the values its blocks decode to: what llama.cpp multiplies by."""
    import gguf

    from microft.export.gguf import family, gguf_name
    from microft.models.artifacts import load_any

    model = load_any(str(d))
    blocks = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    cfg = model.config
    with torch.no_grad():
        for n, p in model.named_parameters():
            t = blocks.get(gguf_name(cfg, n))
            if t is None or t.tensor_type.name in ("F32", "F16"):
                continue
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(-1, p.shape[1])
            if family(cfg).rope_pairs and (
                ".q_proj." in n or ".k_proj." in n
            ):  # undo the permutation
                heads = cfg.n_head if ".q_proj." in n else cfg.n_kv_head
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            p[: w.shape[0]].copy_(w)
    return model
