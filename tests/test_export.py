"""The export-format registry drives `microft export`: its names, options, packages and writers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from microft import export as exports  # noqa: E402
from microft.cli import app  # noqa: E402

runner = CliRunner()
CALLS: list[exports.ExportJob] = []


def toy_write(job: exports.ExportJob) -> exports.Exported:
    """A format's writer as the registry names it: records the job, writes one file, loads nothing."""
    CALLS.append(job)
    with job.writing():
        path = Path(job.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "toy.txt").write_text(repr(job.options))
    return exports.Exported(path, "(toy)", notes=("a toy note",), no_tokenizer="toys have none")


TOY = exports.ExportFormat("toy", "a toy file", f"{__name__}:toy_write", options=("quant",))


@pytest.fixture
def toy(monkeypatch):
    """The registry with one more entry, `toy`, taking --quant."""
    CALLS.clear()
    monkeypatch.setitem(exports.EXPORTS, "toy", TOY)
    return TOY


def invoke(tmp_path, *args: str):
    return runner.invoke(app, ["export", "--model", "gpt2-tiny", "--out", str(tmp_path / "o"), *args])


def test_a_new_entry_is_a_format_the_cli_writes(toy, tmp_path):
    res = invoke(tmp_path, "--format", "toy", "--quant", "q8_0")
    assert res.exit_code == 0, res.output
    (job,) = CALLS
    assert job.model == "gpt2-tiny" and job.out == str(tmp_path / "o") and job.options == {"quant": "q8_0"}
    assert (tmp_path / "o" / "toy.txt").read_text() == "{'quant': 'q8_0'}"
    assert f"exported gpt2-tiny -> {tmp_path / 'o'} (toy)" in res.stdout
    assert "note: a toy note" in res.stderr and "has no tokenizer files (toys have none)" in res.stderr


def test_an_option_default_comes_from_the_registry(toy, tmp_path):
    assert invoke(tmp_path, "--format", "toy").exit_code == 0
    assert CALLS[0].options == {"quant": exports.OPTIONS["quant"].default} == {"quant": "f16"}


def test_a_bad_format_names_the_registrys_formats(toy, tmp_path):
    res = invoke(tmp_path, "--format", "onnx")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == "error: unknown export format 'onnx'; supported: hf, gguf, toy"


@pytest.mark.parametrize("fmt, args, message", [
    ("hf", ["--template", "chatml"], "--quant and --template are for --format gguf"),
    ("toy", ["--template", "chatml"], "--template is for --format gguf"),
    ("toy", ["--quant", "q5_k"], "unknown --quant 'q5_k'; choose one of: f16, bf16, q8_0, q4_0, f32"),
])
def test_options_a_format_does_not_take_are_one_line(toy, tmp_path, fmt, args, message):
    res = invoke(tmp_path, "--format", fmt, *args)
    assert res.exit_code == 2 and message in res.output and not CALLS
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_missing_package_is_the_entrys_hint(monkeypatch, tmp_path):
    CALLS.clear()
    needy = dataclasses.replace(TOY, name="needy", package="microft_no_such_package",
                                hint="needy needs a package")
    monkeypatch.setitem(exports.EXPORTS, "needy", needy)
    res = invoke(tmp_path, "--format", "needy")
    assert res.exit_code == 2 and res.output.strip() == "error: needy needs a package" and not CALLS


def test_the_help_lists_every_format_and_option():
    res = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    help_text = re.sub(r"[\s│]+", " ", res.output)
    for fmt in exports.EXPORTS.values():
        assert f"{fmt.name}: {fmt.summary}" in exports.format_help()
        assert f"{fmt.name}:" in help_text
    assert "gguf: f16, bf16, q8_0, q4_0 or f32 (default: f16)." in help_text
    assert exports.format_help() == ("hf: a transformers directory; gguf: one GGUF file for llama.cpp / "
                                     "Ollama / LM Studio, and a Modelfile.")
