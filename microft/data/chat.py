"""A model's own chat template: render conversations with its jinja `chat_template`, train on assistant turns.

The template (from `tokenizer_config.json` or `chat_template.jinja`) runs in a sandboxed jinja2
environment set up the way transformers sets it up (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson`, `strftime_now`, `bos_token` / `eos_token`, `add_generation_prompt`), so
the text is the text the model was tuned on.

Which tokens carry the loss is read off the rendered text, not off the template's source: for each
assistant message i, the conversation up to i rendered with the generation prompt ends where the
assistant's text starts in the full rendering, and the conversation up to and including i ends where
it stops. Templates that render earlier turns differently once later ones exist (reasoning models that
drop old `<think>` blocks) are handled by finding the turn's closing text instead. Character spans
become token spans through the tokenizer's offsets; a turn keeps its end-of-turn token (`<|im_end|>`,
`<|eot_id|>`) and drops the whitespace after it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microft.data.templates import Template, load_template
from microft.errors import ConfigError, DataError

if TYPE_CHECKING:
    import jinja2

    from microft.data.tokenizer import Tokenizer

Messages = Sequence[Mapping[str, Any]]
Span = tuple[int, int]  # [start, end) characters of the rendered text
AUTO_NAMES = ("auto",)
MODEL_NAMES = ("chat", "model")


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=1)
def chat_env() -> jinja2.Environment:
    """The sandboxed environment chat templates run in (immutable: templates can't mutate their inputs)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body unchanged (spans come from rendering)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        # not jinja's own tojson, which HTML-escapes: templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template once; a syntax error is a ConfigError naming the line."""
    import jinja2

    try:
        return chat_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def render_chat(source: str, messages: Messages, *, add_generation_prompt: bool = False,
                bos_token: str | None = None, eos_token: str | None = None, **kwargs: Any) -> str:
    """The conversation as text, as the template writes it. A template that raises (or fails on the
    data) is a DataError with the template's message."""
    import jinja2

    tmpl = compile_chat_template(source)
    try:
        return tmpl.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)
    except jinja2.TemplateError as e:  # raise_exception(), undefined names, sandbox refusals
        raise DataError(f"chat template rejected the conversation: {e.message or type(e).__name__}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise DataError(f"chat template failed on the conversation: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------ the template as a microft template


def record_messages(record: Any) -> list[dict[str, str]]:
    """A Record as chat messages; an instruction record becomes one user/assistant exchange."""
    if record.messages:
        return [{"role": m.role, "content": m.content} for m in record.messages]
    user = record.instruction + (f"\n\n{record.input}" if record.input.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record.output}]


class ChatTemplate:
    """A jinja chat template bound to a tokenizer; used where a `Template` is (render_prompt, clean)."""

    stop: str | None = None

    def __init__(self, tokenizer: Tokenizer, source: str | None = None, name: str = "model"):
        source = source if source is not None else tokenizer.chat_template
        if not source:
            raise ConfigError(f"{tokenizer.name}: the model has no chat template (no chat_template in "
                              "tokenizer_config.json and no chat_template.jinja); "
                              "use --template alpaca, chatml, plain or a template file")
        compile_chat_template(source)  # syntax errors surface before any data is read
        self.tok = tokenizer
        self.source = source
        self.name = name

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return render_chat(self.source, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.tok.bos_token, eos_token=self.tok.eos_token)

    def render_prompt(self, instruction: str, input: str = "") -> str:
        """An instruction as a user turn followed by the assistant's header: what generation starts from."""
        user = instruction + (f"\n\n{input}" if input.strip() else "")
        return self.render([{"role": "user", "content": user}], add_generation_prompt=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids for rendered prompt text: special tokens parsed, no BOS added (the template writes its own)."""
        return self.tok.encode(prompt, special=True)

    def clean(self, generated: str) -> str:
        return generated.strip()

    def assistant_spans(self, messages: Messages) -> tuple[str, list[Span]]:
        """The full rendering and, for each assistant message, its character span in it (header excluded,
        closing text included)."""
        full = self.render(messages)
        spans: list[Span] = []
        idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for n, i in enumerate(idx):
            pre = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(pre):
                raise DataError(f"chat template: the conversation before message {i} renders differently "
                                "on its own than inside the whole conversation, so the assistant turn "
                                "can't be located")
            upto = self.render(messages[: i + 1])
            if full.startswith(upto) and len(upto) > len(pre):
                end = len(upto)
            else:  # earlier turns render differently once later ones exist: find this turn's closing text
                limit = len(self.render(messages[: idx[n + 1]], add_generation_prompt=True)) \
                    if n + 1 < len(idx) else len(full)
                end = self._turn_end(full, messages, i, len(pre), limit)
            spans.append((len(pre), end))
        return full, spans

    def _turn_end(self, full: str, messages: Messages, i: int, start: int, limit: int) -> int:
        """Where assistant turn i ends in `full`: after the first occurrence of the text the template
        closes an assistant turn with (what two renderings with different last characters share)."""
        content = str(messages[i].get("content", ""))
        a = self.render(messages[: i + 1])
        other = dict(messages[i], content=content + ("y" if content.endswith("x") else "x"))
        b = self.render([*messages[:i], other])
        k = 0
        while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
            k += 1
        tail = a[len(a) - k:]
        pos = full.find(tail, start, limit) if tail.strip() else -1
        if pos >= 0:
            return pos + len(tail)
        common = 0  # no closing text found: fall back to where the turn rendered alone stops matching
        while common < min(len(a), len(full)) and a[common] == full[common]:
            common += 1
        if common <= start:
            raise DataError(f"chat template: can't find where assistant message {i} ends in the "
                            "rendered text")
        return common

    def encode_chat(self, messages: Messages, train_all: bool = True) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and which are targets: each assistant turn's text and its
        end-of-turn token(s). With `train_all=False` only the last assistant turn is a target."""
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("the conversation has no assistant message to train on")
        full, spans = self.assistant_spans(messages)
        if not train_all:
            spans = spans[-1:]
        ids, offsets = self.tok.encode_offsets(full)
        target = [False] * len(ids)
        j = 0
        for s, e in spans:
            while j < len(ids) and max(offsets[j][1], offsets[j][0] + 1) <= s:
                j += 1
            covered = []
            while j < len(ids) and offsets[j][0] < e:
                covered.append(j)
                j += 1
            # keep the turn's end marker, drop the whitespace the template puts after it
            last_special = max((k for k in covered if ids[k] in self.tok.special_ids), default=None)
            if last_special is not None and full[offsets[last_special][1]:e].strip() == "":
                covered = [k for k in covered if k <= last_special]
            for k in covered:
                target[k] = True
        return ids, target


def resolve_template(spec: str | Template | ChatTemplate | None,
                     tokenizer: Tokenizer) -> Template | ChatTemplate:
    """The template a run formats data with.

    None or "auto": the model's chat template when it has one, else `alpaca`. "chat" / "model": the
    model's chat template (an error when it has none). A `.jinja` file: that chat template. Otherwise a
    built-in name or a TOML/JSON template file (`templates.load_template`).
    """
    if isinstance(spec, (Template, ChatTemplate)):
        return spec
    if spec is None or spec in AUTO_NAMES:
        return ChatTemplate(tokenizer) if tokenizer.chat_template else load_template("alpaca")
    if spec in MODEL_NAMES:
        return ChatTemplate(tokenizer)
    path = Path(spec)
    if path.suffix.lower() == ".jinja":
        if not path.is_file():
            raise ConfigError(f"chat template file {path} not found")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read chat template {path}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        if not source.strip():
            raise ConfigError(f"chat template file {path} is empty")
        return ChatTemplate(tokenizer, source, name=path.stem)
    return load_template(spec)
