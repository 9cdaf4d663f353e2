"""Preference data: pairs of a chosen and a rejected response to one prompt, read, validated and tokenised.

A record (any format of `formats.FORMATS`, a file or a directory, as `finetune` reads them) is one of
  - the book's: {"instruction": str, "input": str (optional), "chosen": str, "rejected": str}
  - {"prompt": str, "chosen": str, "rejected": str}
  - conversational: "chosen" and "rejected" message lists (their last message the assistant's response)
    after a shared prompt: "prompt" as a message list or a string (one user turn), or no prompt at all
    when both lists carry the same earlier turns (those are the prompt).
A pair becomes two `instruct.Record`s with the same prompt, tokenised exactly as `finetune` tokenises a
record (`--template`: a text template renders the prompt, the model's chat template renders messages), so a
prompt looks the same to `dpo` as to the SFT run before it. The scored tokens of each side are its final
response only: the response text and the end-of-turn token (a text template's `response_end` and EOS; a chat
template's tokens up to its end-of-turn marker, whatever the template writes after it left out, as finetune
leaves it out). Bad pairs (a side empty or missing, both sides the same, a prompt leaving no room for a
response within --max-seq-len) are one line each, refused or skipped and counted with --skip-bad.

A pair sample is {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "input_ids", "prompt",
"chosen", "rejected", "source"}: labels are already shifted, IGNORE_INDEX off the response; "input_ids" is
the two sides' ids end to end, only so that `data.sample_length` counts a pair's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microft.data.formats import Bad, read_table
from microft.data.instruct import (
    Message,
    Record,
    _Bad,
    _get_str,
    _record_object,
    _resolve,
    as_data_error,
    build_sample,
    data_files,
    parse_messages,
    refuse_bad_records,
    split_records,
)
from microft.errors import DataError
from microft.models.config import IGNORE_INDEX

if TYPE_CHECKING:
    from microft.config import RunConfig

Sample = dict[str, Any]


@dataclass(frozen=True)
class Pair:
    """One validated preference record: the chosen and the rejected side as records with the same prompt."""

    chosen: Record
    rejected: Record
    source: str = ""


def _messages(value: object, key: str) -> tuple[Message, ...]:
    return tuple(parse_messages(value, key))


def _side(obj: dict, key: str) -> str | tuple[Message, ...]:
    """A side as given: a string, or a message list ending with the assistant's non-empty response."""
    if key not in obj:
        raise _Bad(f"missing key {key!r}")
    value = obj[key]
    if isinstance(value, str):
        text = _get_str(obj, key)
        if not text.strip():
            raise _Bad(f"{key!r} is empty")
        return text
    msgs = _messages(value, key)
    if msgs[-1].role != "assistant":
        raise _Bad(f"the last message of {key!r} must be from the assistant (it is the response)")
    if not msgs[-1].content.strip():
        raise _Bad(f"{key}[{len(msgs) - 1}]: the assistant's response is empty")
    return msgs


def parse_pair(obj: object, source: str = "") -> Pair:
    """Validate one decoded record as a preference pair; raises DataError (message without location)."""
    return as_data_error(_parse_pair, obj, source)


def _parse_pair(obj: object, source: str) -> Pair:
    obj = _record_object(obj)
    if "chosen" not in obj or "rejected" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise _Bad(f"expected 'chosen' and 'rejected' (with 'prompt' or 'instruction'); keys found: {keys}")
    chosen, rejected = _side(obj, "chosen"), _side(obj, "rejected")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are the same: the pair prefers nothing")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _Bad("'chosen' and 'rejected' must both be strings or both message lists")
    if "instruction" in obj or isinstance(chosen, str) and not isinstance(obj.get("prompt"), list):
        instruction = _get_str(obj, "instruction" if "instruction" in obj else "prompt")
        if not instruction.strip():
            raise _Bad("'instruction' is empty" if "instruction" in obj else "'prompt' is empty")
        inp = _get_str(obj, "input", optional=True)
        if isinstance(chosen, str):
            return Pair(Record(instruction=instruction, input=inp, output=chosen, source=source),
                        Record(instruction=instruction, input=inp, output=rejected, source=source), source)
        user = instruction + (f"\n\n{inp}" if inp.strip() else "")
        return _chat_pair((Message("user", user),), chosen, rejected, source)
    prompt = _prompt_messages(obj, chosen, rejected)
    if isinstance(chosen, str):
        chosen, rejected = (Message("assistant", chosen),), (Message("assistant", rejected),)
    return _chat_pair(prompt, chosen, rejected, source)


def _prompt_messages(obj: dict, chosen: Any, rejected: Any) -> tuple[Message, ...]:
    """The shared prompt of a conversational pair: "prompt" (a message list or a user turn), or the earlier
    turns both sides repeat."""
    if "prompt" not in obj:
        if chosen[:-1] != rejected[:-1] or not chosen[:-1]:
            raise _Bad("no 'prompt', and 'chosen' and 'rejected' do not share their earlier turns; give the "
                       "prompt as 'prompt'")
        return ()
    if isinstance(obj["prompt"], str):
        text = _get_str(obj, "prompt")
        if not text.strip():
            raise _Bad("'prompt' is empty")
        return (Message("user", text),)
    return _messages(obj["prompt"], "prompt")


def _chat_pair(prompt: tuple[Message, ...], chosen: tuple[Message, ...], rejected: tuple[Message, ...],
               source: str) -> Pair:
    return Pair(Record(messages=prompt + chosen, source=source),
                Record(messages=prompt + rejected, source=source), source)


@dataclass
class PairRead:
    pairs: list[Pair]
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)


def read_pairs(path: str, skip_bad: bool = False) -> PairRead:
    """Every pair under `path` (a file or a directory, any record format); a bad record is refused with its
    location and how many more there are, or with `skip_bad` skipped and counted."""
    problems: list[str] = []
    pairs: list[Pair] = []
    for f in data_files(path):
        name = str(f)
        for row in read_table(f, name).rows:
            if isinstance(row.value, Bad):
                problems.append(f"{name}: {row.where}: {row.value.problem}")
                continue
            try:
                pairs.append(_parse_pair(row.value, row.source))
            except _Bad as e:
                problems.append(f"{name}: {row.where}: {e}")
    _refuse_bad(path, pairs, problems, skip_bad)
    return PairRead(pairs, len(problems), problems)


def _refuse_bad(path: str, pairs: list, problems: list[str], skip_bad: bool) -> None:
    """finetune's rule: a bad record is refused (the first named, the rest counted) unless skipped."""
    refuse_bad_records(problems, skip_bad)
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({len(problems)} bad record(s) skipped)")


def final_response_only(labels: list[int]) -> list[int]:
    """`labels` with only their last run of targets kept: a prompt's earlier assistant turns are context."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:]


def build_pair(pair: Pair, template: Any, tok: Any, max_seq_len: int) -> Sample:
    """The pair sample of `pair`, each side encoded as `finetune` encodes a record; raises `_Bad` when the
    prompt leaves no room for a response within `max_seq_len`."""
    sides = {}
    for name, record in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        sample, _ = build_sample(record, template, tok, max_seq_len, mask_prompt=True)
        if sample is None:
            raise _Bad(f"the prompt fills --max-seq-len {max_seq_len}, leaving no room for the {name} "
                       "response; raise --max-seq-len or shorten the prompt")
        sides[name] = sample
    c, r = sides["chosen"], sides["rejected"]
    return {"chosen_ids": c["input_ids"], "chosen_labels": final_response_only(c["labels"]),
            "rejected_ids": r["input_ids"], "rejected_labels": final_response_only(r["labels"]),
            "input_ids": c["input_ids"] + r["input_ids"], "prompt": c["prompt"],
            "chosen": pair.chosen.response, "rejected": pair.rejected.response, "source": pair.source}


@dataclass
class PairData:
    """Pair samples of each split, the template that rendered them, and what was skipped."""

    train: list[Sample]
    val: list[Sample]
    template: Any
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)


def load_pairs(cfg: RunConfig, max_seq_len: int, tok: Any,
               read: tuple[PairRead, PairRead | None]) -> PairData:
    """Split (a seeded --val-frac, or --val-data) and tokenise the pairs `read` (train, validation file)."""
    template = _resolve(cfg.template, tok)
    train_read, val_read = read
    if val_read is None:
        parts = split_records(train_read.pairs, cfg.val_frac, 0.0, cfg.seed)
        splits = {"train": parts.train, "val": parts.val}
    else:
        splits = {"train": train_read.pairs, "val": val_read.pairs}
    problems = list(train_read.problems) + (val_read.problems if val_read else [])
    out: dict[str, list[Sample]] = {"train": [], "val": []}
    for name, pairs in splits.items():
        for pair in pairs:
            try:
                out[name].append(build_pair(pair, template, tok, max_seq_len))
            except _Bad as e:
                problems.append(f"{pair.source}: {e}")
    n_built = len(problems) - len(train_read.problems) - (len(val_read.problems) if val_read else 0)
    if n_built and not cfg.skip_bad:
        first = problems[len(problems) - n_built]
        more = f" (and {n_built - 1} more)" if n_built > 1 else ""
        raise DataError(f"{first}{more}; pass --skip-bad to skip such pairs")
    if not out["train"]:
        raise DataError(f"no training pairs left: all were cut away by --max-seq-len {max_seq_len}")
    return PairData(out["train"], out["val"], template, len(problems), problems)
