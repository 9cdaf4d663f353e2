"""Instruction data: formats, validation messages, templates, prompt masking, truncation, splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microft.config import RunConfig
from microft.data.instruct import (
    Message,
    Record,
    build_samples,
    load_instruct_data,
    read_records,
    split_records,
    write_predictions,
)
from microft.data.templates import BUILTIN_TEMPLATES, load_template
from microft.data.tokenizer import decode, encode
from microft.errors import ConfigError, DataError
from microft.models.config import EOT_TOKEN, IGNORE_INDEX

ALPACA = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "weight": 2.5},
]
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]}


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------ formats


def test_json_array(tmp_path):
    res = read_records(write(tmp_path / "d.json", json.dumps(ALPACA, indent=2)))
    assert res.n_skipped == 0
    a, b = res.records
    assert (a.instruction, a.input, a.output, a.weight) == ("Name a colour.", "", "Blue.", 1.0)
    assert (b.input, b.weight, b.source) == ("2 + 3", 2.5, f"{tmp_path / 'd.json'}[1]")


def test_jsonl_with_blank_lines_and_bom(tmp_path):
    p = write(tmp_path / "d.jsonl", b"\xef\xbb\xbf" + jsonl(ALPACA).replace("\n", "\n\n", 1).encode())
    recs = read_records(p).records
    assert [r.output for r in recs] == ["Blue.", "5"]
    assert recs[1].source == f"{p}:3"  # line numbers count the blank line


def test_chat_jsonl(tmp_path):
    (r,) = read_records(write(tmp_path / "c.jsonl", jsonl([CHAT]))).records
    assert r.is_chat and r.response == "Goodbye."
    assert r.messages[0] == Message("system", "Be brief.")


def test_single_pretty_printed_object(tmp_path):
    (r,) = read_records(write(tmp_path / "one.json", json.dumps(ALPACA[1], indent=2))).records
    assert r.output == "5"


def test_directory_sorted_and_filtered(tmp_path):
    write(tmp_path / "b.jsonl", jsonl([ALPACA[1]]))
    write(tmp_path / "a.json", json.dumps([ALPACA[0]]))
    write(tmp_path / "notes.txt", "not data")
    write(tmp_path / "c.jsonl", jsonl([CHAT]))
    recs = read_records(tmp_path).records
    assert [r.response for r in recs] == ["Blue.", "5", "Goodbye."]


# ------------------------------------------------------------------ errors

BAD_CASES = {
    "broken_jsonl": ("d.jsonl", jsonl(ALPACA[:1]) + '{"instruction": "x", "output": \n',
                     "line 2: invalid JSON"),
    "broken_array": ("d.json", '[{"instruction": "x",\n "output": "y"},\n {"instruction" "z"}]',
                     "line 3 column"),
    "missing_key": ("d.json", json.dumps([ALPACA[0], {"instruction": "x"}]),
                    "record 1: missing key 'output'"),
    "wrong_type": ("d.jsonl", jsonl([ALPACA[0], {"instruction": "x", "output": 5}]),
                   "line 2: 'output' must be a string, got number"),
    "input_type": ("d.jsonl", jsonl([{"instruction": "x", "input": ["a"], "output": "y"}]),
                   "line 1: 'input' must be a string, got array"),
    "not_object": ("d.json", json.dumps([ALPACA[0], "text"]),
                   "record 1: a record must be a JSON object, got string"),
    "unknown_format": ("d.jsonl", jsonl([{"text": "hello"}]), "line 1: expected 'instruction' and 'output'"),
    "empty_output": ("d.jsonl", jsonl([{"instruction": "x", "output": "  "}]), "line 1: 'output' is empty"),
    "bad_weight": ("d.jsonl", jsonl([{**ALPACA[0], "weight": -1}]),
                   "line 1: 'weight' must be a positive number"),
    "bool_weight": ("d.jsonl", jsonl([{**ALPACA[0], "weight": True}]), "got boolean"),
    "bad_role": ("c.jsonl", jsonl([{"messages": [{"role": "bot", "content": "x"}]}]),
                 "line 1: messages[0]: unknown role 'bot'"),
    "no_content": ("c.jsonl", jsonl([{"messages": [{"role": "user"}]}]), "missing key messages[0].'content'"),
    "ends_with_user": ("c.jsonl", jsonl([{"messages": CHAT["messages"][:4]}]),
                       "last message must be from the assistant"),
    "empty_messages": ("c.jsonl", jsonl([{"messages": []}]), "'messages' must be a non-empty array"),
    "non_utf8_jsonl": ("d.jsonl", jsonl(ALPACA).encode() + b'{"instruction": "\xff", "output": "y"}\n',
                       "line 3: not valid UTF-8 (byte 0xff at column 18)"),
    "non_utf8_array": ("d.json", b'[\n{"instruction": "a", "output": "\xe9t\xe9"}]',
                       "line 2: not valid UTF-8 (byte 0xe9"),
    "empty_file": ("d.jsonl", "", "file is empty"),
    "blank_file": ("d.json", " \n\n ", "file is empty"),
    "empty_array": ("d.json", "[]", "the JSON array is empty"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_names_file_and_record(tmp_path, case):
    name, content, expected = BAD_CASES[case]
    p = write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        read_records(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ")
    assert expected in msg


def test_directory_errors(tmp_path):
    with pytest.raises(DataError, match="no .json, .jsonl, .csv, .tsv, .parquet files"):
        read_records(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    write(tmp_path / "a.jsonl", jsonl(ALPACA))
    write(tmp_path / "b.jsonl", "")
    with pytest.raises(DataError, match=r"b\.jsonl: file is empty"):
        read_records(tmp_path)


def test_first_problem_and_count_of_more(tmp_path):
    rows = [ALPACA[0], {"instruction": "x"}, ALPACA[1], {"output": 1}, "junk"]
    p = write(tmp_path / "d.jsonl", jsonl(rows))
    with pytest.raises(DataError) as e:
        read_records(p)
    assert "line 2: missing key 'output'" in str(e.value)
    assert "(and 2 more bad records)" in str(e.value)
    assert "--skip-bad" in str(e.value)


def test_skip_bad_counts(tmp_path):
    rows = [ALPACA[0], {"instruction": "x"}, ALPACA[1], {"output": 1}]
    p = write(tmp_path / "d.jsonl", jsonl(rows) + "{broken\n")
    res = read_records(p, skip_bad=True)
    assert [r.output for r in res.records] == ["Blue.", "5"]
    assert res.n_skipped == 3 and len(res.problems) == 3
    assert res.problems[2].startswith(f"{p}: line 5: invalid JSON")


def test_skip_bad_still_fails_on_empty_or_all_bad(tmp_path):
    with pytest.raises(DataError, match="file is empty"):
        read_records(write(tmp_path / "e.jsonl", ""), skip_bad=True)
    with pytest.raises(DataError, match=r"no usable records \(2 bad"):
        read_records(write(tmp_path / "bad.jsonl", jsonl([{"a": 1}, {"b": 2}])), skip_bad=True)


# ------------------------------------------------------------------ templates


def test_alpaca_prompts_exact():
    t = load_template("alpaca")
    assert t.render_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert t.render_prompt("Add the numbers.", "2 + 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 + 3\n\n### Response:\n"
    )


def test_plain_and_chatml_prompts():
    assert load_template("plain").render_prompt("Do it.", "data") == "Do it.\ndata\n"
    assert load_template("plain").render_prompt("Do it.") == "Do it.\n"
    chatml = load_template("chatml")
    assert chatml.render_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.clean(" Hello.<|im_end|>\n<|im_start|>user") == "Hello."
    assert encode("<|im_start|>") != [EOT_TOKEN] and len(encode("<|im_start|>")) > 1  # plain text in GPT-2


def test_template_file_toml_and_json(tmp_path):
    p = write(tmp_path / "qa.toml", 'prompt = "Q: {instruction}\\nC: {input}\\nA:"\n'
                                     'prompt_no_input = "Q: {instruction}\\nA:"\n'
                                     'turn = "<{role}> {content}\\n"\n[roles]\nassistant = "bot"\n')
    t = load_template(str(p))
    assert t.name == "qa" and t.render_prompt("x") == "Q: x\nA:"
    assert t.render_prompt("x", "y") == "Q: x\nC: y\nA:"
    segs = t.chat_segments([("user", "hi"), ("assistant", "yo")])
    assert segs == [("<user> hi\n<bot> ", False), ("yo\n", True)]
    j = write(tmp_path / "t.json", json.dumps({"prompt": "{instruction} {input} =>"}))
    assert load_template(str(j)).render_prompt("a") == "a  =>"  # prompt_no_input defaults to prompt


@pytest.mark.parametrize("body, expected", [
    ('prompt = "{question}"', "unknown field"),
    ('prompt = "{instruction"', "literal braces"),
    ('prompt = "no fields"', "must contain {instruction}"),
    ('prompt = "{instruction}"\nturn = "{role}"', "'turn' must contain {content}"),
    ('prompt = "{instruction}"\ncolour = "red"', "unknown key"),
    ('turn = "{content}"', "missing 'prompt'"),
    ('prompt = "{instruction:d}"', "cannot be filled with text"),  # these three failed only when rendering
    ('prompt = "{instruction!x}"', "cannot be filled with text"),
    ('prompt = "{instruction:{input}}"', "cannot be filled with text"),
    ('prompt = "{instruction}"\nturn = "{content} {content}"', "'turn' must contain {content} exactly once"),
])
def test_bad_template_file(tmp_path, body, expected):
    p = write(tmp_path / "t.toml", body)
    with pytest.raises(ConfigError, match="t.toml") as e:
        load_template(str(p))
    assert expected in str(e.value)


def test_a_turn_may_write_a_literal_content_in_braces(tmp_path):
    p = write(tmp_path / "t.toml", 'prompt = "{instruction}"\nturn = "{{content}} {role}: {content}\\n"')
    assert load_template(str(p)).turn.format(role="user", content="hi") == "{content} user: hi\n"


def test_text_that_is_not_unicode_is_a_bad_record(tmp_path):
    """A lone surrogate (JSON's \\ud800) is refused by record and line, or skipped and counted with
    --skip-bad; it used to reach the tokenizer and end in a traceback."""
    good = json.dumps({"instruction": "a", "output": "b"})
    f = write(tmp_path / "d.jsonl", good + "\n" + '{"instruction": "x\\ud800", "output": "y"}\n')
    with pytest.raises(DataError, match="line 2: 'instruction' is not valid Unicode text"):
        read_records(f)
    read = read_records(f, skip_bad=True)
    assert len(read.records) == 1 and read.n_skipped == 1


def test_validation_data_cut_away_entirely_is_an_error(tmp_path):
    train = write(tmp_path / "t.jsonl", json.dumps({"instruction": "a", "output": "b"}) + "\n")
    val = write(tmp_path / "v.jsonl", json.dumps({"instruction": "word " * 200, "output": "b"}) + "\n")
    cfg = RunConfig(data=str(train), val_data=str(val), model="gpt2", template="alpaca")
    with pytest.raises(DataError, match="no validation samples left in .*v.jsonl"):
        load_instruct_data(cfg, max_seq_len=32)


def test_unknown_template_name():
    with pytest.raises(ConfigError, match="alpaca, chatml, plain"):
        load_template("vicuna")


# ------------------------------------------------------------------ samples


def test_masking_marks_exactly_the_prompt():
    rec = Record(instruction="Add the numbers.", input="2 + 3", output="5", weight=2.5, source="x:1")
    (s,), stats = build_samples([rec], "alpaca", encode, 512)
    prompt = BUILTIN_TEMPLATES["alpaca"].render_prompt("Add the numbers.", "2 + 3")
    p_ids, r_ids = encode(prompt), encode("5")
    tokens = p_ids + r_ids + [EOT_TOKEN]
    assert s["input_ids"] == tokens[:-1]
    assert s["labels"] == [IGNORE_INDEX] * (len(p_ids) - 1) + r_ids + [EOT_TOKEN]
    assert (s["prompt"], s["response"], s["weight"], s["source"]) == (prompt, "5", 2.5, "x:1")
    assert stats.n_target_tokens == len(r_ids) + 1 and stats.n_tokens == len(tokens) - 1
    (s2,), _ = build_samples([rec], "alpaca", encode, 512, mask_prompt=False)
    assert s2["labels"] == tokens[1:]


def test_chat_masking_trains_assistant_turns_only():
    rec = Record(messages=tuple(Message(m["role"], m["content"]) for m in CHAT["messages"]))
    (s,), _ = build_samples([rec], "chatml", encode, 512)
    targets = [lab for lab in s["labels"] if lab != IGNORE_INDEX]
    assert targets[-1] == EOT_TOKEN
    assert decode(targets[:-1]) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    # masked positions, joined in order, are the system/user turns and the assistant headers
    assert s["prompt"].endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert s["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert s["response"] == "Goodbye."
    # every target position predicts a token of an assistant turn: check contiguity of the last one
    last = encode("Goodbye.<|im_end|>\n") + [EOT_TOKEN]
    assert s["labels"][-len(last):] == last


def test_alpaca_renders_chat_records():
    rec = Record(messages=(Message("user", "Hi"), Message("assistant", "Yo")))
    (s,), _ = build_samples([rec], "alpaca", encode, 512)
    assert s["prompt"] == "### Instruction:\nHi\n\n### Response:\n"


def test_truncation_and_dropping():
    short = Record(instruction="Hi", output="Yes")
    long_resp = Record(instruction="Hi", output="word " * 50)
    long_prompt = Record(instruction="blah " * 50, output="No")
    plen = len(encode(BUILTIN_TEMPLATES["plain"].render_prompt("Hi")))
    samples, stats = build_samples([short, long_resp, long_prompt], "plain", encode, max_seq_len=plen + 5)
    assert (stats.n_records, stats.n_samples, stats.n_truncated, stats.n_dropped) == (3, 2, 1, 1)
    cut = samples[1]
    assert len(cut["input_ids"]) == len(cut["labels"]) == plen + 5 == stats.max_len
    assert cut["labels"][-1] != EOT_TOKEN and cut["labels"][plen - 1] != IGNORE_INDEX
    assert [s["response"] for s in samples] == ["Yes", "word " * 50]


def test_weights_carried(tmp_path):
    p = write(tmp_path / "d.jsonl", jsonl([{**ALPACA[0], "weight": 0.5}, ALPACA[1], {**CHAT, "weight": 3}]))
    samples, _ = build_samples(read_records(p).records, "chatml", encode, 256)
    assert [s["weight"] for s in samples] == [0.5, 2.5, 3.0]


# ------------------------------------------------------------------ splits, predictions, one-call loading


def test_split_deterministic_and_disjoint():
    recs = [Record(instruction=f"q{i}", output=str(i)) for i in range(100)]
    a = split_records(recs, 0.1, 0.2, seed=7)
    assert a == split_records(recs, 0.1, 0.2, seed=7)
    assert (len(a.train), len(a.val), len(a.test)) == (70, 10, 20)
    ids = [{r.output for r in part} for part in a]
    assert set.union(*ids) == {str(i) for i in range(100)} and sum(map(len, ids)) == 100
    assert a.val != split_records(recs, 0.1, 0.2, seed=8).val
    assert split_records(recs, 0.0, 0.0, seed=7) == (recs, [], [])
    with pytest.raises(DataError, match="too few"):
        split_records(recs[:2], 0.5, 0.5, seed=0)


def test_write_predictions(tmp_path):
    p = tmp_path / "out" / "pred.jsonl"
    n = write_predictions(p, [{"prompt": "P", "reference": "é", "prediction": "x", "source": "d:1"}])
    assert n == 1
    assert json.loads(p.read_text(encoding="utf-8")) == {"prompt": "P", "reference": "é", "prediction": "x",
                                                         "source": "d:1"}


def test_load_instruct_data(tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(20)]
    data = write(tmp_path / "d.jsonl", jsonl(rows) + '{"bad": 1}\n')
    cfg = RunConfig(data=str(data), val_frac=0.2, test_frac=0.1, skip_bad=True, seed=3)
    d = load_instruct_data(cfg, max_seq_len=128)
    assert (len(d.train), len(d.val), len(d.test), d.n_skipped) == (14, 4, 2, 1)
    assert d.eval_samples is d.test and d.stats["train"].n_samples == 14
    val = write(tmp_path / "v.jsonl", jsonl(rows[:3]))
    d2 = load_instruct_data(cfg.model_copy(update={"val_data": str(val), "test_frac": 0.0}), max_seq_len=128)
    assert (len(d2.train), len(d2.val), len(d2.test)) == (20, 3, 0)
    with pytest.raises(DataError, match="max_seq_len=2"):
        load_instruct_data(cfg, max_seq_len=2)
