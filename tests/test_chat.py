"""Chat templates: rendering as transformers renders, loss on assistant turns to the token, data
integration."""

from __future__ import annotations

import json

import pytest

from microft.config import RunConfig
from microft.data.chat import ChatTemplate, record_messages, render_chat, resolve_template
from microft.data.instruct import Record, build_samples, encode_prompt, load_instruct_data, parse_record
from microft.data.templates import Template
from microft.data.tokenizer import gpt2_tokenizer, load_tokenizer
from microft.errors import ConfigError, DataError
from microft.models.config import IGNORE_INDEX
from tests.tokdirs import (
    LLAMA3_TEMPLATE_GEN,
    QWEN_TEMPLATE_GEN,
    THINK_TEMPLATE,
    write_llama_dir,
    write_qwen_dir,
)

SYSTEM_CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is four."},
    {"role": "user", "content": "Translate to French: the cat."},
    {"role": "assistant", "content": "Le chat. 😀"},
]
NO_SYSTEM_CHAT = SYSTEM_CHAT[1:]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"qwen": write_qwen_dir(root / "qwen"), "llama": write_llama_dir(root / "llama"),
            "think": write_qwen_dir(root / "think", THINK_TEMPLATE)}


@pytest.fixture(scope="module")
def toks(dirs):
    return {k: load_tokenizer(d) for k, d in dirs.items()}


@pytest.fixture(scope="module")
def auto(dirs):
    transformers = pytest.importorskip("transformers")
    return {k: transformers.AutoTokenizer.from_pretrained(str(d)) for k, d in dirs.items()}


def expected(tok, pieces):
    """Ids and target flags from (text, is_target) pieces encoded one by one (special tokens parsed)."""
    ids, target = [], []
    for text, t in pieces:
        enc = tok.encode(text, special=True)
        ids += enc
        target += [t] * len(enc)
    return ids, target


@pytest.mark.parametrize("name", ["qwen", "llama", "think"])
@pytest.mark.parametrize("chat", [SYSTEM_CHAT, NO_SYSTEM_CHAT], ids=["system", "no_system"])
def test_render_and_ids_match_transformers(toks, auto, name, chat):
    tmpl, ref = ChatTemplate(toks[name]), auto[name]
    for agp in (False, True):
        msgs = chat if not agp else chat[:-1]
        assert tmpl.render(msgs, agp) == ref.apply_chat_template(msgs, tokenize=False,
                                                                 add_generation_prompt=agp)
    ids, _ = tmpl.encode_chat(chat)
    assert ids == list(ref.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])


def test_qwen_style_mask_to_the_token(toks):
    tok = toks["qwen"]
    ids, target = ChatTemplate(tok).encode_chat(NO_SYSTEM_CHAT)
    # the injected default system prompt, the headers and the newline after <|im_end|> are context
    assert (ids, target) == expected(tok, [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", False),
        ("It is four.<|im_end|>", True),
        ("\n<|im_start|>user\nTranslate to French: the cat.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Le chat. 😀<|im_end|>", True),
        ("\n", False)])


def test_llama3_style_mask_to_the_token(toks):
    tok = toks["llama"]
    ids, target = ChatTemplate(tok).encode_chat(SYSTEM_CHAT)
    assert ids[0] == tok.bos_id  # written by the template; nothing is prepended twice
    assert (ids, target) == expected(tok, [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus two?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("It is four.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nTranslate to French: the cat.<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Le chat. 😀<|eot_id|>", True)])


def test_think_template_mask_to_the_token(toks):
    """Earlier turns lose their <think> block once a later user turn exists; the last gets an empty one."""
    tok = toks["think"]
    chat = [*SYSTEM_CHAT[:2], {"role": "assistant", "content": "<think>\nadd\n</think>\n\nIt is four."},
            *SYSTEM_CHAT[3:]]
    ids, target = ChatTemplate(tok).encode_chat(chat)
    assert (ids, target) == expected(tok, [
        ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("It is four.<|im_end|>", True),
        ("\n<|im_start|>user\nTranslate to French: the cat.<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n\n</think>\n\nLe chat. 😀<|im_end|>", True),
        ("\n", False)])
    _, last_only = ChatTemplate(tok).encode_chat(chat, train_all=False)
    assert sum(last_only) == len(tok.encode("<think>\n\n</think>\n\nLe chat. 😀<|im_end|>", special=True))


@pytest.mark.parametrize("name,gen_template", [("qwen", QWEN_TEMPLATE_GEN), ("llama", LLAMA3_TEMPLATE_GEN)])
@pytest.mark.parametrize("chat", [SYSTEM_CHAT, NO_SYSTEM_CHAT], ids=["system", "no_system"])
def test_mask_matches_transformers_generation_tags(toks, auto, name, gen_template, chat):
    """transformers marks {% generation %} blocks; the same spans must come out of plain rendering."""
    out = auto[name].apply_chat_template(chat, chat_template=gen_template, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
    ids, target = ChatTemplate(toks[name]).encode_chat(chat)
    assert ids == list(out["input_ids"]) and [int(t) for t in target] == list(out["assistant_masks"])
    # the same template with its generation tags renders the same ids and mask here
    ids2, target2 = ChatTemplate(toks[name], gen_template).encode_chat(chat)
    assert (ids2, target2) == (ids, target)


def test_samples_from_chat_and_alpaca_records(toks):
    tok = toks["qwen"]
    tmpl = ChatTemplate(tok)
    chat = parse_record({"messages": NO_SYSTEM_CHAT})
    alpaca = Record(instruction="Translate to French:", input="the cat.", output="Le chat.")
    assert record_messages(alpaca) == [{"role": "user", "content": "Translate to French:\n\nthe cat."},
                                       {"role": "assistant", "content": "Le chat."}]
    (s1, s2), stats = build_samples([chat, alpaca], tmpl, tok, 512)
    ids, target = tmpl.encode_chat(NO_SYSTEM_CHAT)
    assert [ids[-1]] == tok.encode("\n") and not target[-1]
    assert s1["input_ids"] == ids[:-2]  # the trailing "\n" is dropped; <|im_end|> is the last label
    assert s1["labels"] == [t if m else IGNORE_INDEX for t, m in zip(ids[1:-1], target[1:-1], strict=True)]
    assert s1["labels"][-1] == tok.token_to_id("<|im_end|>")
    assert s1["prompt"] == tmpl.render(NO_SYSTEM_CHAT[:-1], add_generation_prompt=True)
    assert s2["prompt"] == tmpl.render_prompt("Translate to French:", "the cat.")
    assert s2["prompt"].endswith("<|im_start|>assistant\n") and s2["response"] == "Le chat."
    kept = [t for t in s2["labels"] if t != IGNORE_INDEX]
    assert tok.decode(kept) == "Le chat.<|im_end|>"
    prompt_ids = encode_prompt(tmpl, tok, s2["prompt"])
    assert s2["input_ids"][: len(prompt_ids)] == prompt_ids
    assert s2["labels"][len(prompt_ids) - 2] == IGNORE_INDEX
    assert s2["labels"][len(prompt_ids) - 1] != IGNORE_INDEX  # the first answer token follows the prompt
    assert stats.n_samples == 2
    assert stats.n_target_tokens == sum(t != IGNORE_INDEX for t in s1["labels"] + s2["labels"])


def test_text_templates_with_a_model_tokenizer(toks):
    """alpaca & co. stay selectable: BOS first when the tokenizer adds one, its EOS last
    (not GPT-2's 50256)."""
    tok = toks["llama"]
    rec = Record(instruction="Say hi.", output="hi")
    (s,), _ = build_samples([rec], "alpaca", tok, 512)
    prompt = resolve_template("alpaca", tok).render_prompt("Say hi.")
    assert s["input_ids"] == [tok.bos_id] + tok.encode(prompt) + tok.encode("hi")
    assert s["labels"][-1] == tok.eos_id and [t for t in s["labels"] if t != IGNORE_INDEX] == \
        tok.encode("hi") + [tok.eos_id]
    assert encode_prompt(resolve_template("alpaca", tok), tok, prompt) == [tok.bos_id] + tok.encode(prompt)


def test_resolve_template(toks, tmp_path):
    assert isinstance(resolve_template("auto", toks["qwen"]), ChatTemplate)
    assert isinstance(resolve_template(None, toks["qwen"]), ChatTemplate)
    assert isinstance(resolve_template("chat", toks["llama"]), ChatTemplate)
    gpt2 = gpt2_tokenizer()
    assert resolve_template("auto", gpt2).name == "alpaca"
    assert resolve_template("chatml", toks["qwen"]).name == "chatml"
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_template("chat", gpt2)
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    t = resolve_template(str(f), gpt2)
    assert isinstance(t, ChatTemplate) and t.render(NO_SYSTEM_CHAT[:1]) == "user: What is two plus two?\n"


def test_load_instruct_data_uses_the_models_template(dirs, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(data=str(data), model=str(dirs["qwen"]), template="auto", val_frac=0.2)
    d = load_instruct_data(cfg, max_seq_len=128)
    assert isinstance(d.template, ChatTemplate) and d.train[0]["prompt"].startswith("<|im_start|>system")
    d2 = load_instruct_data(cfg.model_copy(update={"template": "plain"}), 128, load_tokenizer(dirs["qwen"]))
    assert isinstance(d2.template, Template) and d2.template.name == "plain"


# --------------------------------------------------------------------------- the jinja environment and errors


def test_jinja_environment_features():
    src = ("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}{{ eos_token }}|"
           "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
           "{% generation %}{{ add_generation_prompt }}{% endgeneration %}")
    out = render_chat(src, [{"role": "user", "content": "é<"}, {"role": "assistant", "content": "b"}],
                      add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert out == ('[{"role": "user", "content": "é<"}, {"role": "assistant", "content": "b"}]'
                   '|4|<s></s>|é<|True')
    # trim_blocks / lstrip_blocks, as transformers renders
    assert render_chat("  {% if true %}\nx\n  {% endif %}\ny", []) == "x\ny"


@pytest.mark.parametrize("src,err,match", [
    ("{{ raise_exception('System role not supported') }}", DataError, "System role not supported"),
    ("{% for m in messages %}", ConfigError, "syntax error on line 1"),
    ("{{ messages.append(1) }}", DataError, "chat template rejected"),
    ("{{ messages[0].content + 1 }}", DataError, "chat template"),
    ("{{ 1 / 0 }}", DataError, "ZeroDivisionError"),  # these three were tracebacks
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", DataError, "RecursionError"),
])
def test_template_errors_are_one_line(src, err, match):
    with pytest.raises(err, match=match) as e:
        render_chat(src, [{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value)


def test_record_without_assistant_turn(toks):
    with pytest.raises(DataError, match="no assistant message"):
        ChatTemplate(toks["qwen"]).encode_chat([{"role": "user", "content": "hi"}])
    rejects_system = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}x"
    with pytest.raises(DataError, match="no system"):
        ChatTemplate(toks["qwen"], rejects_system).encode_chat(SYSTEM_CHAT)


def test_jinja_template_files_that_cannot_be_used_are_one_line(tmp_path):
    """A .jinja file that is empty or not UTF-8 is named as the problem (an empty one used to read as "the
    model has no chat template"; a Latin-1 one was a traceback)."""
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ConfigError, match="empty.jinja is empty"):
        resolve_template(str(tmp_path / "empty.jinja"), gpt2_tokenizer())
    (tmp_path / "latin.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(ConfigError, match="cannot read chat template .*latin.jinja"):
        resolve_template(str(tmp_path / "latin.jinja"), gpt2_tokenizer())
