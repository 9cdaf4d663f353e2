"""`--data ORG/NAME`: a dataset repo in the local Hugging Face cache (downloaded through huggingface_hub
when it is not there), its Parquet/JSONL/CSV files picked by --data-split or --data-files; no `datasets`
library."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import microft.runs
from microft.cli import app
from microft.data.hubdata import names_split, pick_files
from microft.data.instruct import read_records
from microft.errors import DataError
from tests.fakehub import FakeHub, Repo

runner = CliRunner()
COMMIT = "a" * 40


def rows(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} {i}: say {i} twice", "answer": f"{i} {i}"} for i in range(n)]


def parquet_bytes(recs: list[dict]) -> bytes:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(recs), buf)
    return buf.getvalue()


def cache_dataset(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A dataset repo laid out as huggingface_hub leaves it: blobs/<hash>, snapshots/<commit>/<file> links
    to them, refs/main naming the commit."""
    root = cache / ("datasets--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is asked of any server
    return tmp_path / "hub"


def test_a_parquet_dataset_in_the_hf_cache_trains(tmp_path, cache):
    cache_dataset(cache, "org/qa", {
        "README.md": b"# qa",
        "data/train-00000-of-00001.parquet": parquet_bytes(rows(40, "train")),
        "data/test-00000-of-00001.parquet": parquet_bytes(rows(7, "test")),
    })
    out = tmp_path / "o"
    res = runner.invoke(app, ["finetune", "--data", "org/qa", "--columns",
                              "instruction=question,output=answer", "--out", str(out), "--max-steps", "2",
                              "--max-seq-len", "64", "--val-frac", "0.25", "--micro-bs", "2", "--accum", "1",
                              "--log-format", "plain"])
    assert res.exit_code == 0, res.output
    assert "30 train / 10 val / 0 test samples" in res.output  # the train split's 40 records, not test's 7
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == [1, 2]
    assert json.loads((out / "run.json").read_text())["config"]["data"] == "org/qa"
    test = read_records("org/qa", columns={"instruction": "question", "output": "answer"}, split="test")
    assert [r.instruction for r in test.records] == [r["question"] for r in rows(7, "test")]


def test_val_data_from_the_hub_reads_its_validation_split(tmp_path, cache):
    from microft.config import RunConfig
    from microft.data.instruct import read_instruct_records

    train = b"".join(json.dumps(r).encode() + b"\n" for r in rows(9, "t"))
    val = json.dumps(rows(1, "v")[0]).encode()
    cache_dataset(cache, "org/v", {"train.jsonl": train, "validation.jsonl": val})
    cfg = RunConfig(data="org/v", val_data="org/v", columns={"instruction": "question", "output": "answer"})
    parts = read_instruct_records(cfg).parts
    assert (len(parts.train), [r.instruction for r in parts.val]) == (9, ["v 0: say 0 twice"])


def test_files_are_picked_by_split_or_pattern(tmp_path):
    names = ["README.md", "train.jsonl", "validation.jsonl", "data/train-00000-of-00002.parquet",
             "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.csv", "extra/trainer_notes.json"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text("x")
    rel = lambda fs: [f.relative_to(tmp_path).as_posix() for f in fs]  # noqa: E731
    assert rel(pick_files(tmp_path, "d", None, None)) == [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "train.jsonl"]
    assert rel(pick_files(tmp_path, "d", "validation", None)) == ["validation.jsonl"]
    assert rel(pick_files(tmp_path, "d", "test", None)) == ["data/test-00000-of-00001.csv"]
    assert rel(pick_files(tmp_path, "d", None, ["data/*.parquet", "*.csv"])) == [
        "data/test-00000-of-00001.csv", "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet"]
    with pytest.raises(DataError, match=r"d: no file of split 'dev' \(its files: data/test-00000-of"):
        pick_files(tmp_path, "d", "dev", None)
    with pytest.raises(DataError, match="no file matches --data-files nope/"):
        pick_files(tmp_path, "d", None, ["nope/*"])
    assert not names_split("extra/trainer_notes", "train") and names_split("train/0000", "train")


def test_a_dataset_that_names_no_split_is_read_whole(tmp_path):
    for n in ("part-a.jsonl", "more/part-b.jsonl"):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text("x")
    assert [f.name for f in pick_files(tmp_path, "d", None, None)] == ["part-b.jsonl", "part-a.jsonl"]


def test_a_dataset_not_in_the_cache_offline_is_one_line_before_the_model_loads(tmp_path, cache, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(microft.runs, "load_base", lambda *a, **k: calls.append("load"))
    res = runner.invoke(app, ["finetune", "--model", "gpt2-tiny", "--data", "org/missing",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: org/missing: no such file or directory, and no dataset of that "
                                  f"name in the local Hugging Face cache ({cache}); HF_HUB_OFFLINE is set, "
                                  "so it was not downloaded")
    assert calls == []


def test_data_split_on_one_file_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(DataError, match="pick files in a dataset directory or hub repo"):
        read_records(tmp_path / "d.jsonl", split="train")


def test_a_dataset_missing_from_the_cache_is_downloaded(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    server = FakeHub()
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in rows(5, "dl"))
    server.repos["datasets/org/dl"] = Repo({"train.jsonl": lines, "README.md": b"# dl", "weights.bin": b"no"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        got = read_records("org/dl", columns={"instruction": "question", "output": "answer"})
    finally:
        server.shutdown()
        server.server_close()
    assert len(got.records) == 5
    snap = tmp_path / "hub" / "datasets--org--dl" / "snapshots" / server.repos["datasets/org/dl"].commit
    assert sorted(p.name for p in snap.iterdir()) == ["train.jsonl"]  # record files only


def test_estimate_mem_measures_a_hub_dataset(cache):
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in rows(20, "train"))
    cache_dataset(cache, "org/est", {"data/train-00000-of-00001.jsonl": lines, "data/test.jsonl": lines[:80]})
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--data", "org/est", "--micro-bs", "2",
                              "--columns", "instruction=question,output=answer"])
    assert res.exit_code == 0, res.output
    assert "from --data: 18 training samples" in res.output  # the train split's 20, less the 10 % held out
