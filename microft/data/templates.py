"""Prompt templates: how an instruction or a chat becomes text, and which part of it is trained on.

A template renders a record into *segments*, `(text, is_target)` pairs. The prompt part is never a
target; the response (and, for chats, every assistant turn) is. `instruct.build_samples` encodes
the segments one by one, so the prompt tokens seen in training are exactly the tokens the model
sees when it is prompted at generation time, and appends `<|endoftext|>` (token 50256) as the last
target so the model learns to stop.

Built-ins: `alpaca` (the Stanford Alpaca prompts), `chatml` and `plain`. A user template is a TOML
or JSON file with `prompt`, optionally `prompt_no_input`, `turn`, `roles` and `response_end`.
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from microft.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROLES = ("system", "user", "assistant")
Segment = tuple[str, bool]  # (text, is_target)


@dataclass(frozen=True)
class Template:
    """Format strings for one prompt style.

    `prompt` / `prompt_no_input` use `{instruction}` and `{input}`; the second is used when the
    input is empty. `turn` renders one chat message with `{role}` (mapped through `roles`) and
    `{content}`; text after `{content}` closes the turn and is a target for assistant turns.
    `response_end` follows an instruction record's output (also a target).
    """

    name: str
    prompt: str
    prompt_no_input: str
    turn: str | None = None
    roles: Mapping[str, str] = field(default_factory=lambda: {r: r for r in ROLES})
    response_end: str = ""

    @property
    def stop(self) -> str | None:
        """Text at which a generated response is cut (the visible end-of-turn marker), if any."""
        return self.response_end.strip() or None

    def render_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt for an instruction record: the exact text a model is given at generation time."""
        fmt = self.prompt if input else self.prompt_no_input
        return fmt.format(instruction=instruction, input=input)

    def instruction_segments(self, instruction: str, input: str, output: str) -> list[Segment]:
        return [(self.render_prompt(instruction, input), False), (output + self.response_end, True)]

    def chat_segments(self, messages: Sequence[tuple[str, str]]) -> list[Segment]:
        """Segments for a chat; every assistant turn's content plus its turn ending are targets."""
        if self.turn is None:
            raise ConfigError(f"template {self.name!r} has no 'turn' format, so it can't render chat records")
        head, tail = self.turn.split("{content}")
        segs: list[Segment] = []
        for role, content in messages:
            shown = self.roles.get(role, role)
            if role == "assistant":
                segs.append((head.format(role=shown), False))
                segs.append((content + tail.format(role=shown), True))
            else:
                segs.append((self.turn.format(role=shown, content=content), False))
        return merge_segments(segs)

    def clean(self, generated: str) -> str:
        """A generated response cut at the template's end-of-turn marker, whitespace stripped."""
        if self.stop and self.stop in generated:
            generated = generated[: generated.index(self.stop)]
        return generated.strip()


def merge_segments(segs: list[Segment]) -> list[Segment]:
    """Join neighbours with the same role so each context run is encoded as one piece of text."""
    out: list[Segment] = []
    for text, target in segs:
        if out and out[-1][1] == target:
            out[-1] = (out[-1][0] + text, target)
        elif text:
            out.append((text, target))
    return out


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

BUILTIN_TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        name="alpaca",
        prompt=ALPACA_PROMPT,
        prompt_no_input=ALPACA_PROMPT_NO_INPUT,
        turn="### {role}:\n{content}\n\n",
        roles={"system": "System", "user": "Instruction", "assistant": "Response"},
    ),
    # ChatML as plain text. GPT-2's vocabulary has no <|im_start|> / <|im_end|> tokens, so the
    # markers are ordinary text (several BPE tokens each); only <|endoftext|> is a special token.
    "chatml": Template(
        name="chatml",
        prompt="<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
        prompt_no_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        turn="<|im_start|>{role}\n{content}<|im_end|>\n",
        response_end="<|im_end|>\n",
    ),
    "plain": Template(
        name="plain",
        prompt="{instruction}\n{input}\n",
        prompt_no_input="{instruction}\n",
        turn="{role}: {content}\n",
        roles={"system": "System", "user": "User", "assistant": "Assistant"},
    ),
}


def _check_format(where: str, key: str, fmt: object, allowed: set[str], required: set[str]) -> str:
    if not isinstance(fmt, str):
        raise ConfigError(f"{where}: {key!r} must be a string")
    try:
        names = _fields(fmt)
    except ValueError as e:
        raise ConfigError(
            f"{where}: {key!r} is not a valid format string ({e}); write {{{{ and }}}} for literal braces"
        ) from None
    bad = sorted({n for n in names if n not in allowed})
    if bad:
        raise ConfigError(f"{where}: {key!r} uses unknown field(s) {', '.join('{' + b + '}' for b in bad)}; "
                          f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}")
    missing = sorted(required - set(names))
    if missing:
        raise ConfigError(f"{where}: {key!r} must contain {', '.join('{' + m + '}' for m in missing)}")
    try:  # a format spec or conversion ({instruction:d}, {input!x}) fails only when filled: fill it now
        fmt.format(**{a: "text" for a in allowed})
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ConfigError(f"{where}: {key!r} cannot be filled with text ({e}); fields take no format spec or "
                          f"conversion") from None
    return fmt


def _fields(fmt: str) -> list[str]:
    """The replacement fields a format string fills, in order (literal {{braces}} are not fields); ValueError
    for a string that does not parse."""
    return [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]


def template_from_dict(raw: Mapping[str, object], where: str = "template") -> Template:
    """Validate a template table (`prompt`, optional `prompt_no_input`, `turn`, `roles`, `response_end`)."""
    known = {"name", "prompt", "prompt_no_input", "turn", "roles", "response_end"}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; expected {', '.join(sorted(known))}")
    if "prompt" not in raw:
        raise ConfigError(f"{where}: missing 'prompt' (a format string with {{instruction}} and {{input}})")
    fields, need = {"instruction", "input"}, {"instruction"}
    prompt = _check_format(where, "prompt", raw["prompt"], fields, need)
    no_input = _check_format(where, "prompt_no_input", raw.get("prompt_no_input", prompt), fields, need)
    turn = raw.get("turn")
    if turn is not None:
        turn = _check_format(where, "turn", turn, {"role", "content"}, {"content"})
        if _fields(turn).count("content") != 1:
            raise ConfigError(f"{where}: 'turn' must contain {{content}} exactly once")
    roles = dict({r: r for r in ROLES})
    raw_roles = raw.get("roles", {})
    if not isinstance(raw_roles, Mapping) or not all(
        k in ROLES and isinstance(v, str) for k, v in raw_roles.items()
    ):
        raise ConfigError(f"{where}: 'roles' must map system/user/assistant to display names (strings)")
    roles.update(raw_roles)
    end = raw.get("response_end", "")
    if not isinstance(end, str):
        raise ConfigError(f"{where}: 'response_end' must be a string")
    name = raw.get("name", where)
    return Template(name=str(name), prompt=prompt, prompt_no_input=no_input, turn=turn, roles=roles,
                    response_end=end)


def load_template(spec: str | Template) -> Template:
    """A built-in template by name (`alpaca`, `chatml`, `plain`) or a `.toml` / `.json` template file."""
    if isinstance(spec, Template):
        return spec
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"unknown template {spec!r}; use one of {', '.join(BUILTIN_TEMPLATES)} "
                          "or a path to a .toml/.json template file")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"template file {path} can't be parsed: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"template file {path}: expected a table/object with a 'prompt' key")
    return template_from_dict({"name": path.stem, **raw}, where=str(path))
