"""Instruction data: read and validate records, turn them into masked training samples, split them.

Accepted inputs (a file of any name, or a directory of such files read in name order), in any format of
`formats.FORMATS` (JSON array or JSONL, CSV/TSV with a header, Parquet), each record being
  - Alpaca: {"instruction": str, "input": str (optional), "output": str}
  - chat: {"messages": [{"role": "system|user|assistant", "content": str}, ...]}
  - other key names mapped to these by --columns (`columns`), or read by their usual `formats.ALIASES`
    (prompt/completion, question/answer, context/response) for the fields a record without messages lacks
    (Dolly's {instruction, context, response} reads as it is).
Every record may carry `"weight": <positive number>`, a multiplier on its token losses. Other keys are
ignored. Everything is validated before training starts; a problem is one line naming the file, the
record (line for JSONL and CSV, 0-based index for JSON arrays and Parquet rows) and what is wrong.

A sample is {"input_ids", "labels", "weight", "prompt", "response", "source"}: labels[t] is the target
for position t (already shifted), IGNORE_INDEX where no loss is taken.

Samples are built with the model's tokenizer (`microft.data.tokenizer.load_tokenizer`) and either a text
template (`templates.Template`: segments encoded one by one, BOS first when the tokenizer adds one, EOS
last) or the model's own chat template (`chat.ChatTemplate`: the whole conversation rendered, assistant
turns found in it). A plain `encode` function is still accepted and means GPT-2's conventions.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from microft.data.formats import (
    ALIASES,
    SUFFIXES,
    Bad,
    Table,
    format_for,
    looks_like_text,
    read_json,
    read_table,
)
from microft.data.templates import ROLES, Segment, Template
from microft.errors import DataError, check_data_path
from microft.models.config import EOT_TOKEN, IGNORE_INDEX

if TYPE_CHECKING:
    from microft.config import RunConfig
    from microft.data.chat import ChatTemplate
    from microft.data.tokenizer import Tokenizer

Sample = dict[str, Any]
Encode = Callable[[str], list[int]]
_T = TypeVar("_T")


class Message(NamedTuple):
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One validated example: an instruction record, or a chat when `messages` is non-empty."""

    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[Message, ...] = ()
    weight: float = 1.0
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def response(self) -> str:
        """The reference answer: the output, or the last assistant turn of a chat."""
        return self.messages[-1].content if self.messages else self.output


@dataclass
class ReadResult:
    records: list[Record]
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, for the skipped records
    notes: list[str] = field(default_factory=list)  # other column names read as ours, one line per file


# --------------------------------------------------------------------------- reading and validation


class _Bad(Exception):
    """A problem with one record (skippable with skip_bad)."""


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def parse_messages(value: object, key: str) -> list[Message]:
    """The role/content messages of a record's `key` (chat records' `messages`, preference pairs' sides)."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"{key!r} must be a non-empty array of messages, got {_json_type(value)}"
                   + (" (empty)" if isinstance(value, list) else ""))
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]."
        if not isinstance(m, dict):
            raise _Bad(f"{key}[{i}] must be an object with 'role' and 'content', got {_json_type(m)}")
        role, content = _get_str(m, "role", where), _get_str(m, "content", where)
        if role not in ROLES:
            raise _Bad(f"{key}[{i}]: unknown role {role!r} (expected system, user or assistant)")
        out.append(Message(role, content))
    return out


def _get_str(obj: Mapping[str, Any], key: str, where: str = "", optional: bool = False) -> str:
    if key not in obj:
        if optional:
            return ""
        raise _Bad(f"missing key {where}{key!r}")
    v = obj[key]
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise _Bad(f"{where}{key!r} must be a string, got {_json_type(v)}")
    if not is_unicode_text(v):
        raise _Bad(f"{where}{key!r} is not valid Unicode text (a lone surrogate escape such as \\ud800)")
    return v


def is_unicode_text(s: str) -> bool:
    """Whether `s` is text a tokenizer can take: no lone surrogates (JSON's "\\ud800", or undecodable bytes
    Python let through from argv or stdin)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _weight(obj: Mapping[str, Any]) -> float:
    if "weight" not in obj:
        return 1.0
    w = obj["weight"]
    if isinstance(w, str):  # a CSV/TSV cell is text: a number written out, or blank for the default
        if not w.strip():
            return 1.0
        try:
            w = float(w)
        except ValueError:
            raise _Bad(f"'weight' must be a positive number, got {w!r}") from None
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise _Bad(f"'weight' must be a positive number, got {_json_type(w)}")
    if not math.isfinite(w) or w <= 0:
        raise _Bad(f"'weight' must be a positive number, got {w}")
    return float(w)


def parse_record(obj: object, source: str = "") -> Record:
    """Validate one decoded JSON value as a record; raises DataError (message without location)."""
    return as_data_error(_parse, obj, source)


def as_data_error(parse: Callable[[object, str], _T], obj: object, source: str) -> _T:
    """`parse(obj, source)`, its `_Bad` raised as DataError (the message without a location)."""
    try:
        return parse(obj, source)
    except _Bad as e:
        raise DataError(str(e)) from None


def _record_object(obj: object) -> dict:
    """`obj` if it is a JSON object (a dict), else `_Bad`: every record format is one."""
    if not isinstance(obj, dict):
        raise _Bad(f"a record must be a JSON object, got {_json_type(obj)}")
    return obj


def _parse(obj: object, source: str) -> Record:
    obj = _record_object(obj)
    weight = _weight(obj)
    if "messages" in obj:
        parsed = parse_messages(obj["messages"], "messages")
        if parsed[-1].role != "assistant":
            raise _Bad("the last message must be from the assistant (it is the response to learn)")
        if not parsed[-1].content.strip():
            raise _Bad(f"messages[{len(parsed) - 1}]: the final assistant message is empty")
        return Record(messages=tuple(parsed), weight=weight, source=source)
    if "instruction" not in obj and "output" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise _Bad(f"expected 'instruction' and 'output' (Alpaca) or 'messages' (chat); keys found: {keys}; "
                   "name yours with --columns instruction=KEY,output=KEY")
    instruction = _get_str(obj, "instruction")
    inp = _get_str(obj, "input", optional=True)
    output = _get_str(obj, "output")
    if not instruction.strip():
        raise _Bad("'instruction' is empty")
    if not output.strip():
        raise _Bad("'output' is empty")
    return Record(instruction=instruction, input=inp, output=output, weight=weight, source=source)


def map_columns(obj: object, columns: Mapping[str, str] | None = None) -> tuple[object, dict[str, str]]:
    """`obj` with its keys renamed to microft's fields, and the renaming used ({field: key}).

    `columns` (--columns) names the key of each field it lists; a record without messages that still lacks
    instruction or output after that reads the `ALIASES` of each field it lacks.
    """
    if not isinstance(obj, dict):
        return obj, {}
    columns = dict(columns or {})
    out = dict(obj)
    for name, key in columns.items():
        if key not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            raise _Bad(f"no key {key!r} for --columns {name}={key}; keys found: {keys}")
        out[name] = obj[key]
    if "messages" not in out and not {"instruction", "output"} <= out.keys():
        for name, keys in ((n, ks) for n, ks in ALIASES.items() if n not in out):
            found = [k for k in keys if k in obj and k not in columns.values()]
            if len(found) > 1:
                raise _Bad(f"both {found[0]!r} and {found[1]!r} could be the {name}; say which with "
                           f"--columns {name}={found[0]}")
            if found:
                out[name] = obj[found[0]]
                columns[name] = found[0]
    return out, {k: v for k, v in columns.items() if k != v}


def _check_columns(name: str, table: Table, columns: Mapping[str, str] | None) -> dict[str, str]:
    """A tabular file's header checked once, before its rows: the columns --columns names exist, and the
    header gives instruction and output, or messages. Returns the renaming used."""
    header = table.columns or []
    found = ", ".join(header)
    for field_name, key in (columns or {}).items():
        if key not in header:
            raise DataError(f"{name}: no column {key!r} for --columns {field_name}={key}; columns: {found}")
    try:
        mapped, renamed = map_columns(dict.fromkeys(header, ""), columns)
    except _Bad as e:
        raise DataError(f"{name}: {e}") from None
    if "messages" not in mapped and not {"instruction", "output"} <= mapped.keys():
        others = " with ".join("/".join(ALIASES[k]) for k in ("instruction", "output"))
        raise DataError(f"{name}: columns {found}: expected instruction, output (optional input) or "
                        f"messages, or {others} (optional {'/'.join(ALIASES['input'])}); name yours with "
                        "--columns instruction=A,output=B")
    return renamed


def _read_file(path: Path, name: str, problems: list[str], columns: Mapping[str, str] | None = None,
               notes: list[str] | None = None) -> list[Record]:
    """Records of one file in any format (`formats.FORMATS`); record-level problems go to `problems`,
    file-level ones raise DataError; how other column names were read goes to `notes`."""
    table = read_table(path, name)
    renamed: dict[str, str] = {}
    if table.columns is not None:
        renamed = _check_columns(name, table, columns)
    out = []
    for row in table.rows:
        if isinstance(row.value, Bad):
            problems.append(f"{name}: {row.where}: {row.value.problem}")
            continue
        try:
            obj, used = map_columns(row.value, columns)
            renamed = renamed or used
            out.append(_parse(obj, row.source))
        except _Bad as e:
            problems.append(f"{name}: {row.where}: {e}")
    if renamed and notes is not None:
        notes.append(f"{name}: read " + ", ".join(f"{k} from {v!r}" for k, v in renamed.items()))
    return out


def data_files(path: str | Path, split: str | None = None, patterns: list[str] | None = None,
               default_split: str = "train") -> list[Path]:
    """The files `read_records` reads for `path`: the file itself, a directory's files of every format
    (`formats.SUFFIXES`: .json, .jsonl, .csv, .tsv, .parquet) in name order, or, for a hub dataset repo id
    (`hubdata`) or a directory given `split` / `patterns` (--data-split, --data-files), the files those
    pick."""
    from microft.data.hubdata import dataset_root, pick_files

    root = dataset_root(str(path), patterns)
    if root is not None:
        return pick_files(root, str(path), split, patterns, default_split)
    p = Path(path)
    check_data_path(p, f"{p}: no such file or directory")
    if split or patterns:
        if not p.is_dir():
            raise DataError(f"--data-split and --data-files pick files in a dataset directory or hub repo; "
                            f"{p} is one file")
        return pick_files(p, str(p), split, patterns)
    if p.is_dir():
        try:
            files = sorted(
                f for f in p.iterdir()
                if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith(".")
            )
        except OSError as e:
            raise DataError(f"{p}: can't read the directory ({e.strerror})") from None
        if not files:
            text = any(f.suffix.lower() == ".txt" for f in p.iterdir())
            raise DataError(f"{p}: directory has no {', '.join(SUFFIXES)} files"
                            + (" (its .txt files are plain text: use `microft pretrain`)" if text else ""))
        return files
    return [p]


def read_records(path: str | Path, skip_bad: bool = False, columns: Mapping[str, str] | None = None,
                 split: str | None = None, patterns: list[str] | None = None, default_split: str = "train"
                 ) -> ReadResult:
    """Read and validate every record under `path`, in any format of `formats.FORMATS`.

    `columns` (--columns) maps microft's fields to the data's own keys or columns ({"instruction":
    "question"}); a record without messages reads the usual other names (`ALIASES`) for the fields it
    lacks. Without `skip_bad` any bad record raises DataError naming the first problem and how many more
    there are. With it, bad records are dropped and counted. A file-level problem (empty file, broken JSON
    array, unreadable file, a header without the columns needed) is always an error, as is ending up with no
    records. `split`, `patterns` and `default_split` pick the files of a dataset directory or hub repo
    (`data_files`).
    """
    problems: list[str] = []
    records: list[Record] = []
    notes: list[str] = []
    for f in data_files(path, split, patterns, default_split):
        records.extend(_read_file(f, str(f), problems, columns, notes))
    refuse_bad_records(problems, skip_bad)
    if not records:
        raise DataError(f"{path}: no usable records ({len(problems)} bad record(s) skipped)")
    return ReadResult(records, len(problems), problems, notes)


def refuse_bad_records(problems: list[str], skip_bad: bool) -> None:
    """finetune's rule: a bad record is refused (the first named, the rest counted) unless skipped."""
    if problems and not skip_bad:
        n_more = len(problems) - 1
        more = f" (and {n_more} more bad record{'s' if n_more > 1 else ''})" if n_more else ""
        raise DataError(f"{problems[0]}{more}; fix the data or pass --skip-bad to skip bad records")


def record_kind(path: str | Path) -> tuple[int, str] | None:
    """(how many, "instruction" or "chat") when the file at `path` reads as records (bad ones a minority),
    else None: what `pretrain` checks before it trains on a file's raw text."""
    p = Path(path)
    if not p.is_file():
        return None
    if format_for(p).read is read_json:  # a text corpus is not read twice: its first 4 KiB tell
        try:
            with p.open("rb") as f:
                head = f.read(4096).removeprefix(b"\xef\xbb\xbf")
        except OSError:
            return None
        if looks_like_text(head):
            return None
    try:
        read = read_records(p, skip_bad=True)
    except DataError:  # plain text, or no record in it
        return None
    if read.n_skipped > len(read.records):  # text with a few lines that happen to parse
        return None
    return len(read.records), "chat" if any(r.is_chat for r in read.records) else "instruction"


# --------------------------------------------------------------------------- samples


@dataclass
class BuildStats:
    """What `build_samples` did. `n_truncated` counts kept samples that were cut to max_seq_len;
    `n_dropped` counts samples removed because truncation left none of their response."""

    n_records: int = 0
    n_samples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0  # input positions over all kept samples
    n_target_tokens: int = 0  # positions with a label
    max_len: int = 0

    @property
    def mean_len(self) -> float:
        return self.n_tokens / self.n_samples if self.n_samples else 0.0


def record_segments(record: Record, template: Template) -> list[Segment]:
    """The record rendered by `template` as (text, is_target) pieces; the final piece is the response."""
    if record.is_chat:
        return template.chat_segments(record.messages)
    return template.instruction_segments(record.instruction, record.input, record.output)


def _encoder(tok: Tokenizer | Encode | None) -> tuple[Encode, list[int], list[int]]:
    """(encode, ids put first, ids put last) for a tokenizer, a bare GPT-2-style encode function, or None."""
    if tok is None:
        from microft.data.tokenizer import gpt2_tokenizer

        tok = gpt2_tokenizer()
    # a plain function: GPT-2's conventions, as before tokenizers were objects
    if not hasattr(tok, "eos_ids"):
        return tok, [], [EOT_TOKEN]
    if tok.eos_id is None:
        from microft.errors import ConfigError

        raise ConfigError(f"{tok.name}: the tokenizer has no EOS token (set eos_token in "
                          "tokenizer_config.json)")
    return tok.encode, tok.prefix, [tok.eos_id]


def _template_tokens(record: Record, template: Template, tok: Tokenizer | Encode | None
                     ) -> tuple[list[int], list[bool], str]:
    encode, head, tail = _encoder(tok)
    segs = record_segments(record, template)
    tokens: list[int] = list(head)
    is_target: list[bool] = [False] * len(head)
    for text, target in segs:
        ids = encode(text)
        tokens.extend(ids)
        is_target.extend([target] * len(ids))
    tokens.extend(tail)
    is_target.extend([True] * len(tail))
    return tokens, is_target, "".join(text for text, _ in segs[:-1])


def _chat_tokens(record: Record, template: ChatTemplate) -> tuple[list[int], list[bool], str]:
    from microft.data.chat import record_messages

    messages = record_messages(record)
    tokens, is_target = template.encode_chat(messages)
    last = max(i for i, t in enumerate(is_target) if t) if any(is_target) else -1
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = template.render(messages[:last_assistant], add_generation_prompt=True)
    return tokens[: last + 1], is_target[: last + 1], prompt  # nothing after the final target is trained


def build_sample(record: Record, template: Template | ChatTemplate, encode: Tokenizer | Encode | None,
                 max_seq_len: int, mask_prompt: bool = True) -> tuple[Sample | None, bool]:
    """One sample (or None when truncation removes its whole response) and whether it was truncated.

    `encode` is the model's tokenizer (or a GPT-2-style encode function; None = GPT-2).
    """
    if isinstance(template, Template):
        tokens, is_target, prompt = _template_tokens(record, template, encode)
    else:
        tokens, is_target, prompt = _chat_tokens(record, template)
    truncated = len(tokens) - 1 > max_seq_len
    if truncated:
        tokens, is_target = tokens[: max_seq_len + 1], is_target[: max_seq_len + 1]
    if not any(is_target[1:]):
        return None, truncated
    pairs = zip(tokens[1:], is_target[1:], strict=True)
    labels = [t if (keep or not mask_prompt) else IGNORE_INDEX for t, keep in pairs]
    sample = {
        "input_ids": tokens[:-1],
        "labels": labels,
        "weight": record.weight,
        "prompt": prompt,
        "response": record.response,
        "source": record.source,
    }
    return sample, truncated


def build_samples(records: Iterable[Record], template: Template | ChatTemplate | str,
                  encode: Tokenizer | Encode | None, max_seq_len: int,
                  mask_prompt: bool = True) -> tuple[list[Sample], BuildStats]:
    """Tokenise records into training samples with the prompt masked (labels IGNORE_INDEX).

    Inputs longer than `max_seq_len` are cut at the right; a sample whose response is cut away
    entirely is dropped. `encode` is the model's tokenizer, a GPT-2-style encode function, or None
    for GPT-2. A template name is resolved against the tokenizer (`chat.resolve_template`: "auto",
    "chat", a built-in, a template file or a .jinja chat template).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    template = _resolve(template, encode)
    samples: list[Sample] = []
    stats = BuildStats()
    for record in records:
        stats.n_records += 1
        sample, truncated = build_sample(record, template, encode, max_seq_len, mask_prompt)
        if sample is None:
            stats.n_dropped += 1
            continue
        stats.n_truncated += truncated
        samples.append(sample)
        n = len(sample["input_ids"])
        stats.n_tokens += n
        stats.n_target_tokens += sum(lab != IGNORE_INDEX for lab in sample["labels"])
        stats.max_len = max(stats.max_len, n)
    stats.n_samples = len(samples)
    return samples, stats


def _resolve(template: Template | ChatTemplate | str | None, tok: Tokenizer | Encode | None
             ) -> Template | ChatTemplate:
    from microft.data.chat import resolve_template
    from microft.data.tokenizer import gpt2_tokenizer

    return resolve_template(template, tok if hasattr(tok, "eos_ids") else gpt2_tokenizer())


def encode_prompt(template: Template | ChatTemplate, tok: Tokenizer, prompt: str) -> list[int]:
    """Ids to start generation from a sample's `prompt`, encoded as training encoded it."""
    if isinstance(template, Template):
        return tok.prefix + tok.encode(prompt)
    return template.encode_prompt(prompt)


# --------------------------------------------------------------------------- splits and predictions


class Split(NamedTuple):
    train: list[Record]
    val: list[Record]
    test: list[Record]


def split_records(records: Sequence[Record], val_frac: float, test_frac: float, seed: int) -> Split:
    """Seeded, deterministic split into train / val / test; each part keeps the original order.

    A non-zero fraction holds out at least one record. Pass val_frac=0 when a separate
    validation file is given.
    """
    n = len(records)
    n_val = max(1, round(n * val_frac)) if val_frac > 0 else 0
    n_test = max(1, round(n * test_frac)) if test_frac > 0 else 0
    if n_val + n_test >= n:
        raise DataError(f"only {n} record(s): too few to hold out {n_val} for validation and {n_test} for "
                        "test; lower --val-frac/--test-frac or pass --val-data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx, test_idx = set(order[:n_val]), set(order[n_val:n_val + n_test])
    split = Split([], [], [])
    for i, r in enumerate(records):
        (split.val if i in val_idx else split.test if i in test_idx else split.train).append(r)
    return split


def write_predictions(path: str | Path, items: Iterable[Mapping[str, Any]]) -> int:
    """Write `--predict` output as JSONL: prompt, reference, prediction, then any extra keys. Returns rows."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            missing = [k for k in ("prompt", "reference", "prediction") if k not in item]
            if missing:
                raise ValueError(f"prediction item lacks {', '.join(missing)}")
            row = {"prompt": item["prompt"], "reference": item["reference"], "prediction": item["prediction"]}
            row.update({k: v for k, v in item.items() if k not in row})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(p)
    return n


# --------------------------------------------------------------------------- one call for the CLI


@dataclass
class InstructData:
    """Samples for each split, with what was read, skipped and cut on the way."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    stats: dict[str, BuildStats]  # "train" / "val" / "test"
    template: Template | ChatTemplate
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)
    demo: bool = False
    notes: list[str] = field(default_factory=list)  # other column names read as ours

    @property
    def eval_samples(self) -> list[Sample]:
        """What --predict and exact-match scoring use: the test split, else the validation split."""
        return self.test or self.val


@dataclass
class InstructRecords:
    """The validated records of each split, read before any model or tokenizer (data errors come first)."""

    parts: Split
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # other column names read as ours


def read_instruct_records(cfg: RunConfig, demo: tuple[list[Record], list[Record]] | None = None
                          ) -> InstructRecords:
    """Read, validate and split `cfg.data` (and `cfg.val_data`, with `cfg.columns`); no tokenizer needed.

    With no `cfg.data`, `demo` gives the records: (training items, held-out items as the validation split).
    """
    if cfg.data is None:
        if demo is None:
            raise DataError("no --data given")
        return InstructRecords(Split(demo[0], demo[1], []))
    read = read_records(cfg.data, cfg.skip_bad, cfg.columns, cfg.data_split, cfg.data_files)
    got = InstructRecords(Split([], [], []), read.n_skipped, list(read.problems), list(read.notes))
    if cfg.val_data is None:
        got.parts = split_records(read.records, cfg.val_frac, cfg.test_frac, cfg.seed)
        return got
    # a hub dataset as --val-data: its validation split (where its files name splits)
    val_read = read_records(cfg.val_data, cfg.skip_bad, cfg.columns, default_split="validation")
    got.n_skipped += val_read.n_skipped
    got.problems += val_read.problems
    got.notes += val_read.notes
    got.parts = split_records(read.records, 0.0, cfg.test_frac, cfg.seed)._replace(val=val_read.records)
    return got


def load_instruct_data(cfg: RunConfig, max_seq_len: int, tokenizer: Tokenizer | Encode | None = None,
                       demo: tuple[list[Record], list[Record]] | None = None,
                       records: InstructRecords | None = None) -> InstructData:
    """Read, validate, split and tokenise `cfg.data` (and `cfg.val_data`) as `finetune` needs them.

    `tokenizer` is the model's (None: `load_tokenizer(cfg.model)`); `cfg.template` is resolved against
    it, so "auto" picks the model's chat template when it has one. `records`: what
    `read_instruct_records(cfg, demo)` already read (runs.py reads the data before loading the model);
    with no `cfg.data`, `demo` gives the records: (training items, held-out items as the validation
    split); runs.py passes the built-in demo's.
    """
    if tokenizer is None:
        from microft.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    template = _resolve(cfg.template, tokenizer)
    got = records if records is not None else read_instruct_records(cfg, demo)
    out: dict[str, list[Sample]] = {}
    stats: dict[str, BuildStats] = {}
    for name, recs in got.parts._asdict().items():
        out[name], stats[name] = build_samples(recs, template, tokenizer, max_seq_len, cfg.mask_prompt)
    if not out["train"]:
        raise DataError(f"no training samples left: all {stats['train'].n_dropped} were cut away by "
                        f"max_seq_len={max_seq_len}; raise --max-seq-len or shorten the prompts")
    if cfg.val_data is not None and not out["val"]:  # asked-for validation must not vanish without a word
        raise DataError(f"no validation samples left in {cfg.val_data}: all {stats['val'].n_dropped} were "
                        f"cut away by max_seq_len={max_seq_len}; raise --max-seq-len or shorten the prompts")
    return InstructData(out["train"], out["val"], out["test"], stats, template, got.n_skipped, got.problems,
                        demo=cfg.data is None, notes=got.notes)
