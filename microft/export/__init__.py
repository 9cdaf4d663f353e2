"""Exports for other runtimes, one `ExportFormat` entry each in `EXPORTS`: `hf` (a transformers directory,
`export/hf.py`) and `gguf` (llama.cpp, Ollama, LM Studio: `export/gguf.py`).

An entry holds the format's name and one-line description (`export --format`'s help is built from them), its
writer, the format options it takes (`--quant` with its choices, `--template`), and the package it needs
with the one-line hint for a missing one. `microft export` only wires: it resolves the entry, checks the
options against it, and hands the writer an `ExportJob`. Adding a format is one entry here plus its writer.

No torch here: the CLI reads this registry for its help text on every start.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microft.errors import ConfigError

HINT = "GGUF export needs the gguf package: pip install 'microft[gguf]'"


@dataclass(frozen=True)
class ExportOption:
    """A format option of `microft export` (`--quant`): its flag, choices (None: free text) and default."""

    flag: str
    help: str  # what it sets, after the names of the formats that take it
    choices: tuple[str, ...] | None = None  # the default first

    @property
    def default(self) -> str | None:
        return self.choices[0] if self.choices else None


@dataclass(frozen=True)
class ExportFormat:
    """One `--format`: what it writes, its writer, the options it takes and the package it needs."""

    name: str
    summary: str  # one line, for `--format`'s help
    writer: str  # "module:function" taking an ExportJob, returning an Exported (imported when used: torch)
    options: tuple[str, ...] = ()  # keys of OPTIONS it takes
    package: str | None = None  # the module it needs beyond microft's own dependencies
    hint: str | None = None  # the one line when that module is missing


@dataclass(frozen=True)
class ExportJob:
    """One `microft export` for a writer: what to read and where to write, the format's options (defaults
    filled in), and the output guard the CLI wires in (export/ sits below train/, whose `writing` turns an
    OSError while writing --out into one line). Writers read the model with `models.artifacts.load_any` and
    its tokenizer with `data.tokenizer_files`."""

    model: str  # --model as given
    out: str
    force: bool
    options: dict[str, str | None]
    writing: Callable[[], AbstractContextManager[None]]


@dataclass(frozen=True)
class Exported:
    """What a writer wrote, for the CLI's lines: `exported MODEL -> path summary`, notes before it."""

    path: Path
    summary: str
    notes: tuple[str, ...] = ()
    no_tokenizer: str | None = None  # why the written directory has no tokenizer files, if it has none


OPTIONS: dict[str, ExportOption] = {
    "quant": ExportOption("--quant", "", choices=("f16", "bf16", "q8_0", "q4_0", "f32")),
    "template": ExportOption("--template", "the chat template to write (alpaca, chatml, plain, chat, a "
                             "template or .jinja file) (default: the one the run trained with)."),
}

EXPORTS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("hf", "a transformers directory", "microft.export.hf:write"),
    ExportFormat("gguf", "one GGUF file for llama.cpp / Ollama / LM Studio, and a Modelfile",
                 "microft.export.gguf:write", options=("quant", "template"), package="gguf", hint=HINT),
)}


def format_help() -> str:
    """`--format`'s help: each format's name and summary."""
    return "; ".join(f"{f.name}: {f.summary}" for f in EXPORTS.values()) + "."


def option_help(key: str) -> str:
    """An option's help: the formats that take it, then its choices (default first) or its own text."""
    opt = OPTIONS[key]
    text = opt.help
    if opt.choices:
        text = f"{', '.join(opt.choices[:-1])} or {opt.choices[-1]} (default: {opt.default})."
    return f"{'/'.join(_takers(key))}: {text}"


def _takers(key: str) -> list[str]:
    return [f.name for f in EXPORTS.values() if key in f.options]


def export_format(name: str, given: dict[str, str | None]) -> ExportFormat:
    """The entry of `--format name`, or one line naming the registry's formats; one line too for a format
    option (`given`, by OPTIONS key; None: not passed) that this format does not take."""
    fmt = EXPORTS.get(name)
    if fmt is None:
        raise ConfigError(f"unknown export format {name!r}; supported: {', '.join(EXPORTS)}")
    foreign = [k for k in OPTIONS if k not in fmt.options]
    if any(given.get(k) is not None for k in foreign):
        takers = dict.fromkeys(t for k in foreign for t in _takers(k))
        verb = "are" if len(foreign) > 1 else "is"
        raise ConfigError(f"{' and '.join(OPTIONS[k].flag for k in foreign)} {verb} for --format "
                          f"{' or '.join(takers)}")
    return fmt


def resolved_options(fmt: ExportFormat, given: dict[str, str | None]) -> dict[str, str | None]:
    """The format's options with their defaults filled in; a choice outside an option's list is one line."""
    out = {}
    for key in fmt.options:
        opt, value = OPTIONS[key], given.get(key)
        value = opt.default if value is None else value
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"unknown {opt.flag} {value!r}; choose one of: {', '.join(opt.choices)}")
        out[key] = value
    return out


def require(fmt: ExportFormat) -> Any:
    """The package the format needs (None if it needs none), or a one-line ConfigError with its hint."""
    if fmt.package is None:
        return None
    try:
        return importlib.import_module(fmt.package)
    except ImportError:
        raise ConfigError(fmt.hint or f"--format {fmt.name} needs the {fmt.package} package") from None


def require_gguf():
    """The `gguf` package, or a one-line ConfigError saying how to install it."""
    return require(EXPORTS["gguf"])


def writer(fmt: ExportFormat) -> Callable[[ExportJob], Exported]:
    """The format's writer function (its module imported now)."""
    module, _, name = fmt.writer.partition(":")
    return getattr(importlib.import_module(module), name)
