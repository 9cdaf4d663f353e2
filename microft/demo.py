"""The built-in demo dataset: small instruction tasks with exactly checkable answers.

`microft finetune` with no data trains on `demo_records` and evaluates on `demo_heldout`. Items are
generated offline and deterministically from a seed. Each task's item space is split in two by a
fixed hash of the item (about one item in five is held out), so held-out items never appear in
training whatever seeds are used: the held-out score measures generalisation, not recall.

Tasks (answers are a few tokens; inputs use words that are single GPT-2 tokens):
  add, sub  "What is 47 + 8?" -> "55"
  reverse   "apple river stone" -> "stone river apple"
  sort      "42 7 19" -> "7 19 42"
  passive   "The cat chased the dog." -> "The dog was chased by the cat."
  upper     "stone garden" -> "STONE GARDEN"
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence

from microft.instruct import Record

DEMO_TRAIN_SIZE = 10000
DEMO_HELDOUT_SIZE = 120
# Run settings `microft finetune` uses when given no model, data or recipe (flags still override).
# gpt2-tiny from scratch: its GPT-2-sized vocabulary dominates the cost, and the 64-wide model learns
# these tasks about as well per sample as gpt2-mini at a quarter of the time. `plain` keeps samples
# ~20 tokens (alpaca's preamble would triple them); samples are all about as long, so length grouping
# (which would make each batch one task) is off. Measured with `--micro-bs 1 --accum 8` on the 2-core
# CPU: 1500 steps in ~5 minutes; the held-out exact match it reaches is stated once, in the README
# (passive voice and upper-casing are learned first; arithmetic and reversal need far more data).
DEMO_RUN: dict[str, object] = {
    "model": "gpt2-tiny",
    "template": "plain",
    "max_seq_len": 64,
    "micro_bs": 8,
    "accum": 1,
    "lr": 1e-2,
    "warmup": 0.05,
    "weight_decay": 0.0,
    "group_by_length": False,
    "precision": "fp32",
    "max_steps": 1500,
    "eval_every": 500,
}
HELDOUT_EVERY = 5  # one item in this many (by hash) belongs to the held-out space
MAX_NUMBER = 49  # operands and list items are 0..MAX_NUMBER

WORDS = (
    "apple river stone cloud garden window table candle forest bridge rocket pencil violin marble castle "
    "island desert jacket kettle ladder mirror needle orange pepper rabbit saddle tiger turtle wagon yellow "
    "anchor basket button camera circle dragon engine feather finger flower hammer helmet lemon lizard "
    "magnet monkey ocean pillow planet pocket puzzle ribbon salmon silver spider summer sunset tunnel valley "
    "wallet winter wizard bottle butter carpet cherry coffee cotton doctor"
).split()
NOUNS = (
    "cat dog teacher farmer bird child doctor king queen boy girl horse fox mouse lion baker student pilot"
).split()
VERBS = (  # (simple past, past participle)
    ("chased", "chased"), ("saw", "seen"), ("helped", "helped"), ("found", "found"), ("followed", "followed"),
    ("called", "called"), ("watched", "watched"), ("pushed", "pushed"), ("took", "taken"), ("met", "met"),
    ("heard", "heard"), ("painted", "painted"), ("visited", "visited"), ("thanked", "thanked"),
)

Item = tuple[str, str, str]  # (instruction, input, output)


def _add(rng: random.Random) -> Item:
    a, b = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
    return f"What is {a} + {b}?", "", str(a + b)


def _sub(rng: random.Random) -> Item:
    a, b = sorted((rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)), reverse=True)
    return f"What is {a} - {b}?", "", str(a - b)


def _reverse(rng: random.Random) -> Item:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return "Reverse the order of these words.", " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> Item:
    nums = rng.sample(range(MAX_NUMBER + 1), rng.randint(3, 5))
    shown, answer = " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))
    return "Sort these numbers from smallest to largest.", shown, answer


def _passive(rng: random.Random) -> Item:
    subj, obj = rng.sample(NOUNS, 2)
    past, participle = rng.choice(VERBS)
    return ("Rewrite this sentence in the passive voice.", f"The {subj} {past} the {obj}.",
            f"The {obj} was {participle} by the {subj}.")


def _upper(rng: random.Random) -> Item:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    return "Write these words in capital letters.", words, words.upper()


TASKS: dict[str, Callable[[random.Random], Item]] = {
    "add": _add, "sub": _sub, "reverse": _reverse, "sort": _sort, "passive": _passive, "upper": _upper,
}


def is_heldout(task: str, instruction: str, input: str) -> bool:
    """Whether an item belongs to the held-out space (a fixed hash, independent of any seed)."""
    return zlib.crc32(f"{task}\0{instruction}\0{input}".encode()) % HELDOUT_EVERY == 0


def _generate(n: int, seed: int, heldout: bool, tasks: Sequence[str] | None) -> list[Record]:
    names = list(tasks or TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; choose from {list(TASKS)}")
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    out: list[Record] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct held-out demo items from tasks {names}")
        task = names[len(out) % len(names)]  # round-robin keeps the task mix balanced
        instruction, inp, output = TASKS[task](rng)
        if is_heldout(task, instruction, inp) != heldout:
            continue
        if heldout:  # the evaluation set has no repeats; training may repeat an item
            if (task, instruction, inp) in seen:
                continue
            seen.add((task, instruction, inp))
        source = f"demo:{task}:{len(out)}"
        out.append(Record(instruction=instruction, input=inp, output=output, source=source))
    return out


def demo_records(n: int = DEMO_TRAIN_SIZE, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Record]:
    """`n` training items (tasks in round-robin order), never from the held-out space."""
    return _generate(n, seed, heldout=False, tasks=tasks)


def demo_heldout(
    n: int = DEMO_HELDOUT_SIZE, seed: int = 0, tasks: Sequence[str] | None = None
) -> list[Record]:
    """`n` distinct evaluation items from the held-out space: disjoint from every `demo_records` set."""
    return _generate(n, seed, heldout=True, tasks=tasks)


def task_of(source: str) -> str:
    """The task name of a demo record's source (`demo:add:17` -> `add`)."""
    parts = source.split(":")
    return parts[1] if len(parts) == 3 and parts[0] == "demo" else "other"


def normalize(text: str) -> str:
    """Collapse runs of whitespace and trim; case and punctuation are kept."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def exact_match_by_task(predictions: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """Exact match per demo task (plus `all`), keyed by task name."""
    groups: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for pred, rec in zip(predictions, records, strict=True):
        for key in (task_of(rec.source), "all"):
            groups[key][0].append(pred)
            groups[key][1].append(rec.response)
    return {k: exact_match(p, r) for k, (p, r) in groups.items()}
