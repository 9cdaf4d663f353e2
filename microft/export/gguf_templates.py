"""Chat templates for GGUF and Ollama: microft's own templates as jinja (what the GGUF carries) and in
Ollama's Go template syntax (the Modelfile's TEMPLATE), and which template a run was tuned with."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microft.data.chat import ChatTemplate
    from microft.data.templates import Template
    from microft.data.tokenizer import Tokenizer


def _jinja_str(text: str) -> str:
    """`text` as a jinja string literal (quotes, backslashes and line breaks escaped)."""
    esc = (
        text.replace("\\", "\\\\")
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return "'" + esc + "'"


def _jinja_lit(text: str) -> str:
    return "{{ " + _jinja_str(text) + " }}"


def _jinja_format(fmt: str, fields: dict[str, str]) -> str:
    """A microft format string as jinja: literal text as strings, each {field} as the expression given."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            out.append(_jinja_lit(literal))
        if name is not None:
            out.append("{{ " + fields[name] + " }}")
    return "".join(out)


def _single_instruction(t: Template) -> str:
    return (
        "{%- if messages|length <= 2 and messages[0]['role'] == 'user' and "
        "(messages|length == 1 or messages[1]['role'] == 'assistant') -%}"
        + _jinja_format(t.prompt_no_input, {"instruction": "messages[0]['content']", "input": "''"})
        + "{%- if messages|length == 2 -%}{{ messages[1]['content'] }}"
        + _jinja_lit(t.response_end)
        + "{{ eos_token }}{%- endif -%}"
    )


def template_jinja(t: Template) -> str:
    """A microft template (alpaca, chatml, plain or a TOML/JSON file) as a jinja chat template that renders
    conversations to the text microft trains on.

    One user message (and its answer) is an instruction record: `prompt_no_input`, the answer,
    `response_end`, EOS, as `microft generate --template` prompts. Longer conversations are chat records:
    each message in `turn`, EOS after a final assistant turn.
    """
    roles = "{" + ", ".join(f"{_jinja_str(k)}: {_jinja_str(v)}" for k, v in t.roles.items()) + "}"
    out = _single_instruction(t)
    if t.turn is None:
        return (
            out
            + "{%- else -%}{{ raise_exception('this template renders one user message only') }}{%- endif -%}"
        )
    head, tail = t.turn.split("{content}")
    role = {"role": "(roles[m['role']] if m['role'] in roles else m['role'])"}
    assistant = {"role": "roles['assistant']"}
    return (
        out
        + "{%- else -%}{%- set roles = "
        + roles
        + " -%}{%- for m in messages -%}"
        + _jinja_format(head, role)
        + "{{ m['content'] }}"
        + _jinja_format(tail, role)
        + "{%- if loop.last and m['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + _jinja_format(head, assistant)
        + "{%- endif -%}{%- endif -%}"
    )


def _go_lit(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _go_format(fmt: str, fields: dict[str, str]) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        out.append(_go_lit(literal))
        if name is not None:
            out.append(fields[name])
    return "".join(out)


def template_go(t: Template) -> str:
    """The same rendering as `template_jinja` in Ollama's Go template syntax (`.Messages`, `.Role`,
    `.Content`)."""
    one = "(index .Messages 0)"
    out = (
        "{{- if and (eq (len .Messages) 1) (eq "
        + one
        + '.Role "user") }}'
        + _go_format(t.prompt_no_input, {"instruction": "{{ " + one + ".Content }}", "input": ""})
    )
    if t.turn is None:
        return out + "{{- else }}{{ range .Messages }}{{ .Content }}{{ end }}{{- end }}"
    head, tail = t.turn.split("{content}")
    shown = "".join(
        f"{{{{ if eq .Role {json.dumps(k)} }}}}{_go_lit(v)}{{{{ else }}}}" for k, v in t.roles.items()
    )
    shown += "{{ .Role }}" + "{{ end }}" * len(t.roles)
    out += (
        "{{- else }}{{ range .Messages }}"
        + _go_format(head, {"role": shown})
        + "{{ .Content }}"
        + _go_format(tail, {"role": shown})
        + "{{ end }}"
        + _go_format(head, {"role": _go_lit(t.roles["assistant"])})
        + "{{- end }}"
    )
    return out


def plain_text_specials(tok: Tokenizer, tmpl: Template | ChatTemplate | None) -> list[str]:
    """Special-token strings in a microft template's text: microft encodes that text as plain text, while
    llama.cpp and Ollama read the string in a chat prompt as the control token."""
    from microft.data.templates import Template

    if not isinstance(tmpl, Template):
        return []
    text = tmpl.prompt + tmpl.prompt_no_input + (tmpl.turn or "") + tmpl.response_end
    found = sorted({s for s in (tok.decode([i]) for i in tok.special_ids) if s and s in text})
    return [
        f"template {tmpl.name!r} writes {s!r}, which microft trained on as plain text but llama.cpp and "
        "Ollama read as a control token"
        for s in found
    ]


def chat_template_of(tmpl: Template | ChatTemplate | None) -> str | None:
    """The jinja chat template GGUF carries for the template a model was tuned with (None: none)."""
    from microft.data.templates import Template

    if tmpl is None:
        return None
    return template_jinja(tmpl) if isinstance(tmpl, Template) else tmpl.source


def trained_template_spec(model_dir: Path | None) -> str | None:
    """The `--template` a run's weights were tuned with, from the run's record (run.json beside `final/` or
    `best/`, or above `checkpoints/step-N/`); None without a record or for a pretraining run (text data)."""
    if model_dir is None:
        return None
    for d in (model_dir, model_dir.parent, model_dir.parent.parent):
        rec = d / "run.json"
        if rec.is_file():
            try:
                cfg = json.loads(rec.read_text(encoding="utf-8")).get("config") or {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                return None
            data = str(cfg.get("data") or "")
            if data and (data.endswith(".txt") or Path(data).is_dir()):
                return None
            return cfg.get("template") or "auto"
    return None
