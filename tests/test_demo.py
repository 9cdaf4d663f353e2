"""The demo: deterministic data with correct answers, held-out items disjoint from training, its own
tokenizer, and a shortened run through `runs.run_finetune` that must learn and leave a usable model."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from microft.config import RunConfig
from microft.data.demo import (
    DEMO_MODEL,
    DEMO_RUN,
    EOS,
    TASKS,
    WORDS,
    build_demo_tokenizer,
    demo_heldout,
    demo_model_config,
    demo_records,
    exact_match,
    exact_match_by_task,
    is_heldout,
    next_steps,
    pick_example,
    task_of,
    write_demo_tokenizer,
)
from microft.data.instruct import Record, build_samples
from microft.data.templates import BUILTIN_TEMPLATES

TOK = build_demo_tokenizer()


def encode(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False).ids


def check_answer(rec: Record) -> None:
    """Recompute the answer of a demo item from its question."""
    task = task_of(rec.source)
    if task == "count":
        assert rec.output == str(len(rec.input.split())) and 1 <= len(rec.input.split()) <= 6
    elif task == "largest":
        nums = [int(x) for x in rec.input.split()]
        assert rec.output == str(max(nums)) and 3 <= len(nums) <= 5
    elif task == "reverse":
        assert rec.output.split() == rec.input.split()[::-1] and 3 <= len(rec.input.split()) <= 5
    elif task == "sort":
        nums = [int(x) for x in rec.input.split()]
        assert rec.output == " ".join(str(x) for x in sorted(nums)) and 3 <= len(nums) <= 5
    elif task == "passive":
        subj, verb, obj = re.fullmatch(r"The (\w+) (\w+) the (\w+)\.", rec.input).groups()
        m = re.fullmatch(r"The (\w+) was (\w+) by the (\w+)\.", rec.output)
        assert m and (m[1], m[3]) == (obj, subj) and subj != obj
    elif task == "upper":
        assert rec.output == rec.input.upper() and rec.output != rec.input
    else:
        raise AssertionError(f"unknown task in {rec.source}")


def key(rec: Record) -> tuple[str, str, str]:
    return task_of(rec.source), rec.instruction, rec.input


def test_deterministic():
    assert demo_records(300, seed=1) == demo_records(300, seed=1)
    assert demo_records(300, seed=1) != demo_records(300, seed=2)
    assert demo_heldout(60, seed=1) == demo_heldout(60, seed=1)


def test_answers_are_correct():
    recs = demo_records(1200, seed=0) + demo_heldout(120, seed=0)
    for rec in recs:
        check_answer(rec)
    assert {task_of(r.source) for r in recs} == set(TASKS)


def test_balanced_task_mix():
    recs = demo_records(600, seed=5)
    counts = {t: sum(task_of(r.source) == t for r in recs) for t in TASKS}
    assert set(counts.values()) == {100}


def test_heldout_disjoint_from_any_training_set():
    held = demo_heldout(120, seed=0)
    assert len({key(r) for r in held}) == 120  # no repeats in the evaluation set
    train_keys = {key(r) for seed in (0, 1, 2) for r in demo_records(2000, seed)}
    assert not train_keys & {key(r) for r in held}
    assert all(is_heldout(*key(r)) for r in held)


def test_tasks_subset_and_unknown():
    recs = demo_records(10, seed=0, tasks=["reverse"])
    assert {task_of(r.source) for r in recs} == {"reverse"}
    with pytest.raises(ValueError, match="unknown demo task"):
        demo_records(10, tasks=["poetry"])


def test_exact_match():
    assert exact_match([" 7 19  42\n", "stone"], ["7 19 42", "STONE"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])
    recs = demo_records(12, seed=0)
    scores = exact_match_by_task([r.output for r in recs[:6]] + ["x"] * 6, recs)
    assert scores["all"] == 0.5 and set(scores) == set(TASKS) | {"all"}


def test_demo_tokenizer_is_deterministic_small_and_lossless():
    again = build_demo_tokenizer()
    assert again.to_str() == TOK.to_str()  # the same merges every time (the sweep checked across processes)
    assert TOK.token_to_id(EOS) == 0 and TOK.get_vocab_size() < 1500
    for rec in demo_records(300, seed=3) + demo_heldout(60, seed=3):
        text = f"{rec.instruction}\n{rec.input}\n{rec.output}"
        assert TOK.decode(encode(text)) == text
    for word in WORDS:  # every demo word (after a space) and its capitals (starting a line) is one token
        assert len(encode(" " + word)) == 1 and len(encode(word.upper())) == 1
    # bytes fall back
    assert TOK.decode(encode("Any text, even ünïcode 🙂")) == "Any text, even ünïcode 🙂"


def test_saved_tokenizer_files_load_as_the_demo_tokenizer(tmp_path):
    """What every saved demo model dir carries: microft and transformers both read EOS = 0 and TOK's ids."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer

    from microft.data.tokenizer import load_tokenizer

    assert write_demo_tokenizer(tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    assert write_demo_tokenizer(tmp_path) == []  # files already there are kept
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.eos_ids == [0] and ours.bos_id == 0 and ours.prefix == []
    assert ours.vocab_size == TOK.get_vocab_size()
    assert theirs.eos_token_id == 0 and theirs.bos_token_id == 0
    text = "Sort these numbers from smallest to largest.\n42 7 19\n7 19 42"
    assert ours.encode(text) == encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(EOS) != [0]  # data can't inject the end token


def test_demo_items_feed_the_pipeline():
    from microft.data.demo import demo_tokenizer

    samples, stats = build_samples(demo_records(60, seed=0), "plain", demo_tokenizer(), max_seq_len=48)
    assert stats.n_samples == 60 and stats.n_truncated == 0
    assert stats.max_len < 40  # short items: a tiny model trains on them quickly
    assert all(s["labels"][-1] == 0 for s in samples)  # every sample ends with the demo tokenizer's EOS
    assert all(encode(s["response"]) == [t for t in s["labels"][:-1] if t >= 0] for s in samples)


def test_demo_run_settings_are_a_valid_config():
    cfg = RunConfig(**DEMO_RUN)
    assert cfg.template in BUILTIN_TEMPLATES and cfg.data is None and cfg.model is None
    samples, stats = build_samples(demo_records(600, seed=0), cfg.template, encode, cfg.max_seq_len)
    assert stats.n_truncated == 0 and stats.max_len < cfg.max_seq_len <= DEMO_MODEL["n_positions"]
    mc = demo_model_config(TOK.get_vocab_size())
    assert (mc.bos_token_id, mc.eos_token_id, mc.vocab_size) == (0, 0, TOK.get_vocab_size())


def test_next_steps_name_the_run_and_an_item_it_got_right_or_say_it_got_none():
    held = demo_heldout(12, seed=0)
    preds = ["wrong"] * 12
    assert pick_example(held, preds) == (None, 0)
    none = next_steps("runs/demo-x/final", "plain", None, 0, 12)
    assert "none of the 12 held-out items right" in none[0] and "generate" not in none[0]
    assert any("--data" in line for line in none)
    preds[0] = held[0].output  # a count item
    rev = next(i for i, r in enumerate(held) if task_of(r.source) == "reverse")
    preds[rev] = "  " + held[rev].output  # whitespace does not count, as in the score
    example, n = pick_example(held, preds)
    assert n == 2 and example is held[rev]  # reverse-the-words first: its answer is checked at a glance
    lines = next_steps("runs/demo x/final", "plain", example, n, 12)
    args = shlex.split(lines[0].removeprefix("try it: ").split("   (")[0])
    assert args[:4] == ["microft", "generate", "--model", "runs/demo x/final"]
    assert args[args.index("--template") + 1] == "plain"  # the demo's own template
    assert args[args.index("--prompt") + 1] == example.instruction
    assert args[args.index("--input") + 1] == example.input
    assert "2 of 12 right" in lines[0] and repr(example.output) in lines[0]
    # --model gpt2-tiny
    assert "--template alpaca " in next_steps("runs/x/final", "alpaca", example, n, 12)[0]


# A shortened demo (the same model, tokenizer and settings; fewer steps and items), run once for the
# tests below. Chance is ~0 % exact match; seed 0 reached 20 % (0 % before) in 61 s of training at
# load average 10 on the 2-core CI machine (bench/demo_sweep.py --short --seeds 0).
SHORT_STEPS, SHORT_TRAIN, SHORT_HELDOUT, SHORT_MIN_ACCURACY = 400, 4000, 60, 0.1


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    import torch

    import microft.data.demo as demo
    from microft.runs import run_finetune

    out = tmp_path_factory.mktemp("demo") / "run"
    cfg = RunConfig(**{**DEMO_RUN, "max_steps": SHORT_STEPS, "eval_every": SHORT_STEPS, "out": str(out),
                       "seed": 0, "predict": True, "log_format": "plain"})
    sizes = demo.DEMO_TRAIN_SIZE, demo.DEMO_HELDOUT_SIZE
    threads = torch.get_num_threads()
    demo.DEMO_TRAIN_SIZE, demo.DEMO_HELDOUT_SIZE = SHORT_TRAIN, SHORT_HELDOUT
    events: list[dict] = []
    try:
        summary = run_finetune(cfg, events.append)
    finally:
        demo.DEMO_TRAIN_SIZE, demo.DEMO_HELDOUT_SIZE = sizes
        torch.set_num_threads(threads)
    return out, summary, events


def test_short_demo_learns_well_above_chance(short_demo):
    out, summary, events = short_demo
    assert summary["demo_accuracy_before"] < 0.05
    assert summary["demo_accuracy_after"] >= SHORT_MIN_ACCURACY, summary
    notes = [e["text"] for e in events if e["kind"] == "note"]
    assert any("exact match after training" in n for n in notes)
    assert notes[-len(summary["next_steps"]):] == summary["next_steps"]  # what to do next comes last
    assert str(out / "final") in summary["next_steps"][0] and "--template plain " in summary["next_steps"][0]
    n_right = round(summary["demo_accuracy_after"] * SHORT_HELDOUT)
    assert f"{n_right} of {SHORT_HELDOUT} right" in summary["next_steps"][0]
    banner = next(e for e in events if e["kind"] == "banner")
    assert "own 1088-token tokenizer" in json.dumps(banner)


def test_final_dir_generates_through_the_cli(short_demo):
    """`microft generate` on final/ (config.json + the demo tokenizer files) answers as the run did."""
    from typer.testing import CliRunner

    from microft.cli import app
    from microft.data.tokenizer import load_tokenizer

    out, summary, _ = short_demo
    final = out / "final"
    saved = json.loads((final / "config.json").read_text())["model"]
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["vocab_size"]) == (0, 0, TOK.get_vocab_size())
    assert load_tokenizer(final).eos_ids == [0]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    held = demo_heldout(SHORT_HELDOUT, seed=0)
    assert [r["reference"] for r in rows] == [r.output for r in held]
    # the command the demo suggests answers what it promises: a held-out item's right answer
    line = summary["next_steps"][0]
    args = shlex.split(line.removeprefix("try it: ").split("   (")[0])
    res = CliRunner().invoke(app, [*args[1:], "--max-new-tokens", "32", "--json"])
    assert res.exit_code == 0, res.output
    answer = json.loads(res.output)["completion"]
    assert repr(answer.strip()) in line and answer.strip() in {r.output for r in held}
    for rec, row in list(zip(held, rows, strict=True))[:4]:
        res = CliRunner().invoke(app, ["generate", "--model", str(final), "--template", "plain",
                                       "--temperature", "0", "--prompt", rec.instruction, "--input",
                                       rec.input, "--max-new-tokens", "128", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["completion"] == row["prediction"]


def test_demo_batch_plan_follows_recipe_rules():
    """The bare demo's plan is 32 x 1; one batch flag keeps its global batch, two replace the plan."""
    from typer.testing import CliRunner

    from microft.cli import app

    def plan(*flags: str) -> str:
        res = CliRunner().invoke(app, ["finetune", *flags, "--dry-run"])
        assert res.exit_code == 0, res.output
        return res.output.split("Effective batch: ")[1].splitlines()[0]

    assert plan() == "32 = 32 (micro) × 1 (accum) × 1 (device)"
    assert plan("--micro-bs", "8") == "32 = 8 (micro) × 4 (accum) × 1 (device)"
    assert plan("--micro-bs", "1", "--accum", "8") == "8 = 1 (micro) × 8 (accum) × 1 (device)"


def test_estimate_mem_of_the_demo_recipe(tmp_path):
    """A recipe without a model (recipes/demo.toml) is estimated on the demo's model: the same answer as
    for that model's config.json with the recipe's settings."""
    from pathlib import Path

    from typer.testing import CliRunner

    from microft.cli import app

    recipe = Path(__file__).parent.parent / "recipes" / "demo.toml"
    (tmp_path / "config.json").write_text(json.dumps(
        {"format": "microft", "model": demo_model_config(TOK.get_vocab_size()).model_dump()}))
    peaks = []
    for args in (["--recipe", str(recipe)],
                 ["--model", str(tmp_path), "--micro-bs", "32", "--global-bs", "32",
                                             "--max-seq-len", "48", "--precision", "fp32"]):
        res = CliRunner().invoke(app, ["estimate-mem", *args, "--json"])
        assert res.exit_code == 0, res.output
        peaks.append(json.loads(res.output)["peak_bytes"])
    assert peaks[0] == peaks[1]


def test_data_without_model_is_not_the_demo_model(tmp_path):
    """The demo's tokenizer only knows the demo's words: --data without --model trains gpt2-tiny."""
    from microft.runs import run_finetune

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                            for w in WORDS[:12]))
    cfg = RunConfig(data=str(data), max_steps=1, micro_bs=2, out=str(tmp_path / "o"), log_format="plain")
    summary = run_finetune(cfg, lambda e: None)
    final = tmp_path / "o" / "final"
    assert json.loads((final / "config.json").read_text())["model"]["name"] == "gpt2-tiny"
    assert not (final / "tokenizer.json").exists() and "demo_accuracy_after" not in summary
