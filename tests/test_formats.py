"""Data formats people have: CSV, TSV, Parquet and JSON read to the same records, other column names mapped
(--columns, or the usual aliases), plain text named; data errors before the model loads; the default batch;
pretrain refusing instruction records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import microft.runs
from microft.cli import app
from microft.config import DEFAULT_GLOBAL_BS, RunConfig, resolve_config
from microft.data.formats import FORMATS, SUFFIXES, format_for
from microft.data.instruct import read_records, record_kind
from microft.errors import ConfigError, DataError
from tests.test_finetune import alpaca_file

runner = CliRunner()
ROWS = [{"instruction": "Reverse the words.", "input": "red cat", "output": "cat red"},
        {"instruction": "Say sun twice.", "input": "", "output": "sun sun"},
        {"instruction": "Quote, \"comma\"", "input": "a\nb", "output": "b\na"}]  # CSV quoting and a newline


def write_delimited(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def fields(res) -> list[tuple[str, str, str]]:
    return [(r.instruction, r.input, r.output) for r in res.records]


EXPECTED = [(r["instruction"], r["input"], r["output"]) for r in ROWS]


def test_every_format_reads_the_same_records(tmp_path):
    cols = ["instruction", "input", "output"]
    cells = [[r[c] for c in cols] for r in ROWS]
    got = {
        "json": read_records(_json(tmp_path / "d.json", ROWS)),
        "csv": read_records(write_delimited(tmp_path / "d.csv", cols, cells)),
        "tsv": read_records(write_delimited(tmp_path / "d.tsv", cols, cells, "\t")),
    }
    for name, res in got.items():
        assert fields(res) == EXPECTED, name
    assert got["csv"].records[2].source == f"{tmp_path / 'd.csv'}:4"  # line 4: the quoted newline spans two
    if _has_pyarrow():
        assert fields(read_records(write_parquet(tmp_path / "d.parquet", ROWS))) == EXPECTED
    # a directory reads every format, in name order
    for p in ("d.json", "d.tsv"):
        (tmp_path / p).unlink()
    (tmp_path / "notes.txt").write_text("not read")
    n = 2 if _has_pyarrow() else 1
    assert fields(read_records(tmp_path)) == EXPECTED * n


def test_the_registry_is_one_entry_per_format(tmp_path):
    """Every suffix belongs to one format; an unknown suffix is read by its content."""
    assert len(SUFFIXES) == len(set(SUFFIXES))
    assert {".json", ".jsonl", ".csv", ".tsv", ".parquet"} <= set(SUFFIXES)
    for f in FORMATS:
        for s in f.suffixes:
            assert format_for(tmp_path / f"x{s}") is f
    (tmp_path / "blob").write_bytes(b"PAR1\x00\x00")
    assert format_for(tmp_path / "blob").name == "Parquet"
    (tmp_path / "recs.txt").write_text(json.dumps(ROWS[0]) + "\n")  # JSONL named .txt still reads
    assert fields(read_records(tmp_path / "recs.txt")) == EXPECTED[:1]


def test_other_column_names_read_as_ours(tmp_path):
    qa = write_delimited(tmp_path / "qa.csv", ["question", "answer"], [["What is 2+2?", "4"]])
    res = read_records(qa)
    assert fields(res) == [("What is 2+2?", "", "4")]
    assert res.notes == [f"{qa}: read instruction from 'question', output from 'answer'"]
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    assert fields(read_records(pc)) == [("Hi", "", "Hello")]
    # Dolly's own layout: our instruction beside its context and response
    dolly = _jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Sum", "context": "2 and 2", "response": "4",
                                               "category": "closed_qa"}])
    res = read_records(dolly)
    assert fields(res) == [("Sum", "2 and 2", "4")]
    assert res.notes == [f"{dolly}: read input from 'context', output from 'response'"]
    # a record with both of ours keeps them: a stray alias key is not read
    both = _jsonl(tmp_path / "both.jsonl", [{"instruction": "A", "output": "B", "response": "C"}])
    assert fields(read_records(both)) == [("A", "", "B")]
    # --columns names any others, and wins over an alias
    cells = [["Q1", "C1", "A1", "2.5"], ["Q2", "", "A2", ""]]
    odd = write_delimited(tmp_path / "odd.tsv", ["q", "ctx", "a", "w"], cells, "\t")
    res = read_records(odd, columns={"instruction": "q", "input": "ctx", "output": "a", "weight": "w"})
    assert fields(res) == [("Q1", "C1", "A1"), ("Q2", "", "A2")]
    assert [r.weight for r in res.records] == [2.5, 1.0]  # a blank weight cell is the default
    # a JSON record with its own keys (once refused) maps by --columns too
    js = _json(tmp_path / "own.json", [{"query": "x", "reply": "y"}])
    assert fields(read_records(js, columns={"instruction": "query", "output": "reply"})) == [("x", "", "y")]
    # Alpaca records keep their own fields even beside a key named like an alias
    keep = _json(tmp_path / "keep.json", [{**ROWS[0], "answer": "not this"}])
    assert fields(read_records(keep)) == EXPECTED[:1]


def test_parquet_chat_records(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    (r,) = read_records(write_parquet(tmp_path / "chat.parquet", chat)).records
    assert r.is_chat and r.response == "Hello"
    cells = [[json.dumps(chat[0]["messages"])]]
    (r,) = read_records(write_delimited(tmp_path / "chat.csv", ["messages"], cells)).records
    assert r.is_chat and r.messages[0].content == "Hi"


@pytest.mark.parametrize(("name", "content", "columns", "message"), [
    ("d.csv", "question,hint\nq,h\n", None, "columns question, hint: expected instruction, output"),
    ("d.csv", "q,a\nx,y\n", {"instruction": "q", "output": "answer"},
     "no column 'answer' for --columns output=answer"),
    ("d.csv", "instruction,output\nx\n", None, "line 2: 1 fields, the header has 2"),
    ("d.csv", "instruction,output,output\nx,y,z\n", None, "column 'output' named twice"),
    ("d.csv", "instruction,output\n", None, "a header (instruction, output) but no rows"),
    ("d.csv", "instruction,output,weight\nx,y,heavy\n", None, "line 2: 'weight' must be a positive number"),
    ("d.csv", "question,prompt,answer\nx,y,z\n", None,
     "both 'prompt' and 'question' could be the instruction"),
    ("d.tsv", b"instruction\toutput\ncaf\xe9\tx\n", None, "line 2: not valid UTF-8"),
    ("d.jsonl", '{"query": "x", "reply": "y"}\n', None, "name yours with --columns instruction=KEY"),
    ("d.jsonl", '{"query": "x", "reply": "y"}\n', {"instruction": "q", "output": "reply"},
     "line 1: no key 'q' for --columns instruction=q"),
    ("d.parquet", b"PAR1 not really", None, "not a readable Parquet file"),
])
def test_bad_tables_name_the_file_and_the_fix(tmp_path, name, content, columns, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        read_records(p, columns=columns)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import sys

    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"reading Parquet needs pyarrow: pip install 'microft\[parquet\]'"):
        read_records(p)


def test_plain_text_is_named_as_such(tmp_path):
    for name in ("notes.txt", "notes.json", "notes"):
        p = tmp_path / name
        p.write_text("Once upon a time.\nThe end.\n")
        with pytest.raises(DataError, match=r"plain text, not instruction records: use `microft pretrain"):
            read_records(p)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("text")
    with pytest.raises(DataError, match=r"\.txt files are plain text: use `microft pretrain`"):
        read_records(tmp_path / "texts")


def test_text_and_json_are_told_apart(tmp_path):
    """Text with a line that opens a brace is still text; JSONL with a broken first line is still JSONL
    (its bad line named); a pretty-printed object with a syntax error is not called text."""
    story = _write(tmp_path / "story.txt", "Chapter one.\n{aside}\nIt rained.\nThe end.\n")
    with pytest.raises(DataError, match="plain text"):
        read_records(story)
    broken = _write(tmp_path / "b.jsonl", "oops\n" + "".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        read_records(broken)
    assert fields(read_records(broken, skip_bad=True)) == EXPECTED
    pretty = _write(tmp_path / "p.json", '{\n  "instruction": "x",\n  "output": "y"\n  "oops": 1\n}\n')
    with pytest.raises(DataError) as e:
        read_records(pretty)
    assert "plain text" not in str(e.value)


def test_a_long_csv_cell_is_one_response(tmp_path):
    long = "word " * 40_000  # 200 KB: past the csv module's default 128 KiB field limit
    data = write_delimited(tmp_path / "d.csv", ["instruction", "output"], [["Say it.", long]])
    (r,) = read_records(data).records
    assert r.output == long


def test_columns_option_is_checked_with_the_flags():
    got = resolve_config(columns="instruction=question, output=answer").columns
    assert got == {"instruction": "question", "output": "answer"}
    assert RunConfig(columns={"input": "context"}).columns == {"input": "context"}  # a recipe's inline table
    for bad, message in [("instruction", "not FIELD=COLUMN"), ("prompt=question", "unknown field 'prompt'"),
                         ("output=", "no column named for 'output'"), ("output=a,output=b", "given twice")]:
        with pytest.raises(ConfigError, match=message) as e:
            resolve_config(columns=bad)
        assert str(e.value).startswith(f"--columns {bad}: ") and "Value error" not in str(e.value)


def test_a_recipe_sets_columns(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('columns = { instruction = "q", output = "a" }\nmicro_bs = 2\n')
    assert resolve_config(str(r)).columns == {"instruction": "q", "output": "a"}
    r.write_text('columns = "instruction=q,output=a"\n')
    assert resolve_config(str(r)).columns == {"instruction": "q", "output": "a"}


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture
def no_model(monkeypatch):
    """The model loaders record that they were called, and fail: data errors must come first."""
    calls: list[str] = []

    def loader(*a, **k):
        calls.append("load")
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(microft.runs, "load_base", loader)
    monkeypatch.setattr(microft.runs, "demo_model", loader)
    return calls


@pytest.mark.parametrize(("make", "extra", "message"), [
    (lambda d: _write(d / "notes.txt", "Once upon a time.\n"), [], "plain text, not instruction records"),
    (lambda d: write_delimited(d / "qa.csv", ["q", "a"], [["x", "y"]]),
     ["--columns", "instruction=q,output=z"],
     "no column 'z' for --columns output=z"),
    (lambda d: _jsonl(d / "d.jsonl", [{"instruction": "x"}]), [], "line 1: missing key 'output'"),
    (lambda d: _jsonl(d / "d.jsonl", ROWS), ["--val-data", "/nonexistent/v.jsonl"], "no such file"),
])
def test_data_errors_come_before_the_model_loads(tmp_path, no_model, make, extra, message):
    data = make(tmp_path)
    res = runner.invoke(app, ["finetune", "--model", "gpt2-tiny", "--data", str(data),
                              "--out", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert no_model == [] and not (tmp_path / "o").exists()


def test_pretrain_refuses_instruction_records(tmp_path, no_model):
    for data in (alpaca_file(tmp_path / "alpaca.json", n=8),
                 write_delimited(tmp_path / "qa.csv", ["question", "answer"], [["x", "y"]] * 3)):
        res = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert "instruction records" in res.output and f"microft finetune --data {data}" in res.output
        assert len(res.output.strip().splitlines()) == 1
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}])
    assert record_kind(chat) == (1, "chat")
    assert no_model == []
    (tmp_path / "story.txt").write_text("{not json} but a story\nthat goes on.\n")
    assert record_kind(tmp_path / "story.txt") is None  # text is text, even with a brace


def test_dry_run_says_the_default_batch():
    res = runner.invoke(app, ["finetune", "--data", "x.json", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"Effective batch: {DEFAULT_GLOBAL_BS} (default: no batch flag given" in res.output
    res = runner.invoke(app, ["finetune", "--dry-run"])  # the demo keeps its own batch
    assert "Effective batch: 32 = 32 (micro) × 1 (accum)" in res.output


def test_default_batch_plan_fits_the_data():
    from microft.models.config import ModelConfig
    from microft.resolved import plan_batch, resolve_run
    from microft.runs import local_device, memory_planner

    def batch_plan(cfg, world, shape, on_event, n_train):
        run = resolve_run(cfg, mcfg, local_device(cfg))
        planned = plan_batch(run, cfg, mcfg, n_train, memory_planner if shape else None, world)
        for text in planned.notes if on_event else ():
            on_event({"kind": "note", "text": text})
        return planned.plan

    # what the README says of the default: 16, the global batch of the Qwen3 and Llama LoRA recipes
    assert DEFAULT_GLOBAL_BS == 16
    recipes = Path(__file__).parent.parent / "recipes"
    for name in ("qwen3-0.6b-lora.toml", "llama-3.2-1b-lora.toml"):
        r = resolve_config(str(recipes / name))
        assert r.micro_bs * r.accum == DEFAULT_GLOBAL_BS, name
    cfg = RunConfig(device="cpu")
    mcfg = ModelConfig.from_preset("gpt2-tiny")
    assert batch_plan(cfg, 1, mcfg, None, 1000).global_bs == DEFAULT_GLOBAL_BS
    notes: list[dict] = []
    plan = batch_plan(cfg, 1, mcfg, notes.append, 10)
    assert plan.global_bs == 10 and "cut to the 10 training samples" in notes[0]["text"]
    assert batch_plan(cfg, 2, None, None, 7).global_bs == 6  # whole shares of two devices
    given = cfg.model_copy(update={"micro_bs": 4})
    assert batch_plan(given, 1, mcfg, None, 1000).global_bs == 4  # a batch flag given: no default


def test_csv_with_columns_trains_end_to_end_at_the_default_batch(tmp_path):
    recs = json.loads(alpaca_file(tmp_path / "a.json").read_text())
    rows = [[r["instruction"], r.get("input", ""), r["output"]] for r in recs]
    data = write_delimited(tmp_path / "data.csv", ["task", "given", "answer_text"], rows)
    out = tmp_path / "o"
    columns = "instruction=task,input=given,output=answer_text"
    args = ["--columns", columns, "--out", str(out), "--max-steps", "2", "--max-seq-len", "64",
            "--log-format", "plain"]
    res = runner.invoke(app, ["finetune", "--data", str(data), *args])
    assert res.exit_code == 0, res.output
    renamed = "read instruction from 'task', input from 'given', output from 'answer_text'"
    assert f"{data}: {renamed}" in res.output
    assert f"Effective batch: {DEFAULT_GLOBAL_BS} = " in res.output
    assert "(default, given no batch flag" in res.output
    run = json.loads((out / "run.json").read_text())
    assert run["plan"]["micro_bs"] * run["plan"]["accum"] == DEFAULT_GLOBAL_BS
    assert run["config"]["columns"] == {"instruction": "task", "input": "given", "output": "answer_text"}
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    assert (out / "final" / "model.safetensors").exists()


def test_parquet_trains_end_to_end_with_a_lora_note(tmp_path):
    pytest.importorskip("pyarrow")
    recs = json.loads(alpaca_file(tmp_path / "a.json").read_text())
    data = write_parquet(tmp_path / "data.parquet", recs)
    out = tmp_path / "o"
    args = ["--out", str(out), "--max-steps", "2", "--lora", "--micro-bs", "4", "--accum", "2",
            "--max-seq-len", "64"]
    res = runner.invoke(app, ["finetune", "--data", str(data), *args, "--log-format", "plain"])
    assert res.exit_code == 0, res.output
    assert "LoRA on gpt2-tiny, a randomly initialised model" in res.output
    # batch flags given: the banner's batch is theirs, without "(default"
    assert "Effective batch: 8 = 4 (micro) × 2 (accum) × 1 (device)\n" in res.output
    assert (out / "final" / "adapter_model.safetensors").exists()


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _json(path: Path, rows: list) -> Path:
    return _write(path, json.dumps(rows))


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))
