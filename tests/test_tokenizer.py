"""Tokenizers: GPT-2's vendored encoding, tokenizer.json (checked against transformers), Llama 3 tiktoken
files, special tokens from the config files, and streaming decode."""

from __future__ import annotations

import json

import pytest

from microft.data.tokenizer import (
    HFTokenizer,
    TiktokenTokenizer,
    decode_stream,
    encode,
    gpt2_tokenizer,
    load_tokenizer,
    read_chat_template,
)
from microft.errors import ConfigError
from microft.generate import stream_text
from microft.models.config import EOT_TOKEN
from tests.tokdirs import N_BASE, QWEN_TEMPLATE, write_llama3_tiktoken, write_llama_dir, write_qwen_dir

TEXTS = ["Hello world, how are you?", "héllo wörld 日本語 😀 12345", "  leading spaces\n\nand\ttabs  ",
         "What is two plus two?\nIt is four."]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"qwen": write_qwen_dir(root / "qwen"), "llama": write_llama_dir(root / "llama")}


@pytest.fixture(scope="module")
def auto(dirs):
    transformers = pytest.importorskip("transformers")
    return {k: transformers.AutoTokenizer.from_pretrained(str(d)) for k, d in dirs.items()}


# --------------------------------------------------------------------------- GPT-2


def test_gpt2_for_no_model_presets_and_gpt2_dirs(tmp_path):
    tok = load_tokenizer(None)
    assert isinstance(tok, TiktokenTokenizer) and tok is load_tokenizer("gpt2-tiny")
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.pad_id, tok.prefix, tok.chat_template) == \
        (50257, EOT_TOKEN, [EOT_TOKEN], None, [], None)
    for text in TEXTS + ["a <|endoftext|> b"]:
        assert tok.encode(text) == encode(text) and tok.decode(tok.encode(text)) == text
    assert EOT_TOKEN not in tok.encode("<|endoftext|>")
    assert tok.encode("<|endoftext|>", special=True) == [EOT_TOKEN]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    assert load_tokenizer(tmp_path) is tok and load_tokenizer(tmp_path / "config.json") is tok


def test_missing_tokenizer_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="not a model directory or a preset"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b\x08\x00sentencepiece")
    with pytest.raises(ConfigError, match="SentencePiece"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- tokenizer.json


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_tokenizer_json_matches_transformers(dirs, auto, name):
    tok, ref = load_tokenizer(dirs[name]), auto[name]
    assert isinstance(tok, HFTokenizer)
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n",
                     "<|start_header_id|>x<|end_header_id|><think>y</think>"]
    for text in texts:
        assert tok.encode(text, special=True) == ref.encode(text, add_special_tokens=False), text
        # BOS as transformers adds it
        assert tok.prefix + tok.encode(text, special=True) == ref.encode(text), text
        ids = tok.encode(text, special=True)
        assert tok.decode(ids) == ref.decode(ids) and tok.decode(ids, skip_special=True) == \
            ref.decode(ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.vocab_size == len(ref)


def test_special_tokens_and_stop_ids(dirs):
    q, ll = load_tokenizer(dirs["qwen"]), load_tokenizer(dirs["llama"])
    im_end, eot = q.token_to_id("<|im_end|>"), q.token_to_id("<|endoftext|>")
    assert (q.bos_id, q.eos_ids, q.pad_id, q.add_bos, q.prefix) == (None, [im_end, eot], eot, False, [])
    assert (q.eos_token, q.bos_token) == ("<|im_end|>", None)
    assert ll.add_bos and ll.prefix == [ll.token_to_id("<|begin_of_text|>")] and ll.pad_id is None
    assert ll.eos_ids == [ll.token_to_id("<|eot_id|>"), ll.token_to_id("<|end_of_text|>")]
    # data text can't produce control tokens unless asked; non-special added tokens (<think>) always match
    assert im_end not in q.encode("a<|im_end|>b") and im_end in q.encode("a<|im_end|>b", special=True)
    assert q.token_to_id("<think>") in q.encode("<think>x") and q.token_to_id("<think>") not in q.special_ids
    assert q.decode(q.encode("a<|im_end|>b")) == "a<|im_end|>b"


def test_chat_template_sources(tmp_path, dirs):
    assert load_tokenizer(dirs["qwen"]).chat_template == QWEN_TEMPLATE
    d = write_qwen_dir(tmp_path / "q")
    (d / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert read_chat_template(d) == "{{ messages[0].content }}"  # the .jinja file wins, as in transformers
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).chat_template == "D"


# --------------------------------------------------------------------------- Llama 3 tiktoken


def test_llama3_tiktoken_file(tmp_path):
    path = write_llama3_tiktoken(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == N_BASE + 256
    ids = {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>",
                                           "<|reserved_special_token_4|>", "<|reserved_special_token_250|>")}
    assert ids == {"<|begin_of_text|>": N_BASE, "<|end_of_text|>": N_BASE + 1,
                   "<|start_header_id|>": N_BASE + 6, "<|end_header_id|>": N_BASE + 7,
                   "<|eot_id|>": N_BASE + 9, "<|reserved_special_token_0|>": N_BASE + 2,
                   "<|reserved_special_token_4|>": N_BASE + 8, "<|reserved_special_token_250|>": N_BASE + 255}
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.prefix) == (N_BASE, [N_BASE + 1, N_BASE + 9], True,
                                                                  [N_BASE])
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello world é 😀<|eot_id|>"
    ids = tok.encode(text, special=True)
    assert ids[:2] == [N_BASE, N_BASE + 6] and ids[-1] == N_BASE + 9 and tok.decode(ids) == text
    assert tok.encode("hello world") == [259, 264]  # "hello", " world" from the merges
    assert N_BASE not in tok.encode("<|begin_of_text|>")  # ordinary text unless special=True
    assert tok.encode("1234") == [ord(c) for c in "1234"]  # "123" | "4": the "34" merge can't apply
    assert tok.decode(tok.encode(text, special=True), skip_special=True) == "user\n\nhello world é 😀"
    assert load_tokenizer(path).vocab_size == tok.vocab_size  # the file itself is a fine spec too


def test_llama31_names_and_stop_ids(tmp_path):
    write_llama3_tiktoken(tmp_path, config={"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [N_BASE + 1, N_BASE + 8,
                                                                                  N_BASE + 9]}))
    tok = load_tokenizer(tmp_path)
    assert tok.token_to_id("<|eom_id|>") == N_BASE + 8 and tok.token_to_id("<|python_tag|>") == N_BASE + 10
    assert tok.token_to_id("<|finetune_right_pad_id|>") == N_BASE + 4
    assert tok.token_to_id("<|reserved_special_token_2|>") == N_BASE + 5
    assert sorted(tok.eos_ids) == [N_BASE + 1, N_BASE + 8, N_BASE + 9]


def test_bad_tiktoken_file(tmp_path):
    write_llama3_tiktoken(tmp_path)
    with (tmp_path / "tokenizer.model").open("a") as f:
        f.write("aGk= notanumber\n")
    with pytest.raises(ConfigError, match="line 268"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- streaming decode


def test_stream_decode_every_tokenizer(tmp_path, dirs):
    write_llama3_tiktoken(tmp_path)
    text = "héllo wörld 日本語 🐍😀 hello world é <think>x</think> done ∑🐍"
    for tok in (gpt2_tokenizer(), load_tokenizer(dirs["qwen"]), load_tokenizer(tmp_path)):
        ids = tok.encode(text, special=True)
        pieces = list(decode_stream(tok, ids))
        assert "".join(pieces) == tok.decode(ids) == text, tok
        assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    assert "".join(stream_text(gpt2_tokenizer().encode("😀"))) == "😀"


def test_stream_decode_dangling_bytes(tmp_path, dirs):
    write_llama3_tiktoken(tmp_path)
    for tok in (load_tokenizer(dirs["qwen"]), load_tokenizer(tmp_path)):
        ids = tok.encode("ab 🐍")
        assert len(ids) > 3  # an emoji outside the training text is byte tokens
        pieces = list(decode_stream(tok, ids[:-1]))
        assert "".join(pieces) == tok.decode(ids[:-1]) and pieces[-1].endswith("\ufffd"), tok


def test_stream_decode_sentencepiece_style(tmp_path):
    """Metaspace tokenizers drop the leading space when decoding alone: pieces must still join up exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(["hello world how are you", "the quick brown fox"] * 10,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                                show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hello world how are you the quick fox")
    pieces = list(decode_stream(tok, ids))
    assert "".join(pieces) == tok.decode(ids) == "hello world how are you the quick fox" and len(pieces) > 4
    assert tok.eos_ids == [tok.token_to_id("</s>")]
