"""The built-in demo dataset: small instruction tasks with exactly checkable answers.

`microft finetune` with no data trains on `demo_records` and evaluates on `demo_heldout`. Items are
generated offline and deterministically from a seed. Each task's item space is split in two by a
fixed hash of the item (about one item in five is held out), so held-out items never appear in
training whatever seeds are used: the held-out score measures generalisation, not recall.

Tasks (answers are a few tokens; every word and number is one token of the demo tokenizer):
  count     "How many words are in this list?" "apple river stone" -> "3"
  largest   "What is the largest of these numbers?" "42 7 19" -> "42"
  reverse   "apple river stone" -> "stone river apple"
  sort      "42 7 19" -> "7 19 42"
  passive   "The cat chased the dog." -> "The dog was chased by the cat."
  upper     "stone garden" -> "STONE GARDEN"
Two-digit addition and subtraction were dropped: over a held-out space of operand pairs they need
either carries learned digit by digit or a 2,500-entry table generalised, and a 1M-parameter model
reached only 5-10 % on them in the demo's budget (bench/demo_sweep.py).

The demo model is a small GPT-2-shaped model (DEMO_MODEL) with its own tokenizer
(`build_demo_tokenizer`, ~1.1k tokens), trained from random init: GPT-2's 50k-token head would cost
more than the whole rest of a model this size.
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from microft.data.instruct import Record

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from microft.data.tokenizer import Tokenizer as MicroftTokenizer
    from microft.models.config import ModelConfig

DEMO_TRAIN_SIZE = 10000
DEMO_HELDOUT_SIZE = 120
# Run settings `microft finetune` uses when given no model, data or recipe (flags still override).
# A 4-layer, 128-wide model on the demo tokenizer (0.94M parameters); `plain` keeps samples ~10-25
# tokens; samples are all about as long, so length grouping (which would make each batch one task) is
# off; fp32 because bf16 is emulated (~20x slower) on CPUs without AVX-512 BF16. Measured with
# bench/demo_sweep.py on the 2-core CPU: see README (the demo) for accuracy per seed and times.
DEMO_MODEL: dict[str, int] = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64}
# The batch is given as micro 32 of global 32 (accumulation 1): `--micro-bs 8` alone keeps 32 samples
# per step (accumulation 4); two batch flags replace the plan, as with a recipe (config.resolve_config).
DEMO_RUN: dict[str, object] = {
    "template": "plain",
    "max_seq_len": 48,
    "micro_bs": 32,
    "global_bs": 32,
    "lr": 2e-3,
    "warmup": 0.05,
    "weight_decay": 0.0,
    "group_by_length": False,
    "precision": "fp32",
    "max_steps": 2000,
    "eval_every": 500,  # val loss and a few generated answers while it trains
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


def _count(rng: random.Random) -> Item:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 6)))
    return "How many words are in this list?", words, str(len(words.split()))


def _largest(rng: random.Random) -> Item:
    nums = rng.sample(range(MAX_NUMBER + 1), rng.randint(3, 5))
    return "What is the largest of these numbers?", " ".join(map(str, nums)), str(max(nums))


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
    "count": _count, "largest": _largest, "reverse": _reverse, "sort": _sort, "passive": _passive,
    "upper": _upper,
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


# --------------------------------------------------------------------------- the demo's own tokenizer

EOS = "<|endoftext|>"
TOKENIZER_CORPUS_SIZE = 3000  # training items (seed 0, plain template) the BPE merges are learned from
TOKENIZER_TEMPLATE = "plain"


def build_demo_tokenizer() -> Tokenizer:
    """The demo model's byte-level BPE tokenizer, trained deterministically on demo training items.

    Every demo word becomes one token (~1k tokens in all, against GPT-2's 50k, whose LM head would
    dominate a tiny model's cost); digits stay single tokens so arithmetic and sorting work digit by
    digit; the 256-byte alphabet keeps any text encodable and decoding lossless. Only training items
    are read, never held-out ones. `EOS` is id 0. Saved with `.save(path)` it is a `tokenizer.json`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from microft.data.instruct import record_segments
    from microft.data.templates import load_template

    template = load_template(TOKENIZER_TEMPLATE)
    texts = ["".join(text for text, _ in record_segments(r, template))
             for r in demo_records(TOKENIZER_CORPUS_SIZE, seed=0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # a cap above what the corpus can reach: merging stops when every word is a single token
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def write_demo_tokenizer(directory: str | Path) -> list[str]:
    """Save the demo tokenizer into `directory` as `tokenizer.json` plus a `tokenizer_config.json` that
    names `EOS` as its bos/eos token (what `tokenizer.load_tokenizer` and transformers read).
    Files already there are kept. Returns the names written."""
    import json

    d = Path(directory)
    written = []
    if not (d / "tokenizer.json").exists():
        build_demo_tokenizer().save(str(d / "tokenizer.json"))
        written.append("tokenizer.json")
    if not (d / "tokenizer_config.json").exists():
        meta = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                "model_max_length": DEMO_MODEL["n_positions"]}
        (d / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def demo_tokenizer() -> MicroftTokenizer:
    """The demo tokenizer as microft's `Tokenizer` (exactly what `load_tokenizer` reads back from a
    saved demo model directory): EOS id 0 ends every sample and stops generation; no BOS is added."""
    import tempfile

    from microft.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="microft-demo-tok-") as d:
        write_demo_tokenizer(d)
        tok = load_tokenizer(d)  # reads the files fully; the directory may go
    tok.name = "demo"
    return tok


def demo_model_config(vocab_size: int) -> ModelConfig:
    """The demo model: GPT-2's layout at DEMO_MODEL's size over the demo tokenizer's `vocab_size` ids,
    declaring the tokenizer's EOS (id 0) as its bos/eos so a saved `config.json` says so."""
    from microft.models.config import ModelConfig

    return ModelConfig(name="demo", vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **DEMO_MODEL)


# the task whose answer shows most at a glance comes first when the model got several right
SHOWCASE_ORDER = ("reverse", "sort", "passive", "upper", "largest", "count")


def pick_example(records: Sequence[Record], predictions: Sequence[str]) -> tuple[Record | None, int]:
    """(a held-out record the model answered exactly right, how many it answered right); the record is
    None when it got none right. Reverse-the-words first (the answer is easy to check by eye)."""
    right = [r for r, p in zip(records, predictions, strict=True) if normalize(p) == normalize(r.response)]
    order = {t: i for i, t in enumerate(SHOWCASE_ORDER)}
    best = min(right, key=lambda r: order.get(task_of(r.source), len(order)), default=None)
    return best, len(right)


def next_steps(final_dir: str, template: str, example: Record | None, n_right: int,
               n_items: int) -> list[str]:
    """What the demo prints last: how to talk to the model it trained (in the prompt `template` it trained
    with) on a held-out `example` it answered right (`n_right` of `n_items`; with none right it says so
    instead of suggesting a command that answers wrongly), then how to train a real one."""
    import shlex

    if example is not None:
        cmd = (f"microft generate --model {shlex.quote(final_dir)} --template {shlex.quote(template)} "
               f"--temperature 0 --prompt {shlex.quote(example.instruction)}"
               + (f" --input {shlex.quote(example.input)}" if example.input else ""))
        first = (f"try it: {cmd}   (a held-out item it answered right: {example.response!r}; "
                 f"{n_right} of {n_items} right)")
    else:
        first = (f"it answered none of the {n_items} held-out items right, so there is no answer to "
                 "show yet: train longer (--max-steps) or try another --seed")
    return [
        first,
        "your data: microft download gpt2, then microft finetune --model openai-community/gpt2 --data "
        "my.jsonl --lora --out runs/mine   (Alpaca or chat JSONL; see README)",
        "a recipe: microft finetune --recipe recipes/gpt2-medium-lora.toml"
        "   (each recipe starts with its command)",
    ]
